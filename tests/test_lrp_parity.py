"""tdfunc.lrp against zennit 0.5.1 and tdhook 0.3.0 on their scenarios (issue 14): rules on every convolution
(Conv1d/3d, ConvTranspose1d/2d/3d), modules a composite cannot handle reported, activations and unmerged
BatchNorm passing relevance (zennit's Pass), zennit's composite names.

zennit is imported beside a stub torchvision (see ``conftest.zennit``); both peers are test-only oracles.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict
from test_lrp import DT, RULES, Single, ours, zennit_lrp
from torch import nn

import tdfunc

L = tdfunc.lrp_rules
lrp = tdfunc.attribution._lrp.lrp

# (layer, input shape): every convolution zennit's ``Convolution`` type covers, with stride / padding / groups
CONVS = {
    "conv1d": (lambda: nn.Conv1d(2, 3, 3, padding=1), (3, 2, 7)),
    "conv1d-strided-grouped": (
        lambda: nn.Conv1d(4, 4, 3, stride=2, groups=2, padding_mode="circular", padding=1),
        (2, 4, 9),
    ),
    "conv3d": (lambda: nn.Conv3d(2, 2, 2, padding=1), (2, 2, 3, 3, 3)),
    "convT1d": (lambda: nn.ConvTranspose1d(2, 3, 3, stride=2), (2, 2, 5)),
    "convT2d": (lambda: nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1), (2, 2, 3, 3)),
    "convT3d": (lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, groups=2), (2, 2, 2, 2, 2)),
}


@pytest.mark.parametrize("kind", list(CONVS))
@pytest.mark.parametrize("name", list(RULES))
def test_rule_on_every_convolution_matches_zennit(zennit, name, kind):
    """Every rule that handles Conv2d handles the other convolutions, equal to zennit's (float64, atol 1e-12)."""
    torch.manual_seed(0)
    make, shape = CONVS[kind]
    layer = make().to(DT)
    m, x = Single(layer), torch.randn(*shape, dtype=DT)
    ours_rule, zen_rule = RULES[name]
    zr = zen_rule(zennit.rules)
    comp = zennit.core.Composite(module_map=lambda ctx, n, mod: zr if isinstance(mod, type(layer)) else None)
    want = zennit_lrp(zennit, m, x, comp)
    got = ours(m, x, rules={type(layer): ours_rule()}, composite=None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_conv_transpose_output_size_keeps_its_output_padding():
    """``ConvTranspose2d(x, output_size=...)`` decides its output padding per call; the rule's products use it."""
    torch.manual_seed(1)
    up = nn.ConvTranspose2d(2, 3, 3, stride=2, bias=False).to(DT)

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = up

        def forward(self, x):
            return self.up(x, output_size=[8, 8])

    m, x = Up(), torch.randn(2, 2, 3, 3, dtype=DT)
    R = ours(m, x, rules={nn.ConvTranspose2d: L.epsilon(0.0)}, composite=None)
    assert R.shape == (2, 3 * 8 * 8, 2, 3, 3)
    torch.testing.assert_close(R.flatten(2).sum(-1), m(x).flatten(1), rtol=1e-10, atol=1e-10)  # LRP-0, no bias


def _tdhook_seq_conv(seed):
    torch.manual_seed(seed)  # tdhook's get_sequential_conv_module
    return nn.Sequential(nn.Conv1d(10, 10, 3, padding=1), nn.ReLU(), nn.Conv1d(10, 10, 3, padding=1), nn.ReLU())


@pytest.mark.parametrize("composite", ["epsilon_plus", "EpsilonPlus", "epsilon_alpha2_beta1", "epsilon_plus_flat"])
def test_conv1d_composites_match_zennit(zennit, composite):
    """tdhook's sequential Conv1d scenario (a composite used to leave Conv1d on its plain gradient: 42 off)."""
    m = _tdhook_seq_conv(4).to(DT)
    x = torch.randn(2, 10, 5, dtype=DT)
    zc = {
        "epsilon_plus": zennit.composites.EpsilonPlus,
        "EpsilonPlus": zennit.composites.EpsilonPlus,
        "epsilon_alpha2_beta1": zennit.composites.EpsilonAlpha2Beta1,
        "epsilon_plus_flat": zennit.composites.EpsilonPlusFlat,
    }[composite]
    want = zennit_lrp(zennit, m, x, zc())
    torch.testing.assert_close(ours(m, x, composite=composite), want, rtol=0, atol=1e-12)


class _Scaled(nn.Module):
    """A layer with its own parameter used directly in forward: no rule of a composite covers it."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.full((4,), 2.0))

    def forward(self, x):
        return x * self.scale


def test_module_a_composite_cannot_handle_is_reported():
    net = nn.Sequential(nn.Linear(3, 4), _Scaled(), nn.ReLU(), nn.Linear(4, 2))
    td = TensorDict({"x": torch.randn(2, 3)}, batch_size=[2])
    f = lambda t: net(t["x"])
    with pytest.raises(tdfunc.AttributionError) as e:
        lrp(f, td, net)
    assert str(e.value) == (
        "tdfunc.lrp: composite 'epsilon_plus' has no rule for '1' (_Scaled): modules with their own parameters that "
        "would silently keep their plain gradient. Give each a rule, e.g. rules={'1': tdfunc.lrp_rules.gradient()} "
        "to keep the plain gradient on purpose."
    )
    got = lrp(f, td, net, rules={"1": L.gradient()})["attr", "x"]  # on purpose: no error
    assert got.shape == (2, 2, 3)
    lrp(f, td, net, composite=None, rules={nn.Linear: L.epsilon()})  # no composite: only the named modules
    mha = nn.MultiheadAttention(4, 2, batch_first=True)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0].sum(-1)

    a, td2 = Attn(), TensorDict({"x": torch.randn(2, 3, 4)}, batch_size=[2])
    with pytest.raises(tdfunc.AttributionError) as e:
        lrp(lambda t: a(t["x"]), td2, a, composite="epsilon")
    assert str(e.value).endswith(
        "has no rule for 'attn' (MultiheadAttention): modules with their own parameters that "
        "would silently keep their plain gradient. Give each a rule, e.g. rules={'attn': "
        "tdfunc.lrp_rules.gradient()} to keep the plain gradient on purpose, or "
        "composite='attnlrp' for nn.MultiheadAttention."
    )
    assert lrp(lambda t: a(t["x"]), td2, a, composite="attnlrp")["attr", "x"].shape == (2, 3, 3, 4)


class _ActBN(nn.Module):
    """Unmerged BatchNorm and activations whose gradient is not the identity rule (Tanh, ReLU6, Sigmoid, ...)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.act1 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh()
        self.conv2, self.act2 = nn.Conv2d(3, 4, 3, stride=2), nn.ReLU6()
        self.fc, self.act3, self.head = nn.Linear(16, 6), nn.Softplus(), nn.Linear(6, 3)

    def forward(self, x):
        h = self.act2(self.conv2(self.act1(self.bn(self.conv1(x))))).flatten(1)
        return self.head(self.act3(self.fc(h)))


def _act_bn_model():
    torch.manual_seed(3)
    m = _ActBN().to(DT).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.2, 0.2)
        m.conv2.weight.mul_(3)  # some ReLU6 inputs above 6, where its gradient (0) is not Pass
    return m, 3 * torch.randn(2, 2, 6, 6, dtype=DT)


