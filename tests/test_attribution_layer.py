"""Layer attribution (grad_cam, layer_gradient_x_activation, layer_integrated_gradients) vs captum.

Every class's map comes from one call with a K-target ``f``; column ``c`` must equal captum's
``target=c``.  Sites: conv / ReLU outputs and an ``:input`` port of a CNN with pooling, an MLP,
and a ``Tap`` in a small transformer fed float embeddings.  The gradient at a site (additive zero
delta) is checked against a forward-hook + ``autograd.grad`` reference, the vmap over targets
against the loop, and every error message is pinned.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from captum.attr import LayerGradCam, LayerGradientXActivation, LayerIntegratedGradients
from models import CNN, MLP, Recurrent, TinyTransformer
from tensordict import TensorDict
from torch import nn
from torch.func import vmap

import tdfunc
from tdfunc import AttributionError, NotReachedError, SiteError
from tdfunc.attribution._common import check_output

DT = torch.float64
METHODS = ["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre"]
# captum's riemann nodes (torch.linspace) and every rule's step sizes (.float()) are float32, so its IG
# agrees to ~1e-6 relative; test_layer_ig_equals_float64_hook_reference checks to 1e-12 in float64
IG_TOL = dict(rtol=1e-5, atol=1e-7)
EXACT = dict(rtol=1e-12, atol=1e-12)


class PoolCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = self.pool1(self.relu1(self.conv1(x)))
        return self.fc(self.pool2(self.relu2(self.conv2(h))).flatten(1))


def _setup(name):
    torch.manual_seed(0)
    if name == "cnn":
        model = PoolCNN().to(DT)
        x = torch.randn(4, 1, 8, 8, dtype=DT)
        return (
            model,
            model,
            x,
            [("conv2", model.conv2, False), ("relu1", model.relu1, False), ("conv2:input", model.conv2, True)],
        )
    if name == "mlp":
        model = MLP().to(DT)
        x = torch.randn(5, 6, dtype=DT)
        return model, model, x, [("fc2", model.fc2, False), ("head:input", model.head, True)]
    tt = TinyTransformer(vocab=5).to(DT)
    x = torch.randn(3, 4, 16, dtype=DT)  # float embeddings
    return tt, lambda h: tt(h)[:, -1], x, [("blocks.0.resid", tt.blocks[0].resid, False)]


SETUPS = ["cnn", "mlp", "transformer"]


def _td(x, baseline=None):
    td = TensorDict({"x": x}, batch_size=[len(x)])
    if baseline is not None:
        td["baseline", "x"] = baseline
    return td


@pytest.mark.parametrize("name", SETUPS)
def test_grad_cam_every_class_matches_captum(name):
    model, fwd, x, sites = _setup(name)
    td = _td(x)
    for site, layer, to_input in sites:
        for opts in ({}, {"relu_attributions": True}, {"attr_dim_summation": False}):
            out = tdfunc.grad_cam(lambda t: fwd(t["x"]), td, model, site, **opts)["attr", site]
            for c in range(out.shape[1]):
                ref = LayerGradCam(fwd, layer).attribute(x, target=c, attribute_to_layer_input=to_input, **opts)
                torch.testing.assert_close(out[:, c], ref, **EXACT)


@pytest.mark.parametrize("name", SETUPS)
def test_layer_gradient_x_activation_every_class_matches_captum(name):
    model, fwd, x, sites = _setup(name)
    td = _td(x)
    for site, layer, to_input in sites:
        for mul in (True, False):
            out = tdfunc.layer_gradient_x_activation(lambda t: fwd(t["x"]), td, model, site, multiply_by_inputs=mul)
            out = out["attr", site]
            ref_method = LayerGradientXActivation(fwd, layer, multiply_by_inputs=mul)
            for c in range(out.shape[1]):
                ref = ref_method.attribute(x, target=c, attribute_to_layer_input=to_input)
                torch.testing.assert_close(out[:, c], ref, **EXACT)


@pytest.mark.parametrize("name", SETUPS)
def test_layer_integrated_gradients_every_class_and_method_matches_captum(name):
    model, fwd, x, sites = _setup(name)
    base = 0.1 * torch.randn_like(x)
    td = _td(x, base)
    for site, layer, to_input in sites:
        for method in METHODS:
            out = tdfunc.layer_integrated_gradients(
                lambda t: fwd(t["x"]), td, model, site, n_steps=6, method=method, return_convergence_delta=True
            )
            attr, delta = out["attr", site], out["convergence_delta"]
            for c in range(attr.shape[1]):
                ref, ref_delta = LayerIntegratedGradients(fwd, layer).attribute(
                    x,
                    base,
                    target=c,
                    n_steps=6,
                    method=method,
                    attribute_to_layer_input=to_input,
                    return_convergence_delta=True,
                )
                torch.testing.assert_close(attr[:, c], ref, **IG_TOL)
                torch.testing.assert_close(delta[:, c], ref_delta, **IG_TOL)
    # captum's multiply_by_inputs=False and chunking (captum: internal_batch_size) once, on the last site
    out = tdfunc.layer_integrated_gradients(
        lambda t: fwd(t["x"]), td, model, site, n_steps=5, multiply_by_inputs=False, chunk_size=2
    )
    ref = LayerIntegratedGradients(fwd, layer, multiply_by_inputs=False).attribute(
        x, base, target=1, n_steps=5, attribute_to_layer_input=to_input, internal_batch_size=2 * len(x)
    )
    torch.testing.assert_close(out["attr", site][:, 1], ref, **IG_TOL)


def _nodes(method, n):
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return 0.5 * (nodes + 1), 0.5 * weights
    start = {"riemann_left": 0.0, "riemann_right": 1 / n, "riemann_middle": 0.5 / n, "riemann_trapezoid": 0.0}[method]
    stop = 1.0 if method == "riemann_trapezoid" else start + 1 - 1 / n
    weights = np.full(n, 1 / n)
    if method == "riemann_trapezoid":
        weights[[0, -1]] /= 2
    return np.linspace(start, stop, n), weights


def _hook_lig(fwd, layer, x, base, c, method, n):
    """Layer IG from the paper's equation with forward hooks, in float64: the reference."""
    seen = []
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad():
        fwd(x), fwd(base)
    handle.remove()
    a_x, a_b = seen
    total = torch.zeros_like(a_x)
    for alpha, weight in zip(*_nodes(method, n)):
        a = (a_b + float(alpha) * (a_x - a_b)).requires_grad_(True)
        handle = layer.register_forward_hook(lambda m, args, out: a)
        try:
            y = fwd(x)[:, c].sum()
        finally:
            handle.remove()
        total += float(weight) * torch.autograd.grad(y, a)[0]
    return total * (a_x - a_b)


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_layer_ig_equals_float64_hook_reference(name):
    model, fwd, x, sites = _setup(name)
    site, layer, _ = sites[0]
    base = 0.1 * torch.randn_like(x)
    for method in METHODS:
        out = tdfunc.layer_integrated_gradients(
            lambda t: fwd(t["x"]), _td(x, base), model, site, n_steps=5, method=method
        )
        for c in (0, 2):
            torch.testing.assert_close(out["attr", site][:, c], _hook_lig(fwd, layer, x, base, c, method, 5), **EXACT)


