"""tdfunc.neuron: captum's Neuron* methods as ``method(neuron(f, module, site, selector), td)``.

Checked on captum's own test cases (tests/attr/neuron/test_neuron_{gradient,integrated_gradients,deeplift,
gradient_shap}.py: their models, inputs, expected values and tolerances) and against captum's classes run live on
the same inputs.  captum's callable selectors ``lambda x: torch.sum(x)`` sum over the batch too; tdfunc's callable
returns one value per example, so they are written ``lambda v: v.flatten(1).sum(1)`` (same gradients: the examples
are independent).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import NeuronDeepLift, NeuronGradient, NeuronGradientShap, NeuronIntegratedGradients
from captum.testing.helpers.basic_models import (
    BasicModel_ConvNet,
    BasicModel_MultiLayer,
    BasicModel_MultiLayer_MultiInput,
    ReLULinearModel,
)
from tensordict import TensorDict

import tdfunc
from tdfunc.attribution import AttributionError


def _td(*xs, **extra):
    d = {f"x{i}": x for i, x in enumerate(xs)}
    d.update(extra)
    return TensorDict(d, batch_size=[xs[0].shape[0]])


def _attrs(out, n):
    return [out["attr", f"x{i}"] for i in range(n)]


def _rows(a, b, n):  # captum's example-major rows (b * n + s) -> tdfunc's (n, b, ...)
    a = torch.as_tensor(a)
    return a.reshape(b, n, *a.shape[1:]).transpose(0, 1)


def _close(got, want, delta):
    want = torch.as_tensor(want, dtype=got.dtype)
    assert (got - want).abs().max() <= delta, (got, want)


# ---- NeuronGradient (test_neuron_gradient.py; captum's default tolerance 1e-4) ----

_SUM = lambda v: v.flatten(1).sum(1)  # noqa: E731  captum's lambda x: torch.sum(x), per example
GRAD_CASES = [
    # (layer site, input, selector, expected, inplace)
    ("linear2", [[0.0, 100.0, 0.0]], (0,), [[4.0, 4.0, 4.0]], False),
    ("linear1", [[0.0, 100.0, 0.0]], (0,), [[1.0, 1.0, 1.0]], False),
    ("relu:input", [[0.0, 5.0, 4.0]], (0,), [[1.0, 1.0, 1.0]], True),  # attribute_to_neuron_input=True
    ("linear1", [[0.0, 5.0, 4.0]], (0,), [[1.0, 1.0, 1.0]], True),
    ("relu", [[0.0, 5.0, 4.0]], 0, [[0.0, 0.0, 0.0]], False),
    ("relu", [[0.0, 5.0, 4.0]], 1, [[1.0, 1.0, 1.0]], False),
    ("relu", [[0.0, 5.0, 4.0]], _SUM, [[3.0, 3.0, 3.0]], False),
    ("relu", [[0.0, 5.0, 4.0]], (slice(0, 2, 1),), [[1.0, 1.0, 1.0]], False),
]


@pytest.mark.parametrize("site,x,sel,want,inplace", GRAD_CASES)
def test_neuron_gradient_captum_cases(site, x, sel, want, inplace):
    net = BasicModel_MultiLayer(inplace=inplace)
    x = torch.tensor(x)
    out = tdfunc.saliency(tdfunc.neuron(lambda t: net(t["x0"]), net, site, sel), _td(x), abs=False)
    _close(out["attr", "x0"], want, 1e-4)
    layer = getattr(net, site.split(":")[0])
    sel_c = (lambda v: v.sum()) if sel is _SUM else sel
    ref = NeuronGradient(net, layer).attribute(x, sel_c, attribute_to_neuron_input=site.endswith(":input"))
    torch.testing.assert_close(out["attr", "x0"], ref)


@pytest.mark.parametrize(
    "site,xs,add,want",
    [
        ("model.linear2", 3, (3,), [[12.0, 12.0, 12.0]] * 3),
        ("model.linear1", 2, "inp3", [[5.0, 5.0, 5.0]] * 2),
    ],
)
def test_neuron_gradient_multi_input(site, xs, add, want):
    net = BasicModel_MultiLayer_MultiInput()
    x = torch.tensor([[0.0, 100.0, 0.0]])
    if add == "inp3":  # inputs 1, 2 attributed; x3 and scale 5 are extra forward args
        td = _td(x, x, extra=x)
        f = lambda t: net(t["x0"], t["x1"], t["extra"], 5)  # noqa: E731
    else:
        td = _td(x, x, x)
        f = lambda t: net(t["x0"], t["x1"], t["x2"], 3)  # noqa: E731
    out = tdfunc.saliency(tdfunc.neuron(f, net, site, (0,)), td, abs=False, in_keys=[f"x{i}" for i in range(xs)])
    for got in _attrs(out, xs):
        _close(got, want[0], 1e-4)


@pytest.mark.parametrize("layer", ["softmax", "relu2"])
def test_neuron_gradient_convnet_every_neuron_live(layer):
    torch.manual_seed(0)
    net = BasicModel_ConvNet()
    x = torch.randn(3, 1, 10, 10)
    f = lambda t: net(t["x0"])  # noqa: E731
    out = tdfunc.functional_call(net, None, (x,), capture=[layer])[1][layer]
    sels = [(i,) + (0,) * (out.dim() - 2) for i in range(out.shape[1])]
    got = tdfunc.saliency(tdfunc.neuron(f, net, layer, sels), _td(x), abs=False)["attr", "x0"]  # one call, K
    assert got.shape == (3, len(sels), 1, 10, 10)
    for k, s in enumerate(sels):
        ref = NeuronGradient(net, getattr(net, layer)).attribute(x, s)
        torch.testing.assert_close(got[:, k], ref)


# ---- NeuronIntegratedGradients (test_neuron_integrated_gradients.py; delta 0.1, n_steps 200, gausslegendre) ----

IG_CASES = [
    ("linear2", [[0.0, 100.0, 0.0]], 0, [[0.0, 390.0, 0.0]], True),
    ("linear2", [[100.0, 100.0, 100.0]], 0, [[3.96, 3.96, 3.96]], False),
    ("linear1", [[0.0, 100.0, 0.0]], (0,), [[0.0, 100.0, 0.0]], True),
    ("relu", [[0.0, 6.0, 14.0]], (0,), [[0.0, 3.0, 7.0]], True),
    ("relu", [[0.0, 5.0, 4.0]], 1, [[0.0, 5.0, 4.0]], True),
    ("relu", [[0.0, 5.0, 4.0]], lambda v: v[:, 2:].flatten(1).sum(1), [[0.0, 10.0, 8.0]], True),
    ("relu", [[0.0, 5.0, 4.0]], (slice(0, 2, 1),), [[0.0, 5.0, 4.0]], True),
]


@pytest.mark.parametrize("site,x,sel,want,mult", IG_CASES)
def test_neuron_integrated_gradients_captum_cases(site, x, sel, want, mult):
    net = BasicModel_MultiLayer()
    x = torch.tensor(x)
    g = tdfunc.neuron(lambda t: net(t["x0"]), net, site, sel)
    out = tdfunc.integrated_gradients(g, _td(x), n_steps=200, method="gausslegendre", multiply_by_inputs=mult)
    _close(out["attr", "x0"], want, 0.1)
    if not callable(sel):
        ref = NeuronIntegratedGradients(net, getattr(net, site), multiply_by_inputs=mult).attribute(
            x, sel, n_steps=200, method="gausslegendre"
        )
        torch.testing.assert_close(out["attr", "x0"], ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("sel", [(0,), _SUM])
def test_neuron_integrated_gradients_multi_input_batch(sel):
    net = BasicModel_MultiLayer_MultiInput()
    x1 = torch.tensor([[0.0, 6.0, 14.0], [0.0, 80.0, 0.0]])
    x2 = torch.tensor([[0.0, 6.0, 14.0], [0.0, 20.0, 0.0]])
    x3 = torch.tensor([[0.0, 0.0, 0.0], [0.0, 20.0, 0.0]])
    g = tdfunc.neuron(lambda t: net(t["x0"], t["x1"], t["extra"], 0.5), net, "model.relu", sel)
    out = tdfunc.integrated_gradients(g, _td(x1, x2, extra=x3), n_steps=200, in_keys=["x0", "x1"])
    if sel is _SUM:
        want = ([[0.0, 10.5, 24.5], [0.0, 160.0, 0.0]], [[0.0, 10.5, 24.5], [0.0, 40.0, 0.0]])
    else:
        want = ([[0.0, 1.5, 3.5], [0.0, 40.0, 0.0]], [[0.0, 1.5, 3.5], [0.0, 10.0, 0.0]])
    for got, w in zip(_attrs(out, 2), want):
        _close(got, w, 0.1)


def test_neuron_integrated_gradients_matches_output_ig():  # captum's test_matching_output_gradient, delta 1e-3
    torch.manual_seed(0)
    net = BasicModel_ConvNet()
    x, base = 100 * torch.randn(2, 1, 10, 10), 20 * torch.randn(2, 1, 10, 10)
    td = TensorDict({"x0": x, ("baseline", "x0"): base}, batch_size=[2])
    f = lambda t: net(t["x0"])  # noqa: E731
    sels = [(i,) for i in range(10)]
    neur = tdfunc.integrated_gradients(tdfunc.neuron(f, net, "softmax", sels), td)["attr", "x0"]
    plain = tdfunc.integrated_gradients(f, td)["attr", "x0"]
    assert (neur - plain).abs().max() <= 1e-3
    ref = NeuronIntegratedGradients(net, net.softmax).attribute(x, (3,), baselines=base)
    torch.testing.assert_close(neur[:, 3], ref, atol=1e-4, rtol=1e-4)


# ---- NeuronDeepLift (test_neuron_deeplift.py; captum's default tolerance 1e-4) ----


@pytest.mark.parametrize(
    "site,mult,want",
    [
        ("l3:input", True, ([[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]])),  # captum's relu output (relu: see errors)
        ("l3:input", True, ([[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]])),
        ("l3", True, ([[0.0, 0.0, 0.0]], [[6.0, 9.0, 0.0]])),
        ("l3", False, ([[0.0, 0.0, 0.0]], [[2.0, 3.0, 0.0]])),
    ],
)
@pytest.mark.parametrize("inplace", [False, True])
def test_neuron_deep_lift_captum_cases(site, mult, want, inplace):
    model = ReLULinearModel(inplace=inplace)
    x1, x2 = torch.tensor([[-10.0, 1.0, -5.0]]), torch.tensor([[3.0, 3.0, 1.0]])
    td = _td(x1, x2)
    g = tdfunc.neuron(lambda t: model(t["x0"], t["x1"]), model, site, 0)
    out = tdfunc.deep_lift(g, td, model, multiply_by_inputs=mult)
    for got, w in zip(_attrs(out, 2), want):
        _close(got, w, 1e-4)
    ref = NeuronDeepLift(model, getattr(model, site.split(":")[0]), multiply_by_inputs=mult).attribute(
        (x1, x2), 0, (torch.zeros(1, 3), torch.zeros(1, 3)), attribute_to_neuron_input=site.endswith(":input")
    )
    for got, r in zip(_attrs(out, 2), ref):
        torch.testing.assert_close(got, r)


# ---- NeuronGradientShap (test_neuron_gradient_shap.py) ----


def test_neuron_gradient_shap_basic_multilayer():  # stdevs 0, two zero baselines, multiply_by_inputs=False
    model = BasicModel_MultiLayer(inplace=True).eval()
    x = torch.tensor([[1.0, 20.0, 10.0]])
    g = tdfunc.neuron(lambda t: model(t["x0"]), model, "linear1", 0)
    out = tdfunc.gradient_shap(
        g, _td(x), TensorDict({"x0": torch.zeros(2, 3)}, batch_size=[2]), multiply_by_inputs=False
    )
    _close(out["attr", "x0"], [[1.0, 1.0, 1.0]], 1e-4)


@pytest.mark.parametrize("sel", [0, (slice(0, 1, 1),), lambda v: v[:, 0:1].sum(1)])
def test_neuron_gradient_shap_same_draws_as_captum(sel):
    """Same baselines, alphas and noise as captum's NeuronGradientShap draws: equal to captum's numbers."""
    model = BasicModel_MultiLayer(inplace=True).eval()
    x, bases = torch.tensor([[1.0, 20.0, 10.0], [2.0, -3.0, 4.0]]), torch.randn(2, 3)
    n = 6
    csel = (lambda v: v[:, 0:1]) if callable(sel) else sel
    np.random.seed(3)
    torch.manual_seed(3)  # captum's order: baseline indices (numpy), input noise (torch), alphas (numpy)
    idx = np.random.choice(2, n * 2)
    noise = torch.normal(0, torch.tensor(0.09).repeat(2 * n, 3))
    al = np.random.uniform(0, 1, 2 * n)
    np.random.seed(3)
    torch.manual_seed(3)
    ref = NeuronGradientShap(model, model.linear1).attribute(x, csel, baselines=bases, n_samples=n, stdevs=0.09)
    g = tdfunc.neuron(lambda t: model(t["x0"]), model, "linear1", sel)
    out = tdfunc.gradient_shap(
        g,
        _td(x),
        TensorDict({"x0": bases}, batch_size=[2]),
        n_samples=n,
        stdevs=0.09,
        noise=_rows(noise, 2, n) / 0.09,
        alphas=_rows(al, 2, n).float(),
        baseline_index=_rows(idx, 2, n),
    )
    torch.testing.assert_close(out["attr", "x0"], ref, atol=1e-5, rtol=1e-5)


# ---- other methods and K neurons in one call ----


def test_neuron_other_methods_equal_loop_over_neurons():
    torch.manual_seed(0)
    net = BasicModel_ConvNet()
    x = torch.randn(2, 1, 10, 10)
    f = lambda t: net(t["x0"])  # noqa: E731
    sels = [(0, 1, 1), (1, slice(None), 2), (1,)]
    for method in (tdfunc.guided_backprop, tdfunc.deconvolution):
        many = method(tdfunc.neuron(f, net, "pool1:input", sels), _td(x), net)["attr", "x0"]
        for k, s in enumerate(sels):
            one = method(tdfunc.neuron(f, net, "pool1:input", s), _td(x), net)["attr", "x0"]
            torch.testing.assert_close(many[:, k], one)
    # the obvious reference: gradient of the hand-written selection of a captured value
    hand = lambda t: tdfunc.functional_call(net, None, (t["x0"],), capture=["relu1"])[1]["relu1"][:, 1, :, 2].sum(1)  # noqa: E731
    torch.testing.assert_close(
        tdfunc.saliency(tdfunc.neuron(f, net, "relu1", (1, slice(None), 2)), _td(x), abs=False)["attr", "x0"],
        tdfunc.saliency(hand, _td(x), abs=False)["attr", "x0"],
    )


# ---- pinned errors ----


def _net():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_neuron_errors():
    net = _net()
    f = lambda t: net(t["x"])  # noqa: E731
    td = TensorDict({"x": torch.randn(2, 3)}, batch_size=[2])
    with pytest.raises(AttributionError, match=r"tdfunc.neuron: bad neuron selector 1.5; expected an index tuple"):
        tdfunc.neuron(f, net, "0", 1.5)
    with pytest.raises(AttributionError, match=r"tdfunc.neuron: bad neuron selector \[\(0,\), 'a'\]"):
        tdfunc.neuron(f, net, "0", [(0,), "a"])
    with pytest.raises(AttributionError, match=r"tdfunc.neuron: bad neuron selector True"):
        tdfunc.neuron(f, net, "0", True)
    with pytest.raises(AttributionError, match=r"site must be one site string \(no glob, no '@\*'\), got '\*'"):
        tdfunc.neuron(f, net, "*", (0,))
    with pytest.raises(tdfunc.SiteError, match=r"tdfunc.neuron: .*'fc9'"):
        tdfunc.neuron(f, net, "fc9", (0,))
    with pytest.raises(
        AttributionError, match=r"selector \(4,\) has index 4 for per-example dim 0 of site '0', which has size 4"
    ):
        tdfunc.saliency(tdfunc.neuron(f, net, "0", (4,)), td)
    with pytest.raises(AttributionError, match=r"selector \(0, 1\) has 2 indices but the value at site '0' has 1 dims"):
        tdfunc.saliency(tdfunc.neuron(f, net, "0", (0, 1)), td)
    with pytest.raises(AttributionError, match=r"the selector function returned shape \(\) for a site value of shape"):
        tdfunc.saliency(tdfunc.neuron(f, net, "0", lambda v: v.sum()), td)
    with pytest.raises(tdfunc.NotReachedError, match=r"tdfunc.neuron: nothing was captured at site '2'"):
        tdfunc.saliency(tdfunc.neuron(lambda t: net[0](t["x"]), net, "2", (0,)), td)
    with pytest.raises(AttributionError, match=r"site '0' is of shape \(1, 4\), but it must start with the td's batch"):
        tdfunc.saliency(tdfunc.neuron(lambda t: net[0](t["x"].reshape(1, -1)[:, :3]), net, "0", 0), td)


@pytest.mark.parametrize("name", ["guided_backprop", "deconvolution"])
def test_neuron_guided_backprop_deconvolution_live(name):
    from captum.attr import NeuronDeconvolution, NeuronGuidedBackprop

    torch.manual_seed(0)
    net = BasicModel_ConvNet()
    x = torch.randn(2, 1, 10, 10)
    sels = [(1, 1, 0), (3, slice(0, 2), 1)]  # relu2's output, where the rewritten value arrives: pool2's input
    got = getattr(tdfunc, name)(tdfunc.neuron(lambda t: net(t["x0"]), net, "pool2:input", sels), _td(x), net)
    got = got["attr", "x0"]
    cls = NeuronGuidedBackprop if name == "guided_backprop" else NeuronDeconvolution
    for k, s in enumerate(sels):
        torch.testing.assert_close(got[:, k], cls(net, net.relu2).attribute(x, s))


def test_neuron_deep_lift_shap_live():  # captum's test_linear_neuron_deeplift_shap(_wo_inp_marginal_effects)
    from captum.attr import NeuronDeepLiftShap

    model = ReLULinearModel()
    x1, x2 = torch.tensor([[-10.0, 1.0, -5.0]]), torch.tensor([[3.0, 3.0, 1.0]])
    refs = TensorDict({"x0": torch.zeros(3, 3), "x1": torch.zeros(3, 3)}, batch_size=[3])
    for mult, want in ((True, [[6.0, 9.0, 0.0]]), (False, [[2.0, 3.0, 0.0]])):
        g = tdfunc.neuron(lambda t: model(t["x0"], t["x1"]), model, "l3", 0)
        out = tdfunc.deep_lift_shap(g, _td(x1, x2), model, refs, multiply_by_inputs=mult)
        _close(out["attr", "x1"], want, 1e-4)
        _close(out["attr", "x0"], [[0.0, 0.0, 0.0]], 1e-4)
        ref = NeuronDeepLiftShap(model, model.l3, multiply_by_inputs=mult).attribute(
            (x1, x2), 0, (torch.zeros(3, 3), torch.zeros(3, 3))
        )
        for got, r in zip(_attrs(out, 2), ref):
            torch.testing.assert_close(got, r)


@pytest.mark.parametrize("method", ["deep_lift", "guided_backprop", "deconvolution"])
def test_neuron_refuses_a_site_the_method_rewrites(method):
    net = _net()
    td = TensorDict({"x": torch.randn(2, 3)}, batch_size=[2])
    g = tdfunc.neuron(lambda t: net(t["x"]), net, "1", (0,))
    with pytest.raises(
        AttributionError,
        match=r"tdfunc.neuron: the method called with this f rewrites the output of site '1' .* consumes '1' "
        r"\(e.g. 'next_module:input'\), where the rewritten value arrives",
    ):
        getattr(tdfunc, method)(g, td, net)
    tdfunc.saliency(g, td)  # the plain gradient rewrites nothing: allowed
