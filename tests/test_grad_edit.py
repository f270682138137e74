"""tdfunc.grad_edit: identity forward, ``fn`` on the gradient flowing back through a site.

References: a plain autograd forward with a tensor hook (``register_hook``, also under ``create_graph=True``
for double backward), tdhook 0.3.0's ``output_grad_callbacks`` on its own test model and scenario, and
zennit-crp's ``CondAttribution`` (concept relevance propagation) on a small CNN.
"""

from __future__ import annotations

import sys

import pytest
import torch
from tensordict import TensorDict
from torch import nn
from torch.func import grad, vmap

import tdfunc

DT = torch.float64


class TdhookModel(nn.Module):  # tdhook's tests/conftest.py TestModel
    def __init__(self, input_size=10, hidden_size=20, output_size=5):
        super().__init__()
        self.linear1 = nn.Linear(input_size, hidden_size)
        self.linear2 = nn.Linear(hidden_size, hidden_size)
        self.linear3 = nn.Linear(hidden_size, output_size)
        self.activation = nn.ReLU()

    def forward(self, x):
        x = self.activation(self.linear1(x))
        x = self.activation(self.linear2(x))
        return self.linear3(x)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)).to(DT)


def _hooked(net, x, fn):
    """The slow reference: a plain forward with a tensor hook at net[1]'s output."""
    h = net[1](net[0](x))
    if h.requires_grad:
        h.register_hook(fn)
    return net[4](net[3](net[2](h)))


def test_value_unchanged_gradient_edited_linear_and_nonlinear():
    net, x = _mlp(), torch.randn(3, 4, dtype=DT)
    m = torch.rand(6, dtype=DT)
    for fn in (lambda g: g * m, lambda g: g.abs(), lambda g: torch.zeros_like(g)):
        f = lambda x: tdfunc.functional_call(net, None, (x,), edits={"1": tdfunc.grad_edit(fn)})  # noqa: B023
        assert torch.equal(f(x), net(x))
        ref = torch.autograd.grad(_hooked(net, x.requires_grad_(True), fn).sum(), x)[0]
        x = x.detach()
        torch.testing.assert_close(grad(lambda x: f(x).sum())(x), ref, rtol=0, atol=1e-14)


def _first(net, make):
    """A first-order result (input x gradient of logit 0) with a grad edit fn = make(m) at net[1]."""

    def first(x, m):
        f = lambda x: tdfunc.functional_call(net, None, (x,), edits={"1": tdfunc.grad_edit(make(m))})
        return (x * grad(lambda x: f(x)[:, 0].sum())(x)).pow(2).sum()

    return first


def _straight(net, make):
    """The definition, written out: an autograd.Function at net[1] whose backward is fn, in plain autograd."""

    class E(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v, m):
            ctx.save_for_backward(m)
            return v.clone()

        @staticmethod
        def backward(ctx, g):
            return make(ctx.saved_tensors[0])(g), None

    def first(x, m):
        x, m = x.clone().requires_grad_(True), m.clone().requires_grad_(True)
        y = net[4](net[3](net[2](E.apply(net[1](net[0](x)), m))))
        g1 = torch.autograd.grad(y[:, 0].sum(), x, create_graph=True)[0]
        return torch.autograd.grad((x * g1).pow(2).sum(), (x, m), allow_unused=True)

    return first


def test_double_backward_is_the_modified_backward_in_every_pass():
    """The second derivative as defined: the site's vjp is fn in every backward pass, fn differentiated as
    written.  = a plain-autograd Function with that backward; for a linear fn = the straight-through map
    stop(v) + m * (v - stop(v)); w.r.t. the mask it is the exact derivative of the first-order map (gradcheck),
    w.r.t. the input it is not (a finite difference sees the site's identity value)."""
    net, x, m = _mlp(), torch.randn(3, 4, dtype=DT), torch.rand(6, dtype=DT)
    for make in (lambda m: (lambda g: g * m), lambda m: (lambda g: torch.tanh(g) * m)):
        gx, gm = grad(_first(net, make), argnums=(0, 1))(x, m)
        rx, rm = _straight(net, make)(x, m)
        torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gm, rm, rtol=1e-12, atol=1e-14)
        assert torch.autograd.gradcheck(lambda m: _first(net, make)(x, m), (m.clone().requires_grad_(True),))  # noqa: B023

    def straight(x, m):
        def f(x):
            h = net[1](net[0](x))
            h = h.detach() + m * (h - h.detach())
            return net[4](net[3](net[2](h)))

        return (x * grad(lambda x: f(x)[:, 0].sum())(x)).pow(2).sum()

    mask = lambda m: (lambda g: g * m)
    for a, b in zip(grad(_first(net, mask), argnums=(0, 1))(x, m), grad(straight, argnums=(0, 1))(x, m)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="Jacobian mismatch"):  # the documented limit, w.r.t. x before the site
        torch.autograd.gradcheck(lambda x: _first(net, mask)(x, m), (x.clone().requires_grad_(True),))


