"""Perturbation methods: parity items with captum (issue 14).

Inputs of zero features, baselines shared across the batch (a number, ``(F,)``, ``(1, F)``) broadcast as
captum does, integer / bool inputs (token ids, masks) without a float cast.  References: captum's
``FeatureAblation`` / ``Occlusion`` / ``ShapleyValueSampling`` / ``KernelShap`` on the same inputs (same
seeds for the samplers), float32 tolerances; a loop over ablated inputs for bool masks.
"""

from __future__ import annotations

import re

import pytest
import torch
from captum.attr import FeatureAblation, KernelShap, Occlusion, ShapleyValueSampling
from tensordict import TensorDict

import tdfunc
from tdfunc.attribution._common import AttributionError


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _per_class(make, k=3):
    return torch.stack([make(c) for c in range(k)], 1)


# ------------------------------------------------------------------------------- zero features


@pytest.mark.parametrize("method", ["kernel_shap", "shapley_value_sampling", "feature_ablation"])
def test_an_input_of_zero_features_gets_an_empty_map_and_leaves_the_others_unchanged(method):
    net = _net()
    x = torch.randn(3, 6)
    f = lambda t: net(t["x"]) + t["e"].sum(-1, keepdim=True)
    fn = getattr(tdfunc, method)
    kw = {} if method == "feature_ablation" else {"n_samples": 12}
    g = lambda: {} if method == "feature_ablation" else {"generator": torch.Generator().manual_seed(4)}
    both = fn(f, TensorDict({"x": x, "e": torch.randn(3, 0)}, batch_size=[3]), **kw, **g())
    alone = fn(lambda t: net(t["x"]), TensorDict({"x": x}, batch_size=[3]), **kw, **g())
    assert both["attr", "e"].shape == (3, 3, 0)
    torch.testing.assert_close(both["attr", "x"], alone["attr", "x"], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["kernel_shap", "shapley_value_sampling", "feature_ablation"])
@pytest.mark.parametrize("k", [None, 2])
def test_only_inputs_of_zero_features_give_empty_maps(method, k):
    td = TensorDict({"e": torch.randn(3, 0)}, batch_size=[3])
    f = (lambda t: t["e"].sum(-1)) if k is None else (lambda t: t["e"].sum(-1)[:, None].expand(3, k))
    out = getattr(tdfunc, method)(f, td)
    assert out["attr", "e"].shape == ((3, 0) if k is None else (3, k, 0))


