"""deep_lift / deep_lift_shap against captum's DeepLift / DeepLiftShap on captum's own test cases and models
(tests/attr/test_deeplift_basic.py, test_deeplift_classification.py; tolerance: captum's assertTensorAlmostEqual,
sum of |diff| < 1e-4), a slow hand-written rescale rule (also differentiated: exact double backward), and
completeness sum(attr) = f(x) - f(x')."""

from __future__ import annotations

import pytest
import torch
from models import CNN
from tensordict import TensorDict
from torch import nn

import tdfunc

captum_attr = pytest.importorskip("captum.attr")
basic_models = pytest.importorskip("captum.testing.helpers.basic_models")
cls_models = pytest.importorskip("captum.testing.helpers.classification_models")


def close(ours, theirs, delta=1e-4):  # captum's assertTensorAlmostEqual, mode "sum"
    theirs = torch.as_tensor(theirs, dtype=ours.dtype)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert float((ours - theirs).abs().sum()) < delta, (ours, theirs)


def two_inputs(model, x1, x2, b1=None, b2=None, **kw):
    d = {"a": x1, "b": x2}
    if b1 is not None:
        d[("baseline", "a")], d[("baseline", "b")] = b1, b2
    td = TensorDict(d, batch_size=x1.shape[:1])
    return tdfunc.deep_lift(lambda t: model(t["a"], t["b"]).reshape(len(t["a"]), -1)[:, 0], td, model, **kw)


def test_relu_exact_match():  # test_relu_deeplift_exact_match
    out = two_inputs(
        basic_models.ReLUDeepLiftModel(),
        torch.tensor([1.0]),
        torch.tensor([2.0]),
        torch.zeros(1),
        torch.zeros(1),
        return_convergence_delta=True,
    )
    assert out["attr", "a"].item() == 2.0 and out["attr", "b"].item() == 1.0 and out["convergence_delta"].item() == 0.0


def test_relu_exact_match_wo_multiplying_by_inputs():
    out = two_inputs(
        basic_models.ReLUDeepLiftModel(), torch.tensor([1.0]), torch.tensor([2.0]), multiply_by_inputs=False
    )
    assert out["attr", "a"].item() == 2.0 and out["attr", "b"].item() == 0.5


@pytest.mark.parametrize("inplace", [False, True])
def test_relu_linear_equals_captum(inplace):  # test_relu_linear_deeplift(_batch), _compare_inplace
    torch.manual_seed(0)
    model = basic_models.ReLULinearModel(inplace=inplace)
    x1 = torch.tensor([[-10.0, 1.0, -5.0], [2.0, 3.0, 4.0]])
    x2 = torch.tensor([[3.0, 3.0, 1.0], [2.3, 5.0, 4.0]])
    b1, b2 = torch.zeros(1, 3), torch.rand(1, 3) * 0.001
    ref = captum_attr.DeepLift(model).attribute((x1, x2), (b1, b2), target=0)
    out = two_inputs(model, x1, x2, b1.expand(2, 3), b2.expand(2, 3), return_convergence_delta=True)
    close(out["attr", "a"], ref[0].detach())
    close(out["attr", "b"], ref[1].detach())
    assert out["convergence_delta"].abs().max() < 1e-5


def test_tanh_and_batch_equal_captum():  # test_tanh_deeplift, test_relu_deeplift_batch
    for model, x1, x2 in [
        (basic_models.TanhDeepLiftModel(), torch.tensor([[-1.0]]), torch.tensor([[-2.0]])),
        (basic_models.ReLUDeepLiftModel(), torch.ones(4, 1), 2 * torch.ones(4, 1)),
    ]:
        ref = captum_attr.DeepLift(model).attribute((x1, x2), (0 * x1, 0 * x2))
        out = two_inputs(model, x1[:, 0], x2[:, 0], return_convergence_delta=True)
        close(out["attr", "a"], ref[0].detach()[:, 0])
        close(out["attr", "b"], ref[1].detach()[:, 0])
        assert out["convergence_delta"].abs().max() < 1e-5


def test_sigmoid_classification_equals_captum():  # test_sigmoid_classification
    model = cls_models.SigmoidDeepLiftModel(20, 5, 1)
    x = torch.arange(0.0, 20.0).unsqueeze(0)
    ref = captum_attr.DeepLift(model).attribute(x, 0 * x, target=0)
    out = tdfunc.deep_lift(
        lambda t: model(t["x"])[:, 0], TensorDict({"x": x}, batch_size=[1]), model, return_convergence_delta=True
    )
    close(out["attr", "x"], ref.detach())
    assert out["convergence_delta"].abs().max() < 1e-5


