"""Perturbation attribution: occlusion, feature ablation, Shapley value sampling (captum's definitions).

Every perturbed input is built as one stacked tensor ``(n_perturbations, *x.shape)`` from boolean
masks ``M_j`` (``x_j = where(M_j, baseline, x)``) and evaluated by one ``vmap``-ed call of ``f``
over the perturbations (``chunk_size`` of them at a time), instead of captum's Python loop of
forwards.  ``f`` always sees ``td``'s batch shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from tensordict import TensorDict, TensorDictBase

from .._checks import check_bool, check_callable, check_chunk_size, check_randomness, per_input
from .._errors import public, shape_str
from .._types import InKeys, Key, PerKey
from ._common import AttributionError, Baselines, Inputs, _show, check_output, prepare, result, with_inputs
from ._perturb_common import check_draws, feature_masks, per_position, run_perturbed, sampling_setup

__all__ = ["occlusion", "feature_ablation", "shapley_value_sampling"]


def _expand_attr(t: torch.Tensor, x: torch.Tensor, k: int | None, nb: int) -> torch.Tensor:
    want = (*x.shape[:nb], *(() if k is None else (k,)), *x.shape[nb:])
    return t.expand(want) if tuple(t.shape) != want else t


def _baseline_outputs(f: Callable, td: TensorDictBase, p: Inputs):
    y0 = f(td)
    return y0, check_output(y0, p.batch, p.x, batch_value=True)  # also one value for the batch (captum's scalar)


# ---------------------------------------------------------------------------------------------- occlusion


def _as_tuple(name: str, v, key, ndim: int) -> tuple:
    if isinstance(v, bool):
        raise AttributionError(f"{name} for {_show(key)} must be a tuple of integers, got {v!r}.")
    if isinstance(v, int) and name == "strides":
        return (v,) * ndim
    if isinstance(v, torch.Size) or (
        isinstance(v, (tuple, list)) and all(isinstance(s, int) and not isinstance(s, bool) for s in v)
    ):
        return tuple(int(s) for s in v)
    raise AttributionError(f"{name} for {_show(key)} must be a tuple of integers, got {v!r}.")


def _window_tables(key, feat: tuple, window, stride, device) -> tuple[list, list]:
    """Per feature dim, the (count, size) table of which positions each window shift covers."""
    window = _as_tuple("sliding_window_shapes", window, key, len(feat))
    stride = _as_tuple("strides", 1 if stride is None else stride, key, len(feat))
    if len(window) != len(feat):
        example = shape_str((1,) * len(feat)) if feat else "()"
        raise AttributionError(
            f"sliding window {window!r} for {_show(key)} has {len(window)} dims, but the input's feature "
            f"shape {shape_str(feat)} has {len(feat)}; give one window size per feature dim, e.g. {example}."
        )
    if any(w < 1 or w > d for w, d in zip(window, feat)):
        raise AttributionError(
            f"sliding window {window!r} for {_show(key)} does not fit the feature shape "
            f"{shape_str(feat)}; every window size must be between 1 and the feature size."
        )
    if len(stride) != len(feat) or any(s < 1 for s in stride):
        raise AttributionError(
            f"strides {stride!r} for {_show(key)} must be one integer >= 1 per feature dim "
            f"({len(feat)} dims) or a single integer >= 1."
        )
    tables, counts = [], []
    for i, (d, w, s) in enumerate(zip(feat, window, stride)):
        if w < d and s > w:
            raise AttributionError(
                f"stride {s} exceeds the window size {w} in feature dim {i} of {_show(key)}; the windows "
                "would skip elements (captum's rule): use strides <= window sizes."
            )
        c = math.ceil((d - w) / s) + 1  # captum's shift count; the last window may be cut at the edge
        pos = torch.arange(d, device=device)
        off = (torch.arange(c, device=device) * s)[:, None]
        tables.append((pos >= off) & (pos < off + w))
        counts.append(c)
    return tables, counts


@public("tdfunc.occlusion")
def occlusion(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    *,
    sliding_window_shapes: Mapping[Key, Sequence[int]] | Sequence[int],
    strides: Mapping[Key, Sequence[int] | int] | Sequence[int] | int | None = None,
    in_keys: InKeys | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    randomness: str = "error",
    baselines: Baselines | None = None,
    keep_window: bool = False,
) -> TensorDict:
    """Occlusion (Zeiler & Fergus, 2014), captum's ``Occlusion``: slide a window of baseline values.

    .. math::
        A_{b,k}(x)_i = \\frac{1}{|\\{w : i \\in w\\}|} \\sum_{w \\ni i}
            \\big(f_k(x)_b - f_k(x^{(w)})_b\\big),
        \\qquad x^{(w)} = x \\text{ with the window } w \\text{ set to the baseline}

    Windows of ``sliding_window_shapes`` start at multiples of ``strides`` in every feature dim
    (``ceil((d - w) / s) + 1`` shifts, the last one cut at the edge, as captum); each input has its
    own windows.  All ``n_windows`` occluded inputs are one stacked tensor evaluated by one
    ``vmap``-ed call of ``f`` (``chunk_size`` windows at a time).

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)``, or one value for
            the whole batch (shape ``()``, captum's scalar forward): then each position gets that value's
            change, one map of the batch expanded to every example (captum returns it with a batch dim of 1).
        td: the inputs; baselines are ``("baseline", key)`` entries (zeros when absent).
        sliding_window_shapes: a window shape (one size per feature dim) per input: a dict
            key -> shape, or a tuple when one input is attributed.
        strides: the step per feature dim: a dict key -> (int or tuple), an int or a tuple when one
            input is attributed; default 1.  A stride may not exceed its window size.
        in_keys: entries to attribute; default every floating-point entry (integer / bool entries, e.g.
            token ids, when named here: their baseline is of the same dtype).
        chunk_size: windows per forward; bounds memory to ``chunk_size`` copies of the inputs.
        progress: show a tqdm bar on stderr over the chunks of windows (one step when ``chunk_size``
            is None); never shown under ``vmap`` / ``grad`` / ``torch.compile``.
        randomness: ``torch.func.vmap``'s flag for random ops in ``f`` (train-mode dropout) under this
            method's ``vmap``: ``"error"`` (default, as torch), ``"different"`` (independent draws per window)
            or ``"same"`` (one draw shared).
        baselines: baselines shared across the batch, broadcast to the input as captum does: a number,
            or a tensor of the input's dtype of the feature shape, ``(1, *feature shape)`` or the input's
            shape; a dict key -> baseline, or a bare one when one input is attributed.  Instead of
            ``("baseline", key)`` entries of ``td`` (default: those, else zeros).
        keep_window: zennit's ``Occlusion`` (its default ``occlude_independent``): each evaluation keeps
            only the window and sets the rest of the input to the baseline, and each position gets the sum of
            ``f_k`` over the windows that contain it (no difference, no mean):
            ``A_{b,k}(x)_i = Σ_{w ∋ i} f_k(x_{[w]})_b``.  Windows as above (cut at the edge, where zennit's
            roll around to the start: equal to zennit where the windows tile the input, e.g. its default
            window = stride dividing the size); with several inputs only the windowed one is masked.

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) + feature shape``.

    Raises:
        AttributionError: a window of the wrong length or larger than the input, a stride < 1 or
            larger than its window, unknown key, ``f`` output of the wrong shape, ``keep_window`` not a bool.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> lin = torch.nn.Linear(4, 2)
        >>> td = TensorDict({"x": torch.randn(3, 4)}, batch_size=[3])
        >>> out = tdfunc.occlusion(lambda t: lin(t["x"]), td, sliding_window_shapes=(1,))
        >>> torch.allclose(out["attr", "x"], td["x"][:, None] * lin.weight, atol=1e-6)  # linear f: x * w (float32)
        True

    References:
        Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014.

    Composes with: ``vmap``, ``grad`` (w.r.t. inputs or parameters; double backward),
    ``torch.compile(fullgraph=True)``.
    """
    check_callable("f", f, AttributionError, expected="f(td) -> Tensor")
    check_chunk_size(chunk_size, AttributionError)
    check_bool("progress", progress, AttributionError)
    check_randomness(randomness, AttributionError)
    check_bool("keep_window", keep_window, AttributionError)  # keep_window
    p = prepare(td, in_keys, baselines_arg=baselines, integer_inputs=True)
    nb = len(p.batch)
    windows = per_input("sliding_window_shapes", sliding_window_shapes, p.keys, "window shape", AttributionError)
    steps = (
        per_input("strides", strides, p.keys, "stride", AttributionError)
        if strides is not None
        else dict.fromkeys(p.keys)
    )
    spans, n = {}, 0
    for key in p.keys:
        x = p.x[key]
        tables, counts = _window_tables(key, tuple(x.shape[nb:]), windows[key], steps[key], x.device)
        total = math.prod(counts)
        spans[key] = (n, total, tables, counts)
        n += total
    y0, k = _baseline_outputs(f, td, p)

    def masks_for(lo, hi):
        out = {}
        for key, (start, total, tables, counts) in spans.items():
            if hi <= start or lo >= start + total:
                continue  # this chunk holds no window of this input
            local = torch.arange(lo - start, hi - start, device=tables[0].device if tables else p.x[key].device)
            m = ((local >= 0) & (local < total)).view(-1, *([1] * len(tables)))
            rest = local.clamp(0, total - 1)
            for i, (table, c) in enumerate(zip(tables, counts)):  # captum: the first dim moves fastest
                row = table[rest % c]  # (chunk, d_i)
                rest = rest // c
                m = m & row.view(-1, *([1] * i), row.shape[-1], *([1] * (len(tables) - i - 1)))
            out[key] = m.view(m.shape[0], *([1] * nb), *m.shape[1:])
        return out

    if keep_window:  # keep_window: zennit's Occlusion
        return _keep_window(f, td, p, spans, masks_for, chunk_size, progress, randomness)
    _, total = run_perturbed(f, td, p, n, chunk_size, masks_for, y0, progress=progress, randomness=randomness)
    attrs = {}
    for key, (start, count, tables, counts) in spans.items():
        cover = torch.ones((), dtype=total[key].dtype, device=p.x[key].device)  # f's dtype (the input may be integer)
        for i, table in enumerate(tables):  # windows covering each position: a product over dims
            c = table.sum(0).to(cover.dtype)
            cover = cover.unsqueeze(-1) * c if i else c
        attrs[key] = _expand_attr(total[key] / cover, p.x[key], k, nb)
    return result(td.batch_size, attrs, warn=True)


def _keep_window(f, td, p, spans, masks_for, chunk_size, progress, randomness) -> TensorDict:  # keep_window
    """zennit's Occlusion: evaluate ``f`` with only each window kept (the rest at the baseline) and give every
    position the sum of the outputs of the windows containing it."""
    nb = len(p.batch)
    _, k = _baseline_outputs(f, td, p)

    def outside(lo, hi):  # the masks of the windows of this chunk, inverted on the input each window belongs to
        inside = masks_for(lo, hi)
        out = {}
        for key, m in inside.items():
            start, total = spans[key][0], spans[key][1]
            mine = (torch.arange(lo, hi, device=m.device) >= start) & (
                torch.arange(lo, hi, device=m.device) < start + total
            )
            out[key] = ~m & mine.view(-1, *([1] * (m.dim() - 1)))
        return out

    n = sum(span[1] for span in spans.values())
    ys, _ = run_perturbed(f, td, p, n, chunk_size, outside, None, progress=progress, randomness=randomness)
    attrs = {}
    for key, (start, count, tables, counts) in spans.items():
        y = ys[start : start + count]  # (n_windows, *batch (+ K)); window j: dim 0's shift moves fastest
        m = len(counts)
        y = y.reshape(*counts[::-1], *y.shape[1:]).to(torch.promote_types(y.dtype, torch.float32))
        y = y.permute(*range(m - 1, -1, -1), *range(m, y.dim()))  # (c_0, ..., c_{m-1}, *batch (+ K))
        for table in tables:  # each shift dim against its table: (c_i, *rest) -> (*rest, d_i)
            y = torch.tensordot(y, table.to(y.dtype), dims=([0], [0]))
        attrs[key] = _expand_attr(y, p.x[key], k, nb)
    return result(td.batch_size, attrs, warn=True)


# ------------------------------------------------------------------------------------ feature masks


@public("tdfunc.feature_ablation")
def feature_ablation(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    *,
    feature_mask: PerKey | None = None,
    in_keys: InKeys | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    randomness: str = "error",
    baselines: Baselines | None = None,
) -> TensorDict:
    """Feature ablation, captum's ``FeatureAblation``: replace one feature group at a time by the baseline.

    .. math::  A_{b,k}(x)_i = f_k(x)_b - f_k(x^{(g(i))})_b,
        \\qquad x^{(g)} = x \\text{ with every position of feature id } g \\text{ set to the baseline}

    Feature ids are the distinct values of ``feature_mask`` over every input (an id used in two
    inputs ablates both at once, as captum).  The ``n_features`` ablated inputs are one stacked
    tensor evaluated by one ``vmap``-ed call of ``f`` (``chunk_size`` features at a time).

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)``, or one value for
            the whole batch (shape ``()``, captum's scalar forward): then each position gets that value's
            change, one map of the batch expanded to every example (captum returns it with a batch dim of 1;
            a per-example feature_mask gives each example its own positions).
        td: the inputs; baselines are ``("baseline", key)`` entries (zeros when absent).
        feature_mask: integer feature ids per input, broadcastable to the input (batch + feature
            shape; a mask of the feature shape applies to every example): a dict key -> tensor, or
            a tensor when one input is attributed.  Default: every scalar its own feature.
        in_keys: entries to attribute; default every floating-point entry (integer / bool entries, e.g.
            token ids, when named here: their baseline is of the same dtype).
        chunk_size: features per forward; bounds memory to ``chunk_size`` copies of the inputs.
        progress: show a tqdm bar on stderr over the chunks of features (one step when ``chunk_size``
            is None); never shown under ``vmap`` / ``grad`` / ``torch.compile``.
        randomness: ``torch.func.vmap``'s flag for random ops in ``f`` (train-mode dropout) under this
            method's ``vmap``: ``"error"`` (default, as torch), ``"different"`` (independent draws per feature)
            or ``"same"`` (one draw shared).
        baselines: baselines shared across the batch, broadcast to the input as captum does: a number,
            or a tensor of the input's dtype of the feature shape, ``(1, *feature shape)`` or the input's
            shape; a dict key -> baseline, or a bare one when one input is attributed.  Instead of
            ``("baseline", key)`` entries of ``td`` (default: those, else zeros).

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) + feature shape``.

    Raises:
        AttributionError: a feature_mask that is not an integer tensor broadcastable to its
            input, unknown key, ``f`` output of the wrong shape.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> lin = torch.nn.Linear(4, 1)
        >>> td = TensorDict({"x": torch.randn(3, 4)}, batch_size=[3])
        >>> out = tdfunc.feature_ablation(lambda t: lin(t["x"])[:, 0], td, feature_mask=torch.tensor([0, 0, 1, 1]))
        >>> torch.allclose(out["attr", "x"][:, 0], (td["x"] * lin.weight)[:, :2].sum(-1), atol=1e-6)
        True

    References:
        Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014 (occlusion
        of single features); captum's ``FeatureAblation``.

    Composes with: ``vmap``, ``grad`` (double backward), ``torch.compile(fullgraph=True)`` with the
    default mask (a custom mask's ids are read with ``torch.unique``).
    """
    check_callable("f", f, AttributionError, expected="f(td) -> Tensor")
    check_chunk_size(chunk_size, AttributionError)
    check_bool("progress", progress, AttributionError)
    check_randomness(randomness, AttributionError)
    p = prepare(td, in_keys, baselines_arg=baselines, integer_inputs=True)
    nb = len(p.batch)
    masks = feature_masks(feature_mask, p)
    dev = next(iter(p.x.values())).device
    if feature_mask is None:
        n = sum(math.prod(p.x[key].shape[nb:]) for key in p.keys)
        ids = torch.arange(n, device=dev)
    else:
        ids = torch.unique(torch.cat([m.flatten().to(dev) for m in masks.values()]))
        n = int(ids.numel())
    y0, k = _baseline_outputs(f, td, p)

    def masks_for(lo, hi):
        cur = ids[lo:hi]
        return {key: m.unsqueeze(0) == cur.view(-1, *([1] * m.dim())) for key, m in masks.items()}

    _, total = run_perturbed(f, td, p, n, chunk_size, masks_for, y0, progress=progress, randomness=randomness)
    return result(td.batch_size, {key: _expand_attr(t, p.x[key], k, nb) for key, t in total.items()}, warn=True)


# ------------------------------------------------------------------------------------ Shapley values


def _check_permutations(perms, n_samples: int, n_feat: int) -> torch.Tensor:
    ok = lambda t: not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)  # noqa: E731
    perms = check_draws("permutations", perms, n_samples, n_feat, "an integer tensor", ok)
    if not torch.compiler.is_compiling():
        ok = bool((perms.sort(1).values == torch.arange(n_feat, device=perms.device)).all())  # type: ignore[assignment]
        if not ok:  # type: ignore[truthy-function]
            raise AttributionError(
                f"every row of permutations must hold each feature id 0 .. {n_feat - 1} exactly once."
            )
    return perms


@public("tdfunc.shapley_value_sampling")
def shapley_value_sampling(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    *,
    feature_mask: PerKey | None = None,
    n_samples: int = 25,
    generator: torch.Generator | None = None,
    permutations: torch.Tensor | None = None,
    in_keys: InKeys | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    randomness: str = "error",
    baselines: Baselines | None = None,
) -> TensorDict:
    """Shapley value sampling (Castro et al., 2009), captum's ``ShapleyValueSampling``.

    .. math::
        \\phi_{b,k}(g) = \\frac{1}{S} \\sum_{s=1}^{S}
            \\Big(f_k\\big(x^{(\\pi_s^{\\le g})}\\big)_b - f_k\\big(x^{(\\pi_s^{< g})}\\big)_b\\Big)

    where ``x^(P)`` holds the input on the features ``P`` and the baseline elsewhere, and
    ``π_s^{<g}`` are the features before ``g`` in the random permutation ``π_s``; every position
    of feature ``g`` gets ``φ(g)``.  The values sum to ``f(x) - f(x')`` for every permutation
    (efficiency).  Feature ids are ``0 .. max(feature_mask)`` shared across inputs (as captum);
    the permutations are ``torch.randperm(n_features, generator=generator)`` drawn once per sample
    (captum's draws after ``torch.manual_seed(s)`` when ``generator`` is seeded with ``s``).  The
    ``S * n_features`` inputs are one stacked tensor evaluated by one ``vmap``-ed call of ``f``.

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)``, or one value for
            the whole batch (shape ``()``, captum's scalar forward): then the Shapley values of that one value, one
            map of the batch expanded to every example (captum returns it with a batch dim of 1).
        td: the inputs; baselines are ``("baseline", key)`` entries (zeros when absent).
        feature_mask: integer feature ids ``0 .. n_features - 1`` per input, broadcastable to the
            input (see :func:`tdfunc.feature_ablation`); default every scalar its own feature.
        n_samples: ``S``, the number of permutations.
        generator: random generator of the permutations (default: torch's global one).
        permutations: an integer tensor ``(n_samples, n_features)`` of permutations to use instead
            of drawing them (no random op: for ``vmap`` over examples and ``torch.compile``; the
            exact Shapley values when it lists all ``n_features!`` of them).
        in_keys: entries to attribute; default every floating-point entry (integer / bool entries, e.g.
            token ids, when named here: their baseline is of the same dtype).
        chunk_size: perturbed inputs per forward (None: all ``S * n_features`` at once).
        progress: show a tqdm bar on stderr over the chunks of perturbed inputs (one step when ``chunk_size``
            is None); never shown under ``vmap`` / ``grad`` / ``torch.compile``.
        randomness: ``torch.func.vmap``'s flag for random ops in ``f`` (train-mode dropout) under this
            method's ``vmap``: ``"error"`` (default, as torch), ``"different"`` (independent draws per perturbed input)
            or ``"same"`` (one draw shared).
        baselines: baselines shared across the batch, broadcast to the input as captum does: a number,
            or a tensor of the input's dtype of the feature shape, ``(1, *feature shape)`` or the input's
            shape; a dict key -> baseline, or a bare one when one input is attributed.  Instead of
            ``("baseline", key)`` entries of ``td`` (default: those, else zeros).

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) + feature shape``.

    Raises:
        AttributionError: ``n_samples < 1``, ``permutations`` that are not ``n_samples``
            permutations of the feature ids, a bad feature_mask, unknown key, ``f`` output of the
            wrong shape.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> td = TensorDict({"x": torch.randn(4, 3)}, batch_size=[4])
        >>> out = tdfunc.shapley_value_sampling(lambda t: net(t["x"]), td, n_samples=5)
        >>> gap = net(td["x"]) - net(torch.zeros(4, 3))  # efficiency: the values sum to f(x) - f(x')
        >>> torch.allclose(out["attr", "x"].sum(-1), gap, atol=1e-5)
        True

    References:
        Castro, Gómez, Tejada. Polynomial calculation of the Shapley value based on sampling.
        Computers & Operations Research, 2009.

    Composes with: ``vmap`` and ``torch.compile(fullgraph=True)`` given ``permutations`` (random
    draws under ``vmap`` follow its ``randomness`` rule; a compiled region cannot create a
    generator) and the default mask, ``grad`` (double backward).
    """
    check_callable("f", f, AttributionError, expected="f(td) -> Tensor")
    p, masks, dev, n_feat = sampling_setup(
        td, in_keys, feature_mask, n_samples, chunk_size, generator, progress, randomness, baselines
    )
    if permutations is None:
        perms = torch.stack([torch.randperm(n_feat, generator=generator) for _ in range(n_samples)]).to(dev)
    else:
        perms = _check_permutations(permutations, n_samples, n_feat).to(dev)
    rank = torch.argsort(perms, dim=1)  # rank[s, g]: the step at which permutation s adds feature g
    s_n = n_samples

    def masks_for(lo, hi):  # perturbation (s, i): features of rank <= i hold the input, the rest the baseline
        idx = torch.arange(lo, hi, device=dev)
        s, i = idx // n_feat, idx % n_feat
        out = {}
        for key, m in masks.items():
            r = rank[s][:, m.flatten()].view(len(idx), *m.shape)  # len(idx): also for an input of zero features
            out[key] = ~(r <= i.view(-1, *([1] * m.dim())))  # True: set to the baseline
        return out

    at_base = f(with_inputs(td, p.baseline))
    k = check_output(at_base, p.batch, p.x, batch_value=True)
    ys, _ = run_perturbed(f, td, p, s_n * n_feat, chunk_size, masks_for, progress=progress, randomness=randomness)
    ys = ys.reshape(s_n, n_feat, *ys.shape[1:])
    prev = torch.cat([at_base.expand(s_n, 1, *at_base.shape), ys[:, :-1]], dim=1)
    steps = ys - prev  # (S, F, *batch (+ K)): the gain of the feature added at each step
    gains = steps[torch.arange(s_n, device=dev)[:, None], rank]  # (S, F, ...) reordered by feature id
    phi = gains.mean(0).movedim(0, -1)  # (*batch (+ K), F)
    if at_base.dim() == 0 and len(p.batch):  # one value per batch: one map of the batch, for every example
        phi = phi.expand(*p.batch, n_feat)
    return result(td.batch_size, per_position(phi, masks, p, k), warn=True)