ZENNIT_COMPOSITES = ["EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat"]


@pytest.mark.parametrize("name", ZENNIT_COMPOSITES)
def test_zennit_composites_with_activations_and_unmerged_batchnorm(zennit, name):
    """zennit's composites by their names (class and registered names), activations and BatchNorm under Pass."""
    m, x = _act_bn_model()
    want = zennit_lrp(zennit, m, x, getattr(zennit.composites, name)())
    snake = tdfunc.attribution._lrp_composites.ZENNIT_NAMES[name]
    assert snake in zennit.composites.COMPOSITES  # zennit's registered name is tdfunc's
    got = ours(m, x, composite=name)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours(m, x, composite=snake), got, rtol=0, atol=0)
    if name == "EpsilonPlus":  # the pass on activations matters here: plain gradients there differ
        plain = {nn.Tanh: L.gradient(), nn.ReLU6: L.gradient(), nn.Softplus: L.gradient(), nn.BatchNorm2d: L.gradient()}
        assert (ours(m, x, composite=name, rules=plain) - want).abs().max() > 1e-3


def test_excitation_backprop_matches_zennit(zennit):
    """zennit's ExcitationBackprop (z⁺ on every layer, activations on their gradient) on a ReLU CNN.

    Only ReLU-like activations: where zennit leaves a module on its gradient it propagates the relevance by it
    (``R_in = Jᵀ R_out``), while tdfunc's ``gradient()`` is ``x ⊙ Jᵀ (R_out / y)``; the two agree on ReLU.
    """
    from test_lrp import ReluCNN

    torch.manual_seed(6)
    m, x = ReluCNN().to(DT), torch.randn(2, 2, 6, 6, dtype=DT)
    want = zennit_lrp(zennit, m, x, zennit.composites.ExcitationBackprop())
    torch.testing.assert_close(ours(m, x, composite="ExcitationBackprop"), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours(m, x, composite="excitation_backprop"), want, rtol=0, atol=1e-12)