def test_f_closing_over_labels_matches_captum_per_example_targets():
    model, fwd, x, _ = _setup("cnn")
    labels = torch.tensor([2, 0, 1, 2])
    f = lambda t: model(t["x"]).gather(-1, labels[:, None])[:, 0]
    td = _td(x)
    pairs = [
        (tdfunc.grad_cam(f, td, model, "relu2"), LayerGradCam(model, model.relu2).attribute(x, target=labels)),
        (
            tdfunc.layer_gradient_x_activation(f, td, model, "relu2"),
            LayerGradientXActivation(model, model.relu2).attribute(x, target=labels),
        ),
    ]
    for ours, ref in pairs:
        torch.testing.assert_close(ours["attr", "relu2"], ref, **EXACT)
    ours = tdfunc.layer_integrated_gradients(f, td, model, "relu2", n_steps=4)["attr", "relu2"]
    ref = LayerIntegratedGradients(model, model.relu2).attribute(x, target=labels, n_steps=4)
    torch.testing.assert_close(ours, ref, **IG_TOL)


def test_in_keys_hold_other_inputs_fixed_like_captum_baselines():
    """Only 'x' goes to its baseline; 'z' stays: captum with baselines (0, z)."""
    torch.manual_seed(0)
    mlp = MLP().to(DT)
    x, z = torch.randn(4, 6, dtype=DT), torch.randn(4, 6, dtype=DT)
    td = TensorDict({"x": x, "z": z}, batch_size=[4])
    out = tdfunc.layer_integrated_gradients(lambda t: mlp(t["x"] * t["z"]), td, mlp, "act", n_steps=4, in_keys=["x"])
    fwd = lambda x, z: mlp(x * z)
    ref = LayerIntegratedGradients(fwd, mlp.act).attribute((x, z), (torch.zeros_like(x), z), target=2, n_steps=4)
    torch.testing.assert_close(out["attr", "act"][:, 2], ref, **IG_TOL)


