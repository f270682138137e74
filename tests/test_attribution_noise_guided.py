"""smooth_grad (noise tunnel) and guided_backprop against captum, slow references and their contracts.

Same noise as captum: captum's ``NoiseTunnel`` draws ``torch.normal(0, stdev)`` inside, per input
and per chunk of samples, example-major (row ``b * S + s``) and in float32 whatever the input dtype.
Two ways are used here:

* ``_same_noise`` monkeypatches ``NoiseTunnel._add_noise_to_input`` to add *our* draws (float64,
  any batch, any chunking): the exact comparison of the combination rules and what is perturbed;
* ``test_seeded_equals_captum_draws`` uses no patch: float32, batch of one, so that captum's
  example-major rows coincide with our ``(S, *x.shape)`` draws and seeding torch's global RNG like
  our generator gives the same numbers (``torch.normal(0, std)`` is ``randn * std``).
"""

from __future__ import annotations

import functools
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from cases_noise_guided import ReluTanhMLP
from models import CNN
from tensordict import TensorDict
from torch import nn
from torch.func import vmap

import tdfunc
from tdfunc.attribution._common import with_inputs

captum_attr = pytest.importorskip("captum.attr")
DT = torch.float64


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(3, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x, z):
        return self.head(torch.tanh(self.a(x) + self.b(z)))


def _same_noise(monkeypatch, inputs: list, stds: list, eps: list) -> None:
    """Make captum add ``std * eps`` (ours, shape (S, B, ...)) in its example-major row order."""
    offsets = {}

    def add(input, stdev, n):
        i = next(j for j, t in enumerate(inputs) if t is input)
        start = offsets.get(i, 0)
        offsets[i] = start + n
        e = eps[i][start : start + n].transpose(0, 1).reshape(-1, *input.shape[1:])
        return input.repeat_interleave(n, dim=0) + stds[i] * e

    monkeypatch.setattr(captum_attr.NoiseTunnel, "_add_noise_to_input", staticmethod(add))
    return offsets