def test_zennit_names_that_need_arguments_are_pinned_errors():
    net = nn.Sequential(nn.Linear(3, 2))
    td = TensorDict({"x": torch.randn(2, 3)}, batch_size=[2])
    with pytest.raises(tdfunc.AttributionError) as e:
        lrp(lambda t: net(t["x"]), td, net, composite="EpsilonGammaBox")
    assert str(e.value) == (
        "tdfunc.lrp: composite 'EpsilonGammaBox' (zennit's) is not a name here; use "
        "tdfunc.lrp_rules.epsilon_gamma_box(low, high) (it needs the input bounds)."
    )
    with pytest.raises(tdfunc.AttributionError) as e:
        lrp(lambda t: net(t["x"]), td, net, composite="guided_backprop")
    assert (
        str(e.value)
        == "tdfunc.lrp: composite 'guided_backprop' (zennit's) is not a name here; use tdfunc.guided_backprop."
    )


def test_passthrough_is_zennit_pass(zennit):
    """``passthrough()`` is zennit's / tdhook's Pass (relevance unchanged), not the plain gradient (``gradient()``)."""
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)).to(DT)
    x = torch.randn(3, 4, dtype=DT)
    comp = zennit.core.Composite(
        module_map=lambda ctx, n, mod: zennit.rules.Pass()
        if isinstance(mod, nn.Sigmoid)
        else zennit.rules.Epsilon()
        if isinstance(mod, nn.Linear)
        else None
    )
    want = zennit_lrp(zennit, m, x, comp)
    got = ours(m, x, rules={nn.Sigmoid: L.passthrough(), nn.Linear: L.epsilon()}, composite=None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert repr(L.passthrough()) == "tdfunc.lrp_rules.passthrough()"


def test_epsilon_gamma_box_matches_zennit(zennit):
    """zennit's EpsilonGammaBox with per-entry bounds (zᴮ on the first convolution only, γ on the other)."""
    m, x = _act_bn_model()
    low, high = x.min() * torch.ones_like(x), x.max() * torch.ones_like(x)
    want = zennit_lrp(zennit, m, x, zennit.composites.EpsilonGammaBox(low=low, high=high))
    got = ours(m, x, composite=L.epsilon_gamma_box(low, high))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    comp = L.epsilon_gamma_box(-1.0, 1.0, epsilon=0.1, gamma=0.5)
    assert (
        comp.rules[nn.Linear] == comp.rules[nn.Linear]
        and repr(comp.rules[nn.Linear]) == "tdfunc.lrp_rules.epsilon(eps=0.1)"
    )
    assert repr(comp.first) == "tdfunc.lrp_rules.zbox(low=-1.0, high=1.0, stabilizer=1e-06)"
    with pytest.raises(
        tdfunc.AttributionError,
        match=r"^tdfunc.lrp_rules.epsilon_gamma_box: tdfunc.lrp_rules.zbox: low must be <= high everywhere",
    ):
        L.epsilon_gamma_box(1.0, -1.0)


# ------------------------------------------------------------------ output relevance, conservation check (tdhook)


def _tdhook_linear(seed):
    torch.manual_seed(seed)
    return nn.Linear(10, 10)


def _tdhook_conv(seed):
    torch.manual_seed(seed)
    return nn.Conv1d(10, 10, 3, padding=1)


TDHOOK_FACTORIES = {"linear": (_tdhook_linear, (10,)), "conv1d": (_tdhook_conv, (10, 5))}


def _tdhook_rule(name):
    from tdhook.attribution.lrp_helpers import rules as R

    return {
        "epsilon": R.EpsilonRule(epsilon=1e-6),
        "alpha_beta": R.AlphaBetaRule(alpha=2.0, beta=1.0, stabilizer=1e-6),
        "flat": R.FlatRule(stabilizer=1e-6),
        "wsquare": R.WSquareRule(stabilizer=1e-6),
    }[name]


OURS = {
    "epsilon": lambda: L.epsilon(1e-6),
    "alpha_beta": lambda: L.alpha_beta(2, 1, 1e-6),
    "flat": lambda: L.flat(1e-6),
    "wsquare": lambda: L.wsquare(1e-6),
}


def _ours_out_rel(module, x, rule, rel, **kw):
    """tdfunc.lrp on one unbatched tdhook input (a batch of one) with a given output relevance."""
    m = Single(module)
    td = TensorDict({"x": x[None]}, batch_size=[1])
    return lrp(
        lambda t: m(t["x"]).flatten(1),
        td,
        m,
        rules={type(module): rule},
        composite=None,
        output_relevance=rel.flatten()[None],
        **kw,
    )["attr", "x"][0]


@pytest.mark.parametrize("factory", list(TDHOOK_FACTORIES))
@pytest.mark.parametrize("name", list(OURS))
def test_output_relevance_matches_tdhook(name, factory):
    """tdhook's test_zennit_rules_equivalence: a random output relevance (its init grads) through one layer."""
    pytest.importorskip("tdhook")
    get, shape = TDHOOK_FACTORIES[factory]
    mod, x = get(0).to(DT), torch.randn(*shape, dtype=DT, requires_grad=True)
    rel = torch.randn_like(mod(x))
    _tdhook_rule(name).register(mod)
    (want,) = torch.autograd.grad(mod(x), x, rel)
    got = _ours_out_rel(get(0).to(DT), x.detach(), OURS[name](), rel)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_output_relevance_matches_zennit_attr_output(zennit):
    """zennit's Gradient attributor with an arbitrary attr_output on a CNN under EpsilonPlusFlat."""
    from test_lrp import ReluCNN

    torch.manual_seed(7)
    m, x = ReluCNN().to(DT), torch.randn(2, 2, 6, 6, dtype=DT)
    rel = torch.randn(2, 3, dtype=DT)
    with zennit.attribution.Gradient(model=m, composite=zennit.composites.EpsilonPlusFlat()) as attributor:
        _, want = attributor(x, rel)
    td = TensorDict({"x": x}, batch_size=[2])
    got = lrp(lambda t: m(t["x"]), td, m, composite="epsilon_plus_flat", output_relevance=rel)["attr", "x"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    fn = lrp(lambda t: m(t["x"]), td, m, composite="epsilon_plus_flat", output_relevance=lambda y: y * (y > 0))
    with zennit.attribution.Gradient(model=m, composite=zennit.composites.EpsilonPlusFlat()) as attributor:
        _, want2 = attributor(x, lambda y: y * (y > 0))
    torch.testing.assert_close(fn["attr", "x"], want2, rtol=0, atol=1e-12)
    per_target = lrp(lambda t: m(t["x"]), td, m, composite="epsilon_plus_flat")["attr", "x"]  # f_k(x): the default
    torch.testing.assert_close(
        lrp(lambda t: m(t["x"]), td, m, composite="epsilon_plus_flat", output_relevance=m(x))["attr", "x"],
        per_target.sum(1),
        rtol=0,
        atol=1e-12,
    )


def test_output_relevance_double_backward_exact():
    """d‖R‖²/dθ with an output relevance that is a function of the output: exact (float64 gradcheck)."""
    torch.manual_seed(8)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x = torch.randn(2, 3, dtype=DT, requires_grad=True)
    w = m[0].weight.detach().clone().requires_grad_(True)

    def f(x, w):
        s = tdfunc.state(m).update({("0", "weight"): w}, inplace=False)
        td = TensorDict({"x": x}, batch_size=[2])
        return lrp(
            lambda t: tdfunc.functional_call(m, s, (t["x"],)),
            td,
            m,
            composite="epsilon",
            output_relevance=lambda y: y.softmax(-1),
        )["attr", "x"]

    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))


