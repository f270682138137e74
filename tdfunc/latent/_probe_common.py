"""What the probe fits share: the error class, input checks, the train/test split and the metrics."""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase

from .._checks import check_int
from .._finite import check_finite
from .._types import ProbeKind
from ._common import LatentError

__all__ = ["ProbeError", "KINDS"]

KINDS: tuple[ProbeKind, ...] = ("linear", "bilinear", "low_rank_bilinear", "mean_difference")


class ProbeError(LatentError):
    """Bad input to a probing function (unknown kind, shapes, labels, split)."""


# ---------------------------------------------------------------------------------------------- checks


def _check_kind(kind, rank) -> None:
    if kind not in KINDS:
        raise ProbeError(f"unknown kind {kind!r}; choose one of {list(KINDS)}.")
    if kind == "low_rank_bilinear" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ProbeError(
            f"kind 'low_rank_bilinear' needs rank, an integer >= 1, got {rank!r}; "
            "pass rank=... (the rank r of W = U V^T)."
        )


def _check_int(name: str, v, lo: int) -> None:
    check_int(name, v, ProbeError, lo=lo)


def _check_x(x, what: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        got = f"shape {tuple(x.shape)} dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ProbeError(
            f"{what} must be a floating tensor (..., D) of activations, got {got}; "
            f"flatten and cast it first ({what}.flatten(1).float())."
        )
    check_finite(what, x, ProbeError, "replace them (e.g. torch.nan_to_num) or drop those rows")
    return x


def _pair(x) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ProbeError(
                f"a bilinear probe takes x = (x1, x2) or one tensor (x1 = x2), got a "
                f"{type(x).__name__} of {len(x)} items."
            )
        return _check_x(x[0], "x[0]"), _check_x(x[1], "x[1]")
    x = _check_x(x)
    return x, x


def _check_labels(y, n: int, what: str = "x") -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        got = f"shape {tuple(y.shape)} dtype {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ProbeError(f"y must be a 1-D integer tensor of class indices, got {got}; pass y.long() of shape (N,).")
    if y.shape[0] != n:
        raise ProbeError(f"y has {y.shape[0]} labels but {what} has N={n} rows; give one label per row.")
    return y


def _n_classes(y: torch.Tensor, n_classes) -> int:
    if y.numel() == 0:
        raise ProbeError("y is empty; fitting a probe needs labelled examples.")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise ProbeError(f"y holds the negative label {lo}; labels are class indices 0..C-1.")
    if n_classes is None:
        return max(hi + 1, 2)
    _check_int("n_classes", n_classes, 2)
    if hi >= n_classes:
        raise ProbeError(f"y holds label {hi} but n_classes={n_classes}; pass n_classes > {hi}.")
    return n_classes


def _check_fraction(v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise ProbeError(f"test_fraction must be a number strictly between 0 and 1, got {v!r}.")


# ------------------------------------------------------------------------------------ sites and metrics


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; ``F.cross_entropy`` is ~30x slower under ``torch.func.grad`` on the CPU."""
    return -torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).mean()


def _sites(acts) -> list:
    if not isinstance(acts, TensorDictBase):
        raise ProbeError(
            f"acts must be a TensorDict {{site: (N, D_site)}} (e.g. the captures of "
            f"tdfunc.functional_call), got {type(acts).__name__}."
        )
    keys = list(acts.keys(include_nested=True, leaves_only=True))
    if not keys:
        raise ProbeError("acts is an empty TensorDict; capture at least one site.")
    for k in keys:
        t = _check_x(acts.get(k), f"acts[{k!r}]")
        if t.dim() != 2:
            raise ProbeError(
                f"acts[{k!r}] has shape {tuple(t.shape)}; every site must be (N, D_site) — "
                "flatten it first (acts.apply(lambda t: t.flatten(1)))."
            )
    return keys


def _split(acts, keys, y, test_fraction, generator):
    _check_fraction(test_fraction)
    n = acts.get(keys[0]).shape[0]
    for k in keys:
        _check_labels(y, acts.get(k).shape[0], f"acts[{k!r}]")
    if n < 2:
        raise ProbeError(f"a train/test split needs at least 2 examples, got N={n}.")
    n_test = min(max(round(test_fraction * n), 1), n - 1)
    perm = torch.randperm(n, generator=generator).to(y.device)
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def _key(site) -> tuple:
    return site if isinstance(site, tuple) else (site,)


def _metrics(logits: torch.Tensor, y: torch.Tensor) -> TensorDict:
    acc = (logits.argmax(-1) == y).to(logits.dtype).mean()
    return TensorDict({"accuracy": acc, "loss": _cross_entropy(logits, y)}, batch_size=[])