CAPTUM_CASES = [
    ("saliency", {}, {}),
    ("input_x_gradient", {}, {}),
    ("integrated_gradients", {"n_steps": 5}, {"n_steps": 5}),
    ("integrated_gradients", {"n_steps": 4, "multiply_by_inputs": False}, {"n_steps": 4}),
]


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
@pytest.mark.parametrize("name,ours_kw,captum_kw", CAPTUM_CASES, ids=["sal", "ixg", "ig", "ig-nomul"])
def test_smooth_grad_equals_captum_noise_tunnel(monkeypatch, nt_type, name, ours_kw, captum_kw):
    torch.manual_seed(0)
    net = TwoInputs().to(DT)
    B, S = 3, 5
    x, z = torch.randn(B, 4, dtype=DT), torch.randn(B, 3, dtype=DT)
    bx, bz = 0.1 * torch.randn(B, 4, dtype=DT), 0.1 * torch.randn(B, 3, dtype=DT)
    td = TensorDict({"x": x, "z": z, "baseline": {"x": bx, "z": bz}}, batch_size=[B])
    stds = {"x": 0.3, "z": 0.7}
    g = torch.Generator().manual_seed(1)
    ours = tdfunc.smooth_grad(
        getattr(tdfunc, name),
        lambda t: net(t["x"], t["z"]),
        td,
        nt_type=nt_type,
        nt_samples=S,
        stdevs=stds,
        generator=g,
        chunk_size=2,
        **ours_kw,
    )
    g = torch.Generator().manual_seed(1)  # the same draws, in the same order (key order: x then z)
    eps = [torch.randn(S, B, 4, generator=g, dtype=DT), torch.randn(S, B, 3, generator=g, dtype=DT)]
    if name == "integrated_gradients":
        base = captum_attr.IntegratedGradients(net, multiply_by_inputs=ours_kw.get("multiply_by_inputs", True))
        captum_kw = {**captum_kw, "baselines": (bx, bz)}
    else:
        base = {"saliency": captum_attr.Saliency, "input_x_gradient": captum_attr.InputXGradient}[name](net)
    nt = captum_attr.NoiseTunnel(base)
    refs = []
    for k in range(3):  # captum: one call per target
        _same_noise(monkeypatch, [x, z], [0.3, 0.7], eps)
        refs.append(
            nt.attribute(
                (x, z), nt_type=nt_type, nt_samples=S, nt_samples_batch_size=2, stdevs=(0.3, 0.7), target=k, **captum_kw
            )
        )
    for i, key in enumerate(["x", "z"]):
        ref = torch.stack([r[i] for r in refs], 1)
        # captum multiplies IG's gradients by float32 step sizes (torch.tensor(step_sizes).float()): ~1e-8 relative
        tol = dict(rtol=1e-7, atol=1e-9) if name == "integrated_gradients" else dict(rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(ours["attr", key], ref, **tol)


def test_seeded_equals_captum_draws():
    """No patch: captum's own torch.normal draws, reproduced by seeding (float32, batch of one)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
    x = torch.randn(1, 3)
    td = TensorDict({"x": x}, batch_size=[1])
    for nt_type in ["smoothgrad", "smoothgrad_sq", "vargrad"]:
        ours = tdfunc.smooth_grad(
            tdfunc.integrated_gradients,
            lambda t: net(t["x"])[:, 2],
            td,
            nt_type=nt_type,
            nt_samples=6,
            stdevs=0.3,
            generator=torch.Generator().manual_seed(5),
            n_steps=7,
        )
        torch.manual_seed(5)
        ref = captum_attr.NoiseTunnel(captum_attr.IntegratedGradients(net)).attribute(
            x, nt_type=nt_type, nt_samples=6, stdevs=0.3, target=2, n_steps=7
        )
        torch.testing.assert_close(ours["attr", "x"], ref, rtol=1e-5, atol=1e-7)


def _slow_reference(method, f, td, keys, eps, stds, nt_type, /, **kw):
    """The noise tunnel written out: one call of ``method`` per sample, then the statistic."""
    per = []
    for s in range(next(iter(eps.values())).shape[0]):
        per.append(method(f, with_inputs(td, {k: td[k] + stds[k] * eps[k][s] for k in keys}), **kw))
    out = {}
    for k in keys:
        a = torch.stack([p["attr", k] for p in per])
        out[k] = {"smoothgrad": a.mean(0), "smoothgrad_sq": (a**2).mean(0), "vargrad": a.var(0, unbiased=False)}[
            nt_type
        ]
    return out, per


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_smooth_grad_equals_slow_loop_any_method(nt_type):
    torch.manual_seed(0)
    net = ReluTanhMLP().to(DT)
    B, S = 4, 4
    td = TensorDict({"x": torch.randn(B, 5, dtype=DT), "label": torch.tensor([0, 2, 1, 0])}, batch_size=[B])
    f_k = lambda t: net(t["x"])  # every class
    f_1 = lambda t: net(t["x"]).gather(-1, t["label"][:, None])[:, 0]  # one target, per-example label
    eps = {"x": torch.randn(S, B, 5, dtype=DT)}
    methods = [
        (tdfunc.saliency, f_k, {}),
        (tdfunc.input_x_gradient, f_1, {}),
        (tdfunc.integrated_gradients, f_k, {"n_steps": 3, "method": "riemann_middle"}),
        (functools.partial(tdfunc.guided_backprop, module=net), f_k, {}),
    ]
    for method, f, kw in methods:
        ours = tdfunc.smooth_grad(method, f, td, nt_type=nt_type, nt_samples=S, stdevs=0.4, noise=eps, **kw)
        ref, _ = _slow_reference(method, f, td, ["x"], eps, {"x": 0.4}, nt_type, **kw)
        torch.testing.assert_close(ours["attr", "x"], ref["x"], rtol=1e-12, atol=1e-13)
        chunked = tdfunc.smooth_grad(
            method, f, td, nt_type=nt_type, nt_samples=S, stdevs=0.4, noise=eps, chunk_size=3, **kw
        )
        torch.testing.assert_close(chunked["attr", "x"], ours["attr", "x"], rtol=1e-12, atol=1e-13)


def test_convergence_delta_per_sample_and_baseline_not_perturbed():
    torch.manual_seed(0)
    net = ReluTanhMLP().to(DT)
    B, S = 2, 3
    base = torch.randn(B, 5, dtype=DT)
    td = TensorDict({"x": torch.randn(B, 5, dtype=DT), "baseline": {"x": base}}, batch_size=[B])
    eps = torch.randn(S, B, 5, dtype=DT)
    f = lambda t: net(t["x"])
    out = tdfunc.smooth_grad(
        tdfunc.integrated_gradients,
        f,
        td,
        nt_samples=S,
        stdevs=0.2,
        noise=eps,
        n_steps=4,
        return_convergence_delta=True,
    )
    _, per = _slow_reference(
        tdfunc.integrated_gradients,
        f,
        td,
        ["x"],
        {"x": eps},
        {"x": 0.2},
        "smoothgrad",
        n_steps=4,
        return_convergence_delta=True,
    )
    assert out["convergence_delta"].shape == (B, S, 3)  # sample dim right after the batch dims
    torch.testing.assert_close(out["convergence_delta"], torch.stack([p["convergence_delta"] for p in per], 1))
    # completeness per sample: sum of the IG map = f(x + noise) - f(baseline), baseline unperturbed
    for s, p in enumerate(per):
        lhs = p["attr", "x"].sum(-1)
        torch.testing.assert_close(
            lhs - p["convergence_delta"], f(TensorDict({"x": td["x"] + 0.2 * eps[s]}, [B])) - net(base)
        )


def test_generator_noise_and_global_rng_agree():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    td = TensorDict({"x": torch.randn(4, 3, dtype=DT)}, batch_size=[4])
    f = lambda t: net(t["x"])
    kw = dict(nt_samples=3, stdevs=0.5, nt_type="vargrad")
    a = tdfunc.smooth_grad(tdfunc.saliency, f, td, generator=torch.Generator().manual_seed(7), **kw)
    eps = torch.randn(3, 4, 3, generator=torch.Generator().manual_seed(7), dtype=DT)
    b = tdfunc.smooth_grad(tdfunc.saliency, f, td, noise=eps, **kw)
    torch.manual_seed(7)
    c = tdfunc.smooth_grad(tdfunc.saliency, f, td, **kw)  # generator=None: torch's global RNG
    assert torch.equal(a["attr", "x"], b["attr", "x"]) and torch.equal(a["attr", "x"], c["attr", "x"])
    # stdevs=0: the base method itself; one sample: zero variance
    zero = tdfunc.smooth_grad(tdfunc.saliency, f, td, nt_samples=2, stdevs=0.0)
    torch.testing.assert_close(zero["attr", "x"], tdfunc.saliency(f, td)["attr", "x"], rtol=0, atol=1e-15)
    assert not tdfunc.smooth_grad(tdfunc.saliency, f, td, nt_samples=1, nt_type="vargrad")["attr", "x"].any()


def test_vmap_over_examples_with_generator_needs_randomness_flag():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    X = torch.randn(3, 3, dtype=DT)

    def one(x):  # a fresh generator per example: the loop reuses the same draws for every example
        td = TensorDict({"x": x[None]}, batch_size=[1])
        g = torch.Generator().manual_seed(0)
        return tdfunc.smooth_grad(tdfunc.saliency, lambda t: net(t["x"]), td, nt_samples=3, stdevs=0.3, generator=g)[
            "attr", "x"
        ][0]

    with pytest.raises(RuntimeError, match="randomness error mode"):
        vmap(one)(X)
    loop = torch.stack([one(x) for x in X])
    torch.testing.assert_close(vmap(one, randomness="same")(X), loop, rtol=1e-12, atol=1e-12)


def test_compile_with_noise_drawn_outside():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    td = TensorDict({"x": torch.randn(4, 3, dtype=DT)}, batch_size=[4])

    def fn(x, eps):
        t = TensorDict({"x": x}, batch_size=[4])
        return tdfunc.smooth_grad(tdfunc.saliency, lambda t: net(t["x"]), t, nt_samples=2, stdevs=0.3, noise=eps)[
            "attr", "x"
        ]

    torch._dynamo.reset()
    try:
        eps = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(3), dtype=DT)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(td["x"], eps)
        eager = tdfunc.smooth_grad(
            tdfunc.saliency,
            lambda t: net(t["x"]),
            td,
            nt_samples=2,
            stdevs=0.3,
            generator=torch.Generator().manual_seed(3),
        )
        torch.testing.assert_close(compiled, eager["attr", "x"], rtol=1e-12, atol=1e-12)
        g = torch.Generator().manual_seed(3)  # a generator cannot be traced: draw outside, pass noise=
        with pytest.raises(torch._dynamo.exc.Unsupported):
            torch.compile(
                lambda x: fn(x, torch.randn(2, 4, 3, generator=g, dtype=DT)), fullgraph=True, backend="aot_eager"
            )(td["x"])
    finally:
        torch._dynamo.reset()


# --- guided backprop ---------------------------------------------------------------------------


class PoolCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.r1 = nn.Conv2d(2, 3, 3, padding=1), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2, self.r2 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True)
        self.fc = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5))

    def forward(self, x):
        h = self.pool(self.r1(self.conv1(x)))
        return self.fc(F.adaptive_avg_pool2d(self.r2(self.conv2(h)), 2).flatten(1))


class FunctionalRelu(nn.Module):
    """One nn.ReLU module and one F.relu call: only the module is guided (as in captum)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.relu, self.fc2, self.fc3 = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(self.relu(self.fc1(x)))))


