"""Similarity of representations, batched: CKA (linear / RBF, debiased) and information imbalance."""

from __future__ import annotations

import math

import torch
from tensordict import TensorDictBase

from .._errors import public
from .._types import Kernel
from ._geometry import GeometryError, _check_int, _check_n, _minkowski, _promoted_dtype, _same_n, _sqdist, _stack_of

__all__ = ["cka", "information_imbalance"]

KERNELS: tuple[Kernel, ...] = ("linear", "rbf")


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


@public("tdfunc.latent.cka")
def cka(
    x: torch.Tensor | TensorDictBase,
    y: torch.Tensor | TensorDictBase,
    *,
    kernel: Kernel = "linear",
    sigma: float | None = None,
    debiased: bool = False,
) -> torch.Tensor:
    """Centered kernel alignment (Kornblith et al., 2019) of every pair of representations in one call.

    .. math::
        \\mathrm{CKA}(K, L) = \\frac{\\mathrm{HSIC}(K, L)}{\\sqrt{\\mathrm{HSIC}(K, K)\\,\\mathrm{HSIC}(L, L)}},
        \\qquad \\mathrm{HSIC}(K, L) = \\frac{\\mathrm{tr}(K H L H)}{(N-1)^2},
            \\; H = I - \\tfrac1N \\mathbf 1 \\mathbf 1^\\top

    with Gram matrices ``K = X Xᵀ`` (linear) or ``exp(-‖x_i - x_j‖² / 2σ²)`` (RBF).  ``debiased``
    uses the unbiased HSIC estimator (Song et al., 2012; as in Nguyen et al., 2021), with
    ``K̃ = K`` with a zero diagonal:
    ``[tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((N-1)(N-2)) - 2/(N-2) · 1ᵀK̃L̃1] / (N(N-3))``.
    Integer and bool inputs (counts, token ids, one-hot codes) are cast to the promotion of the
    floating inputs' dtypes, or to torch's default float dtype when none is floating, as tdhook's
    ``CkaEstimator`` does.

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
        GeometryError: input not (…, N, D) real tensors, different N, unknown kernel, ``sigma <= 0``,
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
        >>> counts = torch.arange(40).reshape(10, 4)  # integers are promoted (here to float32)
        >>> c = tdfunc.latent.cka(counts, counts)
        >>> c.dtype, round(float(c), 5)
        (torch.float32, 1.0)

    References:
        Kornblith, Norouzi, Lee, Hinton. Similarity of neural network representations revisited.
        ICML 2019.  Song, Smola, Gretton, Bedo, Borgwardt. Feature selection via dependence
        maximization. JMLR 2012.  Nguyen, Raghu, Kornblith. Do wide and deep networks learn the same
        things? ICLR 2021.

    Composes with: ``vmap`` (over batches of point clouds), ``grad`` (w.r.t. both representations;
    CKA losses), ``torch.compile``.
    """
    if kernel not in KERNELS:
        raise GeometryError(f"unknown kernel {kernel!r}; choose one of {list(KERNELS)}.")
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0):
        raise GeometryError(f"sigma must be None (median heuristic) or a number > 0, got {sigma!r}.")
    _pre_n(x, y)
    prep = _gram(kernel, sigma)
    promote = _promoted_dtype(x, y)
    k, kb = _stack_of(x, "x", prep, promote)
    l, lb = _stack_of(y, "y", prep, promote)
    n = k.shape[-1]
    if debiased:
        _check_n(n, 4, "debiased=True (the unbiased HSIC)", "use debiased=False")
        kt, lt = (m * ~torch.eye(n, dtype=torch.bool, device=m.device) for m in (k, l))
        hxy = _uhsic(kt[:, None], lt[None])
        hxx, hyy = _uhsic(kt, kt), _uhsic(lt, lt)
    else:
        kc, lc = (
            m - m.mean(-1, keepdim=True) - m.mean(-2, keepdim=True) + m.mean((-1, -2), keepdim=True) for m in (k, l)
        )
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


def _pre_n(x, y) -> None:
    nx, ny = _n_of(x), _n_of(y)
    if nx is not None and ny is not None:
        _same_n(nx, ny)