def test_reused_module_equals_two_copies():  # captum raises on test_reusable_modules; here every call is paired
    torch.manual_seed(1)
    m = basic_models.BasicModelWithReusedModules()
    x = torch.rand(3, 3)
    out = tdfunc.deep_lift(lambda t: m(t["x"]), TensorDict({"x": x}, batch_size=[3]), m, return_convergence_delta=True)
    two = nn.Sequential(m.lin1, nn.ReLU(), m.lin2, nn.ReLU())
    ref = captum_attr.DeepLift(two)
    for k in range(2):
        close(out["attr", "x"][:, k], ref.attribute(x, 0 * x, target=k).detach())
    assert out["convergence_delta"].abs().max() < 1e-5


def test_deep_lift_shap_equals_captum():  # test_relu_deepliftshap_multi_ref, _batch_4D, baselines_as_func
    model = basic_models.ReLULinearModel(inplace=True)
    x1, x2 = torch.tensor([[-10.0, 1.0, -5.0], [2.0, 3.0, 4.0]]), torch.tensor([[3.0, 3.0, 1.0], [2.3, 5.0, 4.0]])
    refs = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, -2.0, 3.0]])
    for mul in (True, False):
        ref = captum_attr.DeepLiftShap(model, multiply_by_inputs=mul).attribute((x1, x2), (refs, refs), target=0)
        out = tdfunc.deep_lift_shap(
            lambda t: model(t["a"], t["b"])[:, 0],
            TensorDict({"a": x1, "b": x2}, batch_size=[2]),
            model,
            TensorDict({"a": refs, "b": refs}, batch_size=[3]),
            multiply_by_inputs=mul,
            return_convergence_delta=True,
        )
        close(out["attr", "a"], ref[0].detach())
        close(out["attr", "b"], ref[1].detach())
        assert not mul or out["convergence_delta"].abs().max() < 1e-5  # completeness needs the (x - x') factor
    m4 = basic_models.ReLUDeepLiftModel()  # test_relu_deepliftshap_batch_4D_input_wo_mutliplying_by_inputs
    td = TensorDict({"a": torch.ones(4, 1, 1, 1), "b": torch.full((4, 1, 1, 1), 2.0)}, batch_size=[4])
    out = tdfunc.deep_lift_shap(
        lambda t: m4(t["a"], t["b"]).flatten(1)[:, 0],
        td,
        m4,
        TensorDict({"a": torch.zeros(4, 1, 1, 1), "b": torch.zeros(4, 1, 1, 1)}, batch_size=[4]),
        multiply_by_inputs=False,
    )
    close(out["attr", "a"], 2 * torch.ones(4, 1, 1, 1))
    close(out["attr", "b"], 0.5 * torch.ones(4, 1, 1, 1))


def slow_deep_lift(w1, b1, w2, b2, x, base, act):
    """The rescale rule written out for f = w2 act(w1 x + b1) + b2: per class k, (x - x') * w1^T (m * w2[k])."""
    z, zb = x @ w1.T + b1, base @ w1.T + b1
    dz = z - zb
    m = torch.where(dz.abs() >= 1e-10, (act(z) - act(zb)) / torch.where(dz.abs() >= 1e-10, dz, 1.0), 0.0)
    return (x - base)[:, None, :] * torch.einsum("bh,kh,hi->bki", m, w2, w1)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU])
def test_slow_reference_completeness_and_double_backward(act):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 6), act(), nn.Linear(6, 3)).double()
    x, base = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    s = tdfunc.state(net)
    td = TensorDict({"x": x, ("baseline", "x"): base}, batch_size=[5])

    def ours(w1):
        st = s.update({("0", "weight"): w1}, inplace=False)
        return tdfunc.deep_lift(
            lambda t: tdfunc.functional_call(net, st, (t["x"],)), td, net, return_convergence_delta=True
        )

    w1 = s["0", "weight"].clone().requires_grad_()
    out = ours(w1)
    slow = slow_deep_lift(w1, s["0", "bias"], s["2", "weight"], s["2", "bias"], x, base, act())
    torch.testing.assert_close(out["attr", "x"], slow, rtol=1e-10, atol=1e-10)
    assert out["convergence_delta"].abs().max() < 1e-10  # completeness
    (gw,) = torch.autograd.grad((out["attr", "x"] ** 2).sum(), w1)  # d(attribution penalty)/d(weights): exact
    (gs,) = torch.autograd.grad((slow**2).sum(), w1)
    torch.testing.assert_close(gw, gs, rtol=1e-9, atol=1e-10)


