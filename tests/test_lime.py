"""LIME: captum's ``Lime`` on the same samples (exact parity of the fit) and captum's own test cases.

Parity: captum's ``Lime`` given a ``perturb_func`` that returns our samples one by one (so both fit the
same interpretable samples), with its ``SkLearnLasso`` / ``SkLearnRidge`` / ``SkLearnLinearRegression``
and exponential kernels; the float32 tolerance of captum's float32 fit (lasso: sklearn's tolerance).
Cases: captum's tests/attr/test_lime.py (models from captum.testing, ``Lasso(alpha=1.0)``, cosine
kernel of width 10, their inputs, masks, baselines, sample counts, expected values and ``delta``),
with our seeded draws in place of captum's unseeded ones.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from captum._utils.models.linear_model import SkLearnLasso, SkLearnLinearRegression, SkLearnRidge
from captum.attr import Lime
from captum.attr._core.lime import get_exp_kernel_similarity_function
from tensordict import TensorDict

import tdfunc
from tdfunc.attribution._common import AttributionError
from tdfunc.attribution._lime import _draw_samples

basic_models = pytest.importorskip("captum.testing.helpers.basic_models")


def _fixed(z):
    rows = iter(z)
    return lambda original_inp, **kw: next(rows)[None].long()


def _captum(net, inputs, z, model, dist, width, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lime = Lime(
            net,
            interpretable_model=model,
            similarity_func=get_exp_kernel_similarity_function(dist, width),
            perturb_func=_fixed(z),
        )
        return lime.attribute(inputs, n_samples=len(z), **kw)


_MODELS = {
    "linear": (SkLearnLinearRegression, {}),
    "ridge": (SkLearnRidge, {"alpha": 0.5}),
    "lasso": (SkLearnLasso, {"alpha": 0.01}),
}


@pytest.mark.parametrize("model", list(_MODELS))
@pytest.mark.parametrize("dist,width", [("cosine", 1.0), ("euclidean", 3.0)])
def test_equals_captum_on_the_same_samples_every_example_and_class(model, dist, width):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, b = torch.randn(2, 5), 0.1 * torch.randn(1, 5)
    z = _draw_samples(60, 5, torch.Generator().manual_seed(0))
    cls, kw = _MODELS[model]
    out = tdfunc.lime(
        lambda t: net(t["x"]),
        TensorDict({"x": x}, batch_size=[2]),
        n_samples=60,
        samples=z,
        interpretable_model=model,
        alpha=kw.get("alpha", 0.0),
        distance=dist,
        kernel_width=width,
        baselines=b,
    )["attr", "x"]
    for i in range(2):
        for c in range(3):
            ref = _captum(net, x[i : i + 1], z, cls(**kw), dist, width, target=c, baselines=b)
            torch.testing.assert_close(out[i, c], ref[0], rtol=1e-4, atol=5e-6 if model == "lasso" else 1e-6)


def test_generator_draws_captums_samples():
    torch.manual_seed(7)
    ref = torch.stack([torch.bernoulli(torch.full((1, 6), 0.5))[0] for _ in range(10)]).bool()
    torch.testing.assert_close(_draw_samples(10, 6, torch.Generator().manual_seed(7)), ref)


# ------------------------------------------------------------------ captum's tests/attr/test_lime.py

_M = basic_models.BasicModel_MultiLayer
_MI = basic_models.BasicModel_MultiLayer_MultiInput
_T = torch.tensor
CASES = {  # name: (net, inputs, target, feature_mask, baselines, n_samples, expected per input, delta)
    "simple_lime": (_M, [[[20.0, 50.0, 30.0]]], 0, None, None, 500, [[[73.3716, 193.3349, 113.3349]]], 1.0),
    "simple_lime_with_mask": (_M, [[[20.0, 50.0, 30.0]]], 0, [[[0, 0, 1]]], None, 500, [[[271.0, 271.0, 111.0]]], 1.0),
    "simple_lime_with_baselines": (
        _M,
        [[[20.0, 50.0, 30.0]]],
        0,
        [[[0, 0, 1]]],
        [4],
        100,
        [[[244.0, 244.0, 100.0]]],
        1.0,
    ),
    "simple_lime_boolean": (
        basic_models.BasicModelBoolInput,
        [[[True, False, True]]],
        0,
        [[[0, 0, 1]]],
        None,
        100,
        [[[31.42, 31.42, 30.90]]],
        1.0,
    ),
    "simple_lime_boolean_with_baselines": (
        basic_models.BasicModelBoolInput,
        [[[True, False, True]]],
        0,
        [[[0, 0, 1]]],
        [True],
        100,
        [[[-36.0, -36.0, 0.0]]],
        1.0,
    ),
    "simple_batch_lime": (
        _M,
        [[[20.0, 50.0, 30.0], [10.0, 14.0, 4.0]]],
        0,
        None,
        None,
        800,
        [[[73.4450, 193.5979, 113.4363], [32.11, 48.00, 11.00]]],
        1.0,
    ),
    "simple_batch_lime_with_mask": (
        _M,
        [[[20.0, 50.0, 30.0], [10.0, 14.0, 4.0]]],
        0,
        [[[0, 0, 1], [0, 1, 2]]],
        None,
        600,
        [[[271.0, 271.0, 111.0], [32.11, 48.00, 11.00]]],
        1.0,
    ),
    "multi_input_lime_without_mask": (
        _MI,
        [[[23.0, 0.0, 0.0]], [[20.0, 0.0, 50.0]], [[0.0, 100.0, 10.0]]],
        0,
        None,
        None,
        2000,
        [[[87, 0, 0]], [[75, 0, 195]], [[0, 395, 35]]],
        1.0,
    ),
    "multi_input_lime_with_mask": (
        _MI,
        [[[20.0, 50.0, 30.0]], [[0.0, 100.0, 0.0]], [[2.0, 10.0, 3.0]]],
        0,
        [[[0, 1, 0]], [[0, 1, 2]], [[0, 0, 0]]],
        None,
        500,
        [[[251.0, 591.0, 251.0]], [[251.0, 591.0, 0.0]], [[251.0, 251.0, 251.0]]],
        1.0,
    ),
    "multi_input_lime_with_mask_and_baselines": (
        _MI,
        [[[20.0, 50.0, 30.0]], [[0.0, 100.0, 0.0]], [[2.0, 10.0, 3.0]]],
        0,
        [[[0, 1, 0]], [[0, 1, 2]], [[0, 0, 0]]],
        [2, 3.0, 4],
        500,
        [[[180, 576.0, 180]], [[180, 576.0, -8.0]], [[180, 180, 180]]],
        1.0,
    ),
    "multi_input_batch_lime_without_mask": (
        _MI,
        [
            [[23.0, 0.0, 0.0], [20.0, 50.0, 30.0]],
            [[20.0, 0.0, 50.0], [0.0, 100.0, 0.0]],
            [[0.0, 100.0, 10.0], [0.0, 10.0, 0.0]],
        ],
        0,
        None,
        None,
        1000,
        [
            [[87.8777, 0.0, 0.0], [75.8461, 195.6842, 115.3390]],
            [[74.7283, 0.0, 195.1708], [0.0, 395.3823, 0.0]],
            [[0.0, 395.5216, 35.5530], [0.0, 35.1349, 0.0]],
        ],
        1.2,
    ),
    "multi_input_batch_lime": (
        _MI,
        [
            [[23.0, 100.0, 0.0], [20.0, 50.0, 30.0]],
            [[20.0, 50.0, 30.0], [0.0, 100.0, 0.0]],
            [[0.0, 100.0, 10.0], [2.0, 10.0, 3.0]],
        ],
        0,
        [[[1, 1, 1], [0, 1, 0]], [[0, 1, 2]], [[0, 1, 2], [0, 0, 0]]],
        None,
        100,
        [
            [[1086.2802, 1086.2802, 1086.2802], [250.8907, 590.9789, 250.8907]],
            [[73.2166, 1086.2802, 152.6888], [250.8907, 590.9789, 0.0]],
            [[73.2166, 1086.2802, 152.6888], [250.8907, 250.8907, 250.8907]],
        ],
        1.0,
    ),
    "multi_input_batch_lime_with_baselines": (
        _MI,
        [
            [[23.0, 100.0, 0.0], [20.0, 50.0, 30.0]],
            [[20.0, 50.0, 30.0], [0.0, 100.0, 0.0]],
            [[0.0, 100.0, 10.0], [2.0, 10.0, 3.0]],
        ],
        0,
        [[[1, 1, 1], [0, 1, 0]], [[0, 1, 2]], [[0, 1, 2], [0, 0, 0]]],
        [2, 3.0, 4],
        500,
        [
            [[1036.4233, 1036.4233, 1036.4233], [180.3035, 575.8969, 180.3035]],
            [[48.2441, 1036.4233, 128.3161], [180.3035, 575.8969, -8.3229]],
            [[48.2441, 1036.4233, 128.3161], [180.3035, 180.3035, 180.3035]],
        ],
        1.0,
    ),
}


def _case(name):
    net_cls, inputs, target, masks, bases, n, expected, delta = CASES[name]
    torch.manual_seed(1234)  # captum's BaseTest seed (the models here are deterministic)
    net = net_cls()
    keys = [f"x{i}" for i in range(len(inputs))]
    xs = [_T(v) for v in inputs]
    td = TensorDict(dict(zip(keys, xs)), batch_size=[xs[0].shape[0]])
    extra = (1,) if net_cls is _MI else ()
    f = lambda t: net(*[t[k] for k in keys], *extra)[:, target]
    kw = {"in_keys": keys, "interpretable_model": "lasso", "alpha": 1.0, "kernel_width": 10.0, "n_samples": n}
    if masks is not None:
        kw["feature_mask"] = {k: _T(m) for k, m in zip(keys, masks)}
    if bases is not None:
        kw["baselines"] = dict(zip(keys, bases))
    return net, keys, xs, td, f, kw, extra, target, expected, delta


#: the second call of a captum test, after draws we do not repeat: our own seeded draws
_LATER_CALL = {"multi_input_lime_with_mask_and_baselines", "multi_input_batch_lime_with_baselines"}


@pytest.mark.parametrize("name", list(CASES))
def test_captum_cases_expected_values(name):
    """captum's draws: its tests seed 1234 and build the model, then Lime draws ``bernoulli`` rows from the
    global generator one example after the other; ``generator=None`` per example makes the same draws."""
    net, keys, xs, td, f, kw, extra, target, expected, delta = _case(name)  # global RNG where captum's test has it
    gen = torch.Generator().manual_seed(0) if name in _LATER_CALL else None
    for i in range(td.shape[0]):
        kwi = dict(kw)
        if "feature_mask" in kw:
            kwi["feature_mask"] = {k: m[i : i + 1] if m.shape[0] > 1 else m for k, m in kw["feature_mask"].items()}
        out = tdfunc.lime(f, td[i : i + 1], generator=gen, **kwi)
        for k, e in zip(keys, expected):
            assert (out["attr", k] - _T(e)[i : i + 1]).abs().max() <= delta, (k, i, out["attr", k], e)


@pytest.mark.parametrize(
    "name",
    [
        "simple_lime_with_baselines",
        "simple_lime_boolean_with_baselines",
        "multi_input_lime_with_mask_and_baselines",
        "multi_input_batch_lime",
    ],
)
def test_captum_cases_equal_captum_on_the_same_samples(name):
    net, keys, xs, td, f, kw, extra, target, expected, delta = _case(name)
    nf = 1 + max(int(m.max()) for m in kw["feature_mask"].values())
    z = _draw_samples(kw["n_samples"], nf, torch.Generator().manual_seed(0))
    out = tdfunc.lime(f, td, samples=z, **kw)
    for i in range(xs[0].shape[0]):  # captum fits one example at a time
        masks = tuple(m[i : i + 1] if m.shape[0] > 1 else m for m in kw["feature_mask"].values())
        base = tuple(kw["baselines"].values()) if "baselines" in kw else None
        ref = _captum(
            net,
            tuple(x[i : i + 1] for x in xs),
            z,
            SkLearnLasso(alpha=1.0),
            "cosine",
            10.0,
            target=target,
            feature_mask=masks,
            baselines=base,
            additional_forward_args=extra or None,
        )
        for k, r in zip(keys, ref):
            torch.testing.assert_close(out["attr", k][i : i + 1], r.float(), rtol=1e-4, atol=2e-3)


def test_an_empty_input_gets_an_empty_map():
    torch.manual_seed(1234)
    net = basic_models.BasicLinearModel()
    x1 = _T([[23.0, 0.0, 0.0, 23.0, 0.0, 0.0, 23.0]])
    td = TensorDict({"a": x1, "b": torch.zeros(1, 0)}, batch_size=[1])
    z = _draw_samples(300, 7, torch.Generator().manual_seed(0))
    kw = {"interpretable_model": "lasso", "alpha": 1.0, "kernel_width": 10.0, "n_samples": 300, "samples": z}
    out = tdfunc.lime(lambda t: net(t["a"], t["b"])[:, 0], td, **kw)
    assert out["attr", "b"].shape == (1, 0)
    ref = _captum(net, (x1, torch.zeros(1, 0)), z, SkLearnLasso(alpha=1.0), "cosine", 10.0)
    torch.testing.assert_close(out["attr", "a"], ref[0], rtol=1e-4, atol=2e-3)


def test_chunks_and_the_k_target_map_agree_with_one_target():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    td = TensorDict({"x": torch.randn(3, 4, dtype=torch.float64)}, batch_size=[3])
    g = torch.Generator
    for model, tol in (("linear", 1e-10), ("ridge", 1e-10), ("lasso", 1e-5)):  # lasso: the solver's tolerance
        a = tdfunc.lime(
            lambda t: net(t["x"]), td, n_samples=30, generator=g().manual_seed(1), interpretable_model=model
        )["attr", "x"]
        b = tdfunc.lime(
            lambda t: net(t["x"])[:, 1],
            td,
            n_samples=30,
            generator=g().manual_seed(1),
            chunk_size=7,
            interpretable_model=model,
        )
        torch.testing.assert_close(b["attr", "x"], a[:, 1], rtol=tol, atol=tol)


def _raises(msg, call):
    with pytest.raises(AttributionError, match="^" + re.escape(msg) + "$"):
        call()


def test_errors_pinned():
    td = TensorDict({"x": torch.randn(2, 3)}, batch_size=[2])
    f = lambda t: t["x"].sum(-1)
    _raises(
        "tdfunc.lime: interpretable_model must be 'lasso', 'ridge' or 'linear' (sklearn's Lasso, Ridge, "
        "LinearRegression), got 'sgd'.",
        lambda: tdfunc.lime(f, td, interpretable_model="sgd"),
    )
    _raises(
        "tdfunc.lime: distance must be 'cosine' or 'euclidean', got 'l1'.", lambda: tdfunc.lime(f, td, distance="l1")
    )
    _raises("tdfunc.lime: alpha must be a number >= 0, got -1.0.", lambda: tdfunc.lime(f, td, alpha=-1.0))
    _raises("tdfunc.lime: kernel_width must be a number > 0, got 0.", lambda: tdfunc.lime(f, td, kernel_width=0))
    _raises(
        "tdfunc.lime: samples has shape (4, 2); expected (4, 3) (n_samples, n_features).",
        lambda: tdfunc.lime(f, td, n_samples=4, samples=torch.ones(4, 2, dtype=torch.bool)),
    )
    _raises(
        "tdfunc.lime: samples must hold only 0 and 1 (1: the feature keeps its input value).",
        lambda: tdfunc.lime(f, td, n_samples=1, samples=torch.tensor([[0, 2, 1]])),
    )
    _raises(
        "tdfunc.lime: samples must be a bool or integer 0/1 tensor of shape (1, 3), got a torch.float32 tensor.",
        lambda: tdfunc.lime(f, td, n_samples=1, samples=torch.ones(1, 3)),
    )


# ------------------------------------------------------------------ one value per batch (captum's scalar forward)

_SCALAR = {  # captum's _single_input_scalar_lime_assert / _multi_input_scalar_lime_assert (tensor_0d variants)
    "single_input_scalar": (_M, [[[2.0, 10.0, 3.0]]], [[[0, 0, 1]]], 700, [[[75.0, 75.0, 17.0]]], 1.0),
    "multi_input_scalar": (
        _MI,
        [
            [[23.0, 100.0, 0.0], [20.0, 50.0, 30.0]],
            [[20.0, 50.0, 30.0], [0.0, 100.0, 0.0]],
            [[0.0, 100.0, 10.0], [20.0, 10.0, 13.0]],
        ],
        [[[1, 1, 1]], [[0, 1, 2]], [[0, 1, 2]]],
        1500,
        [[[3850.6666] * 3], [[305.5, 3850.6666, 410.1]], [[305.5, 3850.6666, 410.1]]],
        1.5,
    ),
}


@pytest.mark.parametrize("name", list(_SCALAR))
def test_captum_scalar_forward_cases(name):
    """f returns one value for the batch: one fit for the batch (the whole batch's similarity), one map
    expanded to every example; captum's draws (seed 1234, the model built, then ``bernoulli`` rows)."""
    net_cls, inputs, masks, n, expected, delta = _SCALAR[name]
    torch.manual_seed(1234)
    net = net_cls()
    keys = [f"x{i}" for i in range(len(inputs))]
    td = TensorDict({k: _T(v) for k, v in zip(keys, inputs)}, batch_size=[len(inputs[0])])
    extra = (1,) if net_cls is _MI else ()
    out = tdfunc.lime(
        lambda t: net(*[t[k] for k in keys], *extra).sum(),
        td,
        in_keys=keys,
        n_samples=n,
        feature_mask={k: _T(m) for k, m in zip(keys, masks)},
        alpha=1.0,
        kernel_width=10.0,
    )
    for k, e in zip(keys, expected):
        assert out["attr", k].shape == td[k].shape
        assert (out["attr", k] - _T(e)).abs().max() <= delta, (k, out["attr", k], e)


@pytest.mark.parametrize("model", ["linear", "lasso"])
def test_scalar_forward_equals_captum_on_the_same_samples(model):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(4, 5)
    g = lambda v: 10 * net(v).pow(2).mean()
    z = _draw_samples(40, 5, torch.Generator().manual_seed(0))
    out = tdfunc.lime(
        lambda t: g(t["x"]),
        TensorDict({"x": x}, batch_size=[4]),
        n_samples=40,
        samples=z,
        interpretable_model=model,
        distance="euclidean",
        kernel_width=3.0,
    )["attr", "x"]
    cls, kw = _MODELS[model]
    ref = _captum(g, x, z, cls(**kw), "euclidean", 3.0, feature_mask=torch.arange(5)[None])
    torch.testing.assert_close(out, ref.expand_as(x), rtol=1e-4, atol=5e-6)
