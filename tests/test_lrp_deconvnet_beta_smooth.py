"""lrp_rules.deconvnet / beta_smooth and the composites "deconvnet" / "beta_smooth" (zennit's DeconvNet, BetaSmooth).

zennit's own scenarios (tests/unit/test_rules.py ``test_simple_rule``: a lone ReLU, relevance = output, against
its replication ``relevance.clamp(min=0)`` / ``relevance * sigmoid(beta * input)``, beta 10 and 1; conftest's
``model_simple``: a Linear / Conv / ConvTranspose layer, ReLU, Flatten, Linear(…, 4), float64) with zennit 0.5.1
live; ``tdfunc.lrp`` returns x ⊙ the modified gradient, zennit's ``Gradient`` attributor the gradient itself.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from tensordict import TensorDict
from torch import nn
from torch.func import vmap

import tdfunc

DT = torch.float64
R = tdfunc.lrp_rules

LAYERS = [  # zennit's module_linear kinds, each with an input shape (without the batch)
    (lambda: nn.Linear(16, 15), (16,)),
    (lambda: nn.Conv1d(3, 3, 3), (3, 8)),
    (lambda: nn.Conv2d(3, 3, 2), (3, 5, 5)),
    (lambda: nn.Conv3d(1, 3, 2, bias=False), (1, 4, 4, 4)),
    (lambda: nn.ConvTranspose2d(3, 1, 3), (3, 4, 4)),
]


def _model_simple(make, shape):
    torch.manual_seed(0)
    layer = make().to(DT).eval()
    x = torch.randn(3, *shape, dtype=DT)
    n = layer(x).shape[1:].numel()
    net = nn.Sequential(
        OrderedDict(
            [("linr0", layer), ("actv0", nn.ReLU()), ("flat0", nn.Flatten()), ("linr1", nn.Linear(n, 4).to(DT))]
        )
    )
    return net, x


def _cases():
    return [("deconvnet", None), ("beta_smooth", 10.0), ("beta_smooth", 1.0)]


def _ours(net, x, name, beta, **kw):
    rules = {nn.ReLU: R.beta_smooth(beta)} if beta not in (None, 10.0) else None
    td = TensorDict({"x": x}, batch_size=[x.shape[0]])
    return tdfunc.lrp(lambda t: net(t["x"]), td, net, composite=name, rules=rules, **kw)["attr", "x"]


@pytest.mark.parametrize("layer", range(len(LAYERS)))
@pytest.mark.parametrize("name, beta", _cases())
def test_equal_to_zennit_on_its_model_simple(zennit, layer, name, beta):
    net, x = _model_simple(*LAYERS[layer])
    comp = zennit.composites.DeconvNet() if name == "deconvnet" else zennit.composites.BetaSmooth(beta_smooth=beta)
    ours = _ours(net, x, name, beta)  # (B, 4 classes, ...)
    for c in range(4):
        with zennit.attribution.Gradient(net, comp) as attributor:
            _, g = attributor(x.clone().requires_grad_(True), torch.eye(4, dtype=DT)[[c]].expand(3, 4))
        torch.testing.assert_close(ours[:, c], x * g, rtol=1e-12, atol=1e-14)
    assert not any(m._forward_hooks or m._backward_hooks for m in net.modules())


@pytest.mark.parametrize("name, beta", _cases())
def test_lone_relu_equals_zennits_replication(zennit, name, beta):
    """zennit's test_simple_rule: relevance = the output; its replication of the rule, and the rule live."""
    torch.manual_seed(1)
    net, x = nn.Sequential(nn.ReLU()), torch.randn(5, 4, dtype=DT)
    y = torch.relu(x)
    replicated = y.clamp(min=0) if name == "deconvnet" else y * torch.sigmoid(beta * x)
    rule = zennit.rules.ReLUDeconvNet() if name == "deconvnet" else zennit.rules.ReLUBetaSmooth(beta_smooth=beta)
    xi = x.clone().requires_grad_(True)
    handle = rule.register(net[0])
    try:
        out = net(xi)
        (live,) = torch.autograd.grad(out, xi, grad_outputs=out)
    finally:
        handle.remove()
    torch.testing.assert_close(live, replicated)
    # output relevance y² = the cotangent y (relevance is carried as value x gradient)
    ours = _ours(net, x, name, beta, output_relevance=lambda y: y * y)
    torch.testing.assert_close(ours, x * replicated, rtol=1e-12, atol=1e-15)


