"""Representation geometry, batched over many representations at once: intrinsic dimension, CKA,
information imbalance.

Every function accepts one representation ``(N, D)`` (N points, e.g. the activations of N inputs
at one site), a stack ``(..., N, D)`` or a TensorDict ``{site: (N, D_site)}`` and computes all of
them in one batched call (no Python loop over representations).  Everything is pure torch, so the
functions run under ``vmap`` (over a batch of point clouds), ``grad`` and ``torch.compile``.
"""

from __future__ import annotations

import math

import torch
from tensordict import TensorDict, TensorDictBase

from ._common import LatentError

__all__ = [
    "GeometryError",
    "twonn_dimension",
    "mle_dimension",
    "local_pca_dimension",
    "ca_pca_dimension",
    "cka",
    "information_imbalance",
]

KERNELS = ("linear", "rbf")


class GeometryError(LatentError):
    """Bad input to a representation-geometry function (shape, too few points, unknown option)."""


# ---------------------------------------------------------------------------------------------- checks


def _check_points(fn: str, x, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise GeometryError(
            f"{fn}: {what} must be a tensor (N, D), a stack (..., N, D) or a TensorDict of (N, D) "
            f"representations, got {type(x).__name__}."
        )
    if x.dim() < 2:
        raise GeometryError(
            f"{fn}: {what} has shape {tuple(x.shape)} but a representation is N points (N, D) or a stack "
            f"(..., N, D); for N scalar features use {what}.unsqueeze(-1)."
        )
    if not x.is_floating_point():
        raise GeometryError(f"{fn}: {what} has dtype {x.dtype}; pass a floating tensor ({what}.float()).")
    return x


def _check_int(fn: str, name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise GeometryError(f"{fn}: {name} must be an integer >= {lo}, got {v!r}.")


def _check_n(fn: str, n: int, need: int, why: str, fix: str = "lower k") -> None:
    if n < need:
        raise GeometryError(f"{fn}: {why} needs at least {need} points per representation, got N={n}; "
                            f"pass more points or {fix}.")


def _per_rep(fn: str, x, body, need: int, why: str):
    """``body((R, N, D)) -> (R,)`` over a tensor (..., N, D) (result ``...``) or a TensorDict (same keys)."""
    if isinstance(x, TensorDictBase):
        out = TensorDict({}, batch_size=[])
        for key in x.keys(include_nested=True, leaves_only=True):
            out.set(key, _one(fn, x.get(key), body, need, why, f"x[{key!r}]"))
        return out
    return _one(fn, x, body, need, why, "x")


def _one(fn, x, body, need, why, what):
    x = _check_points(fn, x, what)
    _check_n(fn, x.shape[-2], need, why)
    lead = x.shape[:-2]
    return body(x.reshape(-1, *x.shape[-2:])).reshape(lead)


def _stack_of(fn: str, x, what: str, prep) -> tuple[torch.Tensor, tuple]:
    """``prep((R, N, D)) -> (R, N, N)`` for a tensor (..., N, D) or a TensorDict of (N, D) leaves."""
    if isinstance(x, TensorDictBase):
        mats = []
        for key in x.keys(include_nested=True, leaves_only=True):
            t = _check_points(fn, x.get(key), f"{what}[{key!r}]")
            if t.dim() != 2:
                raise GeometryError(f"{fn}: {what}[{key!r}] has shape {tuple(t.shape)}; TensorDict entries must be "
                                    "single representations (N, D) — pass a stacked tensor for (R, N, D).")
            mats.append(t)
        if not mats:
            raise GeometryError(f"{fn}: {what} is an empty TensorDict; give at least one representation.")
        ns = {m.shape[0] for m in mats}
        if len(ns) > 1:
            raise GeometryError(f"{fn}: the entries of {what} have different N {sorted(ns)}; every representation "
                                "must hold the same N inputs.")
        return torch.cat([prep(m[None]) for m in mats]), (len(mats),)
    x = _check_points(fn, x, what)
    return prep(x.reshape(-1, *x.shape[-2:])), tuple(x.shape[:-2])


def _same_n(fn: str, nx: int, ny: int) -> None:
    if nx != ny:
        raise GeometryError(f"{fn}: x has N={nx} points but y has N={ny}; x and y must be representations of the "
                            "same N inputs, in the same order.")


# ----------------------------------------------------------------------------------------- distances


def _sqdist(x: torch.Tensor) -> torch.Tensor:
    """(R, N, D) -> (R, N, N) squared distances (from the Gram matrix; exact zeros on the diagonal)."""
    x = x - x.mean(-2, keepdim=True)  # centring keeps the Gram form accurate
    sq = x.square().sum(-1)
    d2 = sq[..., :, None] + sq[..., None, :] - 2 * (x @ x.mT)
    eye = torch.eye(x.shape[-2], dtype=torch.bool, device=x.device)
    return d2.clamp_min(0).masked_fill(eye, 0)


def _knn(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest neighbours (self excluded): squared distances (R, N, k) ascending and indices (R, N, k).

    Neighbours are selected on the Gram-form distances; the returned distances are recomputed from
    coordinate differences (accurate for close points, and differentiable).
    """
    r, n, dim = x.shape
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    idx = _sqdist(x).masked_fill(eye, math.inf).topk(k, dim=-1, largest=False).indices
    nb = torch.gather(x.unsqueeze(1).expand(r, n, n, dim), 2, idx.unsqueeze(-1).expand(r, n, k, dim))
    d2, order = (nb - x.unsqueeze(2)).square().sum(-1).sort(-1)
    return d2, torch.gather(idx, -1, order)


def _neighbourhoods(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    r, n, dim = x.shape
    k = idx.shape[-1]
    return torch.gather(x.unsqueeze(1).expand(r, n, n, dim), 2, idx.unsqueeze(-1).expand(r, n, k, dim))


# ------------------------------------------------------------------------------- intrinsic dimension


def twonn_dimension(x: torch.Tensor | TensorDictBase, *, discard_fraction: float = 0.1) -> torch.Tensor | TensorDict:
    """TwoNN intrinsic dimension (Facco et al., 2017), regression form, of every representation at once.

    .. math::
        \\mu_i = r_2(i) / r_1(i), \\qquad
        \\hat d = \\frac{\\sum_{j \\le m} x_j y_j}{\\sum_{j \\le m} x_j^2}, \\quad
        x_j = \\log \\mu_{(j)}, \\; y_j = -\\log(1 - j/N)

    with :math:`r_1, r_2` the distances to the first and second nearest neighbours, :math:`\\mu_{(j)}`
    sorted ascending, and the fit (a line through the origin, the paper's estimator) on the
    :math:`m = \\min(N-1, \\lfloor (1-f) N \\rfloor)` smallest ratios: the largest fraction ``f`` are
    discarded as in the paper (``f = 0`` equals tdhook's ``TwoNnDimensionEstimator``).  Differentiable
    in ``x`` (through the sort).  Duplicate points make :math:`r_1 = 0`; remove them first.

    Args:
        x: points ``(N, D)``, a stack ``(..., N, D)`` or a TensorDict ``{site: (N, D_site)}``.
        discard_fraction: fraction ``f`` in [0, 1) of the largest ratios left out of the fit.

    Returns:
        The dimension, shape ``...`` (a scalar for one representation), or a TensorDict of scalars.

    Raises:
        GeometryError: input not (…, N, D) floating, ``N < 3``, ``discard_fraction`` outside [0, 1)
            or so large that fewer than 2 ratios remain.

    Example:
        >>> import torch, tdfunc
        >>> t = torch.rand(500, 1, dtype=torch.float64) * 2 * torch.pi
        >>> circles = torch.cat([t.cos(), t.sin()], 1) @ torch.randn(3, 2, 10, dtype=torch.float64)
        >>> d = tdfunc.latent.twonn_dimension(circles)  # three embeddings of a circle in 10-D at once
        >>> d.shape, bool((d - 1).abs().max() < 0.25)
        (torch.Size([3]), True)

    References:
        Facco, d'Errico, Rodriguez, Laio. Estimating the intrinsic dimension of datasets by a minimal
        neighborhood information. Scientific Reports 2017.

    Composes with: ``vmap`` (over point clouds), ``grad`` (w.r.t. the points), ``torch.compile``.
    """
    fn = "tdfunc.latent.twonn_dimension"
    if isinstance(discard_fraction, bool) or not isinstance(discard_fraction, (int, float)) or not 0 <= discard_fraction < 1:
        raise GeometryError(f"{fn}: discard_fraction must be a number in [0, 1), got {discard_fraction!r}.")

    def body(p: torch.Tensor) -> torch.Tensor:
        n = p.shape[-2]
        m = min(n - 1, int(math.floor((1 - discard_fraction) * n)))
        if m < 2:
            raise GeometryError(f"{fn}: discard_fraction={discard_fraction!r} keeps {m} of N={n} ratios; keep at "
                                "least 2 (lower discard_fraction or pass more points).")
        d2, _ = _knn(p, 2)
        logmu = (0.5 * (d2[..., 1].log() - d2[..., 0].log())).sort(-1).values[..., :m]
        y = -torch.log1p(-torch.arange(1, m + 1, dtype=p.dtype, device=p.device) / n)
        return (logmu * y).sum(-1) / logmu.square().sum(-1)

    return _per_rep(fn, x, body, 3, "TwoNN (two neighbours per point)")


def mle_dimension(x: torch.Tensor | TensorDictBase, *, k: int = 10) -> torch.Tensor | TensorDict:
    """Levina–Bickel maximum-likelihood intrinsic dimension from k nearest neighbours, batched.

    .. math::
        \\hat m_k(x_i) = \\Big[\\frac{1}{k-1} \\sum_{j=1}^{k-1} \\log \\frac{T_k(x_i)}{T_j(x_i)}\\Big]^{-1},
        \\qquad \\hat m_k = \\frac{1}{N} \\sum_i \\hat m_k(x_i)

    with :math:`T_j(x_i)` the distance from :math:`x_i` to its j-th nearest neighbour (the paper's
    eq. 8 and its average over points).  Differentiable in ``x``.  tdhook's
    ``LocalKnnDimensionEstimator`` is a different estimator (Farahmand et al.:
    ``log 2 / log(R_2k / R_k)`` per point).

    Args:
        x: points ``(N, D)``, a stack ``(..., N, D)`` or a TensorDict ``{site: (N, D_site)}``.
        k: neighbours per point (``k >= 2``; needs ``N >= k + 1``).

    Returns:
        The dimension, shape ``...``, or a TensorDict of scalars.

    Raises:
        GeometryError: input not (…, N, D) floating, ``k < 2``, ``N < k + 1``.

    Example:
        >>> import torch, tdfunc
        >>> plane = torch.rand(2, 1000, 3, dtype=torch.float64) @ torch.randn(3, 10, dtype=torch.float64)
        >>> d = tdfunc.latent.mle_dimension(plane, k=10)
        >>> d.shape, bool((d - 3).abs().max() < 0.5)
        (torch.Size([2]), True)

    References:
        Levina, Bickel. Maximum likelihood estimation of intrinsic dimension. NeurIPS 2004.

    Composes with: ``vmap`` (over point clouds), ``grad`` (w.r.t. the points), ``torch.compile``.
    """
    fn = "tdfunc.latent.mle_dimension"
    _check_int(fn, "k", k, 2)

    def body(p: torch.Tensor) -> torch.Tensor:
        logt = 0.5 * _knn(p, k)[0].log()
        return ((k - 1) / (logt[..., -1:] - logt[..., :-1]).sum(-1)).mean(-1)

    return _per_rep(fn, x, body, k + 1, f"k={k}")


def local_pca_dimension(x: torch.Tensor | TensorDictBase, *, k: int = 20, variance: float = 0.9) -> torch.Tensor | TensorDict:
    """Local PCA intrinsic dimension (Fukunaga–Olsen): explained variance in kNN neighbourhoods, batched.

    .. math::
        d_i = \\min\\Big\\{ d : \\frac{\\sum_{j \\le d} \\lambda_j(i)}{\\sum_j \\lambda_j(i)} \\ge v \\Big\\},
        \\qquad \\hat d = \\frac{1}{N} \\sum_i d_i

    with :math:`\\lambda_1(i) \\ge \\lambda_2(i) \\ge \\dots` the eigenvalues of the covariance of
    :math:`x_i` and its ``k`` nearest neighbours.  Piecewise constant in ``x`` (no useful gradient).
    tdhook's ``LocalPcaDimensionEstimator`` picks ``d_i`` by eigenvalue gap or ratio instead of
    explained variance.

    Args:
        x: points ``(N, D)``, a stack ``(..., N, D)`` or a TensorDict ``{site: (N, D_site)}``.
        k: neighbours per point (``N >= k + 1``).
        variance: explained-variance threshold ``v`` in (0, 1].

    Returns:
        The mean local dimension, shape ``...``, or a TensorDict of scalars.

    Raises:
        GeometryError: input not (…, N, D) floating, ``k < 1``, ``N < k + 1``, ``variance`` outside (0, 1].

    Example:
        >>> import torch, tdfunc
        >>> plane = torch.rand(400, 3, dtype=torch.float64) @ torch.randn(3, 10, dtype=torch.float64)
        >>> float(tdfunc.latent.local_pca_dimension(plane, k=20, variance=0.99))
        3.0

    References:
        Fukunaga, Olsen. An algorithm for finding intrinsic dimensionality of data. IEEE Trans.
        Computers 1971.

    Composes with: ``vmap`` (over point clouds), ``torch.compile``.
    """
    fn = "tdfunc.latent.local_pca_dimension"
    _check_int(fn, "k", k, 1)
    if isinstance(variance, bool) or not isinstance(variance, (int, float)) or not 0 < variance <= 1:
        raise GeometryError(f"{fn}: variance must be a number in (0, 1], got {variance!r}.")

    def body(p: torch.Tensor) -> torch.Tensor:
        nb = torch.cat([p.unsqueeze(2), _neighbourhoods(p, _knn(p, k)[1])], 2)  # (R, N, k+1, D)
        lam = torch.linalg.svdvals(nb - nb.mean(2, keepdim=True)).square()
        frac = lam.cumsum(-1) / lam.sum(-1, keepdim=True)
        tol = 1e-9 if p.dtype == torch.float64 else 1e-5
        return ((frac < variance - tol).sum(-1) + 1).to(p.dtype).mean(-1)

    return _per_rep(fn, x, body, k + 1, f"k={k}")


def ca_pca_dimension(x: torch.Tensor | TensorDictBase, *, k: int = 20) -> torch.Tensor | TensorDict:
    """Curvature-adjusted local PCA dimension (CA-PCA, Gilbert & O'Neill 2023), batched.

    .. math::
        \\hat\\lambda = \\lambda / r^2, \\quad
        d_i = \\arg\\min_d \\Big\\| \\tfrac{1}{d+2} \\mathbf 1_d - \\big(\\hat\\lambda_{1..d}
            + \\tfrac{3d+4}{d(d+4)} \\textstyle\\sum_{j>d} \\hat\\lambda_j\\big) \\Big\\|
            + 2 \\sum_{j>d} \\hat\\lambda_j, \\qquad \\hat d = \\frac{1}{N}\\sum_i d_i

    with :math:`\\lambda` the sample-covariance eigenvalues of the ``k + 1`` nearest neighbours of
    :math:`x_i` (self excluded) and :math:`r` the mean of the k-th and (k+1)-th neighbour distances:
    the neighbourhood's spectrum is matched to that of a quadratic embedding of a d-ball instead of a
    flat one.  Equals the mean of tdhook's ``CaPcaDimensionEstimator`` per-point output.

    Args:
        x: points ``(N, D)``, a stack ``(..., N, D)`` or a TensorDict ``{site: (N, D_site)}``.
        k: neighbourhood size (``N >= k + 2``).

    Returns:
        The mean local dimension, shape ``...``, or a TensorDict of scalars.

    Raises:
        GeometryError: input not (…, N, D) floating, ``k < 1``, ``N < k + 2``.

    Example:
        >>> import torch, tdfunc
        >>> t = torch.rand(300, 1, dtype=torch.float64) * 2 * torch.pi
        >>> circle = torch.cat([t.cos(), t.sin()], 1) @ torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))[0][:2]
        >>> float(tdfunc.latent.ca_pca_dimension(circle, k=10))
        1.0

    References:
        Gilbert, O'Neill. CA-PCA: Manifold dimension estimation, adapted for curvature. 2023.

    Composes with: ``vmap`` (over point clouds), ``torch.compile``.
    """
    fn = "tdfunc.latent.ca_pca_dimension"
    _check_int(fn, "k", k, 1)

    def body(p: torch.Tensor) -> torch.Tensor:
        d2, idx = _knn(p, k + 1)
        r = 0.5 * (d2[..., k - 1].sqrt() + d2[..., k].sqrt())
        nb = _neighbourhoods(p, idx)
        dim = p.shape[-1]
        lam = torch.zeros(*nb.shape[:2], dim, dtype=p.dtype, device=p.device)
        sv = torch.linalg.svdvals(nb - nb.mean(2, keepdim=True)).square() / k  # covariance, 1/(n-1), n = k+1
        lam = torch.cat([sv, lam[..., sv.shape[-1]:]], -1) / r.square().unsqueeze(-1)
        d = torch.arange(1, dim + 1, dtype=p.dtype, device=p.device)  # candidate dimensions
        head = torch.arange(dim, device=p.device)[None, :] < d[:, None].long()  # (dim_d, dim): j < d
        tail = (lam.unsqueeze(-2) * ~head).sum(-1)  # (R, N, dim_d)
        adj = lam.unsqueeze(-2) + ((3 * d + 4) / (d * (d + 4)) * tail).unsqueeze(-1)
        err = ((1 / (d + 2)).unsqueeze(-1) - adj) * head
        score = err.square().sum(-1).sqrt() + 2 * tail
        return (score.argmin(-1) + 1).to(p.dtype).mean(-1)

    return _per_rep(fn, x, body, k + 2, f"k={k} (k + 1 neighbours)")


# ------------------------------------------------------------------------------------------------ CKA


def _gram(kernel: str, sigma):
    def prep(x: torch.Tensor) -> torch.Tensor:
        if kernel == "linear":
            xc = x - x.mean(-2, keepdim=True)
            return xc @ xc.mT
        d2 = _sqdist(x)
        if sigma is None:  # median heuristic: sigma = median pairwise distance (off-diagonal)
            iu = torch.triu_indices(x.shape[-2], x.shape[-2], 1, device=x.device)
            s2 = d2[..., iu[0], iu[1]].median(-1).values[..., None, None]
        else:
            s2 = sigma * sigma
        return torch.exp(-d2 / (2 * s2))

    return prep


def cka(
    x: torch.Tensor | TensorDictBase,
    y: torch.Tensor | TensorDictBase,
    *,
    kernel: str = "linear",
    sigma: float | None = None,
    debiased: bool = False,
) -> torch.Tensor:
    """Centered kernel alignment (Kornblith et al., 2019) of every pair of representations in one call.

    .. math::
        \\mathrm{CKA}(K, L) = \\frac{\\mathrm{HSIC}(K, L)}{\\sqrt{\\mathrm{HSIC}(K, K)\\,\\mathrm{HSIC}(L, L)}},
        \\qquad \\mathrm{HSIC}(K, L) = \\frac{\\mathrm{tr}(K H L H)}{(N-1)^2}, \\; H = I - \\tfrac1N \\mathbf 1 \\mathbf 1^\\top

    with Gram matrices ``K = X Xᵀ`` (linear) or ``exp(-‖x_i - x_j‖² / 2σ²)`` (RBF).  ``debiased``
    uses the unbiased HSIC estimator (Song et al., 2012; as in Nguyen et al., 2021), with
    ``K̃ = K`` with a zero diagonal:
    ``[tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((N-1)(N-2)) - 2/(N-2) · 1ᵀK̃L̃1] / (N(N-3))``.

    Args:
        x: ``(N, D1)``, a stack ``(..., N, D1)`` or a TensorDict ``{site: (N, D_site)}``.
        y: the same for the second family (same N; any widths).
        kernel: ``"linear"`` or ``"rbf"``.
        sigma: RBF bandwidth; ``None`` (default) takes each representation's median pairwise distance
            (then CKA is invariant to isotropic scaling).  Ignored for ``"linear"``.
        debiased: use the unbiased HSIC (needs ``N >= 4``).

    Returns:
        ``(*x_batch, *y_batch)``: CKA of every pair (a scalar for two single representations; a
        TensorDict counts as a batch of its leaves in ``keys(include_nested=True, leaves_only=True)``
        order).  The Gram matrices cost ``O((R1 + R2) N²)`` memory.

    Raises:
        GeometryError: input not (…, N, D) floating, different N, unknown kernel, ``sigma <= 0``,
            ``debiased`` with ``N < 4``.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> x = torch.randn(4, 50, 8, dtype=torch.float64)      # 4 representations of 50 inputs
        >>> q = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
        >>> y = TensorDict({"rot": 3 * x[0] @ q, "noise": torch.randn(50, 5, dtype=torch.float64)})
        >>> m = tdfunc.latent.cka(x, y)  # all 4 x 2 pairs; TensorDict entries may have different widths
        >>> m.shape, round(float(m[0, 0]), 6)   # rotation and scaling leave CKA at 1
        (torch.Size([4, 2]), 1.0)

    References:
        Kornblith, Norouzi, Lee, Hinton. Similarity of neural network representations revisited.
        ICML 2019.  Song, Smola, Gretton, Bedo, Borgwardt. Feature selection via dependence
        maximization. JMLR 2012.  Nguyen, Raghu, Kornblith. Do wide and deep networks learn the same
        things? ICLR 2021.

    Composes with: ``vmap`` (over batches of point clouds), ``grad`` (w.r.t. both representations;
    CKA losses), ``torch.compile``.
    """
    fn = "tdfunc.latent.cka"
    if kernel not in KERNELS:
        raise GeometryError(f"{fn}: unknown kernel {kernel!r}; choose one of {list(KERNELS)}.")
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0):
        raise GeometryError(f"{fn}: sigma must be None (median heuristic) or a number > 0, got {sigma!r}.")
    _pre_n(fn, x, y)
    prep = _gram(kernel, sigma)
    k, kb = _stack_of(fn, x, "x", prep)
    l, lb = _stack_of(fn, y, "y", prep)
    n = k.shape[-1]
    if debiased:
        _check_n(fn, n, 4, "debiased=True (the unbiased HSIC)", "use debiased=False")
        kt, lt = (m * ~torch.eye(n, dtype=torch.bool, device=m.device) for m in (k, l))
        hxy = _uhsic(kt[:, None], lt[None])
        hxx, hyy = _uhsic(kt, kt), _uhsic(lt, lt)
    else:
        kc, lc = (m - m.mean(-1, keepdim=True) - m.mean(-2, keepdim=True) + m.mean((-1, -2), keepdim=True) for m in (k, l))
        hxy = torch.einsum("aij,bij->ab", kc, lc)
        hxx, hyy = kc.square().sum((-1, -2)), lc.square().sum((-1, -2))
    out = hxy / (hxx[:, None] * hyy[None]).sqrt()
    return out.reshape((*kb, *lb))


def _uhsic(kt: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of zero-diagonal Gram matrices (broadcast over leading dims)."""
    n = kt.shape[-1]
    tr = (kt * lt).sum((-1, -2))  # tr(K̃ L̃) for symmetric K̃, L̃
    cross = (kt.sum(-1) * lt.sum(-1)).sum(-1)  # 1ᵀ K̃ L̃ 1
    sums = kt.sum((-1, -2)) * lt.sum((-1, -2))
    return (tr + sums / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))


def _n_of(v) -> int | None:
    if isinstance(v, TensorDictBase):
        for key in v.keys(include_nested=True, leaves_only=True):
            t = v.get(key)
            return t.shape[-2] if isinstance(t, torch.Tensor) and t.dim() >= 2 else None
        return None
    return v.shape[-2] if isinstance(v, torch.Tensor) and v.dim() >= 2 else None


def _pre_n(fn: str, x, y) -> None:
    nx, ny = _n_of(x), _n_of(y)
    if nx is not None and ny is not None:
        _same_n(fn, nx, ny)


# -------------------------------------------------------------------------------- information imbalance


def information_imbalance(
    x: torch.Tensor | TensorDictBase, y: torch.Tensor | TensorDictBase, *, k: int = 1
) -> torch.Tensor:
    """Information imbalance Δ(x → y) (Glielmo et al., 2022) of every pair of representations in one call.

    .. math::
        \\Delta(A \\to B) = \\frac{2}{N} \\cdot \\frac{1}{N k} \\sum_i \\sum_{j:\\, r^A_{ij} \\le k} r^B_{ij}

    with :math:`r^A_{ij}` the rank of :math:`j` among the neighbours of :math:`i` in space A (1 =
    nearest).  Δ ≈ 0 when A's neighbours are B's neighbours (A predicts B; exactly ``(k+1)/N`` for
    ``y = x``), Δ ≈ 1 when they are unrelated.  ``k = 1`` is the paper's definition and equals
    tdhook's ``InformationImbalanceEstimator`` (``a_to_b``).  Ranks are piecewise constant: no
    useful gradient.  Ties are broken by index.

    Args:
        x: the source representations A: ``(N, D1)``, ``(..., N, D1)`` or a TensorDict of ``(N, D)``.
        y: the target representations B, same N.
        k: neighbours per point in A (``N >= k + 1``).

    Returns:
        ``(*x_batch, *y_batch)``: Δ(x_a → y_b) for every pair; ``information_imbalance(y, x, ...)``
        gives the other direction.

    Raises:
        GeometryError: input not (…, N, D) floating, different N, ``k < 1``, ``N < k + 1``.

    Example:
        >>> import torch, tdfunc
        >>> x = torch.randn(300, 4, dtype=torch.float64)
        >>> y = torch.stack([x.flip(-1), torch.randn(300, 4, dtype=torch.float64)])  # same geometry; noise
        >>> d = tdfunc.latent.information_imbalance(x, y)
        >>> float(d[0]) == 2 / 300, bool((d[1] - 1).abs() < 0.2)
        (True, True)
        >>> ii = tdfunc.latent.information_imbalance  # asymmetric: x predicts x[:, :1], not the other way
        >>> bool(ii(x, x[:, :1]) < 0.5 < ii(x[:, :1], x))
        True

    References:
        Glielmo, Zeni, Cheng, Csányi, Laio. Ranking the information content of distance measures.
        PNAS Nexus 2022.

    Composes with: ``vmap`` (over batches of point clouds), ``torch.compile``.
    """
    fn = "tdfunc.latent.information_imbalance"
    _check_int(fn, "k", k, 1)
    _pre_n(fn, x, y)
    da, ab = _stack_of(fn, x, "x", _sqdist)
    db, bb = _stack_of(fn, y, "y", _sqdist)
    n = da.shape[-1]
    _check_n(fn, n, k + 1, f"k={k}")
    eye = torch.eye(n, dtype=torch.bool, device=da.device)
    nn_a = da.masked_fill(eye, math.inf).topk(k, dim=-1, largest=False).indices  # (R1, N, k)
    ranks_b = db.masked_fill(eye, -math.inf).argsort(-1).argsort(-1)  # (R2, N, N); self 0, nearest 1
    r1, r2 = nn_a.shape[0], ranks_b.shape[0]
    picked = torch.gather(ranks_b[None].expand(r1, r2, n, n), 3, nn_a[:, None].expand(r1, r2, n, k))
    out = picked.to(da.dtype).mean((-1, -2)) * (2.0 / n)
    return out.reshape((*ab, *bb))
