"""Task arithmetic: task vectors, their application, TIES merging, vmapped alpha sweeps and interpolation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torch.func import vmap

from .._checks import check_bool, check_chunk_size, check_module, check_randomness, random_op_error
from .._errors import TdfuncTypeError, here, public, shape_str
from .._finite import warn_nonfinite
from .._progress import n_chunks, progress_bar, vmap_chunks
from .._state import flat_state
from ._common import (
    TD,
    WeightError,
    check_alphas,
    check_same_tree,
    check_scale,
    check_td,
    float_keys,
    from_leaves,
    leaves,
    rebuild,
)

__all__ = ["task_vector", "apply_task_vector", "ties_merge", "task_vector_sweep", "interpolate"]


@public("tdfunc.weights.task_vector")
def task_vector(finetuned: TensorDictBase, pretrained: TensorDictBase) -> TensorDict:
    """The task vector ``θ_ft − θ_pre`` over the floating-point entries of two states.

    .. math::  \\tau = \\theta_{\\mathrm{ft}} - \\theta_{\\mathrm{pre}}

    Task vectors are plain TensorDicts, so task arithmetic is TensorDict arithmetic:
    ``tv_a + tv_b`` (addition), ``-tv`` (negation: forgetting), ``0.5 * tv`` (scaling).

    Args:
        finetuned: state of the fine-tuned model.
        pretrained: state of the pre-trained model (same architecture).

    Returns:
        A TensorDict with every floating-point entry (integer buffers such as BatchNorm's step
        counter are left out).

    Raises:
        WeightError: the two trees differ (an entry missing in one, or of another shape).

    Example:
        >>> import torch, tdfunc
        >>> pre, ft = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        >>> tv = tdfunc.weights.task_vector(tdfunc.state(ft), tdfunc.state(pre))
        >>> back = tdfunc.weights.apply_task_vector(tdfunc.state(pre), tv, 1.0)
        >>> torch.allclose(back["weight"], ft.weight), (-tv)["bias"].shape
        (True, torch.Size([2]))

    References:
        Ilharco et al. Editing Models with Task Arithmetic. ICLR 2023.

    Composes with: ``vmap`` (stacked states), ``grad``, ``torch.compile``; TensorDict ``+``, ``-``, ``*``.
    """
    ft = leaves(check_td("finetuned", finetuned))
    pre = leaves(check_td("pretrained", pretrained))
    keys_ft, keys_pre = float_keys(ft), float_keys(pre)
    check_same_tree("finetuned", ft, "pretrained", pre, keys_ft)
    check_same_tree("pretrained", pre, "finetuned", ft, keys_pre)
    return from_leaves({k: ft[k] - pre[k] for k in keys_ft}, pretrained.batch_size)


@public("tdfunc.weights.apply_task_vector")
def apply_task_vector(pretrained: TD, tv: TensorDictBase, alpha: float | torch.Tensor = 1.0) -> TD:
    """A new state ``θ_pre + α·τ`` (entries absent from ``τ`` are copied from ``pretrained``).

    .. math::  \\theta(\\alpha) = \\theta_{\\mathrm{pre}} + \\alpha\\, \\tau

    Args:
        pretrained: the base state.
        tv: a task vector (:func:`tdfunc.weights.task_vector`, a sum of them, :func:`tdfunc.weights.ties_merge`),
            a sub-tree of ``pretrained``.
        alpha: scaling coefficient, a number or a 0-d tensor (differentiable; vmap over a 1-D tensor
            of alphas, or use :func:`tdfunc.weights.task_vector_sweep`).

    Returns:
        A new TensorDict; ``pretrained`` and ``tv`` are not written.

    Raises:
        WeightError: ``tv`` has an entry that ``pretrained`` lacks or of another shape; ``alpha`` not 0-d.

    Example:
        >>> import torch, tdfunc
        >>> pre, ft = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        >>> tv = tdfunc.weights.task_vector(tdfunc.state(ft), tdfunc.state(pre))
        >>> half = tdfunc.weights.apply_task_vector(tdfunc.state(pre), tv, 0.5)
        >>> torch.allclose(half["weight"], (pre.weight + ft.weight) / 2)
        True

    Composes with: ``vmap`` (over alphas, task vectors or states), ``grad`` (w.r.t. alpha or the
    task vector, double backward), ``torch.compile``.
    """
    pre = leaves(check_td("pretrained", pretrained))
    flat_tv = leaves(check_td("tv", tv))
    alpha = check_scale("alpha", alpha)
    check_same_tree("tv", flat_tv, "pretrained", pre, list(flat_tv))
    return rebuild(pretrained, {k: pre[k] + alpha * v for k, v in flat_tv.items()})


def _stack_tvs(task_vectors: Any) -> tuple[list, dict]:
    if isinstance(task_vectors, TensorDictBase):
        if task_vectors.batch_dims < 1:
            raise WeightError(
                f"a single TensorDict of task vectors must be stacked on a leading task dim, got batch_size "
                f"{list(task_vectors.batch_size)}; pass a list of task vectors or torch.stack([...])."
            )
        flat = leaves(task_vectors)
        return list(flat), flat
    if not isinstance(task_vectors, (list, tuple)) or not task_vectors:
        raise TdfuncTypeError(
            f"task_vectors must be a non-empty list of TensorDicts (tdfunc.weights.task_vector(...)) "
            "or one stacked "
            f"TensorDict, got {type(task_vectors).__name__} ({task_vectors!r:.60})."
        )
    flats = [leaves(check_td(f"task_vectors[{i}]", t)) for i, t in enumerate(task_vectors)]
    keys = list(flats[0])
    for i, f in enumerate(flats[1:], 1):
        check_same_tree("task_vectors[0]", flats[0], f"task_vectors[{i}]", f, keys)
        check_same_tree(f"task_vectors[{i}]", f, "task_vectors[0]", flats[0], list(f))
    return keys, {k: torch.stack([f[k] for f in flats]) for k in keys}


@public("tdfunc.weights.ties_merge")
def ties_merge(
    task_vectors: Sequence[TensorDictBase] | TensorDictBase,
    *,
    density: float = 0.2,
    lambda_: float | torch.Tensor = 1.0,
) -> TensorDict:
    """TIES-merging of task vectors: trim, elect sign, disjoint mean.

    For task vectors ``τ_t`` (each flattened over all its entries, length ``d``):

    .. math::
        \\hat\\tau_t = \\tau_t \\odot \\mathbb{1}[|\\tau_t| \\ge \\kappa_t], \\quad
        \\gamma = \\mathrm{sgn}\\Big(\\sum_t \\hat\\tau_t\\Big), \\quad
        \\tau_m = \\lambda \\frac{\\sum_t \\hat\\tau_t \\mathbb{1}[\\mathrm{sgn}(\\hat\\tau_t) = \\gamma]}
                                 {\\max(1, \\sum_t \\mathbb{1}[\\hat\\tau_t \\ne 0,
                                  \\ \\mathrm{sgn}(\\hat\\tau_t) = \\gamma])}

    with ``κ_t`` the ``(d − ⌊density·d⌋)``-th smallest ``|τ_t|`` (ties at the threshold are kept), and
    entries whose elected sign is 0 taking the sign of ``Σγ`` (the majority) — as the authors' code.

    Args:
        task_vectors: a list of task vectors with the same tree, or one TensorDict stacked on a leading task dim.
        density: fraction of entries kept per task vector, in (0, 1].
        lambda_: scale of the merged vector.

    Returns:
        The merged task vector; apply it with :func:`tdfunc.weights.apply_task_vector`.

    Raises:
        WeightError: trees differ, ``density`` outside (0, 1].

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> t1 = TensorDict({"w": torch.tensor([1.0, -2.0, 0.1, 3.0])})
        >>> t2 = TensorDict({"w": torch.tensor([2.0, 1.0, -0.2, -1.0])})
        >>> tdfunc.weights.ties_merge([t1, t2], density=0.5)["w"]
        tensor([ 1.5000, -2.0000,  0.0000,  3.0000])

    References:
        Yadav, Tam, Choshen, Raffel, Bansal. TIES-Merging: Resolving Interference When Merging Models. NeurIPS 2023.

    Composes with: ``vmap`` (over stacked sets of task vectors), ``grad`` (w.r.t. the task vectors and
    ``lambda_``, piecewise), ``torch.compile``.
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise WeightError(f"density must be a fraction in (0, 1], got {density!r}; e.g. density=0.2 keeps the top 20%.")
    lambda_ = check_scale("lambda_", lambda_)
    keys, stacked = _stack_tvs(task_vectors)
    n_tasks = stacked[keys[0]].shape[0]
    flat = torch.cat([stacked[k].reshape(n_tasks, -1) for k in keys], dim=1)  # (T, d)
    d = flat.shape[1]
    kth = d - int(d * density)
    if kth >= 1:
        thresh = flat.abs().kthvalue(kth, dim=1, keepdim=True).values
        trimmed = flat * (flat.abs() >= thresh)
    else:
        trimmed = flat
    sign = torch.sign(trimmed.sum(0))
    sign = torch.where(sign == 0, torch.sign(sign.sum()), sign)
    keep = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    merged = lambda_ * selected.sum(0) / keep.sum(0).clamp(min=1).to(flat.dtype)
    out, start = {}, 0
    for k in keys:
        shape = stacked[k].shape[1:]
        n = shape.numel()
        out[k] = merged[start : start + n].view(shape)
        start += n
    return from_leaves(out)