def test_cnn_completeness_and_vmap():  # conv + eval BatchNorm + in-place ReLU called twice + average pooling
    torch.manual_seed(3)
    cnn = CNN(c=2, n_cls=3).double().eval()
    img = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    td = TensorDict({"img": img, ("baseline", "img"): 0.3 * torch.randn_like(img)}, batch_size=[4])
    out = tdfunc.deep_lift(lambda t: cnn(t["img"]), td, cnn, return_convergence_delta=True)
    assert out["convergence_delta"].abs().max() < 1e-10
    one = lambda t: tdfunc.deep_lift(lambda u: cnn(u["img"]), t.unsqueeze(0), cnn)["attr", "img"][0]
    torch.testing.assert_close(torch.func.vmap(one)(td), out["attr", "img"])


def test_no_grad_equals_grad_mode():  # one forward under no_grad: same values
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    td = TensorDict({"x": torch.randn(3, 3)}, batch_size=[3])
    a = tdfunc.deep_lift(lambda t: net(t["x"]), td, net)["attr", "x"]
    with torch.no_grad():
        b = tdfunc.deep_lift(lambda t: net(t["x"]), td, net)["attr", "x"]
    torch.testing.assert_close(a, b)


def test_refuses_uncovered_modules():
    soft = cls_models.SoftmaxDeepLiftModel(4, 5, 3)
    td = TensorDict({"x": torch.randn(2, 4)}, batch_size=[2])
    with pytest.raises(
        tdfunc.AttributionError,
        match=r"tdfunc.deep_lift: f reached the Softmax module 'softmax', "
        r"which DeepLift cannot handle here: the rescale rule covers elementwise activations only\. "
        r"Return what comes before it from f \(e.g. logits instead of softmax probabilities\)",
    ):
        tdfunc.deep_lift(lambda t: soft(t["x"]), td, soft)
    conv = basic_models.BasicModel_ConvNet()
    with pytest.raises(tdfunc.AttributionError, match="f reached the MaxPool2d module 'pool1'"):
        tdfunc.deep_lift(lambda t: conv(t["x"]), TensorDict({"x": torch.randn(2, 1, 10, 10)}, batch_size=[2]), conv)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())  # train mode
    with pytest.raises(
        tdfunc.AttributionError,
        match=r"BatchNorm1d module '1'.*batch statistics would mix the "
        r"inputs with their baselines \(put it in eval\(\)\)",
    ):
        tdfunc.deep_lift(lambda t: bn(t["x"]), TensorDict({"x": torch.randn(2, 3)}, batch_size=[2]), bn)
    # a model holding a softmax that f does not reach is fine
    torch.testing.assert_close(
        tdfunc.deep_lift(lambda t: soft.lin1(t["x"]), td, soft)["attr", "x"].sum(-1),
        soft.lin1(td["x"]) - soft.lin1.bias,
    )


def test_pins_layout_and_output_errors():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    td = TensorDict({"x": torch.randn(2, 5, 3)}, batch_size=[2])
    with pytest.raises(
        tdfunc.AttributionError,
        match=r"tdfunc.deep_lift: the ReLU module '1' got an input of shape "
        r"\(5, 4, 4\) \(output \(5, 4, 4\)\); DeepLift runs f once on the inputs and their baselines "
        r"stacked along the first batch dim \(2 rows, then 2\)",
    ):
        tdfunc.deep_lift(lambda t: net(t["x"].transpose(0, 1))[..., 0].sum(0), td, net)
    with pytest.raises(
        tdfunc.AttributionError,
        match=r"tdfunc.deep_lift: f returned shape \(\) for a td of batch shape "
        r"\(4,\) \(the inputs, then their baselines\)",
    ):
        tdfunc.deep_lift(lambda t: net(t["x"]).sum(), TensorDict({"x": torch.randn(2, 3)}, batch_size=[2]), net)
    with pytest.raises(tdfunc.AttributionError, match=r"tdfunc.deep_lift: module is itself an ReLU"):
        tdfunc.deep_lift(lambda t: t["x"], TensorDict({"x": torch.randn(2, 3)}, batch_size=[2]), nn.ReLU())
    with pytest.raises(tdfunc.AttributionError, match=r"tdfunc.deep_lift: eps must be a non-negative float"):
        tdfunc.deep_lift(lambda t: net(t["x"]), TensorDict({"x": torch.randn(2, 3)}, batch_size=[2]), net, eps=-1.0)