def test_a_custom_mask_over_an_empty_input_counts_only_the_other_ids():
    net = _net()
    x = torch.randn(2, 6)
    mask = {"x": torch.tensor([0, 0, 1, 1, 2, 2]), "e": torch.zeros(0, dtype=torch.long)}
    td = TensorDict({"x": x, "e": torch.randn(2, 0)}, batch_size=[2])
    out = tdfunc.shapley_value_sampling(
        lambda t: net(t["x"]), td, feature_mask=mask, n_samples=4, generator=torch.Generator().manual_seed(0)
    )
    ref = tdfunc.shapley_value_sampling(
        lambda t: net(t["x"]),
        TensorDict({"x": x}, batch_size=[2]),
        feature_mask=mask["x"],
        n_samples=4,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(out["attr", "x"], ref["attr", "x"], rtol=0, atol=0)


# ------------------------------------------------------------------------- shared baselines


_SHARED = {
    "number": lambda: 0.5,
    "scalar tensor": lambda: torch.tensor(0.3),
    "(F,)": lambda: torch.randn(6),
    "(1, F)": lambda: torch.randn(1, 6),
    "(B, F)": lambda: torch.randn(4, 6),
}


@pytest.mark.parametrize("kind", list(_SHARED))
def test_shared_baselines_equal_captum(kind):
    net = _net()
    torch.manual_seed(1)
    x, b = torch.randn(4, 6), _SHARED[kind]()
    cb = b  # captum's samplers index a 0-dim tensor and run f on a (F,) baseline alone: give them (1, F)
    if isinstance(b, torch.Tensor) and b.dim() < 2:
        cb = b.item() if b.dim() == 0 else b[None]
    td = TensorDict({"x": x}, batch_size=[4])
    f = lambda t: net(t["x"])
    out = tdfunc.feature_ablation(f, td, baselines=b)["attr", "x"]
    ref = _per_class(lambda c: FeatureAblation(net).attribute(x, baselines=b, target=c))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out = tdfunc.occlusion(f, td, sliding_window_shapes=(3,), strides=2, baselines={"x": b})["attr", "x"]
    ref = _per_class(
        lambda c: Occlusion(net).attribute(x, sliding_window_shapes=(3,), strides=2, baselines=b, target=c)
    )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out = tdfunc.shapley_value_sampling(f, td, n_samples=3, baselines=b, generator=torch.Generator().manual_seed(2))[
        "attr", "x"
    ]

    def svs(c):
        torch.manual_seed(2)
        return ShapleyValueSampling(net).attribute(x, baselines=cb, target=c, n_samples=3)

    torch.testing.assert_close(out, _per_class(svs), rtol=1e-5, atol=1e-6)
    if kind != "(B, F)":  # captum's KernelShap takes one example at a time
        out = tdfunc.kernel_shap(f, td, n_samples=20, baselines=b, generator=torch.Generator().manual_seed(3))[
            "attr", "x"
        ]
        for i in range(4):

            def ks(c):
                torch.manual_seed(3)
                return KernelShap(net).attribute(x[i : i + 1], baselines=cb, target=c, n_samples=20)[0]

            torch.testing.assert_close(out[i], torch.stack([ks(c) for c in range(3)]), rtol=1e-4, atol=2e-5)


def test_shared_baseline_equals_the_td_entry_it_stands_for():
    net = _net()
    x, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    net = net.double()
    shared = tdfunc.feature_ablation(lambda t: net(t["x"]), TensorDict({"x": x}, batch_size=[4]), baselines=b)
    entry = tdfunc.feature_ablation(
        lambda t: net(t["x"]), TensorDict({"x": x, ("baseline", "x"): b.expand(4, 6)}, batch_size=[4])
    )
    torch.testing.assert_close(shared["attr", "x"], entry["attr", "x"], rtol=0, atol=0)


# --------------------------------------------------------------------- integer / bool inputs


def _embedding_model():
    torch.manual_seed(0)
    emb, lin = torch.nn.Embedding(11, 4), torch.nn.Linear(4, 2)
    return lambda ids: lin(torch.tanh(emb(ids)).mean(1))


def test_token_ids_equal_captum_for_every_perturbation_method():
    model = _embedding_model()
    ids = torch.randint(1, 11, (3, 5))
    td = TensorDict({"ids": ids, "y": torch.randn(3)}, batch_size=[3])  # a float entry that is not attributed
    f = lambda t: model(t["ids"])
    out = tdfunc.feature_ablation(f, td, in_keys="ids")["attr", "ids"]  # default baseline 0: the pad id
    torch.testing.assert_close(
        out, _per_class(lambda c: FeatureAblation(model).attribute(ids, baselines=0, target=c), 2), rtol=1e-5, atol=1e-6
    )
    out = tdfunc.occlusion(f, td, in_keys="ids", sliding_window_shapes=(2,), baselines=10)["attr", "ids"]
    ref = _per_class(lambda c: Occlusion(model).attribute(ids, sliding_window_shapes=(2,), baselines=10, target=c), 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out = tdfunc.shapley_value_sampling(
        f, td, in_keys="ids", n_samples=4, baselines=torch.full((1, 5), 3), generator=torch.Generator().manual_seed(5)
    )["attr", "ids"]

    def svs(c):
        torch.manual_seed(5)
        return ShapleyValueSampling(model).attribute(ids, baselines=torch.full((1, 5), 3), target=c, n_samples=4)

    torch.testing.assert_close(out, _per_class(svs, 2), rtol=1e-5, atol=1e-6)
    out = tdfunc.kernel_shap(
        f, td[:1], in_keys="ids", n_samples=25, baselines=2, generator=torch.Generator().manual_seed(6)
    )["attr", "ids"]

    def ks(c):
        torch.manual_seed(6)
        return KernelShap(model).attribute(ids[:1], baselines=2, target=c, n_samples=25)

    torch.testing.assert_close(out, _per_class(ks, 2), rtol=1e-4, atol=2e-5)
    assert out.dtype == torch.float32


def test_bool_mask_input_equals_a_loop_of_flipped_masks():
    torch.manual_seed(0)
    w = torch.randn(5, dtype=torch.float64)
    x = torch.randn(2, 5, dtype=torch.float64)
    keep = torch.rand(2, 5) > 0.3
    f = lambda t: torch.tanh((t["x"] * t["keep"] * w).sum(-1))
    td = TensorDict({"x": x, "keep": keep}, batch_size=[2])
    out = tdfunc.feature_ablation(f, td, in_keys="keep", baselines=True)["attr", "keep"]
    ref = torch.zeros(2, 5, dtype=torch.float64)
    for j in range(5):
        flipped = keep.clone()
        flipped[:, j] = True
        ref[:, j] = f(td) - f(TensorDict({"x": x, "keep": flipped}, batch_size=[2]))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------- pinned errors


def _raises(msg, call):
    with pytest.raises(AttributionError, match="^" + re.escape(msg) + "$"):
        call()


def test_errors_pinned():
    x = torch.randn(2, 4)
    td = TensorDict({"x": x, "ids": torch.zeros(2, 4, dtype=torch.long)}, batch_size=[2])
    f = lambda t: t["x"].sum(-1)
    _raises(
        "tdfunc.feature_ablation: baseline for 'x' has shape (3,) but the input has shape (2, 4); give a "
        "baseline broadcastable to the input: a number, the feature shape (4,), (1, ...) or the input's shape.",
        lambda: tdfunc.feature_ablation(f, td, baselines=torch.zeros(3)),
    )
    _raises(
        "tdfunc.occlusion: baseline for 'ids' is 0.5 but the input has dtype torch.int64; give a finite value "
        "of the input's dtype (for token ids an integer, e.g. the pad token id; for a bool mask True or False).",
        lambda: tdfunc.occlusion(f, td, in_keys="ids", sliding_window_shapes=(1,), baselines=0.5),
    )
    _raises(
        "tdfunc.shapley_value_sampling: baseline for 'ids' has dtype torch.float32 on cpu but the input has "
        "dtype torch.int64 on cpu; convert it with .to(input).",
        lambda: tdfunc.shapley_value_sampling(f, td, in_keys="ids", baselines=torch.zeros(4)),
    )
    _raises(
        "tdfunc.kernel_shap: baseline for 'x' must be a number or a tensor broadcastable to the input (2, 4), got str.",
        lambda: tdfunc.kernel_shap(f, td, baselines="zeros"),
    )
    _raises(
        "tdfunc.feature_ablation: baselines names 'y', which is not an attributed input (['x']); give one "
        "baseline (a number or a tensor broadcastable to the input) per attributed input (a dict key -> baseline "
        "(a number or a tensor broadcastable to the input), or a bare baseline (a number or a tensor "
        "broadcastable to the input) when there is one input).",
        lambda: tdfunc.feature_ablation(f, td, baselines={"x": 0.0, "y": 1.0}),
    )
    both = TensorDict({"x": x, ("baseline", "x"): x}, batch_size=[2])
    _raises(
        "tdfunc.feature_ablation: the baseline for 'x' is given twice, as baselines= and as the td entry "
        "('baseline', 'x'); keep one of them.",
        lambda: tdfunc.feature_ablation(f, both, baselines=0.0),
    )
    _raises(
        "tdfunc.feature_ablation: baseline for 'x' holds 1 NaN value (of 4); replace them (e.g. "
        "torch.nan_to_num) or drop those examples before attributing.",
        lambda: tdfunc.feature_ablation(f, td, baselines=torch.tensor([0.0, float("nan"), 0.0, 0.0])),
    )
    cx = TensorDict({"z": torch.zeros(2, 3, dtype=torch.complex64)}, batch_size=[2])
    _raises(
        "tdfunc.occlusion: input 'z' has dtype torch.complex64; this method perturbs real inputs "
        "(floating-point, integer or bool). Attribute the real and imaginary parts as two real entries.",
        lambda: tdfunc.occlusion(lambda t: t["z"].real.sum(-1), cx, in_keys="z", sliding_window_shapes=(1,)),
    )


@pytest.mark.parametrize("method", ["shapley_value_sampling", "kernel_shap"])
def test_feature_mask_naming_no_input_is_refused(method):
    td = TensorDict({"x": torch.randn(2, 4)}, batch_size=[2])
    _raises(
        f"tdfunc.{method}: feature_mask names 'y', which is not an attributed input (['x']); give one integer "
        "mask per attributed input (a dict key -> integer mask, or a bare integer mask when there is one input).",
        lambda: getattr(tdfunc, method)(
            lambda t: t["x"].sum(-1), td, feature_mask={"x": torch.arange(4), "y": torch.arange(4)}
        ),
    )


# ------------------------------------------------------------------ one value per batch (captum's scalar forward)

_bm = pytest.importorskip("captum.testing.helpers.basic_models")
_SCALAR_CASES = {  # captum tests/attr/test_feature_ablation.py, the *_batch_scalar_tensor_0d cases
    "single_input_one_sample": (_bm.BasicModel_MultiLayer, [[[2.0, 10.0, 3.0]]], [[[0, 0, 1]]], [[[82.0, 82.0, 24.0]]]),
    "single_input_multi_sample": (
        _bm.BasicModel_MultiLayer,
        [[[2.0, 10.0, 3.0], [20.0, 50.0, 30.0]]],
        [[[0, 0, 1]]],
        [[[642.0, 642.0, 264.0]]],
    ),
    "multi_input": (
        _bm.BasicModel_MultiLayer_MultiInput,
        [
            [[23.0, 100.0, 0.0], [20.0, 50.0, 30.0]],
            [[20.0, 50.0, 30.0], [0.0, 100.0, 0.0]],
            [[0.0, 100.0, 10.0], [2.0, 10.0, 3.0]],
        ],
        [[[1, 1, 1]], [[0, 3, 2]], [[4, 5, 6]]],
        [[[1784, 1784, 1784]], [[160, 1200, 240]], [[16, 880, 104]]],
    ),
}


@pytest.mark.parametrize("name", list(_SCALAR_CASES))
def test_one_value_per_batch_captum_feature_ablation_cases(name):
    net_cls, inputs, masks, expected = _SCALAR_CASES[name]
    net = net_cls()
    keys = [f"x{i}" for i in range(len(inputs))]
    td = TensorDict({k: torch.tensor(v) for k, v in zip(keys, inputs)}, batch_size=[len(inputs[0])])
    extra = (1,) if net_cls is _bm.BasicModel_MultiLayer_MultiInput else ()
    f = lambda t: net(*[t[k] for k in keys], *extra).sum()  # one value for the whole batch
    out = tdfunc.feature_ablation(f, td, feature_mask={k: torch.tensor(m) for k, m in zip(keys, masks)})
    for k, e in zip(keys, expected):  # captum's map has a batch dim of 1; ours is expanded to every example
        torch.testing.assert_close(out["attr", k], torch.tensor(e, dtype=torch.float32).expand_as(td[k]))


def test_one_value_per_batch_occlusion_and_ablation_equal_captum():
    net = _net()
    x = torch.randn(4, 6)
    g = lambda v: torch.log1p(net(v).exp().sum())
    td = TensorDict({"x": x}, batch_size=[4])
    out = tdfunc.occlusion(lambda t: g(t["x"]), td, sliding_window_shapes=(2,), baselines=0.5)["attr", "x"]
    ref = Occlusion(g).attribute(x, sliding_window_shapes=(2,), baselines=0.5)
    torch.testing.assert_close(out, ref.expand_as(x), rtol=1e-5, atol=1e-6)
    out = tdfunc.feature_ablation(lambda t: g(t["x"]), td, feature_mask=torch.tensor([0, 0, 1, 1, 2, 2]))["attr", "x"]
    ref = FeatureAblation(g).attribute(x, feature_mask=torch.tensor([[0, 0, 1, 1, 2, 2]]))
    torch.testing.assert_close(out, ref.expand_as(x), rtol=1e-5, atol=1e-6)


def test_one_value_per_batch_shapley_and_kernel_shap_equal_captum():
    net = _net()
    x = torch.randn(4, 6)
    g = lambda v: net(v).pow(2).mean()
    td = TensorDict({"x": x}, batch_size=[4])
    out = tdfunc.shapley_value_sampling(
        lambda t: g(t["x"]), td, n_samples=5, generator=torch.Generator().manual_seed(2)
    )["attr", "x"]
    torch.manual_seed(2)
    ref = ShapleyValueSampling(g).attribute(x, n_samples=5)
    torch.testing.assert_close(out, ref.expand_as(x), rtol=1e-5, atol=1e-7)
    out = tdfunc.kernel_shap(lambda t: g(t["x"]), td, n_samples=30, generator=torch.Generator().manual_seed(2))[
        "attr", "x"
    ]
    torch.manual_seed(2)
    ref = KernelShap(g).attribute(x, n_samples=30)
    torch.testing.assert_close(out, ref.expand_as(x), rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("kind", list(_SHARED))
@pytest.mark.parametrize("strategy", ["vmap", "fold"])
def test_integrated_gradients_shared_baselines_equal_captum(kind, strategy):
    from captum.attr import IntegratedGradients

    net = _net()
    torch.manual_seed(1)
    x, b = torch.randn(4, 6), _SHARED[kind]()
    out = tdfunc.integrated_gradients(
        lambda t: net(t["x"]),
        TensorDict({"x": x}, batch_size=[4]),
        baselines=b,
        method="riemann_trapezoid",
        n_steps=20,
        strategy=strategy,
        return_convergence_delta=True,
    )
    cb = b  # captum's IG refuses (F,) (it asks for a batch dim of 1) and indexes a 0-dim tensor: (1, F), a float
    if isinstance(b, torch.Tensor) and b.dim() < 2:
        cb = b.item() if b.dim() == 0 else b[None]
    for c in range(3):
        ref, delta = IntegratedGradients(net).attribute(
            x, baselines=cb, target=c, method="riemann_trapezoid", n_steps=20, return_convergence_delta=True
        )
        torch.testing.assert_close(out["attr", "x"][:, c], ref, rtol=1e-4, atol=1e-6)


def test_kernel_shap_with_one_feature_gives_the_whole_difference():
    """p(k) = (M - 1) / (k (M - k)) is 0 / 0 for one feature (captum raises): the coalitions alternate full / empty
    and the fit gives the feature f(x) - f(x') (efficiency)."""
    net = _net().double()
    x, b = torch.randn(3, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    out = tdfunc.kernel_shap(
        lambda t: net(t["x"]),
        TensorDict({"x": x}, batch_size=[3]),
        baselines=b,
        n_samples=5,
        feature_mask=torch.zeros(6, dtype=torch.long),
    )["attr", "x"]
    gap = net(x) - net(b.expand(3, 6))
    torch.testing.assert_close(out, gap[..., None].expand(3, 3, 6), rtol=1e-10, atol=1e-10)
