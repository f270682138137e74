"""Activation maximisation, infidelity and max-sensitivity: references, captum / tdhook, pinned errors.

How the random draws are matched with captum:

* infidelity: captum has no default perturbation; both sides get the same fixed noise table
  ``N`` (samples, batch, features).  captum calls its ``perturb_func`` once on the
  ``repeat_interleave``-d batch (example-major), so its function returns ``N`` transposed to
  (batch, samples) and flattened; ours receives ``td.expand(samples, *batch)`` and returns ``N``.
* sensitivity_max, default draw: tdfunc draws ``uniform_(-r, r)`` of shape ``batch + (S,) + feature``
  per input in order, which for float32 is bit-for-bit captum's ``default_perturb_func`` draw of
  ``(batch * S,) + feature`` after ``torch.manual_seed(seed)`` when we pass
  ``generator=torch.Generator().manual_seed(seed)`` (same stream, same layout).  captum always
  draws float32, so the float64 comparisons give both sides a fixed noise table instead.
"""

from __future__ import annotations

import re

import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients, Saliency
from captum.metrics import infidelity as c_infidelity
from captum.metrics import sensitivity_max as c_sensitivity_max
from models import CNN, MLP, TinyTransformer
from tensordict import TensorDict

import tdfunc

DT = torch.float64


def _td(**kw):
    b = next(iter(kw.values())).shape[0]
    return TensorDict(kw, batch_size=[b])


def _close(a, b, tol=1e-12):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _rel(a, b, rtol=1e-12):
    """Relative agreement (infidelities are small numbers: an absolute tolerance would say nothing)."""
    torch.testing.assert_close(a, b, rtol=rtol, atol=0)
    assert (a.abs() > 0).all()


# --------------------------------------------------------------------------- activation maximisation


def _unit(model, site, idx):
    """The objective: one unit of a captured activation per example."""

    def f(t):
        acts = tdfunc.functional_call(model, None, (t["x"],), capture=[site])[1][site]
        return acts.reshape(acts.shape[0], -1)[:, idx]

    return f


def _tv_ref(x):
    return ((x[..., 1:, :] - x[..., :-1, :]) ** 2).flatten(1).sum(1) + ((x[..., 1:] - x[..., :-1]) ** 2).flatten(1).sum(
        1
    )


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "sign"])
def test_maximise_equals_autograd_loop(optimizer):
    torch.manual_seed(0)
    cnn = CNN().to(DT).eval()
    x0 = torch.randn(3, 1, 6, 6, dtype=DT)
    f = _unit(cnn, "conv2", 37)
    steps, lr, l2, tv, lo, hi = 6, 0.05, 1e-2, 3e-2, -1.2, 1.2
    out = tdfunc.activation_maximisation(
        f, _td(x=x0), steps=steps, lr=lr, optimizer=optimizer, l2=l2, tv=tv, clamp=(lo, hi), betas=(0.8, 0.99)
    )
    # the slow, obvious loop: autograd + torch.optim for Adam, hand steps for sgd / sign
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr, betas=(0.8, 0.99), eps=1e-8, maximize=True)
    trace = []
    for _ in range(steps):
        y = f(_td(x=x))
        trace.append(y.detach())
        j = (y - l2 * x.square().flatten(1).sum(1) - tv * _tv_ref(x)).sum()
        (g,) = torch.autograd.grad(j, x)
        with torch.no_grad():
            if optimizer == "adam":
                x.grad = g  # maximize=True: a step along +g
                opt.step()
            else:
                x += lr * (g if optimizer == "sgd" else g.sign())
            x.clamp_(lo, hi)
    trace.append(f(_td(x=x)).detach())
    _close(out["x"], x.detach())
    _close(out["objective"], torch.stack(trace, -1))
    assert out["objective"].shape == (3, steps + 1)


def test_maximise_equals_tdhook():
    """tdhook's ActivationMaximisation (gradient of the summed module output, clamped steps) = optimizer="sgd"."""
    from tdhook.attribution import ActivationMaximisation
    from tensordict.nn import TensorDictModule

    torch.manual_seed(1)
    mlp = MLP().to(DT)
    x0 = torch.randn(4, 6, dtype=DT)
    with ActivationMaximisation(["act"], alpha=0.1, n_steps=5, min_value=-1.5, max_value=1.5).prepare(
        TensorDictModule(mlp, in_keys=["x"], out_keys=["y"])
    ) as hooked:
        ref = hooked(_td(x=x0.clone()))["attr", "x"]
    f = lambda t: tdfunc.functional_call(mlp, None, (t["x"],), capture=["act"])[1]["act"].sum(-1)
    out = tdfunc.activation_maximisation(f, _td(x=x0), steps=5, lr=0.1, optimizer="sgd", clamp=(-1.5, 1.5))
    _close(out["x"], ref.detach())


