"""Occlusion, feature ablation, Shapley value sampling: captum, slow loop references, axioms, errors.

captum comparisons run in float32 (captum's occlusion divides in float32 and its Shapley sums are
float32 whatever the input dtype); the loop references and axioms run in float64.  Each captum
call gets one target ``c`` and is compared with our ``[:, c]`` of the every-class map.

Permutations for Shapley sampling: captum draws ``torch.randperm(n_features)`` from torch's
global generator once per sample; we seed the global generator with ``torch.manual_seed(s)``
before captum's call and pass ``generator=torch.Generator().manual_seed(s)`` to ours, which draws
``torch.randperm(n_features, generator=...)`` per sample: the same stream, so the same
permutations (checked also by passing them explicitly via ``permutations=``).
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from captum.attr import FeatureAblation, Occlusion, ShapleyValues, ShapleyValueSampling
from models import CNN, MLP
from tensordict import TensorDict

import tdfunc

DT = torch.float64


def _td(**kw):
    b = next(iter(kw.values())).shape[0]
    return TensorDict(kw, batch_size=[b])


def _close(a, b, tol=1e-12):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 5)
        self.b = torch.nn.Conv1d(2, 5, 3)

    def forward(self, a, b):
        return torch.tanh(self.a(a) + self.b(b).mean(-1)) @ torch.ones(5, 3) + a[:, :1] * b[:, 0, :1]


# ------------------------------------------------------------------------------------------ occlusion


@pytest.mark.parametrize(
    "channels,window,strides",
    [(1, (1, 3, 3), (1, 2, 2)), (3, (2, 2, 3), (1, 2, 3)), (3, (3, 8, 8), None), (1, (1, 4, 2), 2), (1, (1, 3, 3), 1)],
)
def test_occlusion_cnn_equals_captum_every_class(channels, window, strides):
    torch.manual_seed(0)
    cnn = CNN(c=2, n_cls=3).eval()
    cnn.conv1 = torch.nn.Conv2d(channels, 2, 3, padding=1)
    x, b = torch.randn(2, channels, 8, 8), 0.1 * torch.randn(1, channels, 8, 8)
    td = _td(x=x)
    td["baseline", "x"] = b.expand_as(x)
    ours = tdfunc.occlusion(lambda t: cnn(t["x"]), td, sliding_window_shapes=window, strides=strides, chunk_size=5)
    assert ours["attr", "x"].shape == (2, 3, channels, 8, 8)
    for c in range(3):
        ref = Occlusion(cnn).attribute(x, sliding_window_shapes=window, strides=strides, baselines=b, target=c)
        _close(ours["attr", "x"][:, c], ref, 1e-6)


def test_occlusion_two_inputs_equals_captum():
    torch.manual_seed(0)
    m = TwoInputs()
    a, b = torch.randn(3, 4), torch.randn(3, 2, 6)
    td = _td(a=a, b=b)
    ours = tdfunc.occlusion(
        lambda t: m(t["a"], t["b"])[:, 1],
        td,
        sliding_window_shapes={"a": (2,), "b": (1, 3)},
        strides={"a": 1, "b": (1, 2)},
        chunk_size=3,
    )
    ref = Occlusion(m).attribute((a, b), sliding_window_shapes=((2,), (1, 3)), strides=(1, (1, 2)), target=1)
    _close(ours["attr", "a"], ref[0], 1e-6)
    _close(ours["attr", "b"], ref[1], 1e-6)


def _occlusion_loop(f, x, b, window, strides):
    """Every window position, one forward each; average the output drops over the covering windows."""
    batch, feat = x.shape[:1], x.shape[1:]
    y0 = f(x)
    total = torch.zeros(*batch, *y0.shape[1:], *feat, dtype=x.dtype)
    count = torch.zeros(feat, dtype=x.dtype)
    starts = [range(0, max(d - w, 0) + s, s) if d > w else [0] for d, w, s in zip(feat, window, strides)]
    for corner in itertools.product(*starts):
        sl = tuple(slice(o, o + w) for o, w in zip(corner, window))
        xo = x.clone()
        xo[(slice(None), *sl)] = b[(slice(None), *sl)]
        drop = (y0 - f(xo)).reshape(*y0.shape, *([1] * len(feat)))
        m = torch.zeros(feat, dtype=x.dtype)
        m[sl] = 1
        total += drop * m
        count += m
    return total / count


def test_occlusion_equals_loop_reference_float64():
    torch.manual_seed(1)
    cnn = CNN(c=2, n_cls=3).to(DT).eval()
    x, b = torch.randn(2, 1, 7, 6, dtype=DT), torch.randn(2, 1, 7, 6, dtype=DT)
    f = lambda v: cnn(v)
    for window, strides in [((1, 3, 2), (1, 2, 2)), ((1, 2, 4), (1, 1, 3))]:
        ours = tdfunc.occlusion(
            lambda t: f(t["x"]),
            _td(x=x, baseline=TensorDict(x=b, batch_size=[2])),
            sliding_window_shapes=window,
            strides=strides,
        )
        _close(ours["attr", "x"], _occlusion_loop(f, x, b, window, strides))


def test_occlusion_linear_window_one_is_input_times_weight_and_chunks_agree():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 2).to(DT)
    td = _td(x=torch.randn(4, 5, dtype=DT))
    full = tdfunc.occlusion(lambda t: lin(t["x"]), td, sliding_window_shapes=(1,))
    _close(full["attr", "x"], td["x"][:, None] * lin.weight)
    for chunk in (1, 2, 5, 100):
        _close(
            tdfunc.occlusion(lambda t: lin(t["x"]), td, sliding_window_shapes=(1,), chunk_size=chunk)["attr", "x"],
            full["attr", "x"],
        )


def test_occlusion_grad_wrt_input_matches_finite_differences():
    torch.manual_seed(0)
    mlp = MLP().to(DT)
    x = torch.randn(2, 6, dtype=DT, requires_grad=True)
    g = lambda v: tdfunc.occlusion(lambda t: mlp(t["x"]), _td(x=v), sliding_window_shapes=(2,), strides=2)["attr", "x"]
    assert torch.autograd.gradcheck(g, (x,))


# ------------------------------------------------------------------------------------ feature ablation


@pytest.mark.parametrize("mask_kind", ["default", "feature-shape", "per-example", "channels"])
def test_feature_ablation_equals_captum_every_class(mask_kind):
    torch.manual_seed(0)
    cnn = CNN(c=2, n_cls=3).eval()
    x, b = torch.randn(3, 1, 4, 4), 0.2 * torch.randn(3, 1, 4, 4)
    masks = {
        "default": None,
        "feature-shape": (torch.arange(16).view(1, 4, 4) // 5),
        "per-example": torch.randint(0, 4, (3, 1, 4, 4)),
        "channels": torch.tensor([[[[2, 2, 7, 7]]]]),  # broadcast over rows; ids need not be consecutive
    }
    fm = masks[mask_kind]
    td = _td(x=x, baseline=TensorDict(x=b, batch_size=[3]))
    ours = tdfunc.feature_ablation(lambda t: cnn(t["x"]), td, feature_mask=fm, chunk_size=3)["attr", "x"]
    for c in range(3):
        cm = None if fm is None else (fm if fm.dim() == 4 else fm[None])
        ref = FeatureAblation(cnn).attribute(x, baselines=b, target=c, feature_mask=cm)
        _close(ours[:, c], ref, 1e-6)


def test_feature_ablation_two_inputs_shared_ids_equals_captum():
    torch.manual_seed(0)
    m = TwoInputs()
    a, b = torch.randn(3, 4), torch.randn(3, 2, 6)
    ma, mb = torch.tensor([0, 1, 1, 2]), torch.tensor([[2, 2, 3, 3, 4, 4], [0, 0, 0, 5, 5, 5]])
    ours = tdfunc.feature_ablation(lambda t: m(t["a"], t["b"]), _td(a=a, b=b), feature_mask={"a": ma, "b": mb})
    for c in range(3):
        ref = FeatureAblation(m).attribute((a, b), target=c, feature_mask=(ma[None], mb[None]))
        _close(ours["attr", "a"][:, c], ref[0], 1e-6)
        _close(ours["attr", "b"][:, c], ref[1], 1e-6)


def test_feature_ablation_equals_loop_reference_float64():
    torch.manual_seed(2)
    mlp = MLP().to(DT)
    x, b = torch.randn(4, 6, dtype=DT), torch.randn(4, 6, dtype=DT)
    fm = torch.tensor([3, 0, 3, 1, 1, 0])
    y0 = mlp(x)
    ref = torch.zeros(4, 3, 6, dtype=DT)
    for g in fm.unique():
        sel = fm == g
        drop = y0 - mlp(torch.where(sel, b, x))
        ref += drop[:, :, None] * sel
    ours = tdfunc.feature_ablation(
        lambda t: mlp(t["x"]), _td(x=x, baseline=TensorDict(x=b, batch_size=[4])), feature_mask=fm
    )
    _close(ours["attr", "x"], ref)


# ------------------------------------------------------------------------------------------- Shapley


@pytest.mark.parametrize("mask_kind", ["default", "groups", "per-example"])
def test_shapley_sampling_equals_captum_with_the_same_permutations(mask_kind):
    torch.manual_seed(0)
    mlp = MLP()
    x, b = torch.randn(3, 6), 0.3 * torch.randn(3, 6)
    fm = {"default": None, "groups": torch.tensor([0, 2, 1, 1, 2, 0]), "per-example": torch.randint(0, 3, (3, 6))}[
        mask_kind
    ]
    td = _td(x=x, baseline=TensorDict(x=b, batch_size=[3]))
    for c in range(3):
        ours = tdfunc.shapley_value_sampling(
            lambda t: mlp(t["x"]),
            td,
            feature_mask=fm,
            n_samples=6,
            generator=torch.Generator().manual_seed(10 + c),
            chunk_size=7,
        )["attr", "x"]
        torch.manual_seed(10 + c)  # captum draws torch.randperm from the global generator
        cm = None if fm is None else (fm if fm.dim() == 2 else fm[None])
        ref = ShapleyValueSampling(mlp).attribute(x, baselines=b, target=c, n_samples=6, feature_mask=cm)
        _close(ours[:, c], ref, 1e-6)


def test_shapley_generator_draws_the_explicit_permutations():
    torch.manual_seed(0)
    mlp = MLP().to(DT)
    td = _td(x=torch.randn(2, 6, dtype=DT))
    g = torch.Generator().manual_seed(3)
    perms = torch.stack([torch.randperm(6, generator=g) for _ in range(4)])
    a = tdfunc.shapley_value_sampling(
        lambda t: mlp(t["x"]), td, n_samples=4, generator=torch.Generator().manual_seed(3)
    )
    b = tdfunc.shapley_value_sampling(lambda t: mlp(t["x"]), td, n_samples=4, permutations=perms)
    _close(a["attr", "x"], b["attr", "x"])


def test_shapley_exact_with_all_permutations_efficiency_and_captum_shapley_values():
    torch.manual_seed(0)
    mlp = MLP().to(DT)
    x, b = torch.randn(4, 6, dtype=DT), torch.randn(4, 6, dtype=DT)
    fm = torch.tensor([0, 1, 2, 2, 1, 0])  # 3 features: 6 permutations
    perms = torch.tensor(list(itertools.permutations(range(3))))
    td = _td(x=x, baseline=TensorDict(x=b, batch_size=[4]))
    ours = tdfunc.shapley_value_sampling(lambda t: mlp(t["x"]), td, feature_mask=fm, n_samples=6, permutations=perms)[
        "attr", "x"
    ]
    # efficiency: the per-feature values (one position of each feature) sum to f(x) - f(x')
    phi = torch.stack([ours[..., (fm == g).nonzero()[0, 0]] for g in range(3)], -1)
    _close(phi.sum(-1), mlp(x) - mlp(b))
    # the exact Shapley formula: sum over subsets S of |S|! (n-|S|-1)! / n! (f(S + g) - f(S))
    for g in range(3):
        exact = torch.zeros(4, 3, dtype=DT)
        others = [h for h in range(3) if h != g]
        for r in range(3):
            for sub in itertools.combinations(others, r):
                w = math.factorial(r) * math.factorial(2 - r) / math.factorial(3)
                on = torch.isin(fm, torch.tensor(sub, dtype=torch.long))
                with_g = torch.where(on | (fm == g), x, b)
                exact += w * (mlp(with_g) - mlp(torch.where(on, x, b)))
        _close(phi[..., g], exact)
    ref = ShapleyValues(mlp.float()).attribute(x.float(), baselines=b.float(), target=1, feature_mask=fm[None])
    _close(ours[:, 1].float(), ref, 1e-5)


def test_shapley_sampling_efficiency_holds_for_every_sample_count():
    torch.manual_seed(0)
    mlp = MLP().to(DT)
    x = torch.randn(3, 6, dtype=DT)
    for n in (1, 3):
        out = tdfunc.shapley_value_sampling(
            lambda t: mlp(t["x"]), _td(x=x), n_samples=n, generator=torch.Generator().manual_seed(n)
        )
        _close(out["attr", "x"].sum(-1), mlp(x) - mlp(torch.zeros_like(x)))


def test_empty_batch_shape_matches_batched():
    torch.manual_seed(0)
    mlp = MLP().to(DT)
    x = torch.randn(6, dtype=DT)
    one = tdfunc.occlusion(lambda t: mlp(t["x"]), TensorDict({"x": x}, batch_size=[]), sliding_window_shapes=(2,))
    many = tdfunc.occlusion(lambda t: mlp(t["x"]), _td(x=x[None]), sliding_window_shapes=(2,))
    _close(one["attr", "x"], many["attr", "x"][0])


# --------------------------------------------------------------------------------------------- errors


def _raises(msg, fn, *args, **kw):
    with pytest.raises(tdfunc.AttributionError, match="^" + re.escape(msg) + "$"):
        fn(*args, **kw)


def test_errors_pinned():
    f = lambda t: t["x"].sum(-1)
    td = _td(x=torch.randn(2, 1, 8, 8))
    occ, fa, sv = tdfunc.occlusion, tdfunc.feature_ablation, tdfunc.shapley_value_sampling
    _raises(
        "tdfunc.occlusion: sliding window (3, 3) for 'x' has 2 dims, but the input's feature shape (1, 8, 8) has 3; "
        "give one window size per feature dim, e.g. (1, 1, 1).",
        occ,
        f,
        td,
        sliding_window_shapes=(3, 3),
    )
    _raises(
        "tdfunc.occlusion: sliding window (1, 9, 3) for 'x' does not fit the feature shape (1, 8, 8); every window "
        "size must be between 1 and the feature size.",
        occ,
        f,
        td,
        sliding_window_shapes=(1, 9, 3),
    )
    _raises(
        "tdfunc.occlusion: strides (1, 0, 2) for 'x' must be one integer >= 1 per feature dim (3 dims) or a single "
        "integer >= 1.",
        occ,
        f,
        td,
        sliding_window_shapes=(1, 3, 3),
        strides=(1, 0, 2),
    )
    _raises(
        "tdfunc.occlusion: strides (-1, -1, -1) for 'x' must be one integer >= 1 per feature dim (3 dims) or a "
        "single integer >= 1.",
        occ,
        f,
        td,
        sliding_window_shapes=(1, 3, 3),
        strides=-1,
    )
    _raises(
        "tdfunc.occlusion: stride 3 exceeds the window size 2 in feature dim 1 of 'x'; the windows would skip "
        "elements (captum's rule): use strides <= window sizes.",
        occ,
        f,
        td,
        sliding_window_shapes=(1, 2, 2),
        strides=(1, 3, 1),
    )
    _raises(
        "tdfunc.occlusion: sliding_window_shapes for 'x' must be a tuple of integers, got 3.",
        occ,
        f,
        td,
        sliding_window_shapes=3,
    )
    two = _td(x=torch.randn(2, 3), y=torch.randn(2, 4))
    _raises(
        "tdfunc.occlusion: sliding_window_shapes has no entry for 'y'; give one window shape per attributed input "
        "(a dict key -> window shape, or a bare window shape when there is one input).",
        occ,
        lambda t: t["x"].sum(-1),
        two,
        sliding_window_shapes={"x": (1,)},
    )
    _raises(
        "tdfunc.occlusion: sliding_window_shapes must be a dict key -> window shape when attributing several "
        "inputs ('x', 'y'), got tuple.",
        occ,
        lambda t: t["x"].sum(-1),
        two,
        sliding_window_shapes=(1,),
    )
    _raises(
        "tdfunc.occlusion: chunk_size must be None or an integer >= 1, got 0.",
        occ,
        f,
        td,
        sliding_window_shapes=(1, 2, 2),
        chunk_size=0,
    )
    x6 = _td(x=torch.randn(4, 6))
    g = lambda t: t["x"].sum(-1)
    _raises(
        "tdfunc.feature_ablation: feature_mask for 'x' has shape (5,) but the input has shape (4, 6); give an "
        "integer mask broadcastable to the input (batch + feature shape).",
        fa,
        g,
        x6,
        feature_mask=torch.arange(5),
    )
    _raises(
        "tdfunc.feature_ablation: feature_mask for 'x' has shape (1, 4, 6) but the input has shape (4, 6); give an "
        "integer mask broadcastable to the input (batch + feature shape).",
        fa,
        g,
        x6,
        feature_mask=torch.zeros(1, 4, 6, dtype=torch.long),
    )
    _raises(
        "tdfunc.feature_ablation: feature_mask for 'x' must be an integer tensor of feature ids, got a torch.float32 "
        "tensor; e.g. torch.arange(n).view(shape).",
        fa,
        g,
        x6,
        feature_mask=torch.zeros(6),
    )
    _raises(
        "tdfunc.shapley_value_sampling: feature_mask for 'x' has shape (2, 6) but the input has shape (4, 6); give "
        "an integer mask broadcastable to the input (batch + feature shape).",
        sv,
        g,
        x6,
        feature_mask=torch.zeros(2, 6, dtype=torch.long),
    )
    _raises("tdfunc.shapley_value_sampling: n_samples must be an integer >= 1, got 0.", sv, g, x6, n_samples=0)
    _raises("tdfunc.shapley_value_sampling: n_samples must be an integer >= 1, got 2.5.", sv, g, x6, n_samples=2.5)
    _raises(
        "tdfunc.shapley_value_sampling: feature_mask has the negative id -1; feature ids must be 0 .. n_features - 1.",
        sv,
        g,
        x6,
        feature_mask=torch.tensor([-1, 0, 0, 1, 1, 1]),
    )
    _raises(
        "tdfunc.shapley_value_sampling: permutations has shape (2, 5); expected (2, 6) (n_samples, n_features).",
        sv,
        g,
        x6,
        n_samples=2,
        permutations=torch.zeros(2, 5, dtype=torch.long),
    )
    _raises(
        "tdfunc.shapley_value_sampling: every row of permutations must hold each feature id 0 .. 5 exactly once.",
        sv,
        g,
        x6,
        n_samples=1,
        permutations=torch.zeros(1, 6, dtype=torch.long),
    )
    _raises(
        "tdfunc.shapley_value_sampling: permutations must be an integer tensor of shape (1, 6), got a torch.float32 tensor.",
        sv,
        g,
        x6,
        n_samples=1,
        permutations=torch.zeros(1, 6),
    )
    _raises(
        "tdfunc.feature_ablation: f returned shape (4, 2, 3), but td has batch shape (4,); f must return one value "
        "per example (4,) or K per example (4, K). Select the target inside f, e.g. lambda t: "
        "model(t['x']).gather(-1, labels[:, None])[:, 0].".replace(
            "lambda t: model(t['x'])", "lambda td: model(td['x'])"
        ),
        fa,
        lambda t: torch.zeros(4, 2, 3),
        x6,
    )


# ----------------------------------------------------------- occlusion(keep_window=True): zennit's Occlusion


def _keep_loop(f, x, window, stride):
    """Slow reference: every window (captum's layout, stride dividing), keep it, the rest 0, sum f over windows."""
    feat = x.shape[1:]
    starts = [range(0, d - w + 1, s) for d, w, s in zip(feat, window, stride)]
    out = None
    for st in itertools.product(*starts):
        m = torch.zeros(feat, dtype=torch.bool)
        m[tuple(slice(a, a + w) for a, w in zip(st, window))] = True
        y = f(torch.where(m, x, torch.zeros_like(x)))  # (B, K)
        part = y[:, :, *([None] * len(feat))] * m
        out = part if out is None else out + part
    return out


@pytest.mark.parametrize("window", [(1, 4, 4), (1, 2, 4), (1, 8, 8), (1, 1, 1)])
def test_keep_window_equals_zennit_occlusion_every_class(zennit, window):
    torch.manual_seed(0)
    cnn = CNN(c=3, n_cls=4).to(DT).eval()
    x = torch.randn(2, 1, 8, 8, dtype=DT)
    ours = tdfunc.occlusion(
        lambda t: cnn(t["x"]), _td(x=x), sliding_window_shapes=window, strides=window, keep_window=True
    )["attr", "x"]
    for c in range(4):
        onehot = torch.eye(4, dtype=DT)[c]
        with zennit.attribution.Occlusion(cnn, window=window, stride=window) as attributor:
            _, theirs = attributor(x.clone(), lambda y: y * onehot)
        _close(ours[:, c], theirs)
    _close(ours, _keep_loop(cnn, x, window, window))


@pytest.mark.parametrize("size", [1, 2, 4])
def test_keep_window_zennit_disjunct_and_single_scenarios(zennit, size):
    """zennit's test_occlusion_disjunct (window = stride tiling the input: the kept windows add up to the input, so
    for a linear f the windows' outputs add up to f(x)) and test_occlusion_single (one window of the whole input:
    every position gets f(x)), with zennit's Occlusion live on the same f."""
    torch.manual_seed(1)
    w = torch.randn(4, 4, 3, dtype=DT)
    f = lambda x: torch.einsum("bij,ijk->bk", x, w)  # noqa: E731
    x = torch.randn(3, 4, 4, dtype=DT)
    ours = tdfunc.occlusion(
        lambda t: f(t["x"]), _td(x=x), sliding_window_shapes=(size, size), strides=size, keep_window=True
    )["attr", "x"]
    per_window = ours[..., ::size, ::size]  # one entry per window: f of that window alone
    _close(per_window.sum((-2, -1)), f(x))

    class F(torch.nn.Module):
        def forward(self, x):
            return f(x)

    for c in range(3):
        onehot = torch.eye(3, dtype=DT)[c]
        with zennit.attribution.Occlusion(F(), window=(size, size), stride=(size, size)) as attributor:
            _, theirs = attributor(x.clone(), lambda y: y * onehot)
        _close(ours[:, c], theirs)
    single = tdfunc.occlusion(lambda t: f(t["x"]), _td(x=x), sliding_window_shapes=(4, 4), keep_window=True)
    _close(single["attr", "x"], f(x)[:, :, None, None].expand(3, 3, 4, 4))


def test_keep_window_baseline_scalar_f_chunks_and_error():
    torch.manual_seed(2)
    mlp = MLP().to(DT)
    x, base = torch.randn(4, 6, dtype=DT), 0.3 * torch.randn(6, dtype=DT)
    td = _td(x=x)
    kw = dict(sliding_window_shapes=(3,), strides=1, keep_window=True)
    a = tdfunc.occlusion(lambda t: mlp(t["x"]), td, baselines=base, **kw)["attr", "x"]
    b = tdfunc.occlusion(lambda t: mlp(t["x"]), td, baselines=base, chunk_size=2, **kw)["attr", "x"]
    _close(a, b)
    ref = torch.zeros(4, 3, 6, dtype=DT)
    for s in range(4):  # overlapping windows: sums over the windows holding a position
        m = torch.zeros(6, dtype=torch.bool)
        m[s : s + 3] = True
        ref += mlp(torch.where(m, x, base))[:, :, None] * m
    _close(a, ref)
    scalar = tdfunc.occlusion(lambda t: mlp(t["x"]).sum(), td, baselines=base, **kw)["attr", "x"]
    _close(scalar, ref.sum((0, 1))[None].expand(4, 6))
    with pytest.raises(
        tdfunc.AttributionError,
        match=r"tdfunc\.occlusion: keep_window must be True or False, got str \('yes'\); pass keep_window=True",
    ):
        tdfunc.occlusion(lambda t: mlp(t["x"]), td, sliding_window_shapes=(3,), keep_window="yes")  # type: ignore[arg-type]