def test_check_conservation_like_tdhook():
    """tdhook's test_raise_for_unconserved_rel: bias-free layers conserve, a bias does not and is named."""
    torch.manual_seed(0)
    for get, shape in TDHOOK_FACTORIES.values():
        mod = get(0).to(DT)
        with torch.no_grad():
            mod.bias.zero_()
        x = torch.randn(*shape, dtype=DT)
        rel = torch.randn_like(mod(x))
        for name in ("epsilon", "alpha_beta", "flat", "wsquare"):  # tdhook's test_return_type_and_conservation
            rule = {
                "epsilon": L.epsilon(0.0),
                "alpha_beta": L.alpha_beta(2, 1, 0.0),
                "flat": L.flat(0.0),
                "wsquare": L.wsquare(0.0),
            }[name]
            got = _ours_out_rel(mod, x, rule, rel, check_conservation=(1e-9, 1e-9))
            torch.testing.assert_close(got.sum(), rel.sum(), rtol=1e-9, atol=1e-9)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(DT)
    td = TensorDict({"x": torch.randn(5, 3, dtype=DT)}, batch_size=[5])
    with pytest.raises(tdfunc.AttributionError) as e:
        lrp(lambda t: m(t["x"]), td, m, composite="epsilon", check_conservation=True)
    msg = str(e.value)
    assert msg.startswith(
        "tdfunc.lrp: relevance is not conserved at '0' (call 1, rule tdfunc.lrp_rules.epsilon(eps=1e-06)) "
        "for target 0: its inputs get "
    )
    assert msg.endswith(
        "(summed over the batch; atol=1e-06, rtol=1e-06). A bias, ε, or a non-conservative rule absorbs "
        "relevance there; pass check_conservation=(atol, rtol) to loosen the check."
    )
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.zero_()
    r = lrp(lambda t: m(t["x"]), td, m, rules={nn.Linear: L.epsilon(0.0)}, composite=None, check_conservation=True)
    torch.testing.assert_close(r["attr", "x"].sum(-1), m(td["x"]), rtol=1e-9, atol=1e-9)