def test_vmap_over_masks_equals_the_loop_and_compile_equals_eager():
    net, x = _mlp(), torch.randn(3, 4, dtype=DT)
    masks = (torch.rand(5, 6, dtype=DT) > 0.5).to(DT)

    def sal(m, x):
        f = lambda x: tdfunc.functional_call(net, None, (x,), edits={"1": tdfunc.grad_edit(lambda g: g * m)})
        return grad(lambda x: f(x)[..., 1].sum())(x)

    loop = torch.stack([sal(m, x) for m in masks])
    torch.testing.assert_close(vmap(sal, in_dims=(0, None))(masks, x), loop, rtol=0, atol=1e-15)
    torch.testing.assert_close(vmap(sal, in_dims=(None, 0))(masks[0], x), sal(masks[0], x), rtol=0, atol=1e-15)
    tdfunc.install_sites(net, ["1"])
    try:
        for backend in ("aot_eager", "inductor"):
            torch._dynamo.reset()
            c = torch.compile(sal, fullgraph=True, backend=backend)
            torch.testing.assert_close(c(masks[0], x), loop[0], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(c(masks[1], x), loop[1], rtol=1e-12, atol=1e-14)  # new mask, same graph
    finally:
        tdfunc.remove_sites(net)
        torch._dynamo.reset()


def test_applies_after_every_value_edit_at_its_site():
    """A grad edit of an inner call and a delta / rule of an enclosing one at the same site: the edit's gradient
    is taken w.r.t. the final value there (tdhook's bwd_pre hook on the module), never bypassed."""
    net, x = _mlp(), torch.randn(3, 4, dtype=DT)
    inner = lambda x: tdfunc.functional_call(net, None, (x,), edits={"1": tdfunc.grad_edit(torch.abs)})

    def at_delta(d):
        return tdfunc.intervene(inner, net, edits={"1": tdfunc.delta(d)})(x)[:, 0].sum()

    g = grad(at_delta)(torch.zeros(3, 6, dtype=DT))
    assert (g >= 0).all() and (g > 0).any()
    plain = grad(lambda d: tdfunc.functional_call(net, None, (x,), edits={"1": tdfunc.delta(d)})[:, 0].sum())
    torch.testing.assert_close(g, plain(torch.zeros(3, 6, dtype=DT)).abs(), rtol=0, atol=0)
    # a rule in the enclosing call recomputes the output from the module's input: the edit still applies
    again = tdfunc.rule(lambda m, a, k, out: torch.tanh(a[0]))
    y = lambda x: tdfunc.intervene(inner, net, edits={"1": again})(x)[:, 0].sum()
    xr = x.clone().requires_grad_(True)
    ref = torch.autograd.grad(_hooked(net, xr, torch.abs)[:, 0].sum(), xr)[0]
    torch.testing.assert_close(grad(y)(x), ref, rtol=0, atol=1e-14)


def test_input_and_operation_sites():
    net, x = _mlp(), torch.randn(3, 4, dtype=DT)
    m = torch.rand(6, dtype=DT)
    f = lambda x: tdfunc.functional_call(net, None, (x,), edits={"2:input": tdfunc.grad_edit(lambda g: g * m)})
    xr = x.clone().requires_grad_(True)
    ref = torch.autograd.grad(_hooked(net, xr, lambda g: g * m).sum(), xr)[0]
    torch.testing.assert_close(grad(lambda x: f(x).sum())(x), ref, rtol=0, atol=1e-14)

    class Op(nn.Module):
        def forward(self, x):
            return torch.tanh(x) * 2.0

    op = nn.Sequential(Op())
    g = grad(lambda x: tdfunc.functional_call(op, None, (x,), edits={"0/tanh": tdfunc.grad_edit(lambda g: -g)}).sum())
    torch.testing.assert_close(g(x), -2.0 * (1 - torch.tanh(x) ** 2), rtol=0, atol=1e-15)


def test_tdhook_output_grad_callbacks_scenario():
    """tdhook's test_latent_grad_callback (abs on the gradient at linear1) and its input map, live."""
    Saliency = pytest.importorskip("tdhook.attribution").Saliency
    torch.manual_seed(0)
    model, x = TdhookModel(), torch.randn(3, 10)

    def cb(grad_output, **_):
        return (grad_output[0].abs(),)

    peer = {}
    for name, kw in (("latent", dict(input_modules=["linear1"], use_inputs=False)), ("input", {})):
        ctx = Saliency(output_grad_callbacks={"linear1": cb}, **kw)
        with ctx.prepare(model) as hooked:
            peer[name] = hooked(TensorDict({"input": x.clone().requires_grad_(True)}, batch_size=3))
    inner = lambda x: tdfunc.functional_call(model, None, (x,), edits={"linear1": tdfunc.grad_edit(torch.abs)})
    at = grad(lambda d: tdfunc.intervene(inner, model, edits={"linear1": tdfunc.delta(d)})(x).sum())
    latent = at(torch.zeros(3, 20))
    assert torch.all(latent >= 0)
    torch.testing.assert_close(latent, peer["latent"].get(("attr", "linear1")), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad(lambda x: inner(x).sum())(x), peer["input"].get(("attr", "input")))


def _import_crp(tmp_path):
    """zennit-crp's attribution module, imported beside a stub torchvision (removed again afterwards)."""
    stub = tmp_path / "torchvision"
    (stub / "transforms").mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text("")
    (stub / "transforms" / "__init__.py").write_text("")
    had = "torchvision" in sys.modules
    sys.path.insert(0, str(tmp_path))
    try:
        return pytest.importorskip("crp.attribution")
    finally:
        sys.path.remove(str(tmp_path))
        if not had:  # do not leave the stub visible to other tests
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                del sys.modules[name]


def _cnn():
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(128, 5),
        )
        .to(DT)
        .eval()
    )


