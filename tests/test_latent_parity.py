"""tdhook latent parity (issue 14): local kNN dimension, local PCA max-gap / ratio, TwoNN's regression
points, information imbalance with Minkowski p, integer inputs to CKA / information imbalance, the
normalized mean-difference probe, and the duplicate-point checks of the dimension estimators.

Each is checked against tdhook 0.3.0 on tdhook's own test scenarios (tests/latent/test_dimension_estimation.py,
test_representation_similarity.py, test_probing.py: the same fixtures and shapes) and against a slow reference
written from the paper's equation.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from tensordict import TensorDict

import tdfunc
from tdfunc.latent import GeometryError, ProbeError

L = tdfunc.latent


# ------------------------------------------------------------------------------ tdhook's fixtures


def plane_data() -> torch.Tensor:  # tdhook: 2-D manifold in 10-D (last 8 dims zero), float32
    torch.manual_seed(42)
    data = torch.randn(100, 10)
    data[:, 2:] = 0
    return data


def circle_data() -> torch.Tensor:  # tdhook: circle in 2-D, float32
    torch.manual_seed(42)
    theta = torch.rand(100) * 2 * torch.pi
    return torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)


def random_data(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# tdhook's scenarios: (name, data, k); batch shapes of test_batch_shape_preservation
SCENARIOS = [
    ("plane", plane_data, 5),
    ("circle", circle_data, 5),
    ("random_50x10", lambda: random_data(50, 10), 2),
    ("batch_1x10x8", lambda: random_data(1, 10, 8, seed=1), 2),
    ("batch_5x10x8", lambda: random_data(5, 10, 8, seed=2), 2),
    ("batch_2x3x10x4", lambda: random_data(2, 3, 10, 4, seed=3), 2),
]


def _tdhook(estimator, data: torch.Tensor) -> TensorDict:
    batch = [] if data.ndim == 2 else data.shape[:-2]
    return estimator(TensorDict({"data": data}, batch_size=batch))


def _raises(err, msg: str, fn, *args, **kwargs):
    with pytest.raises(err, match=f"^{re.escape(msg)}$"):
        fn(*args, **kwargs)


# ------------------------------------------------------------------------------ local kNN dimension


def _slow_local_knn(x: torch.Tensor, k: int) -> torch.Tensor:
    """Farahmand et al.: d(x_i) = log 2 / log(R_2k / R_k), distances by explicit norms in float64."""
    x = x.double()
    out = []
    for i in range(x.shape[0]):
        r = sorted(float(torch.linalg.vector_norm(x[i] - x[j])) for j in range(x.shape[0]) if j != i)
        out.append(math.log(2) / math.log(r[2 * k - 1] / r[k - 1]))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("name,make,k", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_local_knn_equals_tdhook_per_point(name, make, k):
    pytest.importorskip("tdhook.latent.dimension_estimation")
    from tdhook.latent.dimension_estimation import LocalKnnDimensionEstimator

    data = make()
    ref = _tdhook(LocalKnnDimensionEstimator(k=k), data)["dimension"]
    assert bool(torch.isfinite(ref).all())
    ours = L.local_knn_dimension(data, k=k, per_point=True)
    assert ours.shape == ref.shape == (*data.shape[:-2], data.shape[-2])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)  # tdhook: float32 cdist (Gram form)
    torch.testing.assert_close(L.local_knn_dimension(data, k=k), ours.mean(-1))


def test_local_knn_slow_reference_and_known_dimension():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(L.local_knn_dimension(x, k=4, per_point=True), _slow_local_knn(x, 4), rtol=1e-12, atol=0)
    # a flat 2-D square: the estimate concentrates at 2 (boundaries bias kNN estimates a little)
    flat = torch.zeros(3000, 10, dtype=torch.float64)
    flat[:, :2] = torch.rand(3000, 2, generator=g, dtype=torch.float64)
    assert abs(float(L.local_knn_dimension(flat, k=10)) - 2) < 0.15
    # differentiable in the points (a gradient check in float64)
    small = x[:12].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda p: L.local_knn_dimension(p, k=3), (small,))


# ------------------------------------------------------------------------------ local PCA criteria


def _slow_local_pca(x: torch.Tensor, k: int, criterion: str, alpha: float = 0.05) -> torch.Tensor:
    """Per point: covariance eigenvalues (1/k) of x_i and its k nearest neighbours, numpy float64."""
    xs = x.double().numpy()
    out = []
    for i in range(len(xs)):
        dist = np.linalg.norm(xs - xs[i], axis=1)
        dist[i] = np.inf
        nb = np.concatenate([xs[i : i + 1], xs[np.argsort(dist, kind="stable")[:k]]])
        nb = nb - nb.mean(0)
        lam = np.sort(np.linalg.svd(nb, compute_uv=False) ** 2 / k)[::-1]
        if criterion == "ratio":
            out.append(max(1, int((lam > alpha * lam[0]).sum())))
        else:
            out.append(1 if len(lam) < 2 else int(np.argmax(lam[:-1] / (lam[1:] + 1e-15)) + 1))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("criterion", ["maxgap", "ratio"])
@pytest.mark.parametrize("name,make,k", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_local_pca_criteria_equal_tdhook_per_point(name, make, k, criterion):
    pytest.importorskip("sklearn")
    pytest.importorskip("tdhook.latent.dimension_estimation")
    from tdhook.latent.dimension_estimation import LocalPcaDimensionEstimator

    data = make()
    ref = _tdhook(LocalPcaDimensionEstimator(k=k, criterion=criterion), data)["dimension"]
    ours = L.local_pca_dimension(data, k=k, criterion=criterion, per_point=True)
    assert ours.shape == ref.shape and ours.dtype == data.dtype
    assert torch.equal(ours, ref)  # integer dimensions: exactly equal


def test_local_pca_tdhook_defaults_and_single_eigenvalue():
    pytest.importorskip("sklearn")
    pytest.importorskip("tdhook.latent.dimension_estimation")
    from tdhook.latent.dimension_estimation import LocalPcaDimensionEstimator

    data = random_data(50, 10, seed=4)  # tdhook's default k="auto" is int(sqrt(50)) = 7, criterion maxgap
    ref = _tdhook(LocalPcaDimensionEstimator(), data)["dimension"]
    assert torch.equal(L.local_pca_dimension(data, k=7, criterion="maxgap", per_point=True), ref)
    one = random_data(15, 1, seed=5)  # one eigenvalue per neighbourhood: dimension 1
    ref = _tdhook(LocalPcaDimensionEstimator(k=2, criterion="maxgap"), one)["dimension"]
    ours = L.local_pca_dimension(one, k=2, criterion="maxgap", per_point=True)
    assert torch.equal(ours, ref) and bool((ours == 1).all())


@pytest.mark.parametrize("criterion", ["maxgap", "ratio"])
def test_local_pca_criteria_slow_reference_and_exact_flat(criterion):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64) * torch.tensor(
        [3.0, 2, 1, 0.5, 0.1, 0.05], dtype=torch.float64
    )
    torch.testing.assert_close(
        L.local_pca_dimension(x, k=8, criterion=criterion, per_point=True),
        _slow_local_pca(x, 8, criterion),
        rtol=0,
        atol=0,
    )
    # an exact 3-flat in 10-D: every neighbourhood's spectrum has 3 non-zero eigenvalues
    flat = torch.rand(200, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 10, generator=g, dtype=torch.float64)
    assert torch.equal(
        L.local_pca_dimension(flat, k=12, criterion="maxgap", per_point=True),
        torch.full((200,), 3.0, dtype=torch.float64),
    )


# ------------------------------------------------------------------------------ TwoNN's regression points


@pytest.mark.parametrize("name,make,k", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_twonn_return_xy_equals_tdhook(name, make, k):
    pytest.importorskip("tdhook.latent.dimension_estimation")
    from tdhook.latent.dimension_estimation import TwoNnDimensionEstimator

    # float64: tdhook's float32 cdist takes the Gram form for N > 25, which loses the small r1 of
    # close points on the circle (its log-ratio there is off by up to 1.1); in float64 both agree
    data = make().double()
    ref = _tdhook(TwoNnDimensionEstimator(return_xy=True), data)
    d, x, y = L.twonn_dimension(data, discard_fraction=0.0, return_xy=True)
    assert x.shape == y.shape == ref["dimension_x"].shape == (*data.shape[:-2], data.shape[-2] - 1)
    torch.testing.assert_close(x, ref["dimension_x"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(y, ref["dimension_y"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d.float(), ref["dimension"], rtol=1e-5, atol=1e-5)  # tdhook returns float32
    torch.testing.assert_close(d, L.twonn_dimension(data, discard_fraction=0.0))
    torch.testing.assert_close(d, (x * y).sum(-1) / x.square().sum(-1))  # the slope through the origin


def test_twonn_return_xy_discard_fraction_and_tensordict():
    x = random_data(40, 5, seed=6).double()
    d, lx, ly = L.twonn_dimension(x, discard_fraction=0.25, return_xy=True)
    assert lx.shape == (30,)  # m = floor(0.75 * 40)
    mu = torch.cdist(x, x).fill_diagonal_(math.inf).topk(2, largest=False).values
    ref_x = (mu[:, 1] / mu[:, 0]).log().sort().values[:30]
    torch.testing.assert_close(lx, ref_x)
    torch.testing.assert_close(ly, -torch.log(1 - torch.arange(1, 31, dtype=torch.float64) / 40))
    td = TensorDict({"a": x, "b": x[:20]}, batch_size=[])
    dd, tx, ty = L.twonn_dimension(td, discard_fraction=0.25, return_xy=True)
    torch.testing.assert_close(dd["a"], d)
    assert tx["a"].shape == (30,) and tx["b"].shape == (15,) and torch.equal(tx["a"], lx)


# ------------------------------------------------------------------------------ information imbalance, p


def _slow_imbalance(a: torch.Tensor, b: torch.Tensor, p: float) -> float:
    """Glielmo et al.: 2/N * mean over i of the rank in B of i's nearest neighbour in A; ties by index."""
    n = a.shape[0]

    def order(x, i):
        dist = [(float(torch.linalg.vector_norm(x[i] - x[j], ord=p)), j) for j in range(n) if j != i]
        return [j for _, j in sorted(dist)]  # sorted by (distance, index)

    total = 0
    for i in range(n):
        nearest = order(a, i)[0]
        total += order(b, i).index(nearest) + 1
    return 2.0 / n * total / n


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf, 0.5])
def test_information_imbalance_p_equals_tdhook(p):
    pytest.importorskip("tdhook.latent.representation_similarity")
    from tdhook.latent.representation_similarity import InformationImbalanceEstimator

    for (xs, ys), seed in [(((128, 16), (128, 12)), 0), (((96, 10), (96, 7)), 1), (((2, 3, 10, 8), (2, 3, 10, 6)), 2)]:
        x, y = random_data(*xs, seed=seed), random_data(*ys, seed=seed + 10)
        out = InformationImbalanceEstimator(p=p)(TensorDict({"data_a": x, "data_b": y}, batch_size=xs[:-2]))
        xf, yf = x.reshape(-1, *xs[-2:]), y.reshape(-1, *ys[-2:])
        ab = torch.vmap(lambda u, v: L.information_imbalance(u, v, p=p))(xf, yf)
        ba = torch.vmap(lambda u, v: L.information_imbalance(v, u, p=p))(xf, yf)
        torch.testing.assert_close(ab.reshape(xs[:-2]), out["information_imbalance_a_to_b"], rtol=0, atol=1e-7)
        torch.testing.assert_close(ba.reshape(xs[:-2]), out["information_imbalance_b_to_a"], rtol=0, atol=1e-7)


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_information_imbalance_slow_reference_with_ties(p):
    # tdhook's directional-asymmetry scenario: y = x rounded has many exactly tied distances, ranked by index
    # (integer-valued here: exact also in the Gram form torch.cdist takes for p = 2 and N > 25)
    t = torch.arange(-20.0, 20.0, dtype=torch.float64)
    x, y = t.unsqueeze(-1), (t / 4).round().unsqueeze(-1)
    ab, ba = L.information_imbalance(x, y, p=p), L.information_imbalance(y, x, p=p)
    assert float(ab) == pytest.approx(_slow_imbalance(x, y, p), abs=1e-12)
    assert float(ba) == pytest.approx(_slow_imbalance(y, x, p), abs=1e-12)
    # tdhook's own scenario (float32, non-integer ties): its unstable argsort orders tied ranks arbitrarily, so
    # only its assertion carries over
    tl = torch.linspace(-1.0, 1.0, 120)
    xl, yl = tl.unsqueeze(-1), (4 * tl).round().unsqueeze(-1) / 4.0
    assert L.information_imbalance(yl, xl, p=p) > L.information_imbalance(xl, yl, p=p)  # tdhook's assertion
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(30, 3, generator=g, dtype=torch.float64)
    assert float(L.information_imbalance(a, b, p=p)) == pytest.approx(_slow_imbalance(a, b, p), abs=1e-12)


