"""tdfunc.neuron_conductance against captum's NeuronConductance and a slow reference from the paper.

captum's own cases (tests/attr/neuron/test_neuron_conductance.py: models, inputs, expected values, tolerances
delta 0.1 with n_steps 500 Gauss-Legendre; the layer-matching cases delta 0.005 with captum's default
riemann_trapezoid) re-expressed with tdfunc, and captum's class run live on the same inputs.  captum's tuple
selector ``lambda x: x[i][:, j]`` of a module returning a tuple is the site ``"multi_relu:output.i"`` with
selector ``(j,)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import LayerConductance, NeuronConductance
from captum.testing.helpers.basic_models import (
    BasicModel_ConvNet,
    BasicModel_MultiLayer,
    BasicModel_MultiLayer_MultiInput,
)
from tensordict import TensorDict

import tdfunc
from tdfunc.attribution import AttributionError


def _td(*xs, **extra):
    d = {f"x{i}": x for i, x in enumerate(xs)}
    d.update(extra)
    return TensorDict(d, batch_size=[xs[0].shape[0]])


def _close(got, want, delta):
    want = torch.as_tensor(want, dtype=got.dtype)
    assert (got - want).abs().max() <= delta, (got, want)


# ---- captum's _conductance_input_test_assert cases (delta 0.1, n_steps 500, gausslegendre, target 0) ----

ONE_INPUT = [
    # (site, input, selector, expected, multiply_by_inputs)
    ("linear2", [[0.0, 100.0, 0.0]], (0,), [0.0, 390.0, 0.0], True),
    ("linear2", [[100.0, 100.0, 100.0]], (0,), [3.96, 3.96, 3.96], False),
    ("linear1", [[0.0, 100.0, 0.0]], 0, [0.0, 90.0, 0.0], True),
    ("linear1", [[0.0, 100.0, 0.0]], lambda v: v[:, 0], [0.0, 90.0, 0.0], True),
    ("relu", [[0.0, 70.0, 30.0]], (3,), [0.0, 70.0, 30.0], True),
]


@pytest.mark.parametrize("site,x,sel,want,mult", ONE_INPUT)
def test_captum_cases_one_input(site, x, sel, want, mult):
    net = BasicModel_MultiLayer()
    x = torch.tensor(x)
    f = lambda t: net(t["x0"])[:, 0]  # noqa: E731
    out = tdfunc.neuron_conductance(f, _td(x), net, site, sel, n_steps=500, multiply_by_inputs=mult)
    _close(out["attr", "x0"][0], want, 0.1)
    ref = NeuronConductance(net, getattr(net, site), multiply_by_inputs=mult).attribute(
        x, sel, target=0, n_steps=500, method="gausslegendre"
    )
    torch.testing.assert_close(out["attr", "x0"], ref, atol=1e-4, rtol=1e-5)
    for chunk_size in (5, 20):  # captum's internal_batch_size loop: the same map in chunks of path points
        chunked = tdfunc.neuron_conductance(
            f, _td(x), net, site, sel, n_steps=500, multiply_by_inputs=mult, chunk_size=chunk_size
        )
        torch.testing.assert_close(chunked["attr", "x0"], out["attr", "x0"], atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize(
    "site,xs,extra,want",
    [
        (  # test_simple_conductance_multi_input_linear2: three inputs, scale 4
            "model.linear2",
            ([[0.0, 10.0, 0.0]], [[0.0, 10.0, 0.0]], [[0.0, 5.0, 0.0]]),
            None,
            ([[0.0, 156.0, 0.0]], [[0.0, 156.0, 0.0]], [[0.0, 78.0, 0.0]]),
        ),
        (  # test_simple_conductance_multi_input_relu: inputs 1, 2; x3 and scale 5 held fixed
            "model.relu",
            ([[0.0, 10.0, 1.0]], [[0.0, 4.0, 5.0]]),
            [[0.0, 0.0, 0.0]],
            ([[0.0, 50.0, 5.0]], [[0.0, 20.0, 25.0]]),
        ),
        (  # test_simple_conductance_multi_input_batch_relu
            "model.relu",
            ([[0.0, 10.0, 1.0], [0.0, 0.0, 10.0]], [[0.0, 4.0, 5.0], [0.0, 0.0, 10.0]]),
            [[0.0, 0.0, 0.0], [0.0, 0.0, 5.0]],
            ([[0.0, 50.0, 5.0], [0.0, 0.0, 50.0]], [[0.0, 20.0, 25.0], [0.0, 0.0, 50.0]]),
        ),
    ],
)
def test_captum_cases_multi_input(site, xs, extra, want):
    net = BasicModel_MultiLayer_MultiInput()
    xs = [torch.tensor(x) for x in xs]
    if extra is None:
        td, f, scale = _td(*xs), (lambda t: net(t["x0"], t["x1"], t["x2"], 4)[:, 0]), 4
    else:
        td = _td(*xs, extra=torch.tensor(extra))
        f, scale = (lambda t: net(t["x0"], t["x1"], t["extra"], 5)[:, 0]), 5
    keys = [f"x{i}" for i in range(len(xs))]
    out = tdfunc.neuron_conductance(f, td, net, site, (0,) if extra is None else (3,), n_steps=500, in_keys=keys)
    for i, w in enumerate(want):
        _close(out["attr", f"x{i}"], w, 0.1)
    add = (torch.tensor(extra), scale) if extra is not None else (scale,)
    ref = NeuronConductance(net, net.get_submodule(site)).attribute(
        tuple(xs),
        (0,) if extra is None else (3,),
        target=0,
        n_steps=500,
        method="gausslegendre",
        additional_forward_args=add,
    )
    for i, r in enumerate(ref):
        torch.testing.assert_close(out["attr", f"x{i}"], r, atol=1e-4, rtol=1e-5)


def test_captum_layer_tuple_selector_fn():  # lambda x: x[0][:, 1] of MultiRelu's tuple output
    net = BasicModel_MultiLayer(multi_input_module=True)
    x = torch.tensor([[0.0, 6.0, 0.0]])
    out = tdfunc.neuron_conductance(lambda t: net(t["x0"])[:, 0], _td(x), net, "multi_relu", (1,), n_steps=500)
    _close(out["attr", "x0"][0], [0.0, 6.0, 0.0], 0.1)


def test_captum_matching_layer_tuple_selector_fn_and_unused_layer():
    """test_matching_layer_tuple_selector_fn: each unit's conductance sums to captum's LayerConductance of that
    unit (delta 0.005); test_relu_neuron_conductance_with_unused_layer: ``relu`` runs but feeds nothing."""
    net = BasicModel_MultiLayer(multi_input_module=True)
    x = torch.tensor([[0.0, 6.0, 0.0]])
    f = lambda t: net(t["x0"])[:, 0]  # noqa: E731
    layer = LayerConductance(net, net.multi_relu).attribute(x, target=0, n_steps=500, method="gausslegendre")
    for i in range(2):
        units = [(j,) for j in range(layer[i].shape[1])]
        got = tdfunc.neuron_conductance(f, _td(x), net, f"multi_relu:output.{i}", units, n_steps=500)
        assert (got["attr", "x0"].sum(-1)[0] - layer[i][0]).abs().max() <= 0.005
    unused = tdfunc.neuron_conductance(f, _td(x), net, "relu", [(j,) for j in range(4)], n_steps=50)
    assert unused["attr", "x0"].abs().max() == 0


@pytest.mark.parametrize(
    "site,n,base",
    [("conv2", 2, 0.0), ("conv2", 2, 0.000001), ("relu2", 3, "random"), ("relu2", 3, 0.0), ("pool2", 1, "random")],
)
def test_captum_matching_layer_conductance_convnet(site, n, base):
    """captum's _conductance_input_sum_test_assert: every neuron's conductance summed over the input equals
    LayerConductance of that neuron (delta 0.005); every neuron of the site in one call here."""
    torch.manual_seed(0)
    net = BasicModel_ConvNet()
    x = 100 * torch.randn(n, 1, 10, 10)
    base_t = 20 * torch.randn(n, 1, 10, 10) if base == "random" else base
    layer = LayerConductance(net, getattr(net, site)).attribute(
        x, baselines=base_t, target=0, n_steps=500, method="gausslegendre"
    )
    units = [tuple(int(i) for i in idx) for idx in np.ndindex(*layer.shape[1:])]
    got = tdfunc.neuron_conductance(
        lambda t: net(t["x0"])[:, 0],
        _td(x),
        net,
        site,
        units,
        n_steps=500,
        method="riemann_trapezoid",
        baselines=base_t,
    )["attr", "x0"]
    sums = got.flatten(2).sum(-1).reshape(layer.shape)
    assert (sums - layer).abs().max() <= 0.005
    # and captum's NeuronConductance itself on a few of the units (same method and steps)
    for u in units[:: max(1, len(units) // 4)]:
        ref = NeuronConductance(net, getattr(net, site)).attribute(x, u, baselines=base_t, target=0, n_steps=500)
        torch.testing.assert_close(got[:, units.index(u)], ref, atol=1e-3, rtol=1e-4)


def test_group_selector_is_the_sum_of_its_units_not_captums_product():
    """A slice is the flow through the group (the sum of its units' conductances); captum multiplies the sums
    (its callable-selector warning says aggregation is inaccurate there)."""
    net = BasicModel_MultiLayer()
    x = torch.tensor([[1.0, 7.0, 3.0]])
    f = lambda t: net(t["x0"])[:, 0]  # noqa: E731
    group = tdfunc.neuron_conductance(f, _td(x), net, "relu", (slice(1, 3),), n_steps=100)["attr", "x0"]
    units = tdfunc.neuron_conductance(f, _td(x), net, "relu", [(1,), (2,)], n_steps=100)["attr", "x0"]
    summed = tdfunc.neuron_conductance(f, _td(x), net, "relu", lambda v: v[:, 1:3].sum(1), n_steps=100)["attr", "x0"]
    torch.testing.assert_close(group, units.sum(1))
    torch.testing.assert_close(summed, group)
    captum = NeuronConductance(net, net.relu).attribute(
        x, (slice(1, 3),), target=0, n_steps=100, method="gausslegendre"
    )
    torch.testing.assert_close(captum, 2 * group)  # here: (1 + 1) * (the two units' input gradients)


# ---- slow reference from the paper, completeness, targets ----


def _mlp():
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5), torch.nn.Softplus(), torch.nn.Linear(5, 3)
    ).double()


def _slow(net, split, x, base, unit, target, alphas, weights):
    """(x - x') * sum_s w_s * df/dy_j * dy_j/dx at x(alpha_s), one example and one path point at a time."""
    lower, upper = net[:split], net[split:]
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        acc = torch.zeros(x.shape[1:], dtype=x.dtype)
        for a, w in zip(alphas, weights):
            xa = (base[b] + a * (x[b] - base[b])).requires_grad_()
            y = lower(xa)
            (gy,) = torch.autograd.grad(upper(y)[target], y, retain_graph=True)
            (gx,) = torch.autograd.grad(y[unit], xa)
            acc = acc + w * gy[unit] * gx
        out[b] = acc * (x[b] - base[b])
    return out


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_middle"])
def test_equals_slow_reference_every_target_and_unit(method):
    net = _mlp()
    x, base = torch.randn(3, 4, dtype=torch.float64), 0.3 * torch.randn(3, 4, dtype=torch.float64)
    td = TensorDict({"x": x, ("baseline", "x"): base}, batch_size=[3])
    units = [(0,), (2,), (4,)]
    out = tdfunc.neuron_conductance(lambda t: net(t["x"]), td, net, "3", units, n_steps=12, method=method)
    got = out["attr", "x"]
    assert got.shape == (3, 3, 3, 4)  # batch, K targets, N units, features
    if method == "gausslegendre":
        nodes, w = np.polynomial.legendre.leggauss(12)
        alphas, weights = (nodes + 1) / 2, w / 2
    else:
        alphas, weights = (np.arange(12) + 0.5) / 12, np.full(12, 1 / 12)
    for t in range(3):
        for n, (u,) in enumerate(units):
            ref = _slow(net, 4, x, base, u, t, alphas.tolist(), weights.tolist())
            torch.testing.assert_close(got[:, t, n], ref, atol=1e-12, rtol=1e-10)


def test_every_unit_adds_up_to_integrated_gradients():
    net = _mlp()
    x = torch.randn(4, 4, dtype=torch.float64)
    td = TensorDict({"x": x}, batch_size=[4])
    f = lambda t: net(t["x"])  # noqa: E731
    every = tdfunc.neuron_conductance(f, td, net, "2", [(j,) for j in range(5)], n_steps=20)["attr", "x"]
    ig = tdfunc.integrated_gradients(f, td, n_steps=20)["attr", "x"]
    torch.testing.assert_close(every.sum(2), ig, atol=1e-12, rtol=1e-10)
    whole = tdfunc.neuron_conductance(f, td, net, "2", (slice(None),), n_steps=20)["attr", "x"]
    torch.testing.assert_close(whole, ig, atol=1e-12, rtol=1e-10)
    # one target at a time, and the vmap over examples, give the same maps
    one = tdfunc.neuron_conductance(lambda t: net(t["x"])[:, 1], td, net, "2", (3,), n_steps=20)["attr", "x"]
    torch.testing.assert_close(one, every[:, 1, 3])


def test_double_backward_equals_autograd_through_the_slow_reference():
    net = _mlp()
    x = torch.randn(2, 4, dtype=torch.float64)
    td = TensorDict({"x": x}, batch_size=[2])
    state = tdfunc.state(net)
    nodes, ww = np.polynomial.legendre.leggauss(6)
    alphas, weights = ((nodes + 1) / 2).tolist(), (ww / 2).tolist()
    w = state["0", "weight"].clone().requires_grad_()

    s = state.update({("0", "weight"): w}, inplace=False)
    f = lambda t: tdfunc.functional_call(net, s, (t["x"],))[:, 0]  # noqa: E731
    ours = tdfunc.neuron_conductance(f, td, net, "1", (2,), n_steps=6)["attr", "x"]
    (g1,) = torch.autograd.grad(ours.pow(2).sum(), w)

    lower = lambda v: torch.tanh(torch.nn.functional.linear(v, w, net[0].bias))  # noqa: E731
    upper = lambda y: net[2:](y)[0]  # noqa: E731
    ref = []
    for b in range(2):  # the slow reference with create_graph, differentiated by autograd
        acc = 0
        for a, q in zip(alphas, weights):
            xa = (a * x[b]).requires_grad_()
            y = lower(xa)
            (gy,) = torch.autograd.grad(upper(y), y, create_graph=True)
            (gx,) = torch.autograd.grad(y[2], xa, create_graph=True)
            acc = acc + q * gy[2] * gx
        ref.append(acc * x[b])
    ref = torch.stack(ref)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)
    (g2,) = torch.autograd.grad(ref.pow(2).sum(), w)
    torch.testing.assert_close(g1, g2, atol=1e-10, rtol=1e-8)


# ---- pinned errors ----


def test_neuron_conductance_errors():
    net = _mlp().float()
    td = TensorDict({"x": torch.randn(2, 4)}, batch_size=[2])
    f = lambda t: net(t["x"])  # noqa: E731
    with pytest.raises(AttributionError, match=r"tdfunc.neuron_conductance: bad neuron selector 1.5; expected an"):
        tdfunc.neuron_conductance(f, td, net, "1", 1.5)
    with pytest.raises(
        AttributionError,
        match=r"tdfunc.neuron_conductance: the neuron selector \(6,\) has index 6 for per-example dim 0 of site '1'",
    ):
        tdfunc.neuron_conductance(f, td, net, "1", (6,))
    with pytest.raises(
        AttributionError, match=r"tdfunc.neuron_conductance: the selector function returned shape \(\) for a site"
    ):
        tdfunc.neuron_conductance(f, td, net, "1", lambda v: v.sum())
    with pytest.raises(AttributionError, match=r"tdfunc.neuron_conductance: unknown method 'simpson'"):
        tdfunc.neuron_conductance(f, td, net, "1", 0, method="simpson")
    with pytest.raises(TypeError, match=r"tdfunc.neuron_conductance: multiply_by_inputs must be True or False"):
        tdfunc.neuron_conductance(f, td, net, "1", 0, multiply_by_inputs=1)
    with pytest.raises(AttributionError, match=r"tdfunc.neuron_conductance: site '1\*' names several values"):
        tdfunc.neuron_conductance(f, td, net, "1*", 0)