def _crp(net, mask, c, composite="epsilon_plus_flat"):
    f = lambda t: tdfunc.functional_call(net, None, (t["x"],), edits={"2": tdfunc.grad_edit(lambda g: g * mask)})
    return lambda td: tdfunc.lrp(lambda t: f(t)[:, c], td, net, composite=composite)["attr", "x"]


def test_crp_equals_zennit_crp_cond_attribution(zennit, tmp_path):
    """Concept-conditional relevance (CRP) = LRP with the relevance at conv '2' masked to one channel, equal
    to zennit-crp's CondAttribution (conditions {'y': [c], '2': [ch]}) on a small CNN, per example."""
    import zennit.composites as zc  # noqa: F401  (the fixture imported it beside its stub torchvision)

    attribution = _import_crp(tmp_path)
    net, x = _cnn(), torch.rand(2, 3, 8, 8, dtype=DT)
    td = TensorDict({"x": x}, batch_size=[2])
    att = attribution.CondAttribution(net, no_param_grad=False)
    for c, chans in ((1, [3]), (4, [0, 5])):
        res = att(x.clone().requires_grad_(True), [{"y": [c], "2": chans}], zennit.composites.EpsilonPlusFlat())
        mask = torch.zeros(8, 1, 1, dtype=DT)
        mask[chans] = 1
        ours = _crp(net, mask, c)(td)
        torch.testing.assert_close(ours.sum(1), res.heatmap.detach(), rtol=1e-10, atol=1e-15)
    # per-example concepts: a (B, C, 1, 1) mask = crp's one condition per sample
    res = att(
        x.clone().requires_grad_(True), [{"y": [2], "2": [1]}, {"y": [2], "2": [6]}], zennit.composites.EpsilonPlus()
    )
    mask = torch.zeros(2, 8, 1, 1, dtype=DT)
    mask[0, 1] = mask[1, 6] = 1
    torch.testing.assert_close(
        _crp(net, mask, 2, "epsilon_plus")(td).sum(1), res.heatmap.detach(), rtol=1e-10, atol=1e-15
    )


