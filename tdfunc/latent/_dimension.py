"""Intrinsic dimension of representations, batched: TwoNN, MLE (Levina-Bickel), local PCA, CA-PCA."""

from __future__ import annotations

import math
from typing import overload

import torch
from tensordict import TensorDict, TensorDictBase

from .._finite import readable
from ._geometry import GeometryError, _check_int, _knn, _neighbourhoods, _per_rep

__all__ = ["twonn_dimension", "mle_dimension", "local_pca_dimension", "ca_pca_dimension"]


# ------------------------------------------------------------------------------- intrinsic dimension


@overload
def twonn_dimension(x: TensorDictBase, *, discard_fraction: float = ...) -> TensorDict: ...
@overload
def twonn_dimension(x: torch.Tensor, *, discard_fraction: float = ...) -> torch.Tensor: ...

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
            or so large that fewer than 2 ratios remain; duplicate points; NaN or infinite points.

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
        if readable(d2) and bool((d2[..., 0] == 0).any()):
            dup = int((d2[..., 0] == 0).sum())
            raise GeometryError(f"{fn}: {dup} of the N={n} points have a duplicate (a nearest neighbour at distance 0), "
                                "where the ratio r2 / r1 is undefined; remove duplicate points first "
                                "(e.g. torch.unique(x, dim=0)).")
        logmu = (0.5 * (d2[..., 1].log() - d2[..., 0].log())).sort(-1).values[..., :m]
        y = -torch.log1p(-torch.arange(1, m + 1, dtype=p.dtype, device=p.device) / n)
        return (logmu * y).sum(-1) / logmu.square().sum(-1)

    return _per_rep(fn, x, body, 3, "TwoNN (two neighbours per point)")


@overload
def mle_dimension(x: TensorDictBase, *, k: int = ...) -> TensorDict: ...
@overload
def mle_dimension(x: torch.Tensor, *, k: int = ...) -> torch.Tensor: ...

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


@overload
def local_pca_dimension(x: TensorDictBase, *, k: int = ..., variance: float = ...) -> TensorDict: ...
@overload
def local_pca_dimension(x: torch.Tensor, *, k: int = ..., variance: float = ...) -> torch.Tensor: ...

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


@overload
def ca_pca_dimension(x: TensorDictBase, *, k: int = ...) -> TensorDict: ...
@overload
def ca_pca_dimension(x: torch.Tensor, *, k: int = ...) -> torch.Tensor: ...

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