def test_integer_inputs_promoted_as_tdhook():
    pytest.importorskip("tdhook.latent.representation_similarity")
    from tdhook.latent.representation_similarity import CkaEstimator, InformationImbalanceEstimator

    x = torch.arange(512, dtype=torch.int64).reshape(128, 4)  # tdhook's CKA scenario
    ref = CkaEstimator()(TensorDict({"data_a": x, "data_b": x.clone()}, batch_size=[]))["cka"]
    ours = L.cka(x, x.clone())
    assert ours.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, torch.tensor(1.0), rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    xi, yi = torch.randint(0, 5, (64, 6), generator=g), torch.randint(0, 5, (64, 3), generator=g)
    ref = CkaEstimator()(TensorDict({"data_a": xi, "data_b": yi}, batch_size=[]))["cka"]
    torch.testing.assert_close(L.cka(xi, yi), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(L.cka(xi, yi), L.cka(xi.float(), yi.float()))
    assert L.cka(xi, yi.double()).dtype == torch.float64  # promoted with the floating input, as tdhook
    assert L.cka(xi.bool(), yi).dtype == torch.get_default_dtype()
    assert L.cka(TensorDict({"a": xi}, batch_size=[]), yi).shape == (1,)
    xi, yi = torch.arange(128).reshape(64, 2), torch.arange(192).reshape(64, 3)  # tdhook's II scenario
    out = InformationImbalanceEstimator()(TensorDict({"data_a": xi, "data_b": yi}, batch_size=[]))
    assert L.information_imbalance(xi, yi).dtype == torch.float32
    torch.testing.assert_close(L.information_imbalance(xi, yi), out["information_imbalance_a_to_b"], rtol=0, atol=1e-7)
    torch.testing.assert_close(L.information_imbalance(yi, xi), out["information_imbalance_b_to_a"], rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------ mean difference, normalize


@pytest.mark.parametrize("normalize,coef,intercept", [(True, [1.0, 0.0], 0.0), (False, [3.0, 0.0], 0.0)])
def test_mean_difference_normalize_tdhook_scenario(normalize, coef, intercept):
    # tdhook's TestMeanDifferenceClassifier.test_fit_and_predict: z_1 - z_0 is its decision function
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [-2.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([1, 1, 0, 0])
    p = L.probe_fit("mean_difference", x, y, normalize=normalize)
    z = L.probe_apply(p, x)
    torch.testing.assert_close(z[:, 1] - z[:, 0], x @ torch.tensor(coef, dtype=torch.float64) + intercept)
    assert (z.argmax(-1) == 1).tolist() == [True, True, False, False]
    mid = (x[y == 1].mean(0) + x[y == 0].mean(0)) / 2
    assert float(L.probe_apply(p, mid).softmax(-1)[1]) == pytest.approx(0.5)


def test_mean_difference_normalize_zero_gap_and_digits_equal_tdhook():
    pytest.importorskip("sklearn")
    pytest.importorskip("tdhook.latent.probing")
    from sklearn.datasets import load_digits
    from tdhook.latent.probing import MeanDifferenceClassifier

    same = torch.tensor([[1.0, -1.0]] * 4, dtype=torch.float64)  # tdhook: zero coef norm skips normalization
    p = L.probe_fit("mean_difference", same, torch.tensor([1, 1, 0, 0]), normalize=True)
    assert float(p["scale"]) == 1.0
    torch.testing.assert_close(L.probe_apply(p, same).softmax(-1), torch.full((4, 2), 0.5, dtype=torch.float64))

    X, y = load_digits(return_X_y=True)
    keep = (y == 3) | (y == 8)
    X, y = X[keep], (y[keep] == 8).astype(np.int64)
    for normalize in (True, False):
        ref = MeanDifferenceClassifier(normalize=normalize)
        ref.fit(X, y)
        p = L.probe_fit("mean_difference", torch.tensor(X), torch.tensor(y), normalize=normalize)
        z = L.probe_apply(p, torch.tensor(X))
        np.testing.assert_allclose((z[:, 1] - z[:, 0]).numpy(), ref._decision_function(X), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(z.softmax(-1).numpy(), ref.predict_proba(X), rtol=0, atol=1e-12)
        assert np.array_equal((z.argmax(-1) == 1).numpy(), ref.predict(X))
        # fit_probes: the same probe per site, from the train split
        out = L.fit_probes(
            TensorDict({"a": torch.tensor(X)}, batch_size=[]),
            torch.tensor(y),
            kind="mean_difference",
            normalize=normalize,
            generator=torch.Generator().manual_seed(0),
        )
        tr = out["train_index"]
        ref.fit(X[tr.numpy()], y[tr.numpy()])
        z = L.probe_apply(out["params", "a"], torch.tensor(X))
        np.testing.assert_allclose((z[:, 1] - z[:, 0]).numpy(), ref._decision_function(X), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------ duplicates and errors


def test_duplicate_points_refused_where_they_give_nan_or_inf():
    x = random_data(12, 3, seed=7).double()
    x[5] = x[2]
    dup = (
        "{fn}: 2 of the N=12 points have a duplicate (a nearest neighbour at distance 0), where {why}; remove "
        "duplicate points first (e.g. torch.unique(x, dim=0))."
    )
    _raises(
        GeometryError,
        dup.format(fn="tdfunc.latent.mle_dimension", why="log T_1 is -inf and the estimate degenerates to 0 or NaN"),
        L.mle_dimension,
        x,
        k=3,
    )
    _raises(
        GeometryError,
        dup.format(fn="tdfunc.latent.local_knn_dimension", why="R_k can be 0 and log(R_2k / R_k) is undefined"),
        L.local_knn_dimension,
        x,
        k=2,
    )
    _raises(
        GeometryError,
        dup.format(fn="tdfunc.latent.twonn_dimension", why="the ratio r2 / r1 is undefined"),
        L.twonn_dimension,
        x,
    )
    many = torch.cat([x[:1].expand(4, 3), x[6:]])  # 4 copies of one point: k + 1 = 3 duplicates for k = 2
    _raises(
        GeometryError,
        "tdfunc.latent.ca_pca_dimension: 4 of the N=10 points have k + 1 = 3 duplicates "
        "(neighbourhood radius 0), where the rescaled spectrum lambda / r^2 is undefined; remove duplicate points "
        "first (e.g. torch.unique(x, dim=0)) or raise k.",
        L.ca_pca_dimension,
        many,
        k=2,
    )
    assert torch.isfinite(L.ca_pca_dimension(x, k=2))  # one duplicate pair leaves the radius > 0
    assert torch.isfinite(L.local_pca_dimension(x, k=3, criterion="maxgap"))  # PCA spectra stay finite


def test_pinned_errors_parity():
    x = random_data(9, 3)
    _raises(
        GeometryError,
        "tdfunc.latent.local_knn_dimension: k=5 (the 2k-th neighbour) needs at least 11 points per "
        "representation, got N=9; pass more points or lower k.",
        L.local_knn_dimension,
        x,
        k=5,
    )
    _raises(
        GeometryError,
        "tdfunc.latent.local_knn_dimension: k must be an integer >= 2, got 1.",
        L.local_knn_dimension,
        x,
        k=1,
    )
    # a lattice: the centre's 2nd and 4th neighbours are equally far
    sq = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    _raises(
        GeometryError,
        "tdfunc.latent.local_knn_dimension: 1 of the N=5 points have their k-th and 2k-th neighbours "
        "(k=2) at the same distance, where log(R_2k / R_k) = 0 and the estimate is infinite; pick another k or break "
        "the ties (e.g. add tiny noise to lattice data).",
        L.local_knn_dimension,
        sq,
        k=2,
    )
    _raises(
        GeometryError,
        "tdfunc.latent.local_pca_dimension: unknown criterion 'gap'; choose one of ['variance', 'maxgap', 'ratio'].",
        L.local_pca_dimension,
        x,
        k=2,
        criterion="gap",
    )
    _raises(
        GeometryError,
        "tdfunc.latent.local_pca_dimension: alpha must be a number in (0, 1), got 1.5.",
        L.local_pca_dimension,
        x,
        k=2,
        criterion="ratio",
        alpha=1.5,
    )
    _raises(
        GeometryError,
        "tdfunc.latent.information_imbalance: p must be a number > 0 (the Minkowski order; 2 is Euclidean), got 0.",
        L.information_imbalance,
        x,
        x,
        p=0,
    )
    with pytest.raises(
        TypeError,
        match=re.escape(
            "tdfunc.latent.twonn_dimension: return_xy must be True or False, got "
            "str ('yes'); pass return_xy=True or return_xy=False."
        ),
    ):
        L.twonn_dimension(x, return_xy="yes")
    with pytest.raises(
        TypeError,
        match=re.escape(
            "tdfunc.latent.local_knn_dimension: per_point must be True or False, "
            "got int (1); pass per_point=True or per_point=False."
        ),
    ):
        L.local_knn_dimension(x, k=2, per_point=1)
    y = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 2])
    _raises(
        ProbeError,
        "tdfunc.latent.probe_fit: normalize=True rescales the mean-difference probe, but "
        "kind='linear'; use kind='mean_difference' or drop normalize.",
        L.probe_fit,
        "linear",
        x,
        y,
        normalize=True,
    )
    _raises(
        ProbeError,
        "tdfunc.latent.probe_fit: normalize=True divides by the norm of the mean difference mu_1 - mu_0, "
        "which needs exactly 2 classes, got n_classes=3; use normalize=False with 3 classes.",
        L.probe_fit,
        "mean_difference",
        x,
        y,
        normalize=True,
    )
    _raises(
        ProbeError,
        "tdfunc.latent.fit_probes: normalize=True divides by the norm of the mean difference mu_1 - "
        "mu_0, which needs exactly 2 classes, got n_classes=3; use normalize=False with 3 classes.",
        L.fit_probes,
        TensorDict({"a": x}, batch_size=[]),
        y,
        kind="mean_difference",
        normalize=True,
        test_fraction=0.1,
    )


@pytest.mark.parametrize("name,make,k", SCENARIOS[:3], ids=[s[0] for s in SCENARIOS[:3]])
def test_ca_pca_per_point_equals_tdhook(name, make, k):
    pytest.importorskip("sklearn")
    pytest.importorskip("tdhook.latent.dimension_estimation")
    from tdhook.latent.dimension_estimation import CaPcaDimensionEstimator

    data = make().double()
    ref = _tdhook(CaPcaDimensionEstimator(k=k), data)["dimension"]
    ours = L.ca_pca_dimension(data, k=k, per_point=True)
    assert ours.shape == ref.shape == (data.shape[0],)
    assert torch.equal(ours, ref.to(ours.dtype))