METHODS_BY_NAME = {
    "grad_cam": lambda f, td, m, s: tdfunc.grad_cam(f, td, m, s),
    "gxa": lambda f, td, m, s: tdfunc.layer_gradient_x_activation(f, td, m, s),
    "lig": lambda f, td, m, s: tdfunc.layer_integrated_gradients(f, td, m, s, n_steps=3),
}


@pytest.mark.parametrize("method", list(METHODS_BY_NAME))
def test_vmap_over_targets_equals_loop_and_k_targets(method):
    attribute = METHODS_BY_NAME[method]
    model, fwd, x, _ = _setup("cnn")
    td = _td(x)
    per_class = lambda w: attribute(lambda t: model(t["x"]) @ w, td, model, "conv2")["attr", "conv2"]
    eye = torch.eye(3, dtype=DT)
    batched = vmap(per_class)(eye)
    loop = torch.stack([per_class(w) for w in eye])
    every = attribute(lambda t: model(t["x"]), td, model, "conv2")["attr", "conv2"]
    torch.testing.assert_close(batched, loop, **EXACT)
    torch.testing.assert_close(batched, every.movedim(1, 0), **EXACT)


def _hook_gradient(model, layer, x, fwd, call=0):
    """d sum(fwd(x)[:, c]) / d(output of the `call`-th call of layer), with a forward hook."""
    seen = []
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        y = fwd(x)
    finally:
        handle.remove()
    return torch.stack(
        [torch.autograd.grad(y[:, c].sum(), seen[call], retain_graph=True)[0] for c in range(y.shape[1])], 1
    )


def test_site_gradient_equals_hook_reference():
    torch.manual_seed(0)
    cnn = CNN().to(DT).eval()  # in-place ReLU called twice: site 'relu@1'
    x = torch.randn(4, 1, 6, 6, dtype=DT)
    grad = tdfunc.layer_gradient_x_activation(lambda t: cnn(t["x"]), _td(x), cnn, "relu@1", multiply_by_inputs=False)
    torch.testing.assert_close(grad["attr", "relu@1"], _hook_gradient(cnn, cnn.relu, x, cnn, call=1), rtol=0, atol=0)

    tt, fwd, h, _ = _setup("transformer")
    grad = tdfunc.layer_gradient_x_activation(
        lambda t: fwd(t["x"]), _td(h), tt, "blocks.0.resid", multiply_by_inputs=False
    )
    torch.testing.assert_close(
        grad["attr", "blocks.0.resid"], _hook_gradient(tt, tt.blocks[0].resid, h, fwd), rtol=0, atol=0
    )


def test_batch_shape_of_two_dims_and_empty_batch():
    model, fwd, x, _ = _setup("mlp")
    x = x[:4]
    flat = tdfunc.layer_integrated_gradients(lambda t: model(t["x"]), _td(x), model, "act", n_steps=3)["attr", "act"]
    td2 = TensorDict({"x": x.view(2, 2, 6)}, batch_size=[2, 2])
    two = tdfunc.layer_integrated_gradients(lambda t: model(t["x"]), td2, model, "act", n_steps=3)["attr", "act"]
    torch.testing.assert_close(two, flat.view(2, 2, 3, 8), **EXACT)
    one = tdfunc.grad_cam(lambda t: model(t["x"]), TensorDict({"x": x[0]}, batch_size=[]), model, "act")
    full = tdfunc.grad_cam(lambda t: model(t["x"]), _td(x), model, "act")
    torch.testing.assert_close(one["attr", "act"], full["attr", "act"][0], **EXACT)


