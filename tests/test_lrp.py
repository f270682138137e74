"""tdfunc.lrp against zennit 0.5.1 (rule by rule, composites), a slow layer-by-layer reference from
the papers, relevance conservation (hypothesis), and the exact gradient of the relevance w.r.t. the
weights (which the one-pass ``.detach()`` rewrite gets wrong).

zennit imports torchvision, which cannot be installed beside the CPU torch wheel here; it is
installed with ``pip install --no-deps zennit==0.5.1`` and given a stub ``torchvision`` package
(empty classes zennit uses only for ``isinstance``) for its import.  zennit is a test-only oracle.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict
from torch import nn
from torch.func import vmap

import tdfunc
from tdfunc.lrp_rules import alpha_beta as lrp_alpha_beta
from tdfunc.lrp_rules import epsilon as lrp_epsilon
from tdfunc.lrp_rules import flat as lrp_flat
from tdfunc.lrp_rules import gamma as lrp_gamma
from tdfunc.lrp_rules import gradient as lrp_pass
from tdfunc.lrp_rules import wsquare as lrp_wsquare
from tdfunc.lrp_rules import zbox as lrp_zbox
from tdfunc.lrp_rules import zplus as lrp_zplus

DT = torch.float64
lrp = tdfunc.attribution._lrp.lrp


def zennit_lrp(z, model, x, composite):
    """Every class's relevance from zennit, with output relevance f_k(x) (attr_output = output × one-hot)."""
    maps = []
    with z.attribution.Gradient(model=model, composite=composite) as attributor:
        n = model(x).flatten(1).shape[1]
        for k in range(n):
            _, rel = attributor(x, lambda o: o * (torch.arange(n).view(o[0].shape) == k).to(o.dtype))
            maps.append(rel)
    return torch.stack(maps, 1)


def ours(model, x, **kw):
    td = TensorDict({"x": x}, batch_size=[x.shape[0]])
    return lrp(lambda t: model(t["x"]).flatten(1), td, model, **kw)["attr", "x"]