@pytest.mark.parametrize(
    "make,shape",
    [
        (PoolCNN, (4, 2, 8, 8)),
        (lambda: CNN(), (4, 1, 6, 6)),
        (lambda: nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 7), nn.ReLU(), nn.Linear(7, 4)), (4, 5)),
        (FunctionalRelu, (4, 4)),
    ],
    ids=["maxpool-cnn", "bn-inplace-reused-relu-cnn", "mlp", "functional-relu"],
)
def test_guided_backprop_equals_captum_every_class(make, shape):
    torch.manual_seed(0)
    net = make().to(DT).eval()
    x = torch.randn(*shape, dtype=DT)
    td = TensorDict({"x": x}, batch_size=[shape[0]])
    ours = tdfunc.guided_backprop(lambda t: net(t["x"]), td, net)["attr", "x"]  # every class, one call
    K = ours.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.stack([captum_attr.GuidedBackprop(net).attribute(x.clone(), target=k) for k in range(K)], 1)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    plain = tdfunc.saliency(lambda t: net(t["x"]), td, abs=False)["attr", "x"]
    assert not torch.allclose(ours, plain)  # the guide changed something
    one = tdfunc.guided_backprop(lambda t: net(t["x"])[:, 1], td, net)["attr", "x"]
    torch.testing.assert_close(one, ours[:, 1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "make,shape", [(PoolCNN, (3, 2, 8, 8)), (lambda: CNN(), (3, 1, 6, 6))], ids=["maxpool", "inplace-reused"]
)
def test_guided_one_forward_under_no_grad(make, shape):
    """Under no_grad f runs once (v recorded from the same forward, detached): the same map as two forwards."""
    net = make().to(DT).eval()
    td = TensorDict({"x": torch.randn(*shape, dtype=DT)}, batch_size=[shape[0]])
    runs = []
    f = lambda t: runs.append(1) or net(t["x"])  # noqa: E731
    two = tdfunc.guided_backprop(f, td, net)["attr", "x"]
    assert len(runs) == 2
    with torch.no_grad():
        one = tdfunc.guided_backprop(f, td, net)["attr", "x"]
    assert len(runs) == 3 and one.grad_fn is None
    torch.testing.assert_close(one, two, rtol=0, atol=1e-15)


def test_guided_double_backward_is_exact():
    """d(guided map)/dx and /dθ equal autograd of the written-out map (and finite differences)."""
    torch.manual_seed(0)
    net = ReluTanhMLP().to(DT)
    x = torch.randn(3, 5, dtype=DT)
    w = torch.randn(3, dtype=DT)
    s = tdfunc.state(net)

    def ours(x, weight):
        state = s.update({("fc2", "weight"): weight}, inplace=False)
        td = TensorDict({"x": x}, batch_size=[3])
        return tdfunc.guided_backprop(lambda t: tdfunc.functional_call(net, state, (t["x"],)) @ w, td, net)["attr", "x"]

    W2 = s["fc2", "weight"]
    torch.testing.assert_close(ours(x, W2), _hand_w(net, x, w, W2), rtol=1e-12, atol=1e-14)
    jac = torch.func.jacrev(ours, argnums=(0, 1))(x, W2)

    ref = torch.autograd.functional.jacobian(lambda x, W: _hand_w(net, x, w, W), (x, W2))
    for a, b in zip(jac, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert jac[1].abs().max() > 1e-3  # not trivially zero
    xr = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ours(x, W2), (xr,))


def _hand_w(net, x, w, W2):
    """The guided map of ReluTanhMLP written out, differentiable by autograd (the reference)."""
    z1 = x @ net.fc1.weight.T + net.fc1.bias
    z2 = torch.relu(z1) @ W2.T + net.fc2.bias
    g2 = (w @ net.head.weight) * (1 - torch.tanh(z2) ** 2)
    return ((g2 @ W2).clamp(min=0) * (z1 > 0)) @ net.fc1.weight


def test_smooth_grad_over_guided_under_compile_is_a_known_torch_limit():
    """vmap over an autograd.Function inside torch.compile fails on torch <= 2.13 (pytorch#129845).

    Eager vmap, grad and compile without the noise tunnel's vmap all work (composition table).
    When this test fails, torch has fixed it: turn it into an equality check.
    """
    torch.manual_seed(0)
    net = ReluTanhMLP().to(DT)
    x = torch.randn(2, 5, dtype=DT)
    eps = torch.randn(2, 2, 5, dtype=DT)
    gb = functools.partial(tdfunc.guided_backprop, module=net)

    def fn(x):
        return tdfunc.smooth_grad(gb, lambda t: net(t["x"]), TensorDict({"x": x}, [2]), nt_samples=2, noise=eps)[
            "attr", "x"
        ]

    fn(x)  # eager: fine
    tdfunc.install_sites(net, "**")
    torch._dynamo.reset()
    try:
        with pytest.raises(Exception, match="does not have vmap support"):
            torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    finally:
        tdfunc.remove_sites(net)
        torch._dynamo.reset()


# --- error messages, word for word ----------------------------------------------------------------


def _mlp_td():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return net, (lambda t: net(t["x"])), TensorDict({"x": torch.randn(2, 3)}, batch_size=[2])


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (
            {"nt_type": "smooth"},
            tdfunc.AttributionError,
            "tdfunc.smooth_grad: unknown nt_type 'smooth'; choose one of ['smoothgrad', 'smoothgrad_sq', 'vargrad'].",
        ),
        ({"nt_samples": 0}, tdfunc.AttributionError, "tdfunc.smooth_grad: nt_samples must be an integer >= 1, got 0."),
        (
            {"stdevs": -0.5},
            tdfunc.AttributionError,
            "tdfunc.smooth_grad: stdevs for 'x' must be a non-negative float (the standard deviation of the Gaussian "
            "noise added to the input), got -0.5.",
        ),
        (
            {"stdevs": {"y": 1.0}},
            tdfunc.AttributionError,
            "tdfunc.smooth_grad: stdevs names 'y', which is not an attributed input (['x']); give one entry per "
            "attributed input, or a single float.",
        ),
        (
            {"chunk_size": 0},
            tdfunc.AttributionError,
            "tdfunc.smooth_grad: chunk_size must be None or an integer >= 1, got 0.",
        ),
        (
            {"generator": 3},
            TypeError,
            "tdfunc.smooth_grad: generator must be a torch.Generator or None, got int (3); "
            "e.g. generator=torch.Generator().manual_seed(0).",
        ),
        (
            {"noise": torch.zeros(4, 3)},
            tdfunc.AttributionError,
            "tdfunc.smooth_grad: noise for 'x' has shape (4, 3), expected (nt_samples, *input.shape) = (5, 2, 3); "
            "draw it with torch.randn((5, 2, 3)) (standard normal: stdevs scales it).",
        ),
        (
            {"noise": torch.zeros(5, 2, 3), "generator": torch.Generator()},
            tdfunc.AttributionError,
            "tdfunc.smooth_grad: got both noise and a generator; the generator only draws noise that is not given. "
            "Pass one of them.",
        ),
    ],
    ids=["nt_type", "nt_samples", "stdevs", "stdevs-key", "chunk_size", "generator", "noise-shape", "noise+generator"],
)
def test_smooth_grad_errors(kwargs, exc, msg):
    _, f, td = _mlp_td()
    with pytest.raises(exc) as info:
        tdfunc.smooth_grad(tdfunc.saliency, f, td, **kwargs)
    assert str(info.value) == msg


