"""Pruning as masks over state: importance scores, mask selection (global / per tensor / structured), application."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch.func import grad

from .._errors import TdfuncTypeError, public, shape_str, suggest
from .._types import PruneScope
from ._common import TD, WeightError, check_td, dotted, float_keys, from_leaves, leaves, missing_entry, rebuild, select

__all__ = ["magnitude_scores", "snip_scores", "prune_masks", "apply_masks"]

SCOPES: tuple[PruneScope, ...] = ("global", "module")


@public("tdfunc.weights.magnitude_scores")
def magnitude_scores(state: TensorDictBase) -> TensorDict:
    """Magnitude importance: ``|w|`` for every floating-point entry of the state.

    .. math::  s_i = |\\theta_i|

    Args:
        state: a state TensorDict (:func:`tdfunc.state`).

    Returns:
        A TensorDict with the state's floating-point entries (same tree and shapes), ``|w|``.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> s = tdfunc.weights.magnitude_scores(tdfunc.state(net))
        >>> torch.equal(s["0", "weight"], net[0].weight.detach().abs())
        True

    Composes with: ``vmap`` (stacked states), ``grad``, ``torch.compile``.
    """
    state = check_td("state", state)
    flat = leaves(state)
    return from_leaves({k: flat[k].abs() for k in float_keys(flat)}, state.batch_size)


@public("tdfunc.weights.snip_scores")
def snip_scores(loss_fn: Callable[[TensorDictBase], torch.Tensor], state: TensorDictBase) -> TensorDict:
    """SNIP connection sensitivity: ``|dL/dw ⊙ w|`` with ``torch.func.grad`` over the state.

    .. math::  s_i = \\left| \\frac{\\partial L(\\theta)}{\\partial \\theta_i}\\, \\theta_i \\right|

    (the paper normalises by the sum over all weights; that does not change which weights are pruned).

    Args:
        loss_fn: ``loss_fn(state) -> scalar Tensor``, e.g. a minibatch loss through
            :func:`tdfunc.functional_call`.  Non-floating entries (step counters) are passed unchanged.
        state: the state to score.

    Returns:
        A TensorDict with the state's floating-point entries, the scores.

    Raises:
        WeightError: ``loss_fn`` does not return a scalar tensor.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> loss = lambda s: torch.nn.functional.cross_entropy(tdfunc.functional_call(net, s, (x,)), y)
        >>> scores = tdfunc.weights.snip_scores(loss, tdfunc.state(net))
        >>> masks = tdfunc.weights.prune_masks(tdfunc.state(net), scores, amount=0.5)
        >>> int(masks["0", "weight"].sum())
        6

    References:
        Lee, Ajanthan, Torr. SNIP: Single-shot Network Pruning based on Connection Sensitivity. ICLR 2019.

    Composes with: ``vmap`` (over data or stacked states), ``grad`` (double backward),
    ``torch.compile``.
    """
    if not callable(loss_fn):
        raise TdfuncTypeError(
            f"expected a callable loss_fn(state) -> scalar, got {type(loss_fn).__name__} ({loss_fn!r:.60})."
        )
    state = check_td("state", state)
    flat = leaves(state)
    keys = float_keys(flat)

    def loss(ws: dict) -> torch.Tensor:
        out = loss_fn(rebuild(state, ws))
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            got = f"shape {shape_str(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise WeightError(f"loss_fn must return a scalar tensor, got {got}; reduce it (e.g. .mean()).")
        return out

    g = grad(loss)({k: flat[k] for k in keys})
    return from_leaves({k: (g[k] * flat[k]).abs() for k in keys}, state.batch_size)


def _check_amount(amount: Any) -> list[float] | float:
    def one(a: Any) -> float:
        if isinstance(a, bool) or not isinstance(a, (int, float)):
            raise TdfuncTypeError(
                f"amount must be a Python number in [0, 1] (or a list of them), "
                f"got {type(a).__name__} ({a!r:.60}); "
                "the number of pruned entries fixes the mask, so it cannot be a traced tensor."
            )
        if not 0.0 <= float(a) <= 1.0:
            raise WeightError(
                f"amount must be a fraction in [0, 1], got {a!r}; e.g. amount=0.3 prunes 30% of the selected "
                "entries (unlike torch.nn.utils.prune, an int is not a count)."
            )
        return float(a)

    if isinstance(amount, (list, tuple)):
        if not amount:
            raise WeightError(f"amount is an empty {type(amount).__name__}; give a fraction or a non-empty list.")
        return [one(a) for a in amount]
    return one(amount)


def _structured(name: str, s: torch.Tensor, amount: float, dim: int, p: float) -> torch.Tensor:
    if s.dim() < 2:
        raise WeightError(
            f"structured pruning needs tensors with >= 2 dims, but {name!r} has shape {shape_str(s.shape)}; "
            "leave it out with include=[...]."
        )
    if not -s.dim() <= dim < s.dim():
        raise WeightError(
            f"structured_dim={dim} is out of range for {name!r} of shape {shape_str(s.shape)}; "
            f"give a dim in [{-s.dim()}, {s.dim() - 1}] (0: output units of a Linear/Conv weight)."
        )
    dim = dim % s.dim()
    n = s.shape[dim]
    n_prune = round(amount * n)  # torch.nn.utils.prune._compute_nparams_toprune
    shape = [1] * s.dim()
    shape[dim] = n
    if n_prune == 0:
        return torch.ones_like(s, dtype=torch.bool)
    norm = torch.norm(s, p=p, dim=[d for d in range(s.dim()) if d != dim])  # prune._compute_norm
    keep = torch.topk(norm, k=n - n_prune, largest=True).indices  # as prune.LnStructured
    chan = torch.zeros(n, dtype=torch.bool, device=s.device).scatter(0, keep, True)
    return chan.view(shape).expand(s.shape).contiguous()


def _unstructured(s: torch.Tensor, amount: float) -> torch.Tensor:
    n_prune = round(amount * s.numel())  # torch.nn.utils.prune._compute_nparams_toprune
    flat = s.reshape(-1)
    if n_prune == 0:
        return torch.ones_like(flat, dtype=torch.bool)
    drop = torch.topk(flat.abs(), k=n_prune, largest=False).indices  # as prune.L1Unstructured
    return torch.ones_like(flat, dtype=torch.bool).scatter(0, drop, False)


def _masks_one(flat_scores, keys, amount, scope, structured_dim, p) -> dict:
    if structured_dim is not None:
        return {k: _structured(dotted(k), flat_scores[k], amount, structured_dim, p) for k in keys}
    if scope == "module":
        return {k: _unstructured(flat_scores[k], amount).view(flat_scores[k].shape) for k in keys}
    vec = torch.cat([flat_scores[k].reshape(-1) for k in keys])  # parameters_to_vector order
    mask = _unstructured(vec, amount)
    out, start = {}, 0
    for k in keys:
        n = flat_scores[k].numel()
        out[k] = mask[start : start + n].view(flat_scores[k].shape)
        start += n
    return out


@public("tdfunc.weights.prune_masks")
def prune_masks(
    state: TensorDictBase,
    scores: TensorDictBase,
    *,
    amount: float | Sequence[float],
    scope: PruneScope = "global",
    structured_dim: int | None = None,
    p: float = 2,
    include: Sequence[str] | str | None = None,
) -> TensorDict:
    """Boolean pruning masks (``True`` = kept) over the state's tree, from importance scores.

    .. math::  m_i = \\mathbb{1}[\\, i \\notin \\mathrm{bottom}_k(|s|) \\,],
        \\qquad k = \\mathrm{round}(\\mathrm{amount} \\cdot n)

    * ``scope="global"``: the lowest-``|score|`` fraction of *all* selected entries together
      (``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``);
    * ``scope="module"``: that fraction of each tensor separately (``prune.l1_unstructured``);
    * ``structured_dim=d`` (with ``scope="module"``): whole slices along ``d`` with the lowest
      ``p``-norm of their scores (``prune.ln_structured(n=p, dim=d)``).

    ``k`` is Python's ``round`` (half to even) of ``amount * n`` and ties are broken by
    ``torch.topk``, exactly as ``torch.nn.utils.prune`` does, so the masks equal its choices on
    the same scores (global order: the selected entries in state order).

    Args:
        state: the state whose tree the masks mirror.
        scores: importance scores, e.g. :func:`tdfunc.weights.magnitude_scores` or :func:`tdfunc.weights.snip_scores`
            or any TensorDict with the selected entries' shapes.
        amount: fraction in [0, 1] to prune, or a list of fractions: masks for each, stacked on a
            new leading dim (vmap over them to sweep sparsity levels).
        scope: ``"global"`` or ``"module"`` (per tensor).
        structured_dim: prune slices along this dim (per tensor; needs ``scope="module"``).
        p: norm of the slices for structured pruning.
        include: entries to prune (dotted names, module names or globs such as ``"**.weight"``);
            default: every floating-point tensor with >= 2 dims (weights; biases and norms stay dense).

    Returns:
        A TensorDict of bool masks with the selected entries only (others are left alone by
        :func:`tdfunc.weights.apply_masks`).

    Raises:
        WeightError: ``amount`` outside [0, 1], ``structured_dim`` out of range, unknown ``include``
            entry, ``scores`` missing an entry or of another shape, unknown ``scope``.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> state = tdfunc.state(net)
        >>> masks = tdfunc.weights.prune_masks(state, tdfunc.weights.magnitude_scores(state), amount=[0.25, 0.5, 0.9])
        >>> pruned = torch.func.vmap(tdfunc.weights.apply_masks, in_dims=(None, 0))(state, masks)
        >>> zeros = lambda w: (w == 0).flatten(1).sum(1)
        >>> (zeros(pruned["0", "weight"]) + zeros(pruned["2", "weight"])).tolist()
        [12, 24, 43]

    References:
        Han, Pool, Tran, Dally. Learning both Weights and Connections for Efficient Neural Networks. NeurIPS 2015.

    Composes with: ``vmap`` (over scores or stacked states; amounts are Python numbers), ``torch.compile``;
    masks stacked over amounts vmap through :func:`tdfunc.weights.apply_masks`.
    """
    state = check_td("state", state)
    scores = check_td("scores", scores)
    amounts = _check_amount(amount)
    if scope not in SCOPES:
        raise WeightError(
            f"unknown scope {scope!r}; choose 'global' (all selected entries together) or 'module' (per tensor)."
        )
    if structured_dim is not None:
        if isinstance(structured_dim, bool) or not isinstance(structured_dim, int):
            raise TdfuncTypeError(
                f"structured_dim must be an int or None, got {type(structured_dim).__name__} ({structured_dim!r:.60})."
            )
        if scope != "module":
            raise WeightError(
                f"structured pruning (structured_dim={structured_dim}) ranks slices within each tensor; "
                "pass scope='module'."
            )
    flat = leaves(state)
    if include is None:
        keys = [k for k, v in flat.items() if v.is_floating_point() and v.dim() >= 2]
        if not keys:
            raise WeightError(
                "the state has no floating-point tensor with >= 2 dims; name the entries with include=[...]."
            )
    else:
        keys = [k for k in select("include", flat, include) if flat[k].is_floating_point()]
    flat_scores = leaves(scores)
    for k in keys:
        if k not in flat_scores:
            raise WeightError(
                f"scores has no entry {dotted(k)!r}, which is selected for pruning."
                f"{suggest(dotted(k), [dotted(j) for j in flat_scores])} "
                "Compute scores on the same state (tdfunc.weights.magnitude_scores(state)) or narrow include=[...]."
            )
        if flat_scores[k].shape != flat[k].shape:
            raise WeightError(
                f"scores for {dotted(k)!r} have shape {shape_str(flat_scores[k].shape)} but the state entry has "
                f"shape {shape_str(flat[k].shape)}; give one score per weight."
            )
    if isinstance(amounts, list):
        per = [_masks_one(flat_scores, keys, a, scope, structured_dim, p) for a in amounts]
        return from_leaves({k: torch.stack([m[k] for m in per]) for k in keys}, (len(amounts),))
    return from_leaves(_masks_one(flat_scores, keys, amounts, scope, structured_dim, p))


@public("tdfunc.weights.apply_masks")
def apply_masks(state: TD, masks: TensorDictBase) -> TD:
    """A new state with the masked entries multiplied by their masks (others unchanged).

    .. math::  \\theta'_i = \\theta_i \\cdot m_i

    A multiplication, so it is differentiable in ``state`` and in float (soft) masks, and vmaps over
    stacked masks: ``vmap(apply_masks, in_dims=(None, 0))(state, masks)`` gives one state per level.

    Args:
        state: a state TensorDict.
        masks: a TensorDict whose entries are entries of ``state`` (a sub-tree), bool or floating,
            each of the entry's shape (or broadcastable to it).

    Returns:
        A new TensorDict; ``state`` is not written.

    Raises:
        WeightError: a mask names no entry of the state, has a shape that does not broadcast to
            the entry, or has a non-bool, non-float dtype.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2))
        >>> state = tdfunc.state(net)
        >>> masks = tdfunc.weights.prune_masks(state, tdfunc.weights.magnitude_scores(state), amount=0.5)
        >>> new = tdfunc.weights.apply_masks(state, masks)
        >>> int((new["0", "weight"] == 0).sum()), bool((state["0", "weight"] != 0).all())
        (3, True)

    Composes with: ``vmap`` (over stacked masks or states), ``grad`` (w.r.t. state or float masks,
    double backward), ``torch.compile``.
    """
    state = check_td("state", state)
    masks = check_td("masks", masks)
    flat, flat_m = leaves(state), leaves(masks)
    new = {}
    for k, m in flat_m.items():
        if k not in flat:
            raise missing_entry(
                k,
                flat,
                f"masks has entry {dotted(k)!r}, which is not in the state.",
                "Masks must mirror the state's tree (build them with tdfunc.weights.prune_masks(state, ...)).",
            )
        t = flat[k]
        if m.dtype != torch.bool and not m.is_floating_point():
            raise WeightError(f"mask for {dotted(k)!r} has dtype {m.dtype}; use a bool or floating-point mask.")
        ok = m.dim() <= t.dim() and all(a == b or a == 1 for a, b in zip(m.shape[::-1], t.shape[::-1]))
        if not ok:
            raise WeightError(
                f"mask for {dotted(k)!r} has shape {shape_str(m.shape)} but the state entry has shape "
                f"{shape_str(t.shape)}; masks must mirror the state's tree and shapes (to apply stacked masks, "
                "vmap over them: torch.func.vmap(tdfunc.weights.apply_masks, in_dims=(None, 0)))."
            )
        new[k] = t * m.to(t.dtype)
    return rebuild(state, new)