class Single(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class ReluMLP(nn.Module):
    def __init__(self, d_in=5, d_h=7, d_out=3, bias=True):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(d_in, d_h, bias=bias), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(d_h, d_h, bias=bias), nn.ReLU()
        self.head = nn.Linear(d_h, d_out, bias=bias)

    def forward(self, x):
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


class ReluCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(2, 3, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(3, 4, 3, stride=2), nn.ReLU()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.act2(self.conv2(self.act1(self.conv1(x)))).flatten(1))


RULES = {
    "epsilon": (lambda: lrp_epsilon(0.1), lambda r: r.Epsilon(0.1)),
    "epsilon0": (lambda: lrp_epsilon(0.0), lambda r: r.Epsilon(0.0)),
    "zplus": (lrp_zplus, lambda r: r.ZPlus()),
    "alpha_beta": (lambda: lrp_alpha_beta(2, 1), lambda r: r.AlphaBeta(2.0, 1.0)),
    "alpha1_beta0": (lambda: lrp_alpha_beta(1, 0), lambda r: r.AlphaBeta(1.0, 0.0)),
    "gamma": (lambda: lrp_gamma(0.3), lambda r: r.Gamma(0.3)),
    "flat": (lrp_flat, lambda r: r.Flat()),
    "wsquare": (lrp_wsquare, lambda r: r.WSquare()),
}


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("name", list(RULES))
def test_rule_matches_zennit(zennit, name, kind):
    torch.manual_seed(0)
    layer, x = (
        (nn.Linear(5, 4), torch.randn(3, 5))
        if kind == "linear"
        else (nn.Conv2d(2, 2, 3, padding=1), torch.randn(2, 2, 3, 3))
    )
    m, x = Single(layer.to(DT)), x.to(DT)
    ours_rule, zen_rule = RULES[name]
    zr = zen_rule(zennit.rules)
    comp = zennit.core.Composite(module_map=lambda ctx, n, mod: zr if isinstance(mod, (nn.Linear, nn.Conv2d)) else None)
    want = zennit_lrp(zennit, m, x, comp)
    got = ours(m, x, rules={type(layer): ours_rule()}, composite=None)
    torch.testing.assert_close(got, want.to(DT), rtol=0, atol=1e-13)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_plus_flat"])
def test_composites_match_zennit(zennit, model, composite):
    torch.manual_seed(1)
    m = (ReluMLP() if model == "mlp" else ReluCNN()).to(DT)
    x = torch.randn(4, 5, dtype=DT) if model == "mlp" else torch.randn(2, 2, 6, 6, dtype=DT)
    zc = {"epsilon_plus": zennit.composites.EpsilonPlus, "epsilon_plus_flat": zennit.composites.EpsilonPlusFlat}[
        composite
    ]
    want = zennit_lrp(zennit, m, x, zc())
    got = ours(m, x, composite=composite)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_epsilon_composite_matches_zennit(zennit):
    torch.manual_seed(2)
    m, x = ReluCNN().to(DT), torch.randn(2, 2, 6, 6, dtype=DT)
    comp = zennit.core.Composite(
        module_map=lambda ctx, n, mod: zennit.rules.Epsilon() if isinstance(mod, (nn.Linear, nn.Conv2d)) else None
    )
    torch.testing.assert_close(ours(m, x, composite="epsilon"), zennit_lrp(zennit, m, x, comp), rtol=0, atol=1e-13)


# ------------------------------------------------------------------ a user-written rule and composite


class UserZPlus(tdfunc.lrp_rules.Rule):
    """z⁺ written only against the public protocol: ``R_in = x ⊙ ∂(W⁺x⁺ + W⁻x⁻)/∂x ᵀ (R / stab(W⁺x⁺ + W⁻x⁻ + b⁺))``."""

    modules, targets = (nn.Linear, nn.Conv2d), "nn.Linear and nn.Conv2d"

    @staticmethod
    def _apply(m, x, w):
        if isinstance(m, nn.Conv2d):
            return torch.nn.functional.conv2d(x, w, None, m.stride, m.padding, m.dilation, m.groups)
        return torch.nn.functional.linear(x, w)

    def _y(self, m, x):
        return self._apply(m, x.clamp(min=0), m.weight.clamp(min=0)) + self._apply(
            m, x.clamp(max=0), m.weight.clamp(max=0)
        )

    def record(self, m, args, kwargs, z):
        y = self._y(m, args[0])
        den = y + m.bias.clamp(min=0).view(-1, *[1] * (z.dim() - 2))
        r = z / torch.where(den >= 0, den + 1e-6, den - 1e-6)
        return z.clone(), r, r * y

    def rewrite(self, m, args, kwargs, out, c):
        z, r, s = c
        return z - s + r * self._y(m, args[0])


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_user_rule_matches_zennit(zennit, model):
    torch.manual_seed(8)
    m = (ReluMLP() if model == "mlp" else ReluCNN()).to(DT)
    x = torch.randn(4, 5, dtype=DT) if model == "mlp" else torch.randn(2, 2, 6, 6, dtype=DT)
    comp = zennit.core.Composite(
        module_map=lambda ctx, n, mod: zennit.rules.ZPlus() if isinstance(mod, (nn.Linear, nn.Conv2d)) else None
    )
    want = zennit_lrp(zennit, m, x, comp)
    got = ours(m, x, rules={nn.Linear: UserZPlus(), nn.Conv2d: UserZPlus()}, composite=None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    torch.testing.assert_close(got, ours(m, x, rules={nn.Module: lrp_zplus()}, composite=None), rtol=0, atol=1e-14)
    assert repr(UserZPlus()) == "UserZPlus()"
    with pytest.raises(tdfunc.AttributionError) as e:
        ours(m, x, rules={nn.ReLU: UserZPlus()})
    assert str(e.value).startswith(
        "tdfunc.lrp: rules gives ReLU the rule UserZPlus(), which applies to nn.Linear and nn.Conv2d only"
    )  # UserZPlus's own targets


def test_composite_objects():
    torch.manual_seed(9)
    m, x = ReluCNN().to(DT), torch.randn(2, 2, 6, 6, dtype=DT)
    L = tdfunc.lrp_rules
    want = ours(m, x, composite="epsilon_plus_flat")
    torch.testing.assert_close(ours(m, x, composite=L.COMPOSITES["epsilon_plus_flat"]), want, rtol=0, atol=0)
    mine = L.Composite("mine", {nn.Conv2d: L.zplus(), nn.Linear: L.epsilon()}, first=L.flat())
    torch.testing.assert_close(ours(m, x, composite=mine), want, rtol=0, atol=0)
    assert repr(mine) == (
        "Composite('mine', {Conv2d: tdfunc.lrp_rules.zplus(stabilizer=1e-06), Linear: tdfunc.lrp_rules.epsilon(eps=1e-06)}, "
        "first=tdfunc.lrp_rules.flat(stabilizer=1e-06))"
    )
    with pytest.raises(TypeError) as e:
        L.Composite("bad", {"conv1": L.zplus()})
    assert str(e.value) == (
        "tdfunc.lrp_rules.Composite: rules must map nn.Module subclasses to rules, e.g. {nn.Linear: "
        "tdfunc.lrp_rules.epsilon()}; got 'conv1': tdfunc.lrp_rules.zplus(stabilizer=1e-06)."
    )
    with pytest.raises(tdfunc.AttributionError) as e:
        L.Composite("bad", {nn.ReLU: L.zplus()})
    assert str(e.value) == (
        "tdfunc.lrp_rules.Composite: rules gives ReLU the rule tdfunc.lrp_rules.zplus(stabilizer=1e-06), which "
        "applies to nn.Linear and nn.ConvNd / nn.ConvTransposeNd only."
    )
    with pytest.raises(TypeError) as e:
        L.Composite("bad", {}, first="flat")
    assert str(e.value) == "tdfunc.lrp_rules.Composite: first must be a rule or None, got str ('flat')."


# ------------------------------------------------------------------ slow reference from the papers


def _stab(d, eps):
    return d + eps * torch.where(d >= 0, 1.0, -1.0).to(d)


def slow_lrp(m: ReluMLP, x: torch.Tensor, k: int, rule: str, eps: float = 1e-6) -> torch.Tensor:
    """Explicit relevance propagation through ``m``'s Linear layers (Bach et al. 2015; Montavon et al. 2017).

    Forward keeps every layer input a; backward, from R = f_k(x) e_k at the output:
    ε:  R_i = Σ_j a_i w_ji R_j / (z_j + ε sign z_j);  z⁺:  R_i = Σ_j (a_i⁺ w_ji⁺ + a_i⁻ w_ji⁻) R_j / z'_j
    with z'_j = Σ_i (a_i⁺ w_ji⁺ + a_i⁻ w_ji⁻) + b_j⁺.  ReLU passes R unchanged.  One example, plain loops.
    """
    layers = [m.fc1, m.fc2, m.head]
    acts = [x]
    for i, lin in enumerate(layers):
        z = lin.weight @ acts[-1] + lin.bias
        acts.append(z.clamp(min=0) if i < 2 else z)
    R = torch.zeros_like(acts[-1])
    R = R + torch.nn.functional.one_hot(torch.tensor(k), R.shape[0]).to(R) * acts[-1][k]
    for lin, a in zip(reversed(layers), reversed(acts[:-1])):
        w, b = lin.weight, lin.bias
        rows = []
        for i in range(a.shape[0]):
            tot = 0.0
            for j in range(w.shape[0]):
                if rule == "epsilon":
                    zj = (w[j] * a).sum() + b[j]
                    tot = tot + a[i] * w[j, i] * R[j] / _stab(zj, eps)
                else:
                    cij = lambda ii: a[ii].clamp(min=0) * w[j, ii].clamp(min=0) + a[ii].clamp(max=0) * w[j, ii].clamp(
                        max=0
                    )
                    zj = sum(cij(ii) for ii in range(a.shape[0])) + b[j].clamp(min=0)
                    tot = tot + cij(i) * R[j] / _stab(zj, eps)
            rows.append(tot)
        R = torch.stack(rows)
    return R


def _layer_rules(rule):
    return {nn.Linear: lrp_epsilon(0.05) if rule == "epsilon" else lrp_zplus()}


@pytest.mark.parametrize("rule", ["epsilon", "zplus"])
def test_matches_slow_reference(rule):
    torch.manual_seed(3)
    m = ReluMLP(4, 5, 3).to(DT)
    x = torch.randn(2, 4, dtype=DT)
    got = ours(m, x, rules=_layer_rules(rule), composite=None)
    eps = 0.05 if rule == "epsilon" else 1e-6
    want = torch.stack([torch.stack([slow_lrp(m, x[b], k, rule, eps) for k in range(3)]) for b in range(2)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


# ------------------------------------------------------------------ conservation (hypothesis)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), rule=st.sampled_from(["epsilon0", "zplus"]), scale=st.floats(0.1, 3.0))
def test_conservation_bias_free_relu(seed, rule, scale):
    g = torch.Generator().manual_seed(seed)
    m = ReluMLP(4, 6, 3, bias=False).to(DT)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    x = scale * torch.randn(5, 4, generator=g, dtype=DT)
    # z+ conserves where its denominator z'_j > 0: after a ReLU, R_j != 0 needs z_j > 0, and z'_j >= z_j.
    # The (signed) output layer can have z'_k = 0 < |z_k|, so it gets LRP-0 there, as z+ is used in practice.
    r = lrp_epsilon(0.0) if rule == "epsilon0" else lrp_zplus(stabilizer=1e-12)
    R = ours(m, x, rules={"fc*": r, "head": lrp_epsilon(0.0)}, composite=None)  # (5, 3, 4)
    y = m(x)
    torch.testing.assert_close(R.sum(-1), y, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ the relevance's gradient w.r.t. weights


def _detach_lrp_eps(m, x, eps):
    """The one-pass ``.detach()`` rewrite: out = r z + ((1 - r) z).detach() with r = (z / stab z).detach()."""

    def rw(mod, args, kwargs, z):
        r = (z / _stab(z, eps)).detach()
        return r * z + ((1 - r) * z).detach()

    edits = {n: tdfunc.rule(rw) for n in ("fc1", "fc2", "head")}
    xs = x.detach().requires_grad_(True)
    y = tdfunc.functional_call(m, None, (xs,), edits=edits)[:, 0]
    (g,) = torch.autograd.grad(y.sum(), xs, create_graph=True)
    return x * g


@pytest.mark.parametrize("rule", ["epsilon", "zplus"])
def test_relevance_weight_gradient_exact(rule):
    torch.manual_seed(4)
    m = ReluMLP(4, 5, 3).to(DT)
    x = torch.randn(2, 4, dtype=DT)
    eps = 0.05 if rule == "epsilon" else 1e-6
    w = m.fc2.weight

    def loss_ours(weight):
        s = tdfunc.state(m).update({("fc2", "weight"): weight}, inplace=False)
        td = TensorDict({"x": x}, batch_size=[2])
        R = lrp(
            lambda t: tdfunc.functional_call(m, s, (t["x"],))[:, 0], td, m, rules=_layer_rules(rule), composite=None
        )
        return (R["attr", "x"] ** 2).sum()

    g_ours = torch.func.grad(loss_ours)(w.detach())
    (g_ref,) = torch.autograd.grad(sum((slow_lrp(m, x[b], 0, rule, eps) ** 2).sum() for b in range(2)), w)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-12)
    assert g_ref.abs().max() > 1e-2
    if rule == "epsilon":  # the .detach() trick: right relevance, wrong gradient of it
        R_det = _detach_lrp_eps(m, x, eps)
        torch.testing.assert_close(
            R_det, ours(m, x, rules=_layer_rules(rule), composite=None)[:, 0], rtol=0, atol=1e-14
        )
        (g_det,) = torch.autograd.grad((R_det**2).sum(), w)
        assert (g_det - g_ref).abs().max() > 0.1 * g_ref.abs().max()


def test_gradcheck_weights_and_inputs():
    torch.manual_seed(5)
    m = ReluMLP(3, 4, 2).to(DT)
    x = torch.randn(2, 3, dtype=DT, requires_grad=True)
    w = m.fc1.weight.detach().clone().requires_grad_(True)

    def f(x, w):
        s = tdfunc.state(m).update({("fc1", "weight"): w}, inplace=False)
        td = TensorDict({"x": x}, batch_size=[2])
        return lrp(
            lambda t: tdfunc.functional_call(m, s, (t["x"],)),
            td,
            m,
            composite="epsilon_plus",
            rules={"fc1": lrp_gamma()},
        )["attr", "x"]

    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))


# ------------------------------------------------------------------ calling shape


def test_targets_one_forward_and_vmap():
    torch.manual_seed(6)
    m = ReluCNN().to(DT)
    x = torch.randn(3, 2, 6, 6, dtype=DT)
    td = TensorDict({"x": x}, batch_size=[3])
    allk = lrp(lambda t: m(t["x"]), td, m)["attr", "x"]
    assert allk.shape == (3, 3, 2, 6, 6)
    for k in range(3):
        one = lrp(lambda t: m(t["x"])[:, k], td, m)["attr", "x"]
        torch.testing.assert_close(one, allk[:, k], rtol=0, atol=1e-15)

    def per_example(xi):
        t1 = TensorDict({"x": xi[None]}, batch_size=[1])
        return lrp(lambda t: m(t["x"]), t1, m)["attr", "x"][0]

    torch.testing.assert_close(vmap(per_example)(x), allk, rtol=0, atol=1e-14)


def test_rule_precedence_pattern_over_type_over_composite():
    torch.manual_seed(7)
    m = ReluMLP().to(DT)
    x = torch.randn(2, 5, dtype=DT)
    a = ours(m, x, rules={"head": lrp_epsilon(0.0), nn.Linear: lrp_zplus()}, composite="epsilon")
    b = ours(m, x, rules={"fc*": lrp_zplus(), "head": lrp_epsilon(0.0)}, composite=None)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    plain = ours(m, x, composite=None)  # no rewrite: input × gradient
    xg = tdfunc.input_x_gradient(lambda t: m(t["x"]), TensorDict({"x": x}, batch_size=[2]))["attr", "x"]
    torch.testing.assert_close(plain, xg, rtol=0, atol=1e-15)
    passed = ours(m, x, rules={nn.Linear: lrp_pass()}, composite="epsilon")
    torch.testing.assert_close(passed, xg, rtol=0, atol=1e-15)


# ------------------------------------------------------------------ errors


def test_errors():
    m = ReluMLP().to(DT)
    x = torch.randn(2, 5, dtype=DT)
    td = TensorDict({"x": x}, batch_size=[2])
    f = lambda t: m(t["x"])
    with pytest.raises(tdfunc.AttributionError) as e:
        lrp(f, td, m, composite="eps_plus")
    assert str(e.value) == (
        "tdfunc.lrp: unknown composite 'eps_plus'; choose one of 'epsilon', 'epsilon_plus', 'epsilon_plus_flat', "
        "'epsilon_alpha2_beta1', 'epsilon_alpha2_beta1_flat', 'excitation_backprop', 'attnlrp', 'deconvnet', 'beta_smooth', or composite=None to rewrite only the modules named in rules."
    )
    with pytest.raises(tdfunc.AttributionError) as e:
        lrp(f, td, m, rules={nn.ReLU: lrp_zplus()})
    assert str(e.value) == (
        "tdfunc.lrp: rules gives ReLU the rule tdfunc.lrp_rules.zplus(stabilizer=1e-06), which applies to nn.Linear and "
        "nn.ConvNd / nn.ConvTransposeNd only; give ReLU a rule that applies to it (tdfunc.lrp_rules.gradient() and tdfunc.lrp_rules.ignore() apply to any module), "
        "or remove that entry."
    )
    with pytest.raises(tdfunc.AttributionError) as e:
        lrp(f, td, m, rules={"act*": lrp_zplus()})
    assert str(e.value) == (
        "tdfunc.lrp: rules pattern 'act*' matches 'act1' (ReLU), 'act2' (ReLU), but tdfunc.lrp_rules.zplus(stabilizer=1e-06) "
        "applies to nn.Linear and nn.ConvNd / nn.ConvTransposeNd only; narrow the pattern to those modules."
    )
    with pytest.raises(tdfunc.AttributionError) as e:
        lrp(f, td, m, rules={"fc3": lrp_zplus()})
    assert str(e.value) == (
        "tdfunc.lrp: rules pattern 'fc3' matches no submodule of ReluMLP. Did you mean 'fc2', 'fc1'? Its submodules are "
        "['fc1', 'act1', 'fc2', 'act2', 'head']."
    )
    with pytest.raises(tdfunc.AttributionError) as e:
        lrp_epsilon(-0.1)
    assert str(e.value) == "tdfunc.lrp_rules.epsilon: eps must be a finite number >= 0, got -0.1."
    with pytest.raises(tdfunc.AttributionError, match=r"eps must be a finite number >= 0, got nan"):
        lrp_epsilon(float("nan"))
    with pytest.raises(TypeError, match=r"^tdfunc.lrp_rules.epsilon: eps must be a float, got str \('0.1'\)\.$"):
        lrp_epsilon("0.1")
    with pytest.raises(tdfunc.AttributionError) as e:
        lrp_alpha_beta(2, 2)
    assert str(e.value) == (
        "tdfunc.lrp_rules.alpha_beta: alpha - beta must be 1 (relevance conservation), got alpha=2, beta=2; "
        "e.g. alpha=2, beta=1 or alpha=1, beta=0."
    )
    with pytest.raises(
        TypeError,
        match=r"^tdfunc.lrp: rules\['fc1'\] must be a rule from tdfunc.lrp_rules \(epsilon\(\), zplus\(\), ...\) or a tdfunc.lrp_rules.Rule subclass, got ",
    ):
        lrp(f, td, m, rules={"fc1": 0.1})
    with pytest.raises(tdfunc.AttributionError) as e:
        lrp(f, td, nn.Tanh())
    assert str(e.value) == (
        "tdfunc.lrp: module Tanh has no submodules, so there is no layer to apply an LRP rule to; pass the model that "
        "holds them (the module f calls)."
    )


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("name", [*RULES, "zbox"])
def test_one_pass_under_no_grad_equals_two_passes(name, kind):
    """Under no_grad lrp runs f once (constants detached from the same forward): the same relevance as two passes."""
    torch.manual_seed(4)
    m = (ReluMLP() if kind == "mlp" else ReluCNN()).to(DT)
    x = torch.randn(3, 5, dtype=DT) if kind == "mlp" else torch.randn(3, 2, 5, 5, dtype=DT)
    rule = lrp_zbox(-4.0, 4.0) if name == "zbox" else RULES[name][0]()
    first = "fc1" if kind == "mlp" else "conv1"
    for kw in ({"rules": {first: rule}, "composite": "epsilon_plus"}, {"rules": {nn.Linear: rule, nn.Conv2d: rule}}):
        two = ours(m, x, **kw)
        with torch.no_grad():
            one = ours(m, x, **kw)
        assert one.grad_fn is None
        torch.testing.assert_close(one, two, rtol=0, atol=1e-12)


def test_epsilon_zero_is_the_layer_gradient():
    """ε = 0 (bias in the denominator) is LRP-0, ratio z / z = 1: the layer keeps its gradient (not rewritten), also
    where z is exactly 0 (the ratio would be 0 / 0)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(DT)
    with torch.no_grad():
        net[0].weight[0] = 0.0
        net[0].bias[0] = 0.0  # unit 0: z exactly 0
    td = TensorDict({"x": torch.randn(5, 3, dtype=DT)}, batch_size=[5])
    f = lambda t: net(t["x"])  # noqa: E731
    r = tdfunc.lrp(f, td, net, rules={nn.Linear: tdfunc.lrp_rules.epsilon(0.0)}, composite=None)["attr", "x"]
    torch.testing.assert_close(r, tdfunc.input_x_gradient(f, td)["attr", "x"], rtol=0, atol=0)
    assert r.isfinite().all()