def test_smooth_grad_method_not_callable():
    _, f, td = _mlp_td()
    with pytest.raises(TypeError) as info:
        tdfunc.smooth_grad("saliency", f, td)
    assert str(info.value) == (
        "tdfunc.smooth_grad: method must be an attribution function such as tdfunc.saliency or "
        "tdfunc.integrated_gradients, got str ('saliency'); pass the function itself: "
        "tdfunc.smooth_grad(tdfunc.saliency, f, td)."
    )


def test_guided_backprop_errors():
    net, f, td = _mlp_td()
    with pytest.raises(tdfunc.AttributionError) as info:
        tdfunc.guided_backprop(f, td, net)
    assert str(info.value) == (
        "tdfunc.guided_backprop: module Sequential has no nn.ReLU submodule, so there is no ReLU backward to "
        "guide. ReLUs applied as functions inside forward (F.relu, torch.relu, .relu()) are not modules and "
        "cannot be rewritten (captum's GuidedBackprop has the same limit): make them nn.ReLU modules, or use "
        "tdfunc.saliency(f, td, abs=False) for the plain gradient."
    )
    with pytest.raises(TypeError) as info:
        tdfunc.guided_backprop(f, td, "net")
    assert str(info.value) == "tdfunc.guided_backprop: expected an nn.Module as the module, got str ('net')."
    # an nn.ReLU that f never runs is left alone (non-strict sites), as captum's unused hooks are
    relu_net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU())
    head = lambda t: relu_net[:3](t["x"])
    full = tdfunc.guided_backprop(head, td, relu_net)["attr", "x"]
    part = tdfunc.guided_backprop(head, td, relu_net[:3])["attr", "x"]
    assert torch.equal(full, part)