def test_maximise_examples_independent_pure_and_keys_held():
    torch.manual_seed(2)
    mlp = MLP().to(DT)
    x0, z = torch.randn(3, 6, dtype=DT), torch.randn(3, 6, dtype=DT)
    f = lambda t: tdfunc.functional_call(mlp, None, (t["x"] + 0.5 * t["z"],))[:, 1]
    td = _td(x=x0, z=z)
    before = {k: v.clone() for k, v in td.items()}
    reg = lambda t: 0.1 * t["x"].abs().sum(-1)
    out = tdfunc.activation_maximisation(f, td, in_keys=["x"], steps=8, lr=0.05, regulariser=reg)
    for k, v in before.items():  # td untouched, a new TensorDict returned
        assert torch.equal(td[k], v)
    assert out is not td and torch.equal(out["z"], z) and set(out.keys()) == {"x", "z", "objective"}
    again = tdfunc.activation_maximisation(f, out, steps=2, l2=0.1)  # continue: "objective" is not an input
    fresh = tdfunc.activation_maximisation(f, out.exclude("objective"), steps=2, l2=0.1)
    assert again["objective"].shape == (3, 3) and (again == fresh).all()
    for i in range(3):  # each example optimised on its own
        one = tdfunc.activation_maximisation(f, td[i : i + 1], in_keys=["x"], steps=8, lr=0.05, regulariser=reg)
        _close(one["x"], out["x"][i : i + 1])
        _close(one["objective"], out["objective"][i : i + 1])


@pytest.mark.parametrize("model", ["cnn", "transformer"])
def test_maximise_increases_objective_on_a_model(model):
    torch.manual_seed(3)
    if model == "cnn":
        net = CNN().eval()
        td = _td(x=0.1 * torch.randn(2, 1, 6, 6))
        f = lambda t: tdfunc.functional_call(net, None, (t["x"],), capture=["conv2"])[1]["conv2"][:, 1, 2, 3]
        kw = dict(tv=1e-2, clamp=(-2.0, 2.0))
    else:
        net = TinyTransformer()
        td = _td(x=0.1 * torch.randn(2, 5, 16))
        f = lambda t: tdfunc.functional_call(net, None, (t["x"],), capture=["blocks.1.mlp"])[1]["blocks.1.mlp"][
            :, -1, 3
        ]
        kw = dict(l2=1e-3)
    out = tdfunc.activation_maximisation(f, td, steps=30, lr=0.05, **kw)
    obj = out["objective"]
    assert (obj[:, -1] > obj[:, 0] + 0.5).all(), obj[:, [0, -1]]
    assert torch.allclose(obj[:, -1], f(out))


# --------------------------------------------------------------------------- infidelity


def _interleave(t):
    """(S, B, ...) -> (B * S, ...) in captum's repeat_interleave order."""
    return t.transpose(0, 1).reshape(-1, *t.shape[2:])


def _models():
    torch.manual_seed(4)
    mlp = MLP().to(DT)
    cnn = CNN().to(DT).eval()
    return [(mlp, torch.randn(4, 6, dtype=DT)), (cnn, torch.randn(4, 1, 6, 6, dtype=DT))]