def test_pins_deep_lift_shap_errors():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    f = lambda t: net(t["x"])[:, 0]
    td = TensorDict({"x": torch.randn(2, 3)}, batch_size=[2])
    with pytest.raises(
        tdfunc.AttributionError,
        match=r"tdfunc.deep_lift_shap: baselines must be a TensorDict of batch "
        r"shape \(N,\) with N >= 1 baselines per attributed input, got Tensor",
    ):
        tdfunc.deep_lift_shap(f, td, net, torch.zeros(4, 3))
    with pytest.raises(
        tdfunc.AttributionError,
        match=r"tdfunc.deep_lift_shap: baselines for 'x' have shape \(4, 2\), "
        r"expected \(N, \*feature shape\) = \(4, 3\)",
    ):
        tdfunc.deep_lift_shap(f, td, net, TensorDict({"x": torch.zeros(4, 2)}, batch_size=[4]))
    with pytest.raises(tdfunc.AttributionError, match=r"tdfunc.deep_lift_shap: baselines has no entry 'x'"):
        tdfunc.deep_lift_shap(f, td, net, TensorDict({"y": torch.zeros(4, 3)}, batch_size=[4]))
    with pytest.raises(
        tdfunc.AttributionError,
        match=r"tdfunc.deep_lift_shap: td holds the baseline entry "
        r"\('baseline', 'x'\), but deep_lift_shap takes its baselines from the baselines TensorDict",
    ):
        tdfunc.deep_lift_shap(
            f, td.set(("baseline", "x"), torch.zeros(2, 3)), net, TensorDict({"x": torch.zeros(4, 3)}, batch_size=[4])
        )


# --- layer_deep_lift: captum's test_layer_deeplift.py cases (ReLULinearModel, delta 1e-4 sum) and LayerDeepLift ------


def test_layer_deep_lift_captum_expected():
    model = basic_models.ReLULinearModel(inplace=True)
    td = TensorDict({"a": torch.tensor([[-10.0, 1.0, -5.0]]), "b": torch.tensor([[3.0, 3.0, 1.0]])}, batch_size=[1])
    f = lambda t: model(t["a"], t["b"])[:, 0]
    for site in ("relu:input", "l3:input"):  # test_relu_layer_deeplift, test_linear_layer_deeplift
        out = tdfunc.layer_deep_lift(f, td, model, site, return_convergence_delta=True)
        close(out["attr", site], [[0.0, 15.0]])
        assert out["convergence_delta"].abs().max() < 1e-5
    out = tdfunc.layer_deep_lift(f, td, model, "relu:input", multiply_by_inputs=False)  # _wo_mutliplying_by_inputs
    close(out["attr", "relu:input"], [[0.0, 1.0]])
    g = lambda t: model(t["a"], t["b"], 3.0)[:, 0]  # test_relu_layer_deeplift_add_args
    close(tdfunc.layer_deep_lift(g, td, model, "relu:input")["attr", "relu:input"], [[0.0, 45.0]])


def test_layer_deep_lift_equals_captum_and_is_complete():
    """Output sites equal captum's LayerDeepLift for every class (1e-12). At the *input* of an activation module
    captum's hooks leave that module's plain derivative (attribute_to_layer_input=True), so its map breaks
    completeness; ours applies the module's rescale rule there too: checked against captum's value rescaled by
    m / relu'(a) and by completeness."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, b = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    td = TensorDict({"x": x, ("baseline", "x"): b}, batch_size=[4])
    f = lambda t: net(t["x"])
    for site, layer in [("1", net[1]), ("2", net[2]), ("3", net[3])]:
        out = tdfunc.layer_deep_lift(f, td, net, site, return_convergence_delta=True)
        for k in range(3):
            ref = captum_attr.LayerDeepLift(net, layer).attribute(x, b, target=k)
            torch.testing.assert_close(out["attr", site][:, k], ref.detach(), rtol=1e-12, atol=1e-12)
        assert out["convergence_delta"].abs().max() < 1e-12
    a, ab = net[:3](x), net[:3](b)
    m = (torch.relu(a) - torch.relu(ab)) / (a - ab)
    out = tdfunc.layer_deep_lift(f, td, net, "3:input", return_convergence_delta=True)
    for k in range(3):
        cap = captum_attr.LayerDeepLift(net, net[3]).attribute(x, b, target=k, attribute_to_layer_input=True).detach()
        ours_from_captum = torch.where(a > 0, cap * m, (a - ab) * 0)  # captum: plain relu'(a) = [a > 0]
        mask = a > 0
        torch.testing.assert_close(out["attr", "3:input"][:, k][mask], ours_from_captum[mask], rtol=1e-10, atol=1e-12)
    assert out["convergence_delta"].abs().max() < 1e-12


def test_layer_deep_lift_pins_site_error():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    td = TensorDict({"x": torch.randn(2, 3)}, batch_size=[2])
    with pytest.raises(tdfunc.SiteError, match=r"tdfunc.layer_deep_lift: unknown site 'nope'"):
        tdfunc.layer_deep_lift(lambda t: net(t["x"]), td, net, "nope")
    with pytest.raises(tdfunc.AttributionError, match=r"tdfunc.layer_deep_lift: eps must be a non-negative float"):
        tdfunc.layer_deep_lift(lambda t: net(t["x"]), td, net, "1", eps=float("nan"))