def test_crp_every_concept_in_one_vmap_and_conservation():
    """All 8 channel-conditional maps of conv '2' in one vmap = the loop; they sum to the unconditioned map."""
    net, x = _cnn(), torch.rand(2, 3, 8, 8, dtype=DT)
    td = TensorDict({"x": x}, batch_size=[2])
    eye = torch.eye(8, dtype=DT)[:, :, None, None]
    maps = vmap(lambda m: _crp(net, m, 1, "epsilon")(td))(eye)
    loop = torch.stack([_crp(net, m, 1, "epsilon")(td) for m in eye])
    torch.testing.assert_close(maps, loop, rtol=0, atol=1e-15)
    full = tdfunc.lrp(lambda t: net(t["x"])[:, 1], td, net, composite="epsilon")["attr", "x"]
    torch.testing.assert_close(maps.sum(0), full, rtol=1e-10, atol=1e-14)


def test_errors():
    with pytest.raises(TypeError, match=r"tdfunc\.grad_edit: expected a callable fn\(grad\) -> grad, got int \(3\)"):
        tdfunc.grad_edit(3)  # type: ignore[arg-type]
    net, x = _mlp(), torch.randn(3, 4, dtype=DT)
    bad = lambda x: tdfunc.functional_call(net, None, (x,), edits={"1": tdfunc.grad_edit(lambda g: g[:, :2])})
    with pytest.raises(
        tdfunc.EditError,
        match=r"tdfunc\.functional_call: the tdfunc\.grad_edit function at site '1' returned a tensor of shape "
        r"\(3, 2\), dtype torch\.float64 for a gradient of shape \(3, 6\), dtype torch\.float64; it must return",
    ):
        grad(lambda x: bad(x).sum())(x)
    forward_mode = (
        "tdfunc.functional_call: forward-mode differentiation (torch.func.jvp, jacfwd) reached the tdfunc.grad_edit "
        "at site '1', where it is not defined: the edit changes the backward only, so a forward-mode derivative "
        "would ignore it; use reverse mode (torch.func.grad, vjp, jacrev)."
    )
    for forward in (lambda: torch.func.jvp(bad, (x,), (x,)), lambda: torch.func.jacfwd(bad)(x)):
        with pytest.raises(tdfunc.EditError) as info:
            forward()
        assert str(info.value) == forward_mode
    emb = nn.Sequential(nn.Identity(), nn.Embedding(5, 3))
    with pytest.raises(tdfunc.EditError, match=r"grad_edit at site '0': the site's value has dtype torch\.int64"):
        tdfunc.functional_call(emb, None, (torch.tensor([1, 2]),), edits={"0": tdfunc.grad_edit(torch.abs)})

    class Pair(nn.Module):
        def forward(self, x):
            return TensorDict({"a": x}, batch_size=[])

    pair = nn.Sequential(Pair())
    with pytest.raises(tdfunc.EditError, match=r"needs a tensor there, but the site holds a value of type TensorDict"):
        tdfunc.functional_call(pair, None, (x,), edits={"0": tdfunc.grad_edit(torch.abs)})


@pytest.mark.parametrize("channel, direction", [(7, 1), (3, -1)])
def test_crp_equals_tdhook_concept_channel_callback(channel, direction):
    """tdhook 0.3's CRP: LRP(EpsilonPlus) with output_grad_callbacks={"linear1": concept_channel_gradient_callback(
    channel, direction)} (its ChannelConditionedLRP's callback) on its test model, output relevance = class c."""
    LRP = pytest.importorskip("tdhook.attribution").LRP
    from tdhook.attribution.lrp_helpers.rules import EpsilonPlus
    from tdhook.concepts import concept_channel_gradient_callback

    torch.manual_seed(0)
    model, x, c = TdhookModel().to(DT), torch.randn(3, 10, dtype=DT), 2
    onehot = torch.eye(5, dtype=DT)[c]
    method = LRP(
        rule_mapper=EpsilonPlus(epsilon=1e-6),
        init_attr_grads=lambda td, *_: TensorDict({"output": td["output"] * onehot}, batch_size=td.batch_size),
        output_grad_callbacks={"linear1": concept_channel_gradient_callback(channel, direction)},
        warn_on_missing_rule=False,
    )
    with method.prepare(model) as hooked:
        theirs = hooked(TensorDict({"input": x.clone().requires_grad_(True)}, batch_size=[3])).get(("attr", "input"))
    mask = torch.zeros(20, dtype=DT)
    mask[channel] = direction
    f = lambda t: tdfunc.functional_call(
        model, None, (t["x"],), edits={"linear1": tdfunc.grad_edit(lambda g: g * mask)}
    )
    ours = tdfunc.lrp(lambda t: f(t)[:, c], TensorDict({"x": x}, batch_size=[3]), model, composite="epsilon_plus")
    torch.testing.assert_close(ours["attr", "x"], theirs.detach(), rtol=1e-10, atol=1e-14)