@public("tdfunc.weights.task_vector_sweep")
def task_vector_sweep(
    module: nn.Module,
    pretrained: TensorDictBase,
    tv: TensorDictBase,
    alphas: Sequence[float] | torch.Tensor,
    metric: Callable[[TensorDictBase], torch.Tensor],
    *,
    constraint: Callable[[TensorDictBase], torch.Tensor] | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    randomness: str = "error",
) -> TensorDict:
    """Evaluate ``metric(θ_pre + α·τ)`` for every alpha in one ``vmap`` and pick the best feasible alpha.

    .. math::  \\alpha^\\star = \\arg\\max_{\\alpha \\in A,\\ c(\\theta(\\alpha))} m(\\theta(\\alpha)),
        \\qquad \\theta(\\alpha) = \\theta_{\\mathrm{pre}} + \\alpha\\tau

    As tdhook's ``TaskVectors`` (test accuracy maximised under a control-adequacy check), but all
    alphas run as one batched call over stacked states instead of one hooked run each.

    Args:
        module: the model the states belong to (their keys are checked against it).
        pretrained: the base state.
        tv: the task vector (or a sum / negation / merge of task vectors).
        alphas: 1-D tensor or list of scaling coefficients.
        metric: ``metric(state) -> scalar Tensor`` to maximise (e.g. accuracy or minus a loss through
            :func:`tdfunc.functional_call`); runs under ``vmap`` (no ``.item()``).
        constraint: ``constraint(state) -> bool scalar Tensor``; alphas where it is False are not
            chosen (e.g. control-task accuracy above a floor).  Evaluated in the same vmap.
        chunk_size: alphas per batched call (bounds memory; None: all at once).
        progress: show a tqdm bar on stderr over the chunks of alphas (one step when ``chunk_size``
            is None; the chunks then run as a Python loop of the same ``vmap`` calls, equal
            results); never shown under ``vmap`` / ``grad`` / ``torch.compile``.
        randomness: ``torch.func.vmap``'s flag for random ops in ``metric`` under the sweep's ``vmap``:
            ``"error"`` (default, as torch), ``"different"`` (independent draws per alpha) or ``"same"``.

    Returns:
        TensorDict with ``"alpha"``, ``"metric"``, ``"feasible"`` (each of shape ``(A,)``),
        ``"best_alpha"`` and ``"best_index"`` (0-d; NaN and -1 when no alpha is feasible).  An alpha whose
        metric is NaN is never the best (a :class:`tdfunc.NonFiniteWarning` says which metrics are not finite).

    Raises:
        WeightError: ``alphas`` not 1-D or not finite, ``metric`` / ``constraint`` of the wrong shape, tree
            mismatch, a random op in ``metric`` under ``randomness="error"``.
        StateError: a state key that names no parameter or buffer of ``module``.

    Example:
        >>> import torch, tdfunc
        >>> pre, ft = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
        >>> x = torch.randn(16, 3)
        >>> tv = tdfunc.weights.task_vector(tdfunc.state(ft), tdfunc.state(pre))
        >>> close = lambda s: -(tdfunc.functional_call(pre, s, (x,)) - ft(x)).square().mean()
        >>> out = tdfunc.weights.task_vector_sweep(pre, tdfunc.state(pre), tv, torch.linspace(0, 2, 5), close)
        >>> float(out["best_alpha"]), out["metric"].shape
        (1.0, torch.Size([5]))

    References:
        Ilharco et al. Editing Models with Task Arithmetic. ICLR 2023.

    Composes with: ``vmap`` (over data the metric closes over), ``grad`` (of the metric values),
    ``torch.compile``.
    """
    check_module(module, WeightError)
    check_chunk_size(chunk_size, WeightError)
    check_bool("progress", progress, WeightError)
    check_randomness(randomness, WeightError)
    pretrained = check_td("pretrained", pretrained)
    tv = check_td("tv", tv)
    flat_state(module, pretrained)
    flat_state(module, tv)
    for what, f in (("metric", metric), ("constraint", constraint)):
        if f is not None and not callable(f):
            raise TdfuncTypeError(f"{what} must be callable(state) -> Tensor, got {type(f).__name__} ({f!r:.60}).")
    pre = leaves(pretrained)
    like = next((v for v in pre.values() if v.is_floating_point()), torch.zeros(()))
    alphas = check_alphas(alphas, like)

    def one(a: torch.Tensor):
        s = apply_task_vector(pretrained, tv, a)
        m = metric(s)
        c = constraint(s) if constraint is not None else torch.ones((), dtype=torch.bool, device=a.device)
        for what, v in (("metric", m), ("constraint", c)):
            if not isinstance(v, torch.Tensor) or v.dim() != 0:
                got = f"shape {shape_str(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
                raise WeightError(f"{what} must return a scalar tensor per state, got {got}; reduce it (e.g. .mean()).")
        return m, c.to(torch.bool)

    bar = progress_bar(enabled=progress, desc=here(), total=n_chunks(alphas.shape[0], chunk_size), unit="chunk")
    try:
        if bar is None:
            values, feasible = vmap(one, chunk_size=chunk_size, randomness=randomness)(alphas)
        else:
            with bar:
                values, feasible = vmap_chunks(one, chunk_size, bar, randomness=randomness)(alphas)
    except RuntimeError as e:
        err = random_op_error(e, WeightError, "metric")
        if err is None:
            raise
        raise err from e
    warn_nonfinite('"metric"', values)
    masked = torch.where(feasible & ~values.isnan(), values, torch.full_like(values, float("-inf")))
    idx = masked.argmax()
    any_ok = feasible.any()
    best_index = torch.where(any_ok, idx, torch.full_like(idx, -1))
    at = alphas.gather(0, idx.view(1)).squeeze(0)  # not alphas[idx]: no data-dependent indexing (compile)
    best_alpha = torch.where(any_ok, at, torch.full_like(at, float("nan")))
    return TensorDict(
        {"alpha": alphas, "metric": values, "feasible": feasible, "best_alpha": best_alpha, "best_index": best_index},
        batch_size=[],
    )


