"""What the perturbation methods share (occlusion, feature ablation, Shapley value sampling, kernel SHAP).

Perturbed inputs ``where(M_j, baseline, x)`` built from boolean masks and evaluated by one ``vmap``-ed call
of ``f`` (``chunk_size`` at a time); feature masks, the feature count, per-feature values spread back to
every input position, and the common setup of the two coalition samplers (Shapley sampling, kernel SHAP).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tensordict import TensorDictBase
from torch.func import vmap

from .._checks import (
    check_bool,
    check_chunk_size,
    check_generator,
    check_int,
    check_randomness,
    per_input,
    random_op_error,
)
from .._errors import here, shape_str
from .._progress import progress_bar
from ._common import AttributionError, Inputs, _show, prepare, with_inputs

__all__ = ["run_perturbed", "feature_masks", "n_features", "per_position", "sampling_setup", "check_draws"]


def run_perturbed(
    f: Callable,
    td: TensorDictBase,
    p: Inputs,
    n: int,
    chunk_size: int | None,
    masks_for: Callable,
    y0=None,
    *,
    progress: bool = False,
    randomness: str = "error",
    values_for: Callable | None = None,
):
    """Evaluate ``f`` on the ``n`` perturbed inputs ``where(M_j, baseline, x)``, vmapped over ``j``.

    ``masks_for(start, stop)`` gives, for the perturbations ``start .. stop - 1``, key -> bool mask of
    shape ``(stop - start, *s)`` with ``s`` broadcastable to the input (keys left out are not perturbed).
    Returns the stacked outputs ``(n, *batch (+ K))`` and, when ``y0`` is given,
    ``sum_j (y0 - y_j) * M_j`` per key (``batch (+ K) + feature shape``).  ``progress``: a tqdm bar
    named ``fn`` over the chunks (nothing under ``vmap`` / ``grad`` / compile).  ``values_for(start, stop)``:
    key -> the values ``(stop - start, *x.shape)`` put where the masks hold, instead of the baseline
    (feature permutation: the batch permuted).
    """
    nb = len(p.batch)
    chunk = n if chunk_size is None else min(chunk_size, n)
    ys, total = [], {}  # type: ignore[var-annotated]
    vmapped = vmap(lambda xs: f(with_inputs(td, xs)), randomness=randomness)

    def call(xs):
        try:
            return vmapped(xs)
        except RuntimeError as e:
            err = random_op_error(e, AttributionError)
            if err is None:
                raise
            raise err from e

    starts = range(0, n, chunk) if n else range(1)  # n == 0 (no feature): one empty chunk, no perturbed call
    for start in progress_bar(starts, enabled=progress, desc=here(), unit="chunk"):
        masks = masks_for(start, min(start + chunk, n))
        if n == 0:
            y = f(td).unsqueeze(0)[:0]  # an empty stack of f's output
        else:
            put = p.baseline if values_for is None else values_for(start, min(start + chunk, n))
            xs = {k: torch.where(m, put[k], p.x[k]) for k, m in masks.items()}
            y = call(xs)
        ys.append(y)
        if y0 is None:
            continue
        diff = y0 - y  # (c, *batch (+ K))
        for k, m in masks.items():
            mm = m.to(diff.dtype)  # (c, *batch or 1s, *feat)
            if diff.dim() > nb + 1:  # a target dim: masks broadcast over it
                mm = mm.unsqueeze(nb + 1)
            d = diff.reshape(*diff.shape, *([1] * (mm.dim() - diff.dim())))  # also one value per batch: (c,)
            part = (d * mm).sum(0)
            total[k] = part if k not in total else total[k] + part
    return torch.cat(ys) if len(ys) > 1 else ys[0], total


def feature_masks(feature_mask, p: Inputs, what: str = "the input") -> dict:
    """key -> integer mask of the input's number of dims, broadcastable to it (default: one id per scalar)."""
    nb = len(p.batch)
    if feature_mask is None:
        out, offset = {}, 0
        for key in p.keys:
            x = p.x[key]
            feat = tuple(x.shape[nb:])
            m = math.prod(feat)
            out[key] = torch.arange(offset, offset + m, device=x.device).view(*([1] * nb), *feat)
            offset += m
        return out
    given = per_input("feature_mask", feature_mask, p.keys, "integer mask", AttributionError)
    out = {}
    for key, m in given.items():
        x = p.x[key]
        if not isinstance(m, torch.Tensor) or m.is_floating_point() or m.is_complex() or m.dtype == torch.bool:
            what = type(m).__name__ if not isinstance(m, torch.Tensor) else f"a {m.dtype} tensor"
            raise AttributionError(
                f"feature_mask for {_show(key)} must be an integer tensor of feature ids, got {what}; "
                "e.g. torch.arange(n).view(shape)."
            )
        try:
            ok = m.dim() <= x.dim() and torch.broadcast_shapes(m.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise AttributionError(
                f"feature_mask for {_show(key)} has shape {shape_str(m.shape)} but {what} has shape "
                f"{shape_str(x.shape)}; give an integer mask broadcastable to {what} (batch + feature shape)."
            )
        out[key] = m.to(x.device).reshape(*([1] * (x.dim() - m.dim())), *m.shape)
    return out


def per_position(phi: torch.Tensor, masks: dict, p, k: int | None) -> dict:
    """Per-feature values ``phi`` (*batch (+ K), F) spread to every input position by its feature id."""
    nb = len(p.batch)
    attrs = {}
    for key, m in masks.items():
        x = p.x[key]
        idx = m.expand(x.shape).reshape(*x.shape[:nb], -1)  # (*batch, P)
        if k is not None:
            idx = idx.unsqueeze(nb).expand(*x.shape[:nb], k, idx.shape[-1])
        attrs[key] = phi.gather(-1, idx).reshape(*phi.shape[:-1], *x.shape[nb:])
    return attrs


def n_features(feature_mask, masks: dict, p) -> int:
    """Number of features: every scalar with the default mask, else max id + 1 (ids must be >= 0)."""
    nb = len(p.batch)
    if feature_mask is None:
        return sum(math.prod(p.x[key].shape[nb:]) for key in p.keys)
    lows = [int(m.min()) for m in masks.values() if m.numel()]
    if lows and min(lows) < 0:
        raise AttributionError(
            f"feature_mask has the negative id {min(lows)}; feature ids must be 0 .. n_features - 1."
        )
    return max((int(m.max()) for m in masks.values() if m.numel()), default=-1) + 1  # inputs of zero features: 0


def sampling_setup(
    td: TensorDictBase,
    in_keys,
    feature_mask,
    n_samples,
    chunk_size,
    generator,
    progress: bool = False,
    randomness: str = "error",
    baselines=None,
):
    """Checks and setup of a sampler over feature coalitions: ``(inputs, masks, device, n_features)``."""
    check_int("n_samples", n_samples, AttributionError)
    check_chunk_size(chunk_size, AttributionError)
    check_generator(generator, AttributionError)
    check_bool("progress", progress, AttributionError)
    check_randomness(randomness, AttributionError)
    p = prepare(td, in_keys, baselines_arg=baselines, integer_inputs=True)
    masks = feature_masks(feature_mask, p)
    dev = next(iter(p.x.values())).device
    return p, masks, dev, n_features(feature_mask, masks, p)


def check_draws(name: str, t, n_samples: int, n_feat: int, expected: str, ok: Callable) -> torch.Tensor:
    """A user's table of draws (coalitions, permutations): a tensor ``ok`` accepts, of shape (n_samples, n_features)."""
    want = shape_str((n_samples, n_feat))
    if not isinstance(t, torch.Tensor) or not ok(t):
        got = type(t).__name__ if not isinstance(t, torch.Tensor) else f"a {t.dtype} tensor"
        raise AttributionError(f"{name} must be {expected} of shape {want}, got {got}.")
    if tuple(t.shape) != (n_samples, n_feat):
        raise AttributionError(f"{name} has shape {shape_str(t.shape)}; expected {want} (n_samples, n_features).")
    return t