# --- deconvolution and guided Grad-CAM (captum's test_deconvolution.py / test_guided_grad_cam.py cases, delta 0.01) --


def captum_models():
    return pytest.importorskip("captum.testing.helpers.basic_models")


_DECONV_EX = torch.tensor(
    [[2.0, 3.0, 3.0, 1.0], [3.0, 5.0, 5.0, 2.0], [3.0, 5.0, 5.0, 2.0], [1.0, 2.0, 2.0, 1.0]]
).view(1, 1, 4, 4)
_GGC_EX = torch.tensor(
    [[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 12.0, 8.0], [28.0, 84.0, 97.5, 65.0], [28.0, 56.0, 65.0, 32.5]]
).view(1, 1, 4, 4)


def _captum_close(ours, expected, delta=0.01):  # captum's assertTensorAlmostEqual, mode "sum"
    assert ours.shape == expected.shape and float((ours - expected).abs().sum()) < delta, (ours, expected)


@pytest.mark.parametrize("inplace", [False, True])
def test_deconvolution_equals_captum_expected(inplace):  # test_simple_input_conv_deconv, _multi_input_conv_deconv
    net = captum_models().BasicModel_ConvNet_One_Conv(inplace=inplace)
    inp = torch.arange(16, dtype=torch.float).view(1, 1, 4, 4)
    out = tdfunc.deconvolution(lambda t: net(t["x"])[:, 0], TensorDict({"x": inp}, batch_size=[1]), net)
    _captum_close(out["attr", "x"], _DECONV_EX)
    two = TensorDict({"x": inp, "x2": torch.ones(1, 1, 4, 4)}, batch_size=[1])
    out = tdfunc.deconvolution(lambda t: net(t["x"], t["x2"])[:, 0], two, net)
    _captum_close(out["attr", "x"], _DECONV_EX)
    _captum_close(out["attr", "x2"], _DECONV_EX)