@pytest.mark.parametrize("which", [0, 1], ids=["mlp", "cnn"])
@pytest.mark.parametrize("normalize", [False, True])
def test_infidelity_equals_captum(which, normalize):
    model, x = _models()[which]
    s, b = 6, x.shape[0]
    labels = torch.tensor([0, 2, 1, 2])
    noise = 0.5 * torch.randn(s, *x.shape, dtype=DT)
    perturb = lambda tds, g: ({"x": noise}, {"x": tds["x"] - noise})
    rtol = 1e-9 if normalize else 1e-12  # captum's normalize expands (b a - d)^2: cancellation
    c_perturb = lambda inp: (_interleave(noise), inp - _interleave(noise))
    td = _td(x=x)

    f_lab = lambda t: model(t["x"]).gather(-1, labels[:, None])[:, 0]
    attr = tdfunc.saliency(f_lab, td, abs=False)
    got = tdfunc.infidelity(f_lab, td, attr, perturb_fn=perturb, n_perturb_samples=s, normalize=normalize)
    ref = c_infidelity(model, c_perturb, x, attr["attr", "x"], target=labels, n_perturb_samples=s, normalize=normalize)
    assert got.shape == (b,)
    _rel(got, ref, rtol)
    chunked = tdfunc.infidelity(
        f_lab, td, attr, perturb_fn=perturb, n_perturb_samples=s, normalize=normalize, chunk_size=4
    )
    _rel(chunked, got)

    # K targets: every class's map from one call; the same perturbations for every target
    f_all = lambda t: model(t["x"])
    attr_k = tdfunc.integrated_gradients(f_all, td, n_steps=8)
    got_k = tdfunc.infidelity(f_all, td, attr_k, perturb_fn=perturb, n_perturb_samples=s, normalize=normalize)
    k = got_k.shape[-1]
    for c in range(k):
        a_c = attr_k["attr", "x"][:, c]
        ref_c = c_infidelity(model, c_perturb, x, a_c, target=c, n_perturb_samples=s, normalize=normalize)
        _rel(got_k[:, c], ref_c, rtol)


def test_infidelity_two_inputs_default_draw_and_linear_exactness():
    torch.manual_seed(5)
    mlp = MLP().to(DT)
    a, c = torch.randn(3, 2, dtype=DT), torch.randn(3, 4, dtype=DT)
    model = lambda a, c: mlp(torch.cat([a, c], -1))[:, 1]
    f = lambda t: model(t["a"], t["c"])
    td = _td(a=a, c=c)
    attr = tdfunc.input_x_gradient(f, td)
    s = 5
    na, nc = torch.randn(s, 3, 2, dtype=DT), torch.randn(s, 3, 4, dtype=DT)
    perturb = lambda tds, g: (
        TensorDict({"a": na, "c": nc}, [s, 3]),
        {"a": tds["a"] * (1 - na), "c": tds["c"] * (1 - nc)},
    )
    c_perturb = lambda i: (
        (_interleave(na), _interleave(nc)),
        (i[0] * (1 - _interleave(na)), i[1] * (1 - _interleave(nc))),
    )
    got = tdfunc.infidelity(f, td, attr, perturb_fn=perturb, n_perturb_samples=s)
    ref = c_infidelity(model, c_perturb, (a, c), (attr["attr", "a"], attr["attr", "c"]), n_perturb_samples=s)
    _rel(got, ref)

    # default draw: I ~ N(0, 0.003^2), x~ = x - I, reproducible with a generator
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    d1 = tdfunc.infidelity(f, td, attr, generator=g1)
    d2 = tdfunc.infidelity(f, td, attr, generator=g2)
    assert torch.equal(d1, d2) and d1.shape == (3,)
    g = torch.Generator().manual_seed(7)
    ia, ic = (0.003 * torch.randn((10, *v.shape), dtype=DT, generator=g) for v in (a, c))
    ref = c_infidelity(
        model,
        lambda i: ((_interleave(ia), _interleave(ic)), (i[0] - _interleave(ia), i[1] - _interleave(ic))),
        (a, c),
        (attr["attr", "a"], attr["attr", "c"]),
        n_perturb_samples=10,
    )
    _rel(d1, ref)

    lin = torch.nn.Linear(6, 3).to(DT)  # saliency is exact for a linear model: zero infidelity
    td6 = _td(x=torch.randn(4, 6, dtype=DT))
    sal = tdfunc.saliency(lambda t: lin(t["x"]), td6, abs=False)
    assert tdfunc.infidelity(lambda t: lin(t["x"]), td6, sal, n_perturb_samples=4).abs().max() < 1e-20


# --------------------------------------------------------------------------- sensitivity_max


