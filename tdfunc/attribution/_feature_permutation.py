"""Permutation feature importance (Breiman, 2001), captum's ``FeaturePermutation``.

Each feature group is replaced by its values in the other examples of the batch (a permutation of the
first batch dim, never the identity); the perturbed inputs ``where(M_g, x[π_g], x)`` are one stacked
tensor evaluated by one ``vmap``-ed call of ``f`` (``chunk_size`` features at a time), as the other
perturbation methods.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tensordict import TensorDict, TensorDictBase

from .._checks import check_bool, check_callable, check_chunk_size, check_generator, check_randomness
from .._errors import public, shape_str
from .._types import InKeys, PerKey
from ._common import AttributionError, check_output, prepare, result
from ._perturb_common import feature_masks, run_perturbed

__all__ = ["feature_permutation"]


def _draw_permutations(n_feat: int, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """captum's ``_permute_feature``: ``torch.randperm(n)`` per feature, drawn again while it is the identity."""
    rows, same = [], torch.arange(n)
    for _ in range(n_feat):
        perm = torch.randperm(n, generator=generator)
        while bool((perm == same).all()):
            perm = torch.randperm(n, generator=generator)
        rows.append(perm)
    return torch.stack(rows) if rows else torch.zeros(0, n, dtype=torch.long)


def _check_permutations(perms, n_feat: int, n: int) -> torch.Tensor:
    want = shape_str((n_feat, n))
    if (
        not isinstance(perms, torch.Tensor)
        or perms.is_floating_point()
        or perms.is_complex()
        or perms.dtype == torch.bool
    ):
        got = type(perms).__name__ if not isinstance(perms, torch.Tensor) else f"a {perms.dtype} tensor"
        raise AttributionError(f"permutations must be an integer tensor of shape {want}, got {got}.")
    if tuple(perms.shape) != (n_feat, n):
        raise AttributionError(
            f"permutations has shape {shape_str(perms.shape)}; expected {want} (n_features, batch size)."
        )
    if not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is None:  # values readable
        if not bool((perms.sort(1).values == torch.arange(n, device=perms.device)).all()):
            raise AttributionError(f"every row of permutations must hold each example index 0 .. {n - 1} exactly once.")
    return perms