@public("tdfunc.weights.interpolate")
def interpolate(state_a: TensorDictBase, state_b: TensorDictBase, alphas: Sequence[float] | torch.Tensor) -> TensorDict:
    """States along the straight line from ``state_a`` to ``state_b``, stacked on a leading dim.

    .. math::  \\theta(\\alpha) = (1 - \\alpha)\\, \\theta_a + \\alpha\\, \\theta_b

    (``torch.lerp``: exact at ``α = 0`` and ``α = 1``).  Non-floating entries are taken from
    ``state_a``.  Evaluate a loss along the path in one call:
    ``vmap(lambda s: loss(s))(tdfunc.weights.interpolate(a, b, alphas))``; a uniform soup is
    ``torch.stack([s1, s2, s3]).mean(0)`` (plain TensorDict ops).

    Args:
        state_a: the state at ``α = 0``.
        state_b: the state at ``α = 1`` (same tree and shapes).
        alphas: 1-D tensor or list of coefficients (values outside [0, 1] extrapolate).

    Returns:
        A TensorDict with ``batch_size`` ``(A,) + state_a.batch_size``.

    Raises:
        WeightError: ``alphas`` not 1-D, the trees differ.

    Example:
        >>> import torch, tdfunc
        >>> a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        >>> path = tdfunc.weights.interpolate(tdfunc.state(a), tdfunc.state(b), torch.linspace(0, 1, 5))
        >>> x = torch.randn(4, 3)
        >>> losses = torch.func.vmap(lambda s: tdfunc.functional_call(a, s, (x,)).square().mean())(path)
        >>> losses.shape, torch.equal(path[4]["weight"], b.weight.detach())
        (torch.Size([5]), True)

    References:
        Wortsman et al. Model soups. ICML 2022; Frankle et al. Linear Mode Connectivity and the Lottery
        Ticket Hypothesis. ICML 2020.

    Composes with: ``vmap`` (over the path, nested), ``grad`` (w.r.t. both states and alphas),
    ``torch.compile``.
    """
    fa = leaves(check_td("state_a", state_a))
    fb = leaves(check_td("state_b", state_b))
    keys = float_keys(fa)
    check_same_tree("state_a", fa, "state_b", fb, keys)
    check_same_tree("state_b", fb, "state_a", fa, float_keys(fb))
    like = fa[keys[0]] if keys else torch.zeros(())
    alphas = check_alphas(alphas, like)
    n = alphas.shape[0]
    out = {}
    for k, a in fa.items():
        if k in fb and a.is_floating_point():
            w = alphas.to(a.dtype).view(n, *([1] * a.dim()))
            out[k] = torch.lerp(a.expand(n, *a.shape), fb[k].expand(n, *a.shape), w)
        else:
            out[k] = a.expand(n, *a.shape)
    return from_leaves(out, (n, *state_a.batch_size))