def test_crp_on_the_trained_digits_cnn_equals_zennit_crp(zennit, tmp_path):
    """A real model: the demo's digits CNN (trained on scikit-learn's digits, cached), real test images ([0, 1] pixels,
    many exact zeros: the flat rule's zero-input share), its predicted class, one conv2 channel per image."""
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    try:
        from demo.digits import train_digits_cnn
    finally:
        sys.path.pop(0)
    attribution = _import_crp(tmp_path)
    model, (_, _, x_test, _) = train_digits_cnn(seed=0)
    model = model.to(DT).eval()
    x = x_test[:4].to(DT)
    pred = model(x).argmax(-1)
    chans = [1, 5, 0, 3]
    att = attribution.CondAttribution(model, no_param_grad=False)
    conds = [{"y": [int(pred[i])], "features.conv2": [chans[i]]} for i in range(4)]
    res = att(x.clone().requires_grad_(True), conds, zennit.composites.EpsilonPlusFlat())
    c2 = model.features.conv2.out_channels
    mask = torch.zeros(4, c2, 1, 1, dtype=DT)
    mask[torch.arange(4), chans] = 1
    f = lambda t: tdfunc.functional_call(  # noqa: E731
        model, None, (t["x"],), edits={"features.conv2": tdfunc.grad_edit(lambda g: g * mask)}
    ).gather(1, pred[:, None])[:, 0]
    ours = tdfunc.lrp(f, TensorDict({"x": x}, batch_size=[4]), model, composite="epsilon_plus_flat")["attr", "x"]
    assert (x == 0).float().mean() > 0.3  # many zero pixels
    torch.testing.assert_close(ours.sum(1), res.heatmap.detach(), rtol=1e-9, atol=1e-12)
    assert ours.abs().sum() > 0


METHODS = {  # name -> method(f, td, net): each with a grad edit inside f, against the straight-through reference
    "saliency": lambda f, td, net: tdfunc.saliency(f, td, abs=False),
    "input_x_gradient": lambda f, td, net: tdfunc.input_x_gradient(f, td),
    "integrated_gradients": lambda f, td, net: tdfunc.integrated_gradients(f, td, n_steps=8),
    "smooth_grad": lambda f, td, net: tdfunc.smooth_grad(
        tdfunc.saliency,
        f,
        td,
        nt_samples=3,
        noise=torch.randn(3, *td["x"].shape, generator=torch.Generator().manual_seed(0), dtype=DT),
    ),
    "gradient_shap": lambda f, td, net: tdfunc.gradient_shap(
        f,
        td,
        TensorDict({"x": torch.zeros(2, 4, dtype=DT)}, batch_size=[2]),
        n_samples=3,
        generator=torch.Generator().manual_seed(0),
    ),
    "guided_backprop": lambda f, td, net: tdfunc.guided_backprop(f, td, net),
    "deconvolution": lambda f, td, net: tdfunc.deconvolution(f, td, net),
    "deep_lift": lambda f, td, net: tdfunc.deep_lift(f, td, net),
    "lrp": lambda f, td, net: tdfunc.lrp(f, td, net, composite="epsilon"),
    "layer_gradient_x_activation": lambda f, td, net: tdfunc.layer_gradient_x_activation(f, td, net, "0:input"),
}


@pytest.mark.parametrize("method", METHODS)
def test_inside_every_gradient_method_equals_the_straight_through_map(method):
    """A grad edit g * m at the first Linear inside f, for each gradient method = the same method on f with the
    site's value replaced by the straight-through map stop(v) + m * (v - stop(v)) (same first-order gradients)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT).eval()
    td = TensorDict({"x": torch.randn(5, 4, dtype=DT)}, batch_size=[5])
    m = torch.rand(6, dtype=DT)
    edited = lambda t: tdfunc.functional_call(net, None, (t["x"],), edits={"0": tdfunc.grad_edit(lambda g: g * m)})
    straight = lambda t: tdfunc.functional_call(  # noqa: E731
        net, None, (t["x"],), edits={"0": lambda v: v.detach() + m * (v - v.detach())}
    )
    a, b = METHODS[method](edited, td, net), METHODS[method](straight, td, net)
    plain = METHODS[method](lambda t: net(t["x"]), td, net)
    for key in a.keys(include_nested=True, leaves_only=True):
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-12)
        assert not torch.allclose(a[key], plain[key])  # the edit changed the map