def test_deconvolution_every_class_equals_captum_on_a_cnn():  # test_deconv_matching, on tests/models.CNN
    torch.manual_seed(5)
    cnn = CNN(c=3, n_cls=4).eval()
    img = 10 * torch.randn(3, 1, 5, 5)
    out = tdfunc.deconvolution(lambda t: cnn(t["img"]), TensorDict({"img": img}, batch_size=[3]), cnn)
    for k in range(4):
        ref = captum_attr.Deconvolution(cnn).attribute(img, target=k)
        torch.testing.assert_close(out["attr", "img"][:, k], ref, rtol=1e-5, atol=1e-5)


def test_deconvolution_slow_reference_and_double_backward():
    """Linear-ReLU-Linear: the deconvolution map of class k is W1^T relu(W2[k]), whatever x; its derivative
    w.r.t. W2 (double backward through the rewritten ReLU) equals autograd on that formula."""
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    s = tdfunc.state(net)
    x = torch.randn(5, 4, dtype=torch.float64)
    w2 = s["2", "weight"].clone().requires_grad_()
    st = s.update({("2", "weight"): w2}, inplace=False)
    out = tdfunc.deconvolution(
        lambda t: tdfunc.functional_call(net, st, (t["x"],)), TensorDict({"x": x}, batch_size=[5]), net
    )
    slow = (w2.clamp(min=0) @ s["0", "weight"]).expand(5, 3, 4)
    torch.testing.assert_close(out["attr", "x"], slow, rtol=1e-12, atol=1e-12)
    c = torch.randn(5, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(
        torch.autograd.grad((out["attr", "x"] * c).sum(), w2)[0],
        torch.autograd.grad((slow * c).sum(), w2)[0],
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("inplace,site", [(False, "relu1"), (False, "conv1"), (True, "conv1"), (True, "relu1:input")])
def test_guided_grad_cam_equals_captum_expected(inplace, site):  # test_simple_input_conv, _multi_input_conv(_inplace),
    net = captum_models().BasicModel_ConvNet_One_Conv(inplace=inplace)  # _multi_input_relu_input
    inp = torch.arange(16, dtype=torch.float).view(1, 1, 4, 4)
    if site == "relu1":
        out = tdfunc.guided_grad_cam(lambda t: net(t["x"])[:, 0], TensorDict({"x": inp}, batch_size=[1]), net, site)
        _captum_close(out["attr", "x"], _GGC_EX)
        return
    two = TensorDict({"x": inp, "x2": torch.ones(1, 1, 4, 4)}, batch_size=[1])
    out = tdfunc.guided_grad_cam(lambda t: net(t["x"], t["x2"])[:, 0], two, net, site)
    ref = captum_attr.GuidedGradCam(net, net.relu1 if site.startswith("relu1") else net.conv1).attribute(
        (inp, torch.ones(1, 1, 4, 4)), target=0, attribute_to_layer_input=site.endswith(":input")
    )
    _captum_close(out["attr", "x"], ref[0].detach())
    _captum_close(out["attr", "x2"], ref[1].detach())


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic", "area"])
def test_guided_grad_cam_every_class_and_mode_equals_captum(mode):
    torch.manual_seed(7)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 2, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3)
    ).double()
    img = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    out = tdfunc.guided_grad_cam(
        lambda t: net(t["img"]), TensorDict({"img": img}, batch_size=[2]), net, "2", interpolate_mode=mode
    )
    for k in range(3):
        ref = captum_attr.GuidedGradCam(net, net[2]).attribute(img, target=k, interpolate_mode=mode)
        torch.testing.assert_close(out["attr", "img"][:, k], ref, rtol=1e-10, atol=1e-10)


