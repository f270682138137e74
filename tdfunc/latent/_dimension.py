"""Intrinsic dimension of representations, batched: TwoNN, MLE (Levina-Bickel), local kNN (Farahmand et al.),
local PCA, CA-PCA."""

from __future__ import annotations

import math
from typing import Literal, overload

import torch
from tensordict import TensorDict, TensorDictBase

from .._checks import check_bool
from .._errors import public
from .._finite import readable
from ._geometry import GeometryError, _check_duplicates, _check_int, _knn, _neighbourhoods, _per_rep

__all__ = ["twonn_dimension", "mle_dimension", "local_knn_dimension", "local_pca_dimension", "ca_pca_dimension"]

PcaCriterion = Literal["variance", "maxgap", "ratio"]
PCA_CRITERIA: tuple[PcaCriterion, ...] = ("variance", "maxgap", "ratio")


# ------------------------------------------------------------------------------- intrinsic dimension


@overload
def twonn_dimension(
    x: TensorDictBase, *, discard_fraction: float = ..., return_xy: Literal[False] = ...
) -> TensorDict: ...
@overload
def twonn_dimension(
    x: torch.Tensor, *, discard_fraction: float = ..., return_xy: Literal[False] = ...
) -> torch.Tensor: ...
@overload
def twonn_dimension(
    x: TensorDictBase, *, discard_fraction: float = ..., return_xy: Literal[True]
) -> tuple[TensorDict, TensorDict, TensorDict]: ...
@overload
def twonn_dimension(
    x: torch.Tensor, *, discard_fraction: float = ..., return_xy: Literal[True]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@public("tdfunc.latent.twonn_dimension")
def twonn_dimension(
    x: torch.Tensor | TensorDictBase, *, discard_fraction: float = 0.1, return_xy: bool = False
) -> (
    torch.Tensor
    | TensorDict
    | tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    | tuple[TensorDict, TensorDict, TensorDict]
):
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
        return_xy: also return the regression points ``(x_j, y_j)``, ``j = 1..m`` (tdhook's
            ``return_xy``; plot ``y`` against ``x`` to check the fit is a line through the origin).

    Returns:
        The dimension, shape ``...`` (a scalar for one representation), or a TensorDict of scalars;
        with ``return_xy`` the triple ``(dimension, x, y)``, ``x`` and ``y`` of shape ``(..., m)``
        (TensorDicts of the same keys for a TensorDict input).

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
        >>> d, lx, ly = tdfunc.latent.twonn_dimension(circles, discard_fraction=0.0, return_xy=True)
        >>> lx.shape, bool(torch.allclose(d, (lx * ly).sum(-1) / lx.square().sum(-1)))  # slope through 0
        (torch.Size([3, 499]), True)

    References:
        Facco, d'Errico, Rodriguez, Laio. Estimating the intrinsic dimension of datasets by a minimal
        neighborhood information. Scientific Reports 2017.

    Composes with: ``vmap`` (over point clouds), ``grad`` (w.r.t. the points), ``torch.compile``.
    """
    if (
        isinstance(discard_fraction, bool)
        or not isinstance(discard_fraction, (int, float))
        or not 0 <= discard_fraction < 1
    ):
        raise GeometryError(f"discard_fraction must be a number in [0, 1), got {discard_fraction!r}.")
    check_bool("return_xy", return_xy, GeometryError)

    def body(p: torch.Tensor) -> torch.Tensor:
        n = p.shape[-2]
        m = min(n - 1, int(math.floor((1 - discard_fraction) * n)))
        if m < 2:
            raise GeometryError(
                f"discard_fraction={discard_fraction!r} keeps {m} of N={n} ratios; keep at "
                "least 2 (lower discard_fraction or pass more points)."
            )
        d2, _ = _knn(p, 2)
        _check_duplicates(d2[..., 0], n, "the ratio r2 / r1 is undefined")
        logmu = (0.5 * (d2[..., 1].log() - d2[..., 0].log())).sort(-1).values[..., :m]
        y = -torch.log1p(-torch.arange(1, m + 1, dtype=p.dtype, device=p.device) / n)
        d = (logmu * y).sum(-1) / logmu.square().sum(-1)
        if not return_xy:
            return d
        return torch.cat([d[:, None], logmu, y.expand_as(logmu)], -1)  # (R, 1 + 2m), split below

    out = _per_rep(x, body, 3, "TwoNN (two neighbours per point)")
    if not return_xy:
        return out

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = (t.shape[-1] - 1) // 2
        return t[..., 0], t[..., 1 : m + 1], t[..., m + 1 :]

    if isinstance(out, TensorDictBase):
        return (
            out.apply(lambda t: split(t)[0]),
            out.apply(lambda t: split(t)[1]),  # type: ignore[return-value]
            out.apply(lambda t: split(t)[2]),
        )
    return split(out)


@overload
def mle_dimension(x: TensorDictBase, *, k: int = ...) -> TensorDict: ...
@overload
def mle_dimension(x: torch.Tensor, *, k: int = ...) -> torch.Tensor: ...


@public("tdfunc.latent.mle_dimension")
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
        GeometryError: input not (…, N, D) floating, ``k < 2``, ``N < k + 1``; duplicate points (where
            :math:`\\log T_1 = -\\infty`).

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
    _check_int("k", k, 2)

    def body(p: torch.Tensor) -> torch.Tensor:
        d2 = _knn(p, k)[0]
        _check_duplicates(d2[..., 0], p.shape[-2], "log T_1 is -inf and the estimate degenerates to 0 or NaN")
        logt = 0.5 * d2.log()
        return ((k - 1) / (logt[..., -1:] - logt[..., :-1]).sum(-1)).mean(-1)

    return _per_rep(x, body, k + 1, f"k={k}")


@overload
def local_knn_dimension(x: TensorDictBase, *, k: int = ..., per_point: bool = ...) -> TensorDict: ...
@overload
def local_knn_dimension(x: torch.Tensor, *, k: int = ..., per_point: bool = ...) -> torch.Tensor: ...


@public("tdfunc.latent.local_knn_dimension")
def local_knn_dimension(
    x: torch.Tensor | TensorDictBase, *, k: int = 5, per_point: bool = False
) -> torch.Tensor | TensorDict:
    """Local intrinsic dimension from the k-th and 2k-th neighbour distances (Farahmand et al., 2007), batched.

    .. math::
        \\hat d(x_i) = \\frac{\\log 2}{\\log \\big(R_{2k}(x_i) / R_k(x_i)\\big)}, \\qquad
        \\hat d = \\frac{1}{N} \\sum_i \\hat d(x_i)

    with :math:`R_j(x_i)` the distance from :math:`x_i` to its j-th nearest neighbour: in a
    d-dimensional neighbourhood the number of points in a ball grows as :math:`r^d`, so doubling
    the count multiplies the radius by :math:`2^{1/d}`.  Equals tdhook's ``LocalKnnDimensionEstimator``
    per point (``per_point=True``; tdhook's ``k="auto"`` is ``k = max(2, min(⌊√N⌋, ⌊(N-1)/2⌋))``).
    A different estimator from :func:`mle_dimension`.  Differentiable in ``x``.

    Args:
        x: points ``(N, D)``, a stack ``(..., N, D)`` or a TensorDict ``{site: (N, D_site)}``.
        k: neighbour rank ``k >= 2`` (needs ``N >= 2k + 1``).
        per_point: return every point's estimate ``(..., N)`` instead of their mean.

    Returns:
        The mean local dimension, shape ``...`` (``(..., N)`` with ``per_point``), or a TensorDict.

    Raises:
        GeometryError: input not (…, N, D) floating, ``k < 2``, ``N < 2k + 1``; duplicate points
            (:math:`R_k` may be 0); points whose k-th and 2k-th neighbours are equally far
            (:math:`\\log(R_{2k}/R_k) = 0`, e.g. lattice data; tdhook returns NaN there) — pick another
            ``k`` or remove the ties.  Inside ``vmap`` / ``torch.compile`` these two are not checked.

    Example:
        >>> import torch, tdfunc
        >>> plane = torch.rand(2, 500, 2, dtype=torch.float64) @ torch.randn(2, 10, dtype=torch.float64)
        >>> d = tdfunc.latent.local_knn_dimension(plane, k=8, per_point=True)  # two 2-D planes in 10-D
        >>> d.shape, bool((d.mean(-1) - 2).abs().max() < 0.35)
        (torch.Size([2, 500]), True)

    References:
        Farahmand, Szepesvári, Audibert. Manifold-adaptive dimension estimation. ICML 2007.

    Composes with: ``vmap`` (over point clouds), ``grad`` (w.r.t. the points), ``torch.compile``.
    """
    _check_int("k", k, 2)
    check_bool("per_point", per_point, GeometryError)

    def body(p: torch.Tensor) -> torch.Tensor:
        n = p.shape[-2]
        d2 = _knn(p, 2 * k)[0]
        _check_duplicates(d2[..., 0], n, "R_k can be 0 and log(R_2k / R_k) is undefined")
        log_ratio = 0.5 * (d2[..., 2 * k - 1].log() - d2[..., k - 1].log())
        if readable(log_ratio) and bool((log_ratio == 0).any()):
            ties = int((log_ratio == 0).sum())
            raise GeometryError(
                f"{ties} of the N={n} points have their k-th and 2k-th neighbours (k={k}) at the "
                "same distance, where log(R_2k / R_k) = 0 and the estimate is infinite; pick another k "
                "or break the ties (e.g. add tiny noise to lattice data)."
            )
        d = math.log(2) / log_ratio
        return d if per_point else d.mean(-1)

    return _per_rep(x, body, 2 * k + 1, f"k={k} (the 2k-th neighbour)")


@overload
def local_pca_dimension(
    x: TensorDictBase,
    *,
    k: int = ...,
    variance: float = ...,
    criterion: PcaCriterion = ...,
    alpha: float = ...,
    per_point: bool = ...,
) -> TensorDict: ...
@overload
def local_pca_dimension(
    x: torch.Tensor,
    *,
    k: int = ...,
    variance: float = ...,
    criterion: PcaCriterion = ...,
    alpha: float = ...,
    per_point: bool = ...,
) -> torch.Tensor: ...


@public("tdfunc.latent.local_pca_dimension")
def local_pca_dimension(
    x: torch.Tensor | TensorDictBase,
    *,
    k: int = 20,
    variance: float = 0.9,
    criterion: PcaCriterion = "variance",
    alpha: float = 0.05,
    per_point: bool = False,
) -> torch.Tensor | TensorDict:
    """Local PCA intrinsic dimension (Fukunaga–Olsen): the spectrum of kNN neighbourhoods, batched.

    .. math::
        \\text{variance: } d_i = \\min\\Big\\{ d :
            \\frac{\\sum_{j \\le d} \\lambda_j(i)}{\\sum_j \\lambda_j(i)} \\ge v \\Big\\},
        \\quad \\text{maxgap: } d_i = \\arg\\max_{j} \\frac{\\lambda_j(i)}{\\lambda_{j+1}(i) + 10^{-15}},
        \\quad \\text{ratio: } d_i = \\max\\big(1, \\#\\{j : \\lambda_j(i) > \\alpha \\lambda_1(i)\\}\\big)

    and :math:`\\hat d = \\frac{1}{N} \\sum_i d_i`, with :math:`\\lambda_1(i) \\ge \\lambda_2(i) \\ge \\dots`
    the eigenvalues of the sample covariance (``1/k``) of :math:`x_i` and its ``k`` nearest
    neighbours (``min(k + 1, D)`` of them; a single one gives ``d_i = 1``).  ``"maxgap"`` (Bruske &
    Sommer's largest eigenvalue gap) and ``"ratio"`` equal tdhook's ``LocalPcaDimensionEstimator``
    per point (``per_point=True``); they compute the spectrum in float64 as tdhook does.  Piecewise
    constant in ``x`` (no useful gradient).

    Args:
        x: points ``(N, D)``, a stack ``(..., N, D)`` or a TensorDict ``{site: (N, D_site)}``.
        k: neighbours per point (``N >= k + 1``).
        variance: explained-variance threshold ``v`` in (0, 1] of ``criterion="variance"``.
        criterion: ``"variance"`` (default), ``"maxgap"`` or ``"ratio"``.
        alpha: eigenvalue fraction ``α`` in (0, 1) of ``criterion="ratio"``.
        per_point: return every point's ``d_i`` ``(..., N)`` instead of their mean.

    Returns:
        The mean local dimension, shape ``...`` (``(..., N)`` with ``per_point``), or a TensorDict.

    Raises:
        GeometryError: input not (…, N, D) floating, ``k < 1``, ``N < k + 1``, ``variance`` outside
            (0, 1], ``alpha`` outside (0, 1), unknown ``criterion``.

    Example:
        >>> import torch, tdfunc
        >>> plane = torch.rand(400, 3, dtype=torch.float64) @ torch.randn(3, 10, dtype=torch.float64)
        >>> float(tdfunc.latent.local_pca_dimension(plane, k=20, variance=0.99))
        3.0
        >>> float(tdfunc.latent.local_pca_dimension(plane, k=10, criterion="maxgap"))
        3.0

    References:
        Fukunaga, Olsen. An algorithm for finding intrinsic dimensionality of data. IEEE Trans.
        Computers 1971.  Bruske, Sommer. Intrinsic dimensionality estimation with optimally
        topology preserving maps. IEEE TPAMI 1998.

    Composes with: ``vmap`` (over point clouds), ``torch.compile``.
    """
    _check_int("k", k, 1)
    if isinstance(variance, bool) or not isinstance(variance, (int, float)) or not 0 < variance <= 1:
        raise GeometryError(f"variance must be a number in (0, 1], got {variance!r}.")
    if criterion not in PCA_CRITERIA:
        raise GeometryError(f"unknown criterion {criterion!r}; choose one of {list(PCA_CRITERIA)}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise GeometryError(f"alpha must be a number in (0, 1), got {alpha!r}.")
    check_bool("per_point", per_point, GeometryError)

    def body(p: torch.Tensor) -> torch.Tensor:
        nb = torch.cat([p.unsqueeze(2), _neighbourhoods(p, _knn(p, k)[1])], 2)  # (R, N, k+1, D)
        if criterion == "variance":
            lam = torch.linalg.svdvals(nb - nb.mean(2, keepdim=True)).square()
            frac = lam.cumsum(-1) / lam.sum(-1, keepdim=True)
            tol = 1e-9 if p.dtype == torch.float64 else 1e-5
            d = (frac < variance - tol).sum(-1) + 1
        else:
            nb = nb.to(torch.float64)
            lam = torch.linalg.svdvals(nb - nb.mean(2, keepdim=True)).square() / k  # covariance eigenvalues
            if criterion == "ratio":
                d = (lam > alpha * lam[..., :1]).sum(-1).clamp_min(1)
            elif lam.shape[-1] < 2:
                d = torch.ones(lam.shape[:-1], dtype=torch.long, device=p.device)
            else:
                d = (lam[..., :-1] / (lam[..., 1:] + 1e-15)).argmax(-1) + 1
        d = d.to(p.dtype)
        return d if per_point else d.mean(-1)

    return _per_rep(x, body, k + 1, f"k={k}")


@overload
def ca_pca_dimension(x: TensorDictBase, *, k: int = ..., per_point: bool = ...) -> TensorDict: ...
@overload
def ca_pca_dimension(x: torch.Tensor, *, k: int = ..., per_point: bool = ...) -> torch.Tensor: ...


@public("tdfunc.latent.ca_pca_dimension")
def ca_pca_dimension(
    x: torch.Tensor | TensorDictBase, *, k: int = 20, per_point: bool = False
) -> torch.Tensor | TensorDict:
    """Curvature-adjusted local PCA dimension (CA-PCA, Gilbert & O'Neill 2023), batched.

    .. math::
        \\hat\\lambda = \\lambda / r^2, \\quad
        d_i = \\arg\\min_d \\Big\\| \\tfrac{1}{d+2} \\mathbf 1_d - \\big(\\hat\\lambda_{1..d}
            + \\tfrac{3d+4}{d(d+4)} \\textstyle\\sum_{j>d} \\hat\\lambda_j\\big) \\Big\\|
            + 2 \\sum_{j>d} \\hat\\lambda_j, \\qquad \\hat d = \\frac{1}{N}\\sum_i d_i

    with :math:`\\lambda` the sample-covariance eigenvalues of the ``k + 1`` nearest neighbours of
    :math:`x_i` (self excluded) and :math:`r` the mean of the k-th and (k+1)-th neighbour distances:
    the neighbourhood's spectrum is matched to that of a quadratic embedding of a d-ball instead of a
    flat one.  Equals tdhook's ``CaPcaDimensionEstimator`` per point (``per_point=True``).

    Args:
        x: points ``(N, D)``, a stack ``(..., N, D)`` or a TensorDict ``{site: (N, D_site)}``.
        k: neighbourhood size (``N >= k + 2``).
        per_point: return every point's ``d_i`` ``(..., N)`` instead of their mean.

    Returns:
        The mean local dimension, shape ``...`` (``(..., N)`` with ``per_point``), or a TensorDict.

    Raises:
        GeometryError: input not (…, N, D) floating, ``k < 1``, ``N < k + 2``; a point with ``k + 1``
            duplicates (radius :math:`r = 0`; not checked inside ``vmap`` / ``torch.compile``).

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
    _check_int("k", k, 1)
    check_bool("per_point", per_point, GeometryError)

    def body(p: torch.Tensor) -> torch.Tensor:
        d2, idx = _knn(p, k + 1)
        r = 0.5 * (d2[..., k - 1].sqrt() + d2[..., k].sqrt())
        if readable(r) and bool((r == 0).any()):
            raise GeometryError(
                f"{int((r == 0).sum())} of the N={p.shape[-2]} points have k + 1 = {k + 1} "
                "duplicates (neighbourhood radius 0), where the rescaled spectrum lambda / r^2 is "
                "undefined; remove duplicate points first (e.g. torch.unique(x, dim=0)) or raise k."
            )
        nb = _neighbourhoods(p, idx)
        dim = p.shape[-1]
        lam = torch.zeros(*nb.shape[:2], dim, dtype=p.dtype, device=p.device)
        sv = torch.linalg.svdvals(nb - nb.mean(2, keepdim=True)).square() / k  # covariance, 1/(n-1), n = k+1
        lam = torch.cat([sv, lam[..., sv.shape[-1] :]], -1) / r.square().unsqueeze(-1)
        d = torch.arange(1, dim + 1, dtype=p.dtype, device=p.device)  # candidate dimensions
        head = torch.arange(dim, device=p.device)[None, :] < d[:, None].long()  # (dim_d, dim): j < d
        tail = (lam.unsqueeze(-2) * ~head).sum(-1)  # (R, N, dim_d)
        adj = lam.unsqueeze(-2) + ((3 * d + 4) / (d * (d + 4)) * tail).unsqueeze(-1)
        err = ((1 / (d + 2)).unsqueeze(-1) - adj) * head
        score = err.square().sum(-1).sqrt() + 2 * tail
        d = (score.argmin(-1) + 1).to(p.dtype)
        return d if per_point else d.mean(-1)

    return _per_rep(x, body, k + 2, f"k={k} (k + 1 neighbours)")