def test_output_relevance_and_check_errors():
    m = nn.Sequential(nn.Linear(3, 2))
    td = TensorDict({"x": torch.randn(4, 3)}, batch_size=[4])
    f = lambda t: m(t["x"])
    with pytest.raises(tdfunc.AttributionError) as e:
        lrp(f, td, m, output_relevance=torch.ones(4, 3))
    assert str(e.value) == (
        "tdfunc.lrp: output_relevance has shape (4, 3) but f returns shape (4, 2); give one relevance per output "
        "entry (e.g. output_relevance=lambda y: y * onehot)."
    )
    with pytest.raises(TypeError) as e:
        lrp(f, td, m, output_relevance=lambda y: 1.0)
    assert str(e.value) == (
        "tdfunc.lrp: output_relevance must be a tensor of f's output shape or a function of f's output returning "
        "one, got float (1.0)."
    )
    with pytest.raises(tdfunc.AttributionError) as e:
        lrp(lambda t: m(t["x"]) * 0, td, m, output_relevance=torch.ones(4, 2))
    assert str(e.value) == (
        "tdfunc.lrp: output_relevance is nonzero where f's output is exactly 0 (8 entries); relevance is carried as "
        "value x gradient, so an output of 0 cannot hold any. Give those entries relevance 0."
    )
    with pytest.raises(tdfunc.AttributionError) as e:
        lrp(f, td, m, check_conservation=1e-3)
    assert str(e.value) == (
        "tdfunc.lrp: check_conservation must be True, False or (atol, rtol) with two numbers >= 0, got 0.001."
    )


# ------------------------------------------------------------------ canonizers


BN_LAYERS = {
    "conv1d": (lambda: nn.Conv1d(2, 4, 3), nn.BatchNorm1d, (2, 2, 6)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 2), nn.BatchNorm3d, (2, 2, 3, 3, 3)),
    "convT1d-groups": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2), nn.BatchNorm1d, (2, 4, 4)),
    "convT2d": (lambda: nn.ConvTranspose2d(2, 4, 2, stride=2), nn.BatchNorm2d, (2, 2, 3, 3)),
    "convT3d-groups": (lambda: nn.ConvTranspose3d(4, 4, 2, groups=4), nn.BatchNorm3d, (2, 4, 2, 2, 2)),
}