@pytest.mark.parametrize("which", [0, 1], ids=["mlp", "cnn"])
def test_sensitivity_default_draw_equals_captum_float32(which):
    model, x = _models()[which]
    model, x = model.float(), x.float()
    labels = torch.tensor([1, 0, 2, 2])
    f = lambda t: model(t["x"]).gather(-1, labels[:, None])[:, 0]
    got = tdfunc.sensitivity_max(
        tdfunc.saliency, f, _td(x=x), n_perturb_samples=7, generator=torch.Generator().manual_seed(11), abs=False
    )
    torch.manual_seed(11)  # captum's default_perturb_func draws from the global generator
    ref = c_sensitivity_max(Saliency(model).attribute, x, n_perturb_samples=7, target=labels, abs=False)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    model.double()


@pytest.mark.parametrize("which", [0, 1], ids=["mlp", "cnn"])
@pytest.mark.parametrize("norm_ord", ["fro", 1, float("inf")])
def test_sensitivity_equals_captum_float64(which, norm_ord):
    model, x = _models()[which]
    s, r = 5, 0.05
    noise = r * (2 * torch.rand(s, *x.shape, dtype=DT) - 1)
    perturb = lambda tds, g: {"x": tds["x"] + noise}
    c_perturb = lambda inp: inp + _interleave(noise)
    td = _td(x=x)
    f_all = lambda t: model(t["x"])
    kw = dict(n_perturb_samples=s, norm_ord=norm_ord)
    got = tdfunc.sensitivity_max(tdfunc.input_x_gradient, f_all, td, perturb_fn=perturb, chunk_size=2, **kw)
    for c in range(got.shape[-1]):  # every class from one call = captum one target at a time
        ref = c_sensitivity_max(InputXGradient(model).attribute, x, perturb_func=c_perturb, target=c, **kw)
        _close(got[:, c], ref)
    if norm_ord == "fro":  # method kwargs pass through (IG's own `method=` too); captum's IG weights are float32
        got = tdfunc.sensitivity_max(
            tdfunc.integrated_gradients, f_all, td, perturb_fn=perturb, n_steps=6, method="gausslegendre", **kw
        )
        ig = IntegratedGradients(model).attribute
        for c in range(got.shape[-1]):
            ref = c_sensitivity_max(ig, x, perturb_func=c_perturb, target=c, n_steps=6, method="gausslegendre", **kw)
            torch.testing.assert_close(got[:, c], ref, rtol=1e-6, atol=1e-9)


def test_sensitivity_noise_in_radius_and_zero_radius():
    torch.manual_seed(6)
    x = torch.randn(4, 6, dtype=DT)
    identity = lambda f, t: TensorDict({("attr", "x"): t["x"]}, t.batch_size)  # the map is the input itself
    inf = float("inf")
    out = tdfunc.sensitivity_max(identity, None, _td(x=x), perturb_radius=0.1, n_perturb_samples=64, norm_ord=inf)
    biggest = out * x.abs().amax(-1)  # = max over samples and features of |noise|
    assert (biggest <= 0.1).all() and (biggest > 0.099).all()
    lin = torch.nn.Linear(6, 1).to(DT)
    f = lambda t: (t["x"] ** 2 * lin.weight[0]).sum(-1)  # saliency 2 w x
    zero = tdfunc.sensitivity_max(tdfunc.saliency, f, _td(x=x), perturb_radius=0.0)
    assert torch.equal(zero, torch.zeros(4, dtype=DT))


# --------------------------------------------------------------------------- errors, pinned


def _raises(msg, fn, *a, **kw):
    with pytest.raises(tdfunc.AttributionError, match=re.escape(msg) + r"\Z"):
        fn(*a, **kw)