# -------------------------------------------------------------------------------- information imbalance


@public("tdfunc.latent.information_imbalance")
def information_imbalance(
    x: torch.Tensor | TensorDictBase, y: torch.Tensor | TensorDictBase, *, k: int = 1, p: float = 2.0
) -> torch.Tensor:
    """Information imbalance Δ(x → y) (Glielmo et al., 2022) of every pair of representations in one call.

    .. math::
        \\Delta(A \\to B) = \\frac{2}{N} \\cdot \\frac{1}{N k} \\sum_i \\sum_{j:\\, r^A_{ij} \\le k} r^B_{ij}

    with :math:`r^A_{ij}` the rank of :math:`j` among the neighbours of :math:`i` in space A (1 =
    nearest) under the Minkowski distance :math:`\\lVert a_i - a_j \\rVert_p`.  Δ ≈ 0 when A's
    neighbours are B's neighbours (A predicts B; exactly ``(k+1)/N`` for
    ``y = x``), Δ ≈ 1 when they are unrelated.  ``k = 1`` is the paper's definition and equals
    tdhook's ``InformationImbalanceEstimator`` (``a_to_b``).  Ranks are piecewise constant: no
    useful gradient.  Distances are ``torch.cdist``'s (tdhook's), and equal distances are ranked by
    index; for ``p = 2`` and ``N > 25`` cdist uses the Gram form, whose rounding can order exactly tied
    distances of non-integer data arbitrarily (as in tdhook).  Integer and bool inputs are promoted as
    in :func:`cka` (tdhook's rule).

    Args:
        x: the source representations A: ``(N, D1)``, ``(..., N, D1)`` or a TensorDict of ``(N, D)``.
        y: the target representations B, same N.
        k: neighbours per point in A (``N >= k + 1``).
        p: order of the Minkowski distance in both spaces, ``p > 0`` (``1``: Manhattan, ``2``:
            Euclidean, ``math.inf``: Chebyshev; tdhook's ``p``).

    Returns:
        ``(*x_batch, *y_batch)``: Δ(x_a → y_b) for every pair; ``information_imbalance(y, x, ...)``
        gives the other direction.

    Raises:
        GeometryError: input not (…, N, D) real tensors, different N, ``k < 1``, ``N < k + 1``,
            ``p <= 0``.

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
        >>> float(ii(x, x.flip(-1), p=1)) == 2 / 300  # Manhattan neighbours
        True

    References:
        Glielmo, Zeni, Cheng, Csányi, Laio. Ranking the information content of distance measures.
        PNAS Nexus 2022.

    Composes with: ``vmap`` (over batches of point clouds), ``torch.compile``.
    """
    _check_int("k", k, 1)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
        raise GeometryError(f"p must be a number > 0 (the Minkowski order; 2 is Euclidean), got {p!r}.")
    _pre_n(x, y)
    promote = _promoted_dtype(x, y)
    da, ab = _stack_of(x, "x", _minkowski(p), promote)
    db, bb = _stack_of(y, "y", _minkowski(p), promote)
    n = da.shape[-1]
    _check_n(n, k + 1, f"k={k}")
    eye = torch.eye(n, dtype=torch.bool, device=da.device)
    if k == 1:  # argmin returns the first (lowest-index) of tied minima
        nn_a = da.masked_fill(eye, math.inf).argmin(-1, keepdim=True)
    else:  # (R1, N, k); ties: lower index
        nn_a = da.masked_fill(eye, -math.inf).argsort(dim=-1, stable=True)[..., 1 : k + 1]
    order_b = db.masked_fill(eye, -math.inf).argsort(dim=-1, stable=True)
    ranks_b = torch.scatter(
        torch.zeros_like(order_b),
        -1,
        order_b,  # (R2, N, N); self 0, nearest 1
        torch.arange(n, device=db.device).expand_as(order_b),
    )
    r1, r2 = nn_a.shape[0], ranks_b.shape[0]
    picked = torch.gather(ranks_b[None].expand(r1, r2, n, n), 3, nn_a[:, None].expand(r1, r2, n, k))
    out = picked.to(da.dtype).mean((-1, -2)) * (2.0 / n)
    return out.reshape((*ab, *bb))