@pytest.mark.parametrize("kind", list(BN_LAYERS))
def test_merge_batchnorm_every_convolution_matches_zennit(zennit, kind):
    """merge_batchnorm into Conv1d/3d and transposed (grouped) convolutions: the same model, and LRP equal to
    zennit's EpsilonPlus with its SequentialMergeBatchNorm canonizer (float64, rtol 2e-5: zennit leaves the merged
    BatchNorm a scaling by 1 / sqrt(1 + eps), 5e-6 off the identity; tdfunc's is exactly the identity)."""
    torch.manual_seed(9)
    make, bn_type, shape = BN_LAYERS[kind]
    layer = make()
    m = nn.Sequential(
        layer, bn_type(4 if "groups" not in kind or "3d" in kind else 6), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)
    )
    x = torch.randn(*shape)
    m(x)  # materialise the lazy head
    m = m.to(DT).eval()
    x = x.to(DT)
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.2, 0.2)
    merged = L.merge_batchnorm(m)
    f = lambda t: tdfunc.functional_call(m, merged, (t["x"],))
    torch.testing.assert_close(f({"x": x}), m(x), rtol=0, atol=1e-12)
    got = lrp(f, TensorDict({"x": x}, batch_size=[2]), m)["attr", "x"]
    if not kind.startswith("convT"):
        want = zennit_lrp(
            zennit, m, x, zennit.composites.EpsilonPlus(canonizers=[zennit.canonizers.SequentialMergeBatchNorm()])
        )
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-12)
        assert (got - want).abs().max() > 0  # not trivially equal: the tolerance is zennit's eps scaling only
    # zennit's MergeBatchNorm scales a transposed conv's weight along its input channels (dim 0): wrong, or a
    # shape error.  Reference: the merge written out per output channel, the BatchNorm dropped, zennit's EpsilonPlus.
    bn, ref = m[1], copy.deepcopy(layer)
    s = bn.weight / (bn.running_var + bn.eps) ** 0.5
    with torch.no_grad():
        for o in range(s.shape[0]):
            if kind.startswith("convT"):
                per, cin = ref.weight.shape[1], ref.weight.shape[0] // ref.groups
                g, j = divmod(o, per)
                ref.weight[g * cin : (g + 1) * cin, j] *= s[o]
            else:
                ref.weight[o] *= s[o]
        ref.bias.copy_((layer.bias - bn.running_mean) * s + bn.bias)
    plain = nn.Sequential(ref, nn.ReLU(), nn.Flatten(), m[4])
    torch.testing.assert_close(plain(x), m(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(got, zennit_lrp(zennit, plain, x, zennit.composites.EpsilonPlus()), rtol=0, atol=1e-12)


def _resnet(zennit, bottleneck: bool):
    """A two-block torchvision-style ResNet (bias-free convs, BatchNorm, a downsampling branch), its blocks
    subclassing the torchvision classes zennit's ResNetCanonizer recognises (the test's stub)."""
    tv = zennit.torchvision  # its ResNetBasicBlock / ResNetBottleneck: the stub torchvision's classes

    def conv(i, o, k=3, s=1):
        return nn.Conv2d(i, o, k, stride=s, padding=k // 2, bias=False)

    def down(i, o, s):
        return nn.Sequential(conv(i, o, 1, s), nn.BatchNorm2d(o))

    class BasicBlock(tv.ResNetBasicBlock, nn.Module):  # torchvision's attribute names and forward
        def __init__(self, i, o, s=1):
            nn.Module.__init__(self)
            self.conv1, self.bn1, self.relu = conv(i, o, 3, s), nn.BatchNorm2d(o), nn.ReLU()
            self.conv2, self.bn2 = conv(o, o), nn.BatchNorm2d(o)
            self.downsample = down(i, o, s) if (s != 1 or i != o) else None

        def forward(self, x):
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu(out + identity)

    class Bottleneck(tv.ResNetBottleneck, nn.Module):
        def __init__(self, i, o, s=1, width=2):
            nn.Module.__init__(self)
            self.conv1, self.bn1 = conv(i, width, 1), nn.BatchNorm2d(width)
            self.conv2, self.bn2 = conv(width, width, 3, s), nn.BatchNorm2d(width)
            self.conv3, self.bn3, self.relu = conv(width, o, 1), nn.BatchNorm2d(o), nn.ReLU()
            self.downsample = down(i, o, s) if (s != 1 or i != o) else None

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu(out + identity)

    block = Bottleneck if bottleneck else BasicBlock
    torch.manual_seed(10)
    net = (
        nn.Sequential(
            conv(2, 4),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            block(4, 4),
            block(4, 6, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 3),
        )
        .to(DT)
        .eval()
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.eps = 0.0  # zennit's merged BatchNorm is then exactly the identity too (var = 1): exact comparisons
    return net


@pytest.mark.parametrize("bottleneck", [False, True], ids=["BasicBlock", "Bottleneck"])
def test_resnet_canonizer_matches_zennit(zennit, bottleneck):
    """merge_batchnorm(with_zero_biases(model)) = zennit's ResNetCanonizer under EpsilonPlus: to 1e-12 with the
    stabilizers at 1e-30; with the default 1e-6 to 1e-4 of the largest relevance (zennit's residual Sum and
    AvgPool take Norm's stabilizer where tdfunc keeps their exact gradient).  BatchNorm eps = 0 in the model,
    so zennit's merged BatchNorm (var = 1, a scaling by 1 / sqrt(1 + eps)) is exactly the identity as ours is."""
    net = _resnet(zennit, bottleneck)
    x = torch.randn(2, 2, 6, 6, dtype=DT)
    want = zennit_lrp(zennit, net, x, zennit.composites.EpsilonPlus(canonizers=[zennit.torchvision.ResNetCanonizer()]))
    net2 = L.with_zero_biases(net)
    merged = L.merge_batchnorm(net2)
    assert all(getattr(m, "bias", 0) is None for m in net.modules() if isinstance(m, nn.Conv2d))  # untouched
    f = lambda t: tdfunc.functional_call(net2, merged, (t["x"],))
    torch.testing.assert_close(f({"x": x}), net(x), rtol=0, atol=1e-12)
    got = lrp(f, TensorDict({"x": x}, batch_size=[2]), net2)["attr", "x"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # with the stabilizers at 1e-30: exact
    want0 = zennit_lrp(
        zennit,
        net,
        x,
        zennit.composites.EpsilonPlus(stabilizer=1e-30, canonizers=[zennit.torchvision.ResNetCanonizer()]),
    )
    rules = dict(L.COMPOSITES["epsilon_plus"].rules)
    rules.update({t: L.zplus(1e-30) for t in (nn.Conv2d,)})
    got0 = lrp(f, TensorDict({"x": x}, batch_size=[2]), net2, composite=L.Composite("ep0", rules))["attr", "x"]
    torch.testing.assert_close(got0, want0, rtol=0, atol=1e-12)
    plain = lrp(lambda t: net(t["x"]), TensorDict({"x": x}, batch_size=[2]), net)["attr", "x"]  # BN passed, not merged
    assert (plain - want).abs().max() > 1e-3
    with pytest.raises(tdfunc.AttributionError, match=r"has no bias, so it cannot absorb"):
        L.merge_batchnorm(net)


# ------------------------------------------------------------------ zero inputs under zᴮ, flat, w²


def _pixels(*shape):
    """[0, 1] pixel data with many exact zeros (about half), as after clipping."""
    return (torch.rand(*shape, dtype=DT) * 2 - 1).clamp(min=0)


@pytest.mark.parametrize("kind", ["conv2d", "flatten-linear", "conv1d"])
@pytest.mark.parametrize("name", ["flat", "wsquare", "zbox"])
def test_zero_inputs_get_their_relevance_like_zennit(zennit, name, kind):
    """flat / w² / zᴮ give inputs that are exactly 0 their share (not x ⊙ gradient = 0): = zennit, float64 1e-12."""
    torch.manual_seed(11)
    if kind == "conv2d":
        first, x = nn.Conv2d(2, 3, 3, padding=1), _pixels(2, 2, 5, 5)
        m = nn.Sequential(first, nn.ReLU(), nn.Flatten(), nn.Linear(75, 3))
    elif kind == "conv1d":
        first, x = nn.Conv1d(2, 3, 3), _pixels(2, 2, 7)
        m = nn.Sequential(first, nn.ReLU(), nn.Flatten(), nn.Linear(15, 3))
    else:
        first, x = nn.Linear(12, 5), _pixels(2, 3, 4)
        m = nn.Sequential(nn.Flatten(), first, nn.ReLU(), nn.Linear(5, 3))
    m = m.to(DT)
    assert (x == 0).float().mean() > 0.3
    ours_rule = {"flat": L.flat(), "wsquare": L.wsquare(), "zbox": L.zbox(0.0, 1.0)}[name]
    zr = {"flat": zennit.rules.Flat(), "wsquare": zennit.rules.WSquare(), "zbox": zennit.rules.ZBox(0.0, 1.0)}[name]
    comp = zennit.core.Composite(
        module_map=lambda ctx, n, mod: zr
        if mod is first
        else zennit.rules.Epsilon()
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d))
        else None
    )
    want = zennit_lrp(zennit, m, x, comp)
    name_first = "1" if kind == "flatten-linear" else "0"
    got = ours(m, x, rules={name_first: ours_rule}, composite="epsilon")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    share = (want.abs() * (x == 0).unsqueeze(1)).sum() / want.abs().sum()
    assert share > 0.1  # the zero pixels hold a real part of |R|
    with torch.no_grad():  # one forward under no_grad: the same
        torch.testing.assert_close(
            ours(m, x, rules={name_first: ours_rule}, composite="epsilon"), got, rtol=0, atol=1e-12
        )


@pytest.mark.parametrize("composite", ["EpsilonPlusFlat", "EpsilonGammaBox"])
def test_zero_inputs_composites_and_conservation(zennit, composite):
    """zennit's EpsilonPlusFlat / EpsilonGammaBox on pixel data with zeros; a bias-free net under flat + LRP-0
    conserves f(x) (it lost about half before)."""
    from test_lrp import ReluCNN

    torch.manual_seed(12)
    m, x = ReluCNN().to(DT), _pixels(2, 2, 6, 6)
    if composite == "EpsilonPlusFlat":
        want, got = (
            zennit_lrp(zennit, m, x, zennit.composites.EpsilonPlusFlat()),
            ours(m, x, composite="epsilon_plus_flat"),
        )
    else:
        low, high = torch.zeros_like(x), torch.ones_like(x)
        want = zennit_lrp(zennit, m, x, zennit.composites.EpsilonGammaBox(low=low, high=high))
        got = ours(m, x, composite=L.epsilon_gamma_box(low, high))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.zero_()
    R = ours(
        m,
        x,
        rules={"conv1": L.flat(0.0), "conv2": L.epsilon(0.0), "fc": L.epsilon(0.0)},
        composite=None,
        check_conservation=(1e-9, 1e-9),
    )  # the check counts the zero inputs' share too
    torch.testing.assert_close(R.flatten(2).sum(-1), m(x), rtol=1e-9, atol=1e-9)


def test_zero_inputs_double_backward_exact():
    """d‖R‖²/dθ with zero inputs under flat: exact (gradcheck / gradgradcheck in float64)."""
    torch.manual_seed(13)
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(DT)
    x = _pixels(3, 4)
    x[:, 0] = 0
    w = m[0].weight.detach().clone().requires_grad_(True)

    def f(w):
        s = tdfunc.state(m).update({("0", "weight"): w}, inplace=False)
        td = TensorDict({"x": x}, batch_size=[3])
        return lrp(
            lambda t: tdfunc.functional_call(m, s, (t["x"],)), td, m, rules={"0": L.wsquare()}, composite="epsilon"
        )["attr", "x"]

    assert f(w)[:, :, 0].abs().sum() > 0  # the zero column has relevance
    assert torch.autograd.gradcheck(f, (w,))
    assert torch.autograd.gradgradcheck(f, (w,))


# ------------------------------------------------------------------ zero_params


ZERO = {
    "epsilon": (lambda: L.epsilon(0.1, zero_params="bias"), lambda r: r.Epsilon(0.1, zero_params="bias")),
    "zplus": (lambda: L.zplus(zero_params=("bias",)), lambda r: r.ZPlus(zero_params="bias")),
    "alpha_beta": (
        lambda: L.alpha_beta(2, 1, zero_params=["bias"]),
        lambda r: r.AlphaBeta(2.0, 1.0, zero_params="bias"),
    ),
    "gamma": (lambda: L.gamma(0.3, zero_params="bias"), lambda r: r.Gamma(0.3, zero_params="bias")),
    "flat": (lambda: L.flat(zero_params="bias"), lambda r: r.Flat(zero_params="bias")),
    "wsquare": (lambda: L.wsquare(zero_params="bias"), lambda r: r.WSquare(zero_params="bias")),
    "zbox": (lambda: L.zbox(-3.0, 3.0, zero_params="bias"), lambda r: r.ZBox(-3.0, 3.0, zero_params="bias")),
}


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("name", list(ZERO))
def test_zero_params_bias_matches_zennit(zennit, name, kind):
    """zennit's zero_params='bias' on every layer rule (float64, atol 1e-12); it changes the result."""
    torch.manual_seed(14)
    layer = nn.Linear(5, 4) if kind == "linear" else nn.Conv1d(2, 3, 3, padding=1)
    with torch.no_grad():
        layer.bias.uniform_(0.5, 1.0)
    m = Single(layer.to(DT))
    x = torch.randn(3, 5, dtype=DT) if kind == "linear" else torch.randn(2, 2, 5, dtype=DT)
    ours_rule, zen_rule = ZERO[name]
    zr = zen_rule(zennit.rules)
    comp = zennit.core.Composite(module_map=lambda ctx, n, mod: zr if isinstance(mod, type(layer)) else None)
    want = zennit_lrp(zennit, m, x, comp)
    got = ours(m, x, rules={type(layer): ours_rule()}, composite=None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if name == "epsilon":  # the bias leaves the denominator: a different result
        assert (ours(m, x, rules={type(layer): L.epsilon(0.1)}, composite=None) - got).abs().max() > 1e-3


def test_zero_params_error():
    with pytest.raises(tdfunc.AttributionError) as e:
        L.epsilon(zero_params="weight")
    assert str(e.value) == (
        "tdfunc.lrp_rules.epsilon: zero_params names the parameters the rule treats as zero; only 'bias' is supported "
        "(a zero weight gives no relevance at all), got 'weight'; e.g. zero_params=('bias',)."
    )
    assert repr(L.zplus(zero_params="bias")) == "tdfunc.lrp_rules.zplus(stabilizer=1e-06, zero_params=('bias',))"