def test_state_and_inputs_untouched():
    model, fwd, x, _ = _setup("mlp")
    td = _td(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x0 = x.clone()
    tdfunc.layer_integrated_gradients(lambda t: model(t["x"]), td, model, "fc2", n_steps=2)
    assert set(td.keys()) == {"x"} and torch.equal(td["x"], x0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    tdfunc.remove_sites(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# --- errors, pinned word for word -------------------------------------------------------------------

X = torch.randn(4, 6)
TD = TensorDict({"x": X}, batch_size=[4])
M, REC = MLP(), Recurrent()
SCALAR = nn.Sequential(nn.Linear(6, 1), nn.Flatten(0))  # one number per example at site '1'


class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 3)
        self.unused = nn.Linear(6, 3)

    def forward(self, x):
        return self.a(x)


def _f(model):
    return lambda t: model(t["x"])


PINNED = [
    (
        "unknown_site",
        lambda: tdfunc.grad_cam(_f(M), TD, M, "fc3"),
        SiteError,
        "tdfunc.grad_cam: unknown site 'fc3': MLP has no submodule 'fc3'. Did you mean 'fc2', 'fc1'? List the names with [n for n, _ in model.named_modules()].",
    ),
    (
        "site_never_reached",
        lambda: tdfunc.layer_gradient_x_activation(_f(Skip()), TD, Skip(), "unused"),
        NotReachedError,
        "tdfunc.layer_gradient_x_activation: nothing was captured at site 'unused': the module never ran in this call. Capture a site the forward reaches.",
    ),
    (
        "non_module",
        lambda: tdfunc.layer_integrated_gradients(_f(MLP()), TD, "fc1", "fc1"),
        TypeError,
        "tdfunc.layer_integrated_gradients: module must be the nn.Module whose site is attributed, got str ('fc1'); pass the model itself, e.g. tdfunc.layer_integrated_gradients(f, td, model, 'layer1').",
    ),
    (
        "glob_site",
        lambda: tdfunc.grad_cam(_f(M), TD, M, "fc*"),
        AttributionError,
        "tdfunc.grad_cam: site 'fc*' names several values; attribute one site at a time (no globs; '@k' for the k-th call of a module that runs several times).",
    ),
    (
        "site_ran_several_times",
        lambda: tdfunc.grad_cam(lambda t: REC(t["x"][:, :5]), TD, REC, "cell"),
        NotReachedError,
        "tdfunc.grad_cam: site 'cell' ran 3 times in this call, so a single capture is ambiguous; capture 'cell@0' … 'cell@2' for one call, or 'cell@*' for all of them stacked on a new leading dimension.",
    ),
    (
        "site_not_batch_first",
        lambda: tdfunc.layer_gradient_x_activation(lambda t: M(t["x"].view(2, 2, 6)).view(4, 3), TD, M, "fc1"),
        AttributionError,
        "tdfunc.layer_gradient_x_activation: the value at site 'fc1' has shape (2, 2, 8), which does not start with td's batch shape (4,); the site must hold one activation per example, batch dims first. Give td the batch shape the model sees, or attribute another site.",
    ),
    (
        "grad_cam_without_channels",
        lambda: tdfunc.grad_cam(_f(SCALAR), TD, SCALAR, "1"),
        AttributionError,
        "tdfunc.grad_cam: the value at site '1' has shape (4,), with no channel dim after td's batch shape (4,); Grad-CAM needs batch + (C, *spatial). Attribute another site.",
    ),
    (
        "td_not_a_tensordict",
        lambda: tdfunc.grad_cam(_f(M), torch.zeros(2), M, "fc1"),
        TypeError,
        "tdfunc.grad_cam: td must be a TensorDict holding the inputs, got Tensor (tensor([0., 0.])); e.g. TensorDict({'x': x}, batch_size=[len(x)]).",
    ),
    (
        "bad_method",
        lambda: tdfunc.layer_integrated_gradients(_f(M), TD, M, "fc1", method="simpson"),
        AttributionError,
        "tdfunc.layer_integrated_gradients: unknown method 'simpson'; choose one of ['riemann_left', 'riemann_right', 'riemann_middle', 'riemann_trapezoid', 'gausslegendre'].",
    ),
]


@pytest.mark.parametrize("name,call,exc,message", PINNED, ids=[p[0] for p in PINNED])
def test_error_message(name, call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert str(info.value) == message


def _check_output_formats_k() -> bool:
    try:
        check_output(torch.zeros(()), torch.Size([2]))
    except AttributionError:
        return True
    except ValueError:  # shape_str((*batch, 'K')) calls int('K'): reported to the lead
        return False
    return True


F_SHAPE = [
    (
        "grad_cam",
        lambda: tdfunc.grad_cam(lambda t: M(t["x"]).sum(), TD, M, "fc1"),
        "tdfunc.grad_cam: f returned shape (), but td has batch shape (4,); f must return one value per example (4,) or K per example (4, K). Select the target inside f, e.g. lambda td: model(td['x']).gather(-1, labels[:, None])[:, 0].",
    ),
    (
        "layer_integrated_gradients",
        lambda: tdfunc.layer_integrated_gradients(lambda t: M(t["x"])[None], TD, M, "fc1"),
        "tdfunc.layer_integrated_gradients: f returned shape (1, 4, 3), but td has batch shape (4,); f must return one value per example (4,) or K per example (4, K). Select the target inside f, e.g. lambda td: model(td['x']).gather(-1, labels[:, None])[:, 0].",
    ),
]


@pytest.mark.xfail(
    not _check_output_formats_k(),
    reason="_common.check_output cannot format (*batch, 'K') yet",
    raises=ValueError,
    strict=True,
)
@pytest.mark.parametrize("name,call,message", F_SHAPE, ids=[p[0] for p in F_SHAPE])
def test_error_f_wrong_shape(name, call, message):
    with pytest.raises(AttributionError) as info:
        call()
    assert str(info.value) == message


# --- internal_influence and layer_conductance: captum's test_internal_influence.py / test_layer_conductance.py cases
# (BasicModel_MultiLayer, target 0; internal influence: riemann_trapezoid, 500 steps, delta 0.01 max; conductance:
# gausslegendre, 500 steps, delta 0.1 sum, convergence delta < 0.01), and captum on a random net for every method.


def _ml(**kw):
    return pytest.importorskip("captum.testing.helpers.basic_models").BasicModel_MultiLayer(**kw)


@pytest.mark.parametrize(
    "site,inp,base,expected",
    [
        ("linear0", [[0.0, 100.0, 0.0]], None, [[3.9, 3.9, 3.9]]),
        ("linear1", [[0.0, 100.0, 0.0]], None, [[0.9, 1.0, 1.0, 1.0]]),
        ("relu", [[3.0, 4.0, 0.0]], None, [[1.0, 1.0, 1.0, 1.0]]),
        ("linear2", [[0.0, 100.0, 0.0]], None, [[1.0, 0.0]]),
        ("linear1", [[0.0, 80.0, 0.0]], [[0.0, -20.0, 0.0]], [[0.7, 0.8, 0.8, 0.8]]),
    ],
)
def test_internal_influence_captum_expected(site, inp, base, expected):
    net = _ml()
    d = {"x": torch.tensor(inp)}
    if base is not None:
        d[("baseline", "x")] = torch.tensor(base)
    out = tdfunc.internal_influence(
        lambda t: net(t["x"])[:, 0], TensorDict(d, batch_size=[1]), net, site, n_steps=500, method="riemann_trapezoid"
    )
    assert float((out["attr", site] - torch.tensor(expected)).abs().max()) < 0.01


@pytest.mark.parametrize(
    "site,expected,inplace",
    [
        ("linear0", [[0.0, 390.0, 0.0]], False),
        ("linear1", [[90.0, 100.0, 100.0, 100.0]], False),
        ("relu", [[90.0, 100.0, 100.0, 100.0]], True),
        ("linear2", [[390.0, 0.0]], False),
    ],
)
def test_layer_conductance_captum_expected(site, expected, inplace):
    net = _ml(inplace=inplace)
    td = TensorDict({"x": torch.tensor([[0.0, 100.0, 0.0]])}, batch_size=[1])
    out = tdfunc.layer_conductance(
        lambda t: net(t["x"])[:, 0], td, net, site, n_steps=500, return_convergence_delta=True
    )
    assert float((out["attr", site] - torch.tensor(expected)).abs().sum()) < 0.1
    assert out["convergence_delta"].abs().max() < 0.01


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_middle"])
def test_conductance_and_internal_influence_equal_captum_every_class(method):
    captum_attr = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    x, b = torch.randn(5, 3, dtype=torch.float64), 0.2 * torch.randn(5, 3, dtype=torch.float64)
    td = TensorDict({"x": x, ("baseline", "x"): b}, batch_size=[5])
    cond = tdfunc.layer_conductance(lambda t: net(t["x"]), td, net, "1", n_steps=20, method=method)
    ii = tdfunc.internal_influence(lambda t: net(t["x"]), td, net, "2", n_steps=20, method=method)
    for k in range(4):  # captum's alphas / step sizes are float32 python lists: 1e-8
        ref = captum_attr.LayerConductance(net, net[1]).attribute(x, b, target=k, n_steps=20, method=method)
        torch.testing.assert_close(cond["attr", "1"][:, k], ref.detach(), rtol=1e-7, atol=1e-8)
        ref = captum_attr.InternalInfluence(net, net[2]).attribute(x, b, target=k, n_steps=20, method=method)
        torch.testing.assert_close(ii["attr", "2"][:, k], ref.detach(), rtol=1e-7, atol=1e-8)


def test_conductance_slow_reference_and_completeness():
    """Written out: conductance = sum_s dF/da(alpha_s) (a(alpha_{s+1}) - a(alpha_s)) with autograd per point; summed
    over a layer that cuts every path, it tends to f(x) - f(x')."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, b = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    td = TensorDict({"x": x, ("baseline", "x"): b}, batch_size=[2])
    out = tdfunc.layer_conductance(
        lambda t: net(t["x"])[:, 1], td, net, "1", n_steps=7, method="riemann_left", return_convergence_delta=True
    )
    alphas = [i / 8 for i in range(8)]  # riemann_left with n_steps + 1 = 8 points
    slow = torch.zeros(2, 5, dtype=torch.float64)
    for s in range(7):
        a0 = net[1](net[0](b + alphas[s] * (x - b))).detach().requires_grad_()
        (g,) = torch.autograd.grad(net[2](a0)[:, 1].sum(), a0)
        a1 = net[1](net[0](b + alphas[s + 1] * (x - b)))
        slow += g * (a1 - a0).detach()
    torch.testing.assert_close(out["attr", "1"], slow, rtol=1e-12, atol=1e-12)
    fine = tdfunc.layer_conductance(
        lambda t: net(t["x"])[:, 1], td, net, "1", n_steps=400, return_convergence_delta=True
    )
    assert fine["convergence_delta"].abs().max() < 1e-4


def test_pins_conductance_and_influence_errors():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    td = TensorDict({"x": torch.randn(2, 3)}, batch_size=[2])
    with pytest.raises(tdfunc.AttributionError, match=re.escape("tdfunc.layer_conductance: unknown method 'simpson'")):
        tdfunc.layer_conductance(lambda t: net(t["x"]), td, net, "1", method="simpson")
    with pytest.raises(tdfunc.AttributionError, match=re.escape("tdfunc.internal_influence: n_steps")):
        tdfunc.internal_influence(lambda t: net(t["x"]), td, net, "1", n_steps=0)
    with pytest.raises(
        tdfunc.AttributionError,
        match=re.escape("tdfunc.layer_conductance: return_convergence_delta must be True or False, got str ('yes')."),
    ):
        tdfunc.layer_conductance(lambda t: net(t["x"]), td, net, "1", return_convergence_delta="yes")
    with pytest.raises(tdfunc.SiteError, match=re.escape("tdfunc.internal_influence: unknown site 'nope'")):
        tdfunc.internal_influence(lambda t: net(t["x"]), td, net, "nope")


# --- layer IG on integer token ids (issue 13 §5): captum's LayerIntegratedGradients on an embedding layer, with the
# ids in td and baseline ids (the pad token) as a ('baseline', key) entry or baselines=<pad id>; transformers BERT and
# GPT-2 from small configs, every target of one call against captum's target=c (captum's float32 alphas: IG_TOL).


def _hf(name):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if name == "bert":
        cfg = transformers.BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            num_labels=3,
            attn_implementation="eager",
        )
        model = transformers.BertForSequenceClassification(cfg).eval().to(DT)
        ids = torch.randint(1, 50, (3, 6))
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0
        fwd = lambda i, m: model(input_ids=i, attention_mask=m).logits  # 3 classes
        return model, fwd, ids, mask, cfg.pad_token_id, [("bert.embeddings", model.bert.embeddings)]
    cfg = transformers.GPT2Config(
        vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=16, attn_implementation="eager"
    )
    model = transformers.GPT2LMHeadModel(cfg).eval().to(DT)
    ids = torch.randint(0, 60, (3, 5))
    fwd = lambda i, m: model(input_ids=i, attention_mask=m).logits[:, -1, :4]  # 4 next-token logits
    return model, fwd, ids, torch.ones_like(ids), 7, [("transformer.wte", model.transformer.wte)]


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_layer_ig_token_ids_with_pad_baseline_matches_captum_every_target(name):
    model, fwd, ids, mask, pad, sites = _hf(name)
    f = lambda t: fwd(t["input_ids"], t["attention_mask"])
    pad_ids = torch.full_like(ids, pad)
    entry = TensorDict({"input_ids": ids, "attention_mask": mask, ("baseline", "input_ids"): pad_ids}, batch_size=[3])
    site, layer = sites[0]
    for method, n in (("gausslegendre", 8), ("riemann_trapezoid", 5)):
        out = tdfunc.layer_integrated_gradients(
            f, entry, model, site, n_steps=n, method=method, return_convergence_delta=True
        )
        attr, delta = out["attr", site], out["convergence_delta"]
        assert attr.shape == (3, delta.shape[1], *ids.shape[1:], 16)
        for c in range(delta.shape[1]):
            ref, ref_delta = LayerIntegratedGradients(fwd, layer).attribute(
                ids,
                pad_ids,
                target=c,
                additional_forward_args=(mask,),
                n_steps=n,
                method=method,
                return_convergence_delta=True,
            )
            torch.testing.assert_close(attr[:, c], ref, **IG_TOL)
            torch.testing.assert_close(delta[:, c], ref_delta, **IG_TOL)
    # the same call with baselines=<pad id> shared across the batch and the ids named by in_keys; per-token scores
    shared = tdfunc.layer_integrated_gradients(
        f,
        entry.exclude(("baseline", "input_ids")),
        model,
        site,
        n_steps=5,
        method=method,
        in_keys=["input_ids"],
        baselines=pad,
    )
    torch.testing.assert_close(shared["attr", site], attr, **EXACT)
    per_token = shared["attr", site].sum(-1)
    assert per_token.shape == (3, delta.shape[1], ids.shape[1])


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_layer_ig_token_ids_completeness_and_one_target(name):
    """sum(attr) = f(ids) - f(pad ids) up to the quadrature error (Gauss-Legendre: ~1e-15 here); the attention mask is
    held fixed; a one-target f equals the K-target call's column; a td holding only the ids takes them by default."""
    model, fwd, ids, mask, pad, sites = _hf(name)
    site, _ = sites[0]
    td = TensorDict({"input_ids": ids, "attention_mask": mask}, batch_size=[3])
    f = lambda t: fwd(t["input_ids"], t["attention_mask"])
    out = tdfunc.layer_integrated_gradients(f, td, model, site, in_keys="input_ids", baselines=pad, n_steps=20)
    attr = out["attr", site]
    with torch.no_grad():
        gap = fwd(ids, mask) - fwd(torch.full_like(ids, pad), mask)
    total = attr.flatten(2).sum(-1)
    assert gap.abs().max() > 1e-3  # a gap to explain
    torch.testing.assert_close(total, gap.detach(), rtol=1e-9, atol=1e-12)
    coarse = tdfunc.layer_integrated_gradients(f, td, model, site, in_keys="input_ids", baselines=pad, n_steps=4)
    assert (coarse["attr", site].flatten(2).sum(-1) - gap).abs().max() > 1e-13  # the check above can fail
    one = tdfunc.layer_integrated_gradients(
        lambda t: f(t)[:, 1], td, model, site, in_keys="input_ids", baselines=pad, n_steps=20
    )
    torch.testing.assert_close(one["attr", site], attr[:, 1], **EXACT)
    only_ids = TensorDict({"input_ids": ids}, batch_size=[3])
    g = lambda t: fwd(t["input_ids"], mask)
    default = tdfunc.layer_integrated_gradients(g, only_ids, model, site, n_steps=20)  # zeros: captum's default
    ref = LayerIntegratedGradients(fwd, sites[0][1]).attribute(
        ids, additional_forward_args=(mask,), target=2, n_steps=20
    )
    torch.testing.assert_close(default["attr", site][:, 2], ref, **IG_TOL)


def test_layer_ig_token_id_errors_pinned():
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 2)
    lm = nn.ModuleDict({"emb": emb, "head": head})
    ids = torch.tensor([[3, 7, 0], [1, 2, 3]])
    f = lambda t: head(emb(t["ids"]).mean(1))[:, 0]
    both = TensorDict({"ids": ids, "mask": torch.ones_like(ids)}, batch_size=[2])
    cases = [
        (
            lambda: tdfunc.layer_integrated_gradients(f, both, lm, "emb"),
            "tdfunc.layer_integrated_gradients: td has no floating-point entry and no entry given a baseline (entries: "
            "['ids', 'mask']), so nothing says which inputs go to a baseline; name them with in_keys=['ids'] (integer "
            "token ids too: their baseline is ids of the same dtype, e.g. baselines=<pad token id> or a ('baseline', "
            "'ids') entry; zeros when absent).",
        ),
        (
            lambda: tdfunc.layer_integrated_gradients(
                f, both.clone().set(("baseline", "ids"), torch.zeros(2, 3)), lm, "emb"
            ),
            "tdfunc.layer_integrated_gradients: baseline for 'ids' has dtype torch.float32 but the input has dtype "
            "torch.int64; the baseline of integer inputs (token ids) is ids of the same dtype (e.g. the pad token id): "
            "the path runs between the site's values for the baseline ids and for the input ids. Give integer ids "
            "(baselines=<pad token id>, or a ('baseline', 'ids') entry of dtype torch.int64); for a baseline in "
            "embedding space, attribute float embeddings (pass inputs_embeds).",
        ),
        (
            lambda: tdfunc.layer_integrated_gradients(f, both, lm, "emb", in_keys="ids", baselines=torch.zeros(3)),
            "tdfunc.layer_integrated_gradients: baseline for 'ids' has dtype torch.float32 but the input has dtype "
            "torch.int64; the baseline of integer inputs (token ids) is ids of the same dtype (e.g. the pad token id): "
            "the path runs between the site's values for the baseline ids and for the input ids. Give integer ids "
            "(baselines=<pad token id>, or a ('baseline', 'ids') entry of dtype torch.int64); for a baseline in "
            "embedding space, attribute float embeddings (pass inputs_embeds).",
        ),
        (
            lambda: tdfunc.layer_integrated_gradients(f, both, lm, "emb", in_keys="ids", baselines=0.5),
            "tdfunc.layer_integrated_gradients: baseline for 'ids' is 0.5 but the input has dtype torch.int64; give a "
            "finite value of the input's dtype (for token ids an integer, e.g. the pad token id; for a bool mask True "
            "or False).",
        ),
        (
            lambda: tdfunc.layer_integrated_gradients(f, both, lm, "emb:input", in_keys="ids"),
            "tdfunc.layer_integrated_gradients: site 'emb:input' holds dtype torch.int64; layer attribution needs a "
            "floating-point tensor there. Attribute another site (e.g. ':output.N' for one element of a tuple output).",
        ),
    ]
    for call, message in cases:
        with pytest.raises(AttributionError) as info:
            call()
        assert str(info.value) == message
    # input-space methods cannot move ids along a path: unchanged refusal
    with pytest.raises(AttributionError, match=re.escape("tdfunc.internal_influence: input 'ids' has dtype")):
        tdfunc.internal_influence(f, both, lm, "emb", in_keys="ids")