def test_pins_deconvolution_and_guided_grad_cam_errors():
    net = captum_models().BasicModel_ConvNet_One_Conv()
    td = TensorDict({"x": torch.randn(1, 1, 4, 4), "v": torch.ones(1, 1)}, batch_size=[1])
    f = lambda t: net(t["x"] + t["v"][..., None, None])[:, 0]
    with pytest.raises(
        tdfunc.AttributionError,
        match=re.escape(
            "tdfunc.guided_grad_cam: input 'v' has feature shape (1,), but the Grad-CAM map at 'conv1' has spatial "
            "shape (2, 2); guided_grad_cam upsamples the map to each input's spatial dims (feature shape (C, "
            "*spatial), as many spatial dims as the map, 1 to 3). Attribute only such inputs (in_keys=[...]) or use "
            "tdfunc.guided_backprop for the others."
        ),
    ):
        tdfunc.guided_grad_cam(f, td, net, "conv1")
    with pytest.raises(
        tdfunc.AttributionError,
        match=re.escape(
            "tdfunc.guided_grad_cam: unknown interpolate_mode 'made_up_nonlinear'; choose one of ['nearest', 'linear', "
            "'bilinear', 'bicubic', 'trilinear', 'area', 'nearest-exact'] (torch.nn.functional.interpolate's modes)."
        ),
    ):
        tdfunc.guided_grad_cam(f, td, net, "conv1", in_keys=["x"], interpolate_mode="made_up_nonlinear")
    lin = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(
        tdfunc.AttributionError,
        match=re.escape(
            "tdfunc.deconvolution: module Sequential has no nn.ReLU submodule, so there is no ReLU backward to rewrite."
        ),
    ):
        tdfunc.deconvolution(lambda t: lin(t["x"]), TensorDict({"x": torch.randn(2, 3)}, batch_size=[2]), lin)
