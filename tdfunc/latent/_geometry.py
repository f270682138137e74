"""Representation geometry, batched over many representations at once: intrinsic dimension, CKA,
information imbalance.

Every function accepts one representation ``(N, D)`` (N points, e.g. the activations of N inputs
at one site), a stack ``(..., N, D)`` or a TensorDict ``{site: (N, D_site)}`` and computes all of
them in one batched call (no Python loop over representations).  Everything is pure torch, so the
functions run under ``vmap`` (over a batch of point clouds), ``grad`` and ``torch.compile``.

This module holds what they share (the error class, the input checks, distances and neighbours);
intrinsic dimensions are in :mod:`._dimension`, CKA and information imbalance in :mod:`._similarity`.
"""

from __future__ import annotations

import math

import torch
from tensordict import TensorDict, TensorDictBase

from .._checks import check_int
from .._finite import check_finite, readable
from ._common import LatentError

__all__ = ["GeometryError"]


class GeometryError(LatentError):
    """Bad input to a representation-geometry function (shape, too few points, unknown option)."""


# ---------------------------------------------------------------------------------------------- checks


def _check_points(x, what: str, promote: torch.dtype | None = None) -> torch.Tensor:
    """A floating (..., N, D) tensor; ``promote``: cast integer / bool points to this dtype instead of refusing them."""
    if not isinstance(x, torch.Tensor):
        raise GeometryError(
            f"{what} must be a tensor (N, D), a stack (..., N, D) or a TensorDict of (N, D) "
            f"representations, got {type(x).__name__}."
        )
    if x.dim() < 2:
        raise GeometryError(
            f"{what} has shape {tuple(x.shape)} but a representation is N points (N, D) or a stack "
            f"(..., N, D); for N scalar features use {what}.unsqueeze(-1)."
        )
    if promote is not None and not x.is_floating_point() and not x.is_complex():
        x = x.to(promote)
    if not x.is_floating_point():
        raise GeometryError(f"{what} has dtype {x.dtype}; pass a floating tensor ({what}.float()).")
    check_finite(what, x, GeometryError, "replace them (e.g. torch.nan_to_num) or drop those points")
    return x


def _check_int(name: str, v, lo: int) -> None:
    check_int(name, v, GeometryError, lo=lo)


def _check_n(n: int, need: int, why: str, fix: str = "lower k") -> None:
    if n < need:
        raise GeometryError(
            f"{why} needs at least {need} points per representation, got N={n}; pass more points or {fix}."
        )


def _per_rep(x, body, need: int, why: str):
    """``body((R, N, D)) -> (R, *rest)`` over a tensor (..., N, D) (result ``(..., *rest)``) or a TensorDict
    (same keys).

    ``rest`` is ``()`` for one number per representation, ``(N,)`` for per-point values.
    """
    if isinstance(x, TensorDictBase):
        out = TensorDict({}, batch_size=[])
        for key in x.keys(include_nested=True, leaves_only=True):
            out.set(key, _one(x.get(key), body, need, why, f"x[{key!r}]"))
        return out
    return _one(x, body, need, why, "x")


def _one(x, body, need, why, what):
    x = _check_points(x, what)
    _check_n(x.shape[-2], need, why)
    lead = x.shape[:-2]
    out = body(x.reshape(-1, *x.shape[-2:]))
    return out.reshape((*lead, *out.shape[1:]))


def _stack_of(x, what: str, prep, promote: torch.dtype | None = None) -> tuple[torch.Tensor, tuple]:
    """``prep((R, N, D)) -> (R, N, N)`` for a tensor (..., N, D) or a TensorDict of (N, D) leaves."""
    if isinstance(x, TensorDictBase):
        mats = []
        for key in x.keys(include_nested=True, leaves_only=True):
            t = _check_points(x.get(key), f"{what}[{key!r}]", promote)
            if t.dim() != 2:
                raise GeometryError(
                    f"{what}[{key!r}] has shape {tuple(t.shape)}; TensorDict entries must be "
                    "single representations (N, D) — pass a stacked tensor for (R, N, D)."
                )
            mats.append(t)
        if not mats:
            raise GeometryError(f"{what} is an empty TensorDict; give at least one representation.")
        ns = {m.shape[0] for m in mats}
        if len(ns) > 1:
            raise GeometryError(
                f"the entries of {what} have different N {sorted(ns)}; every representation "
                "must hold the same N inputs."
            )
        return torch.cat([prep(m[None]) for m in mats]), (len(mats),)
    x = _check_points(x, what, promote)
    return prep(x.reshape(-1, *x.shape[-2:])), tuple(x.shape[:-2])


def _leaves(v) -> list:
    if isinstance(v, TensorDictBase):
        return [v.get(k) for k in v.keys(include_nested=True, leaves_only=True)]
    return [v]


def _promoted_dtype(*xs) -> torch.dtype:
    """The dtype integer / bool points are cast to: the promotion of the floating inputs' dtypes, or torch's
    default float dtype when none is floating (tdhook's rule, with float32 the default)."""
    floats = [t.dtype for v in xs for t in _leaves(v) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floats:
        return torch.get_default_dtype()
    out = floats[0]
    for d in floats[1:]:
        out = torch.promote_types(out, d)
    return out


def _same_n(nx: int, ny: int) -> None:
    if nx != ny:
        raise GeometryError(
            f"x has N={nx} points but y has N={ny}; x and y must be representations of the "
            "same N inputs, in the same order."
        )


# ----------------------------------------------------------------------------------------- distances


def _sqdist(x: torch.Tensor) -> torch.Tensor:
    """(R, N, D) -> (R, N, N) squared distances (from the Gram matrix; exact zeros on the diagonal)."""
    x = x - x.mean(-2, keepdim=True)  # centring keeps the Gram form accurate
    sq = x.square().sum(-1)
    d2 = sq[..., :, None] + sq[..., None, :] - 2 * (x @ x.mT)
    eye = torch.eye(x.shape[-2], dtype=torch.bool, device=x.device)
    return d2.clamp_min(0).masked_fill(eye, 0)


def _check_duplicates(nearest: torch.Tensor, n: int, why: str) -> None:
    """Refuse points whose nearest neighbour is at distance 0 (``nearest``: (R, N) distances), where ``why``."""
    if readable(nearest) and bool((nearest == 0).any()):
        dup = int((nearest == 0).sum())
        raise GeometryError(
            f"{dup} of the N={n} points have a duplicate (a nearest neighbour at distance 0), "
            f"where {why}; remove duplicate points first (e.g. torch.unique(x, dim=0))."
        )


def _minkowski(p: float):
    """(R, N, D) -> (R, N, N) Minkowski distances of order ``p``: ``torch.cdist``, as tdhook computes them (for
    ``p = 2`` and more than 25 points torch takes the Gram form: fast, and exact on integer-valued data)."""
    return lambda x: torch.cdist(x, x, p=p)


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