def test_errors():
    lin = torch.nn.Linear(3, 2).to(DT)
    td = _td(x=torch.randn(4, 3, dtype=DT))
    f1 = lambda t: lin(t["x"])[:, 0]
    fk = lambda t: lin(t["x"])
    am = tdfunc.activation_maximisation
    _raises("tdfunc.activation_maximisation: steps must be an integer >= 1, got 0.", am, f1, td, steps=0)
    _raises(
        "tdfunc.activation_maximisation: lr must be a finite number > 0, got 0.0; the step size of the ascent.",
        am,
        f1,
        td,
        lr=0.0,
    )
    _raises(
        "tdfunc.activation_maximisation: lr must be a finite number > 0, got -1; the step size of the ascent.",
        am,
        f1,
        td,
        lr=-1,
    )
    _raises(
        "tdfunc.activation_maximisation: unknown optimizer 'lbfgs'; choose 'adam' (default), 'sgd' "
        "(x + lr * grad, as tdhook) or 'sign' (x + lr * sign(grad)).",
        am,
        f1,
        td,
        optimizer="lbfgs",
    )
    _raises(
        "tdfunc.activation_maximisation: clamp must be None or a pair (low, high) with low < high, got (1, 0).",
        am,
        f1,
        td,
        clamp=(1, 0),
    )
    _raises(
        "tdfunc.activation_maximisation: tv must be a finite number >= 0 (a penalty weight), got -0.1.",
        am,
        f1,
        td,
        tv=-0.1,
    )
    _raises(
        "tdfunc.activation_maximisation: f must return one objective per example, shape (4,), got (4, 2). "
        "Select or combine the units inside f, e.g. lambda td: acts(td)[:, unit] or .sum(-1).",
        am,
        fk,
        td,
        steps=1,
    )

    attr = tdfunc.saliency(fk, td)
    inf = tdfunc.infidelity
    _raises(
        "tdfunc.infidelity: n_perturb_samples must be an integer >= 1, got 0.", inf, fk, td, attr, n_perturb_samples=0
    )
    _raises(
        "tdfunc.infidelity: attributions must be the TensorDict returned by a tdfunc attribution method "
        "(entries ('attr', key)), got Tensor.",
        inf,
        fk,
        td,
        attr["attr", "x"],
    )
    _raises(
        "tdfunc.infidelity: attributions has no entry ('attr', 'z') for the input 'z'; it has [('attr', 'x')]. "
        "Attribute that input too, or leave it out of in_keys.",
        inf,
        fk,
        td,
        attr,
        in_keys=["z"],
    )
    _raises(
        "tdfunc.infidelity: attributions has no ('attr', key) entry (entries: ['y']); pass the TensorDict "
        "returned by a tdfunc attribution method.",
        inf,
        fk,
        td,
        TensorDict({"y": torch.ones(4)}, [4]),
    )
    _raises(
        "tdfunc.infidelity: attributions ('attr', 'x') has shape (4, 2, 3), but the input 'x' has shape (4, 3) and "
        "f returns one target per example; expected (4, 3) (batch (+ K) + feature shape).",
        inf,
        f1,
        td,
        attr,
    )
    _raises(
        "tdfunc.infidelity: perturb_fn must return a pair (perturbations, perturbed_inputs), got Tensor.",
        inf,
        fk,
        td,
        attr,
        perturb_fn=lambda t, g: t["x"],
    )
    _raises(
        "tdfunc.infidelity: perturb_fn returned perturbed inputs of shape (4, 3) for 'x'; expected (10, 4, 3) "
        "(n_perturb_samples + the input's shape).",
        inf,
        fk,
        td,
        attr,
        perturb_fn=lambda t, g: (t, {"x": td["x"]}),
    )
    _raises(
        "tdfunc.infidelity: perturb_fn returned perturbations without a tensor for the input 'x' (got NoneType); "
        "return one for every attributed input.",
        inf,
        fk,
        td,
        attr,
        perturb_fn=lambda t, g: ({}, t),
    )

    sm = tdfunc.sensitivity_max
    _raises(
        "tdfunc.sensitivity_max: n_perturb_samples must be an integer >= 1, got 0.",
        sm,
        tdfunc.saliency,
        fk,
        td,
        n_perturb_samples=0,
    )
    _raises(
        "tdfunc.sensitivity_max: norm_ord must be 'fro' or a number (the vector p-norm, inf allowed), got 'nuc'.",
        sm,
        tdfunc.saliency,
        fk,
        td,
        norm_ord="nuc",
    )
    _raises(
        "tdfunc.sensitivity_max: perturb_radius must be a finite number >= 0, got -0.1.",
        sm,
        tdfunc.saliency,
        fk,
        td,
        perturb_radius=-0.1,
    )
    _raises(
        "tdfunc.sensitivity_max: method <lambda> returned Tensor; it must return a TensorDict with ('attr', key) "
        "entries, as tdfunc's attribution methods do.",
        sm,
        lambda f, t: f(t),
        fk,
        td,
    )
    _raises(
        "tdfunc.sensitivity_max: perturb_fn returned perturbed inputs of shape (4, 3) for 'x'; expected (10, 4, 3) "
        "(n_perturb_samples + the input's shape).",
        sm,
        tdfunc.saliency,
        fk,
        td,
        perturb_fn=lambda t, g: {"x": td["x"]},
    )