def test_deconvnet_equals_deconvolution_and_beta_smooth_a_slow_reference():
    net, x = _model_simple(*LAYERS[2])
    td = TensorDict({"x": x}, batch_size=[3])
    d = tdfunc.deconvolution(lambda t: net(t["x"]), td, net)["attr", "x"]
    torch.testing.assert_close(_ours(net, x, "deconvnet", None), x[:, None] * d, rtol=1e-12, atol=1e-15)
    # beta_smooth written out: the gradient of class c through softplus_beta' at the ReLU
    z = net.linr0(x)
    for beta in (10.0, 3.0):
        s = torch.sigmoid(beta * z)
        for c in range(4):
            gz = s * net.linr1.weight[c].reshape(z.shape[1:])
            xi = x.clone().requires_grad_(True)
            (gx,) = torch.autograd.grad(net.linr0(xi), xi, grad_outputs=gz)
            torch.testing.assert_close(_ours(net, x, "beta_smooth", beta)[:, c], x * gx, rtol=1e-12, atol=1e-15)


def test_names_composition_and_errors():
    assert R.COMPOSITES["deconvnet"].rules[nn.ReLU].__repr__() == "tdfunc.lrp_rules.deconvnet()"
    assert repr(R.beta_smooth(2.0)) == "tdfunc.lrp_rules.beta_smooth(beta=2.0)"
    net, x = _model_simple(*LAYERS[1])
    td = TensorDict({"x": x}, batch_size=[3])
    for zname, name in (("DeconvNet", "deconvnet"), ("BetaSmooth", "beta_smooth")):
        a = tdfunc.lrp(lambda t: net(t["x"]), td, net, composite=zname)["attr", "x"]
        torch.testing.assert_close(a, _ours(net, x, name, 10.0), rtol=0, atol=0)
        # vmap over examples = the loop; double backward (beta_smooth is smooth; deconvnet piecewise linear)
        one = lambda x, name=name: tdfunc.lrp(  # noqa: E731
            lambda t: net(t["x"]), TensorDict({"x": x[None]}, batch_size=[1]), net, composite=name
        )["attr", "x"][0]
        torch.testing.assert_close(vmap(one)(x), torch.stack([one(xi) for xi in x]), rtol=1e-12, atol=1e-15)
        w = net.linr0.weight.detach().clone().requires_grad_(True)

        def loss(w, name=name):
            s = tdfunc.state(net).set(("linr0", "weight"), w)
            f = lambda t: tdfunc.functional_call(net, s, (t["x"],))  # noqa: E731
            return tdfunc.lrp(f, td, net, composite=name)["attr", "x"].pow(2).sum()

        assert torch.autograd.gradcheck(loss, (w,))
    with pytest.raises(TypeError, match=r"tdfunc\.lrp_rules\.beta_smooth: beta must be a float, got str \('x'\)"):
        R.beta_smooth("x")  # type: ignore[arg-type]
    with pytest.raises(tdfunc.AttributionError, match=r"beta_smooth: beta must be > 0, got 0\.0"):
        R.beta_smooth(0.0)
    with pytest.raises(tdfunc.AttributionError, match=r"beta must be a finite number >= 0, got -1\.0"):
        R.beta_smooth(-1.0)
    inplace = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True), nn.Linear(3, 2))
    td3 = TensorDict({"x": torch.randn(2, 3)}, batch_size=[2])
    with pytest.raises(tdfunc.AttributionError, match=r"needs the input of nn\.ReLU\(inplace=True\), which the module"):
        tdfunc.lrp(lambda t: inplace(t["x"]), td3, inplace, composite="deconvnet")
    with pytest.raises(tdfunc.AttributionError, match=r"applies to nn\.ReLU only|nn\.ReLU"):
        tdfunc.lrp(lambda t: inplace(t["x"]), td3, inplace, rules={nn.Linear: R.deconvnet()}, composite=None)


@pytest.mark.parametrize("name", ["deconvnet", "beta_smooth"])
def test_compile_fullgraph_equals_eager(name):
    net, x = _model_simple(*LAYERS[0])
    f = lambda x: _ours(net, x, name, 10.0)  # noqa: E731
    tdfunc.install_sites(net, "**")
    try:
        torch._dynamo.reset()
        c = torch.compile(f, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(c(x), f(x), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(c(x + 1), f(x + 1), rtol=1e-12, atol=1e-14)
    finally:
        tdfunc.remove_sites(net)
        torch._dynamo.reset()
