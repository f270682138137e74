"""Neuron attribution: ``neuron(f, module, site, selector)``, the selected neuron(s) of a site as a new ``f``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union, cast

import torch
from tensordict import TensorDictBase
from torch import nn

from .. import _runtime
from .._checks import type_error
from .._errors import public, shape_str
from .._plan import Plan, make_plan
from .._state import unwrap as _unwrap
from ._common import AttributionError

__all__ = ["neuron"]

_FN = "tdfunc.neuron"

#: one neuron: an index tuple per example (ints, and slices summed over), or a function of the site's value
NeuronIndex = Union[int, slice, tuple[Union[int, slice], ...]]
NeuronSelector = Union[NeuronIndex, Sequence[NeuronIndex], Callable[[torch.Tensor], torch.Tensor]]

_EXPECTED = (
    "expected an index tuple per example without the batch dims (ints, e.g. (3,) or (0, 2, 2), and slices, "
    "summed over), a list of such tuples (K neurons), or a function of the site's value returning shape "
    "batch or batch + (K,)"
)


def _index(sel: object) -> tuple[int | slice, ...] | None:
    """``sel`` as an index tuple, or None when it is not one."""
    if isinstance(sel, (int, slice)) and not isinstance(sel, bool):
        sel = (sel,)
    if isinstance(sel, tuple) and sel and all(isinstance(i, (int, slice)) and not isinstance(i, bool) for i in sel):
        return sel
    return None


def _parse(selector: object) -> tuple[list[tuple[int | slice, ...]] | None, bool]:
    """(index tuples, several) for an index selector; ([], False) is never returned — a bad one raises."""
    one = _index(selector)
    if one is not None:
        return [one], False
    if isinstance(selector, list) and selector:
        many = [_index(s) for s in selector]
        if all(m is not None for m in many):
            return many, True  # type: ignore[return-value]
    raise AttributionError(f"bad neuron selector {selector!r:.80}; {_EXPECTED}.")


def _select(idx: tuple[int | slice, ...], value: torch.Tensor, n: int, site: str) -> torch.Tensor:
    feat = value.shape[n:]
    if len(idx) > len(feat):
        raise AttributionError(
            f"the neuron selector {idx!r} has {len(idx)} indices but the value at site {site!r} has "
            f"{len(feat)} dims per example (shape {shape_str(value.shape)}, batch dims {n}); give at most "
            f"{len(feat)} indices."
        )
    for d, (i, size) in enumerate(zip(idx, feat)):
        if isinstance(i, int) and not -size <= i < size:
            raise AttributionError(
                f"the neuron selector {idx!r} has index {i} for per-example dim {d} of site {site!r}, "
                f"which has size {size} (value shape {shape_str(value.shape)}); give an index in [{-size}, {size})."
            )
    picked = value[(slice(None),) * n + idx]
    return picked.reshape(*value.shape[:n], -1).sum(-1) if picked.dim() > n else picked


def selection(selector: object) -> Callable[[object, torch.Size, str], torch.Tensor]:
    """``pick(value, batch, site)``: the selected neuron(s) of a site's value, shape ``batch`` or ``batch + (K,)``.

    A bad index selector raises at once; the value's shape and a callable's output are checked per call.
    """
    fun = selector if callable(selector) else None
    idxs, several = (None, False) if fun is not None else _parse(selector)

    def pick(value: object, batch: torch.Size, site: str) -> torch.Tensor:
        n = len(batch)
        if not isinstance(value, torch.Tensor) or value.shape[:n] != batch:
            got = f"of shape {shape_str(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise AttributionError(
                f"the value at site {site!r} is {got}, but it must start with the td's batch shape "
                f"{shape_str(batch)} so a neuron can be selected per example; pick a site whose value is per example."
            )
        if fun is not None:
            out = fun(value)
            if not isinstance(out, torch.Tensor) or out.shape[:n] != batch or out.dim() not in (n, n + 1):
                got = f"shape {shape_str(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
                raise AttributionError(
                    f"the selector function returned {got} for a site value of shape "
                    f"{shape_str(value.shape)}; it must return shape batch {shape_str(batch)} or batch + (K,)."
                )
            return out
        picked = [_select(i, value, n, site) for i in idxs]  # type: ignore[union-attr]
        return torch.stack(picked, -1) if several else picked[0]

    return pick


@public("tdfunc.neuron")
def neuron(
    f: Callable[[TensorDictBase], object],
    module: nn.Module,
    site: str,
    selector: NeuronSelector,
) -> Callable[[TensorDictBase], torch.Tensor]:
    """The selected neuron(s) of a site, as a function to attribute (captum's ``Neuron*`` methods).

    .. math::  f'(td)_b = \\sum_{j \\in S} a_{\\text{site}}(td)_{b, j}

    ``neuron(f, module, site, selector)`` runs ``f`` (any function of the td that calls ``module``, directly or
    through :func:`tdfunc.functional_call`), captures the value of ``site`` inside it, and returns the selected
    neuron(s) instead of ``f``'s output.  Pass the result to any gradient-based method:
    ``tdfunc.saliency(neuron(f, m, "fc1", (3,)), td)`` is captum's ``NeuronGradient``;
    with :func:`tdfunc.integrated_gradients`, :func:`tdfunc.deep_lift`, :func:`tdfunc.gradient_shap`,
    :func:`tdfunc.guided_backprop`, :func:`tdfunc.deconvolution`, :func:`tdfunc.smooth_grad`,
    :func:`tdfunc.input_x_gradient` it is ``NeuronIntegratedGradients``, ``NeuronDeepLift``, ... .
    The perturbation methods take it too: ``tdfunc.feature_ablation(neuron(f, m, "fc1", (3,)), td,
    feature_mask=...)`` is captum's ``NeuronFeatureAblation`` (equal on captum's own cases; its
    ``perturbations_per_eval`` is ``chunk_size``), and :func:`tdfunc.occlusion`,
    :func:`tdfunc.shapley_value_sampling`, ... of a neuron follow.  For the conductance of a neuron (captum's
    ``NeuronConductance``) see :func:`tdfunc.neuron_conductance`.

    The site's value has the td's batch dims first (``td.batch_size``); the selector indexes what follows:

    * an index tuple of ints — one neuron per example, ``value[b, i, j, ...]`` (captum's tuple selector; an int
      ``i`` means ``(i,)``); fewer indices than dims sum over the dims left;
    * slices in the tuple — the sum over the selected block (captum's slice aggregation);
    * a list of K index tuples — K neurons at once, output ``batch + (K,)``: one call attributes all K;
    * a callable ``sel(value) -> Tensor`` of shape ``batch`` or ``batch + (K,)`` (captum's function selector).

    Args:
        f: ``f(td)`` calling ``module`` (its output is not used).
        module: the model whose site is selected (the one ``f`` calls).
        site: one site of ``module``, as in :func:`tdfunc.functional_call` (``"fc1"``, ``"act:input"``,
            ``"blocks.0.mlp@1"``); not a glob nor ``@*``.
        selector: index tuple, list of index tuples, or callable (above).

    Returns:
        ``f'(td) -> Tensor`` of shape ``td.batch_size`` (one neuron) or ``td.batch_size + (K,)``.

    Raises:
        AttributionError: a selector that is none of the above (at once); at call time, indices that do not fit
            the site's value, a value whose leading dims are not the batch, a callable of the wrong output.
        SiteError: unknown site (with the nearest names), a glob or ``@*`` site.
        NotReachedError: ``f`` never reaches the site (or reaches it several times without ``@k``).

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> g = tdfunc.neuron(lambda t: net(t["x"]), net, "0", (2,))  # unit 2 of the first Linear
        >>> torch.allclose(tdfunc.saliency(g, td, abs=False)["attr", "x"], net[0].weight[2].expand(5, 3))
        True
        >>> tdfunc.saliency(tdfunc.neuron(lambda t: net(t["x"]), net, "0", [(0,), (1,)]), td)["attr", "x"].shape
        torch.Size([5, 2, 3])

    Composes with: every gradient-based and perturbation method, ``vmap``, ``grad`` (double backward),
    ``torch.compile(fullgraph=True)``.
    """
    if not callable(f):
        raise type_error(AttributionError)(f"{_FN}: expected a callable f(td), got {type(f).__name__} ({f!r:.60}).")
    if not isinstance(module, nn.Module):
        raise type_error(AttributionError)(
            f"{_FN}: expected an nn.Module as the module, got {type(module).__name__} ({module!r:.60})."
        )
    if not isinstance(site, str) or "*" in site:
        raise (AttributionError if isinstance(site, str) else type_error(AttributionError))(
            f"{_FN}: site must be one site string (no glob, no '@*'), got {site!r:.80}; e.g. 'fc1' or 'blocks.0.mlp'."
        )
    pick = selection(selector)
    plan = cast(Plan, make_plan(_unwrap(module), None, [site]))  # a capture: never None

    cap, target = plan.captures[0], plan.sites[0][1]

    def rewritten_outside() -> bool:
        """Whether a frame around this call (a method's rewrite) edits the site's output: the capture would miss it."""
        stack = getattr(_runtime._LOCAL, "stack", None)
        if not stack or cap.port != "output":
            return False
        for fr in _runtime._active(stack):
            if cap.opname is None:
                entry = fr.plan.entries.get(target)
                outs = entry.outputs if entry is not None else []
            else:
                outs = [
                    op for oe in fr.plan.ops.get(cap.opname, []) if oe.path == plan.sites[0][0] for op in oe.outputs
                ]
            if any(not op.capture for op in outs):
                return True
        return False

    def selected(td: TensorDictBase) -> torch.Tensor:
        if rewritten_outside():
            raise AttributionError(
                f"{_FN}: the method called with this f rewrites the output of site {site!r} (its own backward rule: "
                "DeepLift's rescale, guided backprop's or deconvolution's ReLU, an LRP rule), and a neuron selected "
                "there sees the value before that rewrite, so the site's own rule would be skipped; select the neuron "
                f"at the input of the module that consumes {site!r} (e.g. 'next_module:input'), where the rewritten "
                "value arrives."
            )
        value = _runtime.run_plan(plan, f, td)[1][site]
        return pick(value, td.batch_size if isinstance(td, TensorDictBase) else torch.Size([]), site)

    return public("tdfunc.neuron")(selected)  # its errors, raised when a method runs it, name neuron