@public("tdfunc.feature_permutation")
def feature_permutation(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    *,
    feature_mask: PerKey | None = None,
    generator: torch.Generator | None = None,
    permutations: torch.Tensor | None = None,
    in_keys: InKeys | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    randomness: str = "error",
) -> TensorDict:
    """Permutation feature importance (Breiman, 2001), captum's ``FeaturePermutation``.

    .. math::  A_{b,k}(x)_i = f_k(x)_b - f_k(x^{(g(i))})_b,
        \\qquad x^{(g)} = x \\text{ with every position of feature } g \\text{ taken from example } \\pi_g(b)

    where ``π_g`` is a permutation of the examples (the first batch dim) drawn per feature with
    ``torch.randperm`` (drawn again while it is the identity, as captum).  Feature ids are the distinct
    values of ``feature_mask`` over every input (an id used in two inputs permutes both with the same
    ``π_g``, keeping them aligned; captum draws one permutation per input there).  The ``n_features``
    inputs are one stacked tensor evaluated by one ``vmap``-ed call of ``f`` (``chunk_size`` features at a
    time).  The attribution of an example depends on the others: it is a statistic of the batch.

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)``, or one value for
            the whole batch (shape ``()``, e.g. the loss of a batch: captum's scalar forward).  Then what is
            attributed is that value's change, ``f(x) - f(x^(g))`` at every position of feature ``g``: one
            map of the batch, the same for every example (expanded to the batch shape; captum returns it
            with a batch dim of 1).
        td: the inputs, at least 2 examples along the first batch dim.
        feature_mask: integer feature ids per input, broadcastable to the input (see
            :func:`tdfunc.feature_ablation`); default every scalar its own feature.
        generator: random generator of the permutations (default: torch's global one; captum's draws
            after ``torch.manual_seed(s)`` when ``generator`` is seeded with ``s`` and each feature lies in
            one input).
        permutations: an integer tensor ``(n_features, batch size)`` of permutations to use instead of
            drawing them, row ``j`` for the ``j``-th smallest feature id (no random op: for ``vmap`` and
            ``torch.compile``).
        in_keys: entries to attribute; default every floating-point entry (integer / bool entries, e.g.
            token ids, when named here).
        chunk_size: features per forward; bounds memory to ``chunk_size`` copies of the inputs.
        progress: show a tqdm bar on stderr over the chunks of features (one step when ``chunk_size``
            is None); never shown under ``vmap`` / ``grad`` / ``torch.compile``.
        randomness: ``torch.func.vmap``'s flag for random ops in ``f`` (train-mode dropout) under this
            method's ``vmap``: ``"error"`` (default, as torch), ``"different"`` (independent draws per feature)
            or ``"same"`` (one draw shared).

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) + feature shape``.

    Raises:
        AttributionError: a batch of fewer than 2 examples (or an empty batch shape), ``permutations``
            of the wrong shape or values, a bad feature_mask, unknown key, ``f`` output of the wrong shape.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> lin = torch.nn.Linear(3, 1)
        >>> td = TensorDict({"x": torch.randn(4, 3)}, batch_size=[4])
        >>> perms = torch.tensor([[1, 0, 3, 2]] * 3)  # swap examples 0 <-> 1 and 2 <-> 3 in every feature
        >>> out = tdfunc.feature_permutation(lambda t: lin(t["x"])[:, 0], td, permutations=perms)
        >>> torch.allclose(out["attr", "x"], (td["x"] - td["x"][[1, 0, 3, 2]]) * lin.weight, atol=1e-6)
        True

    References:
        Breiman. Random Forests. Machine Learning, 2001; Fisher, Rudin, Dominici. All Models are Wrong,
        but Many are Useful. JMLR 2019.

    Composes with: ``vmap`` and ``torch.compile(fullgraph=True)`` given ``permutations`` and the default
    mask, ``grad`` (double backward).
    """
    check_callable("f", f, AttributionError, expected="f(td) -> Tensor")
    check_chunk_size(chunk_size, AttributionError)
    check_generator(generator, AttributionError)
    check_bool("progress", progress, AttributionError)
    check_randomness(randomness, AttributionError)
    p = prepare(td, in_keys, baselines=False, integer_inputs=True)
    if not len(p.batch) or p.batch[0] < 2:
        raise AttributionError(
            f"td has batch shape {shape_str(p.batch)}; permuting a feature needs at least 2 examples along the "
            "first batch dim. Attribute a batch (TensorDict({...}, batch_size=[n]) with n >= 2)."
        )
    nb, n_ex = len(p.batch), int(p.batch[0])
    masks = feature_masks(feature_mask, p)
    dev = next(iter(p.x.values())).device
    if feature_mask is None:
        ids = torch.arange(sum(math.prod(p.x[key].shape[nb:]) for key in p.keys), device=dev)
    else:
        ids = torch.unique(torch.cat([m.flatten().to(dev) for m in masks.values()]))
    n = int(ids.numel())
    if permutations is None:
        perms = _draw_permutations(n, n_ex, generator).to(dev)
    else:
        perms = _check_permutations(permutations, n, n_ex).to(dev)
    y0 = f(td)
    k = check_output(y0, p.batch, p.x, batch_value=True)

    def masks_for(lo, hi):
        cur = ids[lo:hi]
        return {key: m.unsqueeze(0) == cur.view(-1, *([1] * m.dim())) for key, m in masks.items()}

    def values_for(lo, hi):  # (chunk, *x.shape): the batch in each feature's permuted order
        return {key: x[perms[lo:hi]] for key, x in p.x.items()}

    _, total = run_perturbed(
        f, td, p, n, chunk_size, masks_for, y0, progress=progress, randomness=randomness, values_for=values_for
    )
    attrs = {}
    for key, t in total.items():
        x = p.x[key]
        want = (*x.shape[:nb], *(() if k is None else (k,)), *x.shape[nb:])
        attrs[key] = t.expand(want) if tuple(t.shape) != want else t
    return result(td.batch_size, attrs, warn=True)
