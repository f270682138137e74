"""Representation geometry: intrinsic dimension on known manifolds, CKA / information imbalance
axioms, slow references from the papers' equations, batching, tdhook cross-checks, pinned errors."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from tensordict import TensorDict

import tdfunc

DT = torch.float64


def _rotation(d: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))[0]


def _circle(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=DT) * 2 * math.pi
    pts = torch.zeros(n, 10, dtype=DT)
    pts[:, 0], pts[:, 1] = t.cos(), t.sin()
    return pts @ _rotation(10, seed)


def _plane(n=1000, seed=1):
    g = torch.Generator().manual_seed(seed)
    pts = torch.zeros(n, 10, dtype=DT)
    pts[:, :3] = torch.rand(n, 3, generator=g, dtype=DT)
    return pts @ _rotation(10, seed) + 0.5


def _cube(n=2000, seed=2):
    return torch.rand(n, 5, generator=torch.Generator().manual_seed(seed), dtype=DT)


# ------------------------------------------------------------------------------- intrinsic dimension

ESTIMATORS = {
    # tolerances: (circle ≈ 1, 3-D plane ≈ 3, 5-D cube ≈ 5); the k-1 Levina–Bickel form is biased up
    # by about k/(k-2), and boundaries pull kNN estimates of the cube down
    "twonn": (lambda x: tdfunc.latent.twonn_dimension(x), (0.1, 0.25, 0.5)),
    "mle": (lambda x: tdfunc.latent.mle_dimension(x, k=10), (0.2, 0.4, 0.5)),
    "local_pca": (lambda x: tdfunc.latent.local_pca_dimension(x, k=20, variance=0.95), (1e-9, 1e-9, 0.5)),
    "ca_pca": (lambda x: tdfunc.latent.ca_pca_dimension(x, k=20), (1e-9, 0.1, 0.3)),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_dimension_of_known_manifolds(name):
    est, (tol1, tol3, tol5) = ESTIMATORS[name]
    assert abs(float(est(_circle())) - 1) < tol1
    assert abs(float(est(_plane())) - 3) < tol3
    assert abs(float(est(_cube())) - 5) < tol5


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_dimension_batched_equals_loop_and_tensordict(name):
    est = ESTIMATORS[name][0]
    xs = torch.stack([_circle(200, s) for s in range(3)]).reshape(3, 1, 200, 10)
    batched = est(xs)
    assert batched.shape == (3, 1)
    loop = torch.stack([est(xs[i, 0]) for i in range(3)])
    torch.testing.assert_close(batched[:, 0], loop)
    td = TensorDict({"a": xs[0, 0], ("b", "c"): _plane(200)[:, :7]})
    out = est(td)
    torch.testing.assert_close(out["a"], loop[0])
    torch.testing.assert_close(out["b", "c"], est(_plane(200)[:, :7]))


def _nn_dists(x: np.ndarray) -> np.ndarray:
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return np.sort(d, 1)


def test_twonn_matches_slow_reference_and_closed_form():
    x = _cube(300)
    r = _nn_dists(x.numpy())
    mu = np.sort(r[:, 1] / r[:, 0])
    n = len(mu)
    for f in (0.0, 0.1, 0.3):  # Facco et al.: fit -log(1 - i/N) = d log mu through the origin, top f dropped
        m = min(n - 1, int(np.floor((1 - f) * n)))
        xs, ys = np.log(mu[:m]), -np.log(1 - np.arange(1, m + 1) / n)
        assert float(tdfunc.latent.twonn_dimension(x, discard_fraction=f)) == pytest.approx(
            (xs @ ys) / (xs @ xs), rel=1e-10
        )
    # closed form by hand: points 0, 1, 3 on a line have mu = 3/1, 2/1, 3/2; the fit keeps the 2 smallest
    pts = torch.tensor([[0.0], [1.0], [3.0]], dtype=DT)
    mu3 = np.array([1.5, 2.0])
    ys3 = -np.log(1 - np.arange(1, 3) / 3)
    expect = (np.log(mu3) @ ys3) / (np.log(mu3) @ np.log(mu3))
    assert float(tdfunc.latent.twonn_dimension(pts, discard_fraction=0.0)) == pytest.approx(expect, rel=1e-12)


def test_mle_matches_slow_reference():
    x = _plane(300)
    r = _nn_dists(x.numpy())
    k = 8
    per_point = [(k - 1) / np.log(r[i, k - 1] / r[i, : k - 1]).sum() for i in range(len(r))]
    assert float(tdfunc.latent.mle_dimension(x, k=k)) == pytest.approx(np.mean(per_point), rel=1e-10)


def test_local_pca_matches_slow_reference():
    x = _plane(150)[:, :6] + 0.05 * torch.randn(150, 6, dtype=DT)
    xn = x.numpy()
    d = np.sqrt(((xn[:, None] - xn[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    dims = []
    for i in range(len(xn)):
        nb = np.concatenate([xn[i : i + 1], xn[np.argsort(d[i])[:15]]])
        lam = np.sort(np.linalg.eigvalsh(np.cov(nb.T)))[::-1]
        dims.append(int(np.searchsorted(np.cumsum(lam) / lam.sum(), 0.8) + 1))
    assert float(tdfunc.latent.local_pca_dimension(x, k=15, variance=0.8)) == pytest.approx(np.mean(dims))


def test_dimension_is_differentiable():
    x = _circle(60).requires_grad_(True)
    for f in (tdfunc.latent.twonn_dimension, lambda p: tdfunc.latent.mle_dimension(p, k=5)):
        (g,) = torch.autograd.grad(f(x), x)
        assert torch.isfinite(g).all() and g.abs().sum() > 0


# --------------------------------------------------------------------------------------------- CKA


def _hsic_slow(k: np.ndarray, l: np.ndarray) -> float:
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def _uhsic_slow(k: np.ndarray, l: np.ndarray) -> float:  # Song et al. 2012, eq. 5, with explicit loops for the sums
    n = len(k)
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    ones = np.ones(n)
    term1 = np.trace(kt @ lt)
    term2 = (ones @ kt @ ones) * (ones @ lt @ ones) / ((n - 1) * (n - 2))
    term3 = 2 / (n - 2) * sum(kt[i] @ lt[:, j] for i in range(n) for j in range(n))
    return (term1 + term2 - term3) / (n * (n - 3))


def _cka_slow(x, y, hsic=_hsic_slow):
    k, l = x @ x.T, y @ y.T
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_invariances_and_self_similarity(kernel, debiased):
    x = torch.randn(40, 7, dtype=DT)
    y = torch.randn(40, 5, dtype=DT) + x[:, :5]
    c = lambda a, b: tdfunc.latent.cka(a, b, kernel=kernel, debiased=debiased)
    q = _rotation(7, 3)
    torch.testing.assert_close(c(x, x), torch.tensor(1.0, dtype=DT))
    torch.testing.assert_close(c(2.5 * x @ q + 1.0, y), c(x, y))  # rotation, isotropic scaling, translation
    torch.testing.assert_close(c(y, x), c(x, y))
    assert 0 < float(c(x, y)) < 1


def test_linear_cka_equals_slow_hsic_formula():
    x, y = torch.randn(30, 6, dtype=DT), torch.randn(30, 4, dtype=DT)
    assert float(tdfunc.latent.cka(x, y)) == pytest.approx(_cka_slow(x.numpy(), y.numpy()), rel=1e-10)
    # Kornblith et al.'s feature-space form ||YᵀX||² / (||XᵀX|| ||YᵀY||) on centred data
    xc, yc = x - x.mean(0), y - y.mean(0)
    feat = (yc.T @ xc).square().sum() / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    torch.testing.assert_close(tdfunc.latent.cka(x, y), feat)


def test_debiased_cka_equals_slow_reference():
    x, y = torch.randn(25, 6, dtype=DT), torch.randn(25, 4, dtype=DT)
    y = y + x[:, :4]
    ref = _cka_slow(x.numpy(), y.numpy(), _uhsic_slow)
    assert float(tdfunc.latent.cka(x, y, debiased=True)) == pytest.approx(ref, rel=1e-10)


def test_rbf_cka_with_fixed_sigma_equals_slow_reference():
    x, y = torch.randn(20, 3, dtype=DT), torch.randn(20, 2, dtype=DT)

    def gram(a, s):
        d2 = ((a[:, None] - a[None]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * s * s))

    k, l = gram(x.numpy(), 1.3), gram(y.numpy(), 1.3)
    ref = _hsic_slow(k, l) / math.sqrt(_hsic_slow(k, k) * _hsic_slow(l, l))
    assert float(tdfunc.latent.cka(x, y, kernel="rbf", sigma=1.3)) == pytest.approx(ref, rel=1e-10)
    # the median heuristic: sigma = median off-diagonal distance
    d = np.sqrt(((x.numpy()[:, None] - x.numpy()[None]) ** 2).sum(-1))[np.triu_indices(20, 1)]
    s = np.sort(d)[(len(d) - 1) // 2]  # torch.median: the lower median
    k = gram(x.numpy(), s)
    assert float(tdfunc.latent.cka(x, y, kernel="rbf")) == pytest.approx(
        _hsic_slow(
            k,
            l := gram(
                y.numpy(),
                np.sort(np.sqrt(((y.numpy()[:, None] - y.numpy()[None]) ** 2).sum(-1))[np.triu_indices(20, 1)])[
                    (len(d) - 1) // 2
                ],
            ),
        )
        / math.sqrt(_hsic_slow(k, k) * _hsic_slow(l, l)),
        rel=1e-10,
    )


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_pairwise_batch_equals_loop(kernel, debiased):
    xs, ys = torch.randn(3, 2, 30, 6, dtype=DT), torch.randn(4, 30, 5, dtype=DT)
    out = tdfunc.latent.cka(xs, ys, kernel=kernel, debiased=debiased)
    assert out.shape == (3, 2, 4)
    loop = torch.stack(
        [
            torch.stack(
                [
                    torch.stack(
                        [tdfunc.latent.cka(xs[a, b], ys[c], kernel=kernel, debiased=debiased) for c in range(4)]
                    )
                    for b in range(2)
                ]
            )
            for a in range(3)
        ]
    )
    torch.testing.assert_close(out, loop)
    td = TensorDict({"wide": torch.randn(30, 9, dtype=DT), ("blk", "narrow"): xs[0, 1]})
    m = tdfunc.latent.cka(td, ys, kernel=kernel, debiased=debiased)
    assert m.shape == (2, 4)
    torch.testing.assert_close(m[1], out[0, 1])


# ------------------------------------------------------------------------------- information imbalance


def _ii_slow(a: np.ndarray, b: np.ndarray, k: int) -> float:
    n = len(a)
    da = ((a[:, None] - a[None]) ** 2).sum(-1)
    db = ((b[:, None] - b[None]) ** 2).sum(-1)
    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        nn_a = sorted(others, key=lambda j: da[i, j])[:k]
        rank_b = {j: r + 1 for r, j in enumerate(sorted(others, key=lambda j: db[i, j]))}
        total += sum(rank_b[j] for j in nn_a)
    return 2 / n * total / (n * k)


@pytest.mark.parametrize("k", [1, 3])
def test_information_imbalance_reference_and_axioms(k):
    x = torch.randn(80, 4, dtype=DT)
    noise = torch.randn(80, 4, dtype=DT)
    assert float(tdfunc.latent.information_imbalance(x, x, k=k)) == pytest.approx((k + 1) / 80, abs=1e-15)  # ≈ 0
    assert float(tdfunc.latent.information_imbalance(x, x[:, :2], k=k)) == pytest.approx(
        _ii_slow(x.numpy(), x[:, :2].numpy(), k)
    )
    assert abs(float(tdfunc.latent.information_imbalance(x, noise, k=k)) - 1) < 0.25
    big = torch.randn(1000, 3, dtype=DT)
    assert abs(float(tdfunc.latent.information_imbalance(big, torch.randn(1000, 3, dtype=DT), k=k)) - 1) < 0.1
    # asymmetry: the full space predicts a projection, not the reverse
    full_to_part = float(tdfunc.latent.information_imbalance(big, big[:, :1], k=k))
    part_to_full = float(tdfunc.latent.information_imbalance(big[:, :1], big, k=k))
    assert full_to_part < 0.25 and part_to_full > 0.4


def test_information_imbalance_pairwise_batch_equals_loop():
    xs, ys = torch.randn(2, 50, 3, dtype=DT), torch.randn(3, 50, 6, dtype=DT)
    ys[0, :, :3] = xs[0]
    out = tdfunc.latent.information_imbalance(xs, ys, k=2)
    assert out.shape == (2, 3)
    loop = torch.stack(
        [torch.stack([tdfunc.latent.information_imbalance(xs[a], ys[b], k=2) for b in range(3)]) for a in range(2)]
    )
    torch.testing.assert_close(out, loop)
    td = TensorDict({"p": xs[1], "q": ys[2, :, :2]})
    torch.testing.assert_close(
        tdfunc.latent.information_imbalance(td, ys[0], k=2),
        torch.stack([out[1, 0], tdfunc.latent.information_imbalance(ys[2, :, :2], ys[0], k=2)]),
    )


def test_vmap_over_point_clouds():
    from torch.func import vmap

    xs = torch.stack([_circle(100, s) for s in range(3)])
    for f in (
        tdfunc.latent.twonn_dimension,
        lambda p: tdfunc.latent.local_pca_dimension(p, k=10),
        lambda p: tdfunc.latent.ca_pca_dimension(p, k=10),
        lambda p: tdfunc.latent.cka(p, p[:, :3], kernel="rbf"),
        lambda p: tdfunc.latent.information_imbalance(p, p[:, :3]),
    ):
        torch.testing.assert_close(vmap(f)(xs), torch.stack([f(x) for x in xs]))


# ------------------------------------------------------------------------------------------- tdhook


def test_equals_tdhook_where_definitions_match():
    pytest.importorskip("tdhook.latent.dimension_estimation")
    pytest.importorskip("sklearn")
    from tdhook.latent.dimension_estimation import CaPcaDimensionEstimator, TwoNnDimensionEstimator
    from tdhook.latent.representation_similarity import CkaEstimator, InformationImbalanceEstimator

    x, y = _plane(120), torch.randn(120, 4, dtype=DT)
    td = TensorDict({"data": x, "data_a": x, "data_b": y}, batch_size=[])
    # TwoNN: tdhook fits all N-1 ratios (our discard_fraction=0); it returns float32
    ref = TwoNnDimensionEstimator()(td.clone())["dimension"]
    torch.testing.assert_close(
        tdfunc.latent.twonn_dimension(x, discard_fraction=0.0).float(), ref, rtol=1e-5, atol=1e-5
    )
    ref = CkaEstimator()(td.clone())["cka"]  # linear only in tdhook
    torch.testing.assert_close(tdfunc.latent.cka(x, y).float(), ref.float(), rtol=1e-5, atol=1e-6)
    out = InformationImbalanceEstimator()(td.clone())
    torch.testing.assert_close(tdfunc.latent.information_imbalance(x, y).float(), out["information_imbalance_a_to_b"])
    torch.testing.assert_close(tdfunc.latent.information_imbalance(y, x).float(), out["information_imbalance_b_to_a"])
    per_point = CaPcaDimensionEstimator(k=10)(TensorDict({"data": x[:60]}, batch_size=[]))["dimension"]
    torch.testing.assert_close(tdfunc.latent.ca_pca_dimension(x[:60], k=10), per_point.mean())


# ------------------------------------------------------------------------------------------- errors


def _raises(msg: str, fn, *args, **kwargs):
    with pytest.raises(tdfunc.latent.GeometryError, match=f"^{re.escape(msg)}$") as e:
        fn(*args, **kwargs)
    assert isinstance(e.value, tdfunc.TdfuncError) and isinstance(e.value, ValueError)


def test_pinned_error_messages():
    x = torch.randn(5, 3)
    _raises(
        "tdfunc.latent.mle_dimension: k=10 needs at least 11 points per representation, got N=5; pass more points "
        "or lower k.",
        tdfunc.latent.mle_dimension,
        x,
        k=10,
    )
    _raises(
        "tdfunc.latent.information_imbalance: k=5 needs at least 6 points per representation, got N=5; pass more "
        "points or lower k.",
        tdfunc.latent.information_imbalance,
        x,
        x,
        k=5,
    )
    _raises(
        "tdfunc.latent.cka: x has N=5 points but y has N=6; x and y must be representations of the same N inputs, in "
        "the same order.",
        tdfunc.latent.cka,
        x,
        torch.randn(6, 3),
    )
    _raises(
        "tdfunc.latent.information_imbalance: x has N=5 points but y has N=4; x and y must be representations of the "
        "same N inputs, in the same order.",
        tdfunc.latent.information_imbalance,
        x,
        torch.randn(2, 4, 3),
    )
    _raises(
        "tdfunc.latent.cka: unknown kernel 'gaussian'; choose one of ['linear', 'rbf'].",
        tdfunc.latent.cka,
        x,
        x,
        kernel="gaussian",
    )
    _raises(
        "tdfunc.latent.twonn_dimension: x has shape (5,) but a representation is N points (N, D) or a stack (..., N, D); "
        "for N scalar features use x.unsqueeze(-1).",
        tdfunc.latent.twonn_dimension,
        torch.randn(5),
    )
    _raises(
        "tdfunc.latent.cka: y has shape (5,) but a representation is N points (N, D) or a stack (..., N, D); for N "
        "scalar features use y.unsqueeze(-1).",
        tdfunc.latent.cka,
        x,
        torch.randn(5),
    )
    _raises("tdfunc.latent.mle_dimension: k must be an integer >= 2, got 1.", tdfunc.latent.mle_dimension, x, k=1)
    _raises(
        "tdfunc.latent.twonn_dimension: discard_fraction must be a number in [0, 1), got 1.0.",
        tdfunc.latent.twonn_dimension,
        x,
        discard_fraction=1.0,
    )
    _raises(
        "tdfunc.latent.local_pca_dimension: variance must be a number in (0, 1], got 0.",
        tdfunc.latent.local_pca_dimension,
        x,
        k=2,
        variance=0,
    )
    _raises(
        "tdfunc.latent.cka: sigma must be None (median heuristic) or a number > 0, got -1.0.",
        tdfunc.latent.cka,
        x,
        x,
        kernel="rbf",
        sigma=-1.0,
    )
    _raises(
        "tdfunc.latent.cka: debiased=True (the unbiased HSIC) needs at least 4 points per representation, got N=3; "
        "pass more points or use debiased=False.",
        tdfunc.latent.cka,
        x[:3],
        x[:3],
        debiased=True,
    )
    _raises(
        "tdfunc.latent.twonn_dimension: x has dtype torch.int64; pass a floating tensor (x.float()).",
        tdfunc.latent.twonn_dimension,
        torch.ones(5, 2, dtype=torch.long),
    )
    _raises(
        "tdfunc.latent.twonn_dimension: x['a'] has shape (5,) but a representation is N points (N, D) or a stack (..., "
        "N, D); for N scalar features use x['a'].unsqueeze(-1).",
        tdfunc.latent.twonn_dimension,
        TensorDict({"a": torch.randn(5)}),
    )
    _raises(
        "tdfunc.latent.cka: the entries of x have different N [4, 5]; every representation must hold the same N inputs.",
        tdfunc.latent.cka,
        TensorDict({"a": x, "b": x[:4]}),
        x,
    )
