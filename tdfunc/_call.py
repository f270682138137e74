"""The core call: ``functional_call`` with edits and captures, and the ``intervene`` transform."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal, ParamSpec, TypeVar, overload

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from . import _runtime
from ._errors import TdfuncTypeError, public
from ._finish import finish
from ._plan import Frame, make_plan
from ._state import flat_state, written_buffers
from ._state import unwrap as _unwrap
from ._stop import Stop, StopFrame, check_stop  # stop_early
from ._types import Capture, Edits, State

__all__ = ["functional_call", "intervene"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _check_module(module: Any) -> None:
    if not isinstance(module, nn.Module):
        raise TdfuncTypeError(f"expected an nn.Module as the module, got {type(module).__name__} ({module!r:.60}).")


@overload
def functional_call(
    module: nn.Module,
    state: State,
    args: Any,
    kwargs: Mapping[str, Any] | None = ...,
    *,
    edits: Edits | None = ...,
    capture: None = ...,
    strict: bool = ...,
    return_state: Literal[False] = ...,
) -> Any: ...
@overload
def functional_call(
    module: nn.Module,
    state: State,
    args: Any,
    kwargs: Mapping[str, Any] | None = ...,
    *,
    edits: Edits | None = ...,
    capture: Capture,
    strict: bool = ...,
    return_state: Literal[False] = ...,
) -> tuple[Any, TensorDict]: ...
@overload
def functional_call(
    module: nn.Module,
    state: State,
    args: Any,
    kwargs: Mapping[str, Any] | None = ...,
    *,
    edits: Edits | None = ...,
    capture: None = ...,
    strict: bool = ...,
    return_state: Literal[True],
) -> tuple[Any, TensorDict]: ...
@overload
def functional_call(
    module: nn.Module,
    state: State,
    args: Any,
    kwargs: Mapping[str, Any] | None = ...,
    *,
    edits: Edits | None = ...,
    capture: Capture,
    strict: bool = ...,
    return_state: Literal[True],
) -> tuple[Any, TensorDict, TensorDict]: ...
@overload
def functional_call(  # stop_early: the captures only
    module: nn.Module,
    state: State,
    args: Any,
    kwargs: Mapping[str, Any] | None = ...,
    *,
    edits: Edits | None = ...,
    capture: Capture,
    strict: bool = ...,
    return_state: Literal[False] = ...,
    stop: Literal[True],
) -> TensorDict: ...
@overload
def functional_call(
    module: nn.Module,
    state: State,
    args: Any,
    kwargs: Mapping[str, Any] | None = ...,
    *,
    edits: Edits | None = ...,
    capture: Capture | None = ...,
    strict: bool = ...,
    return_state: bool = ...,
) -> Any: ...


@public("tdfunc.functional_call")
def functional_call(
    module: nn.Module,
    state: State,
    args: Any,
    kwargs: Mapping[str, Any] | None = None,
    *,
    edits: Edits | None = None,
    capture: Capture | None = None,
    strict: bool = True,
    return_state: bool = False,
    stop: bool = False,  # stop_early
) -> Any:
    """Run ``module`` as a pure function of (state, inputs, activation edits).

    .. math::  (y, \\{a_s\\}_{s \\in C}) = F(\\theta, x;\\; a_s \\leftarrow e_s(a_s)\\ \\forall s \\in E)

    Like :func:`torch.func.functional_call`, with ``state`` a TensorDict (partial allowed: entries
    it lacks come from the module).  ``edits`` change values inside the forward; ``capture``
    returns values from inside it.  Nothing is written to the module, the state, the inputs or the
    edits: TensorDict inputs are shallow-copied (a ``TensorDictModule``'s writes stay inside), what
    an edit puts into the model is a fresh copy (an in-place op after the site cannot write into
    your tensor), and the buffers of submodules in training mode (BatchNorm's running statistics)
    are cloned before the forward updates them — ask for the updated ones with ``return_state=True``.

    Sites (keys of ``edits``, entries of ``capture``):

    * ``"blocks.0.mlp"`` — the output of that submodule (its first element if it returns a tuple);
    * ``"blocks.0.mlp:input"`` / ``":input.N"`` — its first / N-th positional input;
      ``":output.N"`` — element N of a tuple output;
    * ``"blocks.0.mlp@k"`` — only its k-th call (0-based) when it runs several times in one forward;
      ``"@*"`` captures every call, stacked on a new leading dimension.  An edit without ``@``
      applies to every call; a capture without ``@`` of a module that ran several times is an error;
    * globs: ``"blocks.*.mlp"`` (``*`` within one name segment, ``**`` across segments);
      a glob capture returns one entry per matched module, keyed by its name;
    * ``"blocks.0:input.hidden_states"`` — the forward's argument by name (passed by keyword or
      positionally); ``"model:output.logits"`` — an entry of a dict / ``ModelOutput`` output;
    * ``"blocks.0.attn/softmax"`` — an operation site: the output of a torch function (``softmax``,
      ``matmul``, ``einsum``, ``mul``, ``scaled_dot_product_attention``, …) called by that module's own
      forward code (not its submodules'), with the same ``:input.N`` and ``@k`` suffixes
      (``"blocks.0.attn/matmul:input.1@0"``); :func:`tdfunc.list_sites` lists them;
    * a :class:`tdfunc.Tap` placed in model code is a site under its own path.

    Edits:

    * a ``Tensor`` — substitute the value (broadcast to its shape; same dtype and device);
    * a callable ``fn(value) -> value`` — e.g. ``lambda v: v * mask`` (same shape);
    * :func:`tdfunc.delta` ``(t)`` — add ``t``; differentiate w.r.t. ``t`` for the gradient at the site;
    * :func:`tdfunc.rule` ``(fn)`` — ``fn(module, args, kwargs, output)`` replaces the output
      (at an operation site ``module`` is the torch function).

    Several edits at one site apply in the order of the mapping; captures see the value after the
    edits of the same call.  Edits run outside the call: a model called inside an edit runs plain.

    Args:
        module: the model.
        state: a TensorDict from :func:`tdfunc.state` (or part of one, or a stacked one under
            ``vmap``), a mapping of dotted names to tensors, or ``None`` for the module's own tensors.
        args: positional inputs (a tuple, or a single value).
        kwargs: keyword inputs.
        edits: mapping from site to edit.
        capture: a site or list of sites to return.
        strict: with ``False``, an edit or capture whose site the forward never reaches is skipped
            (the capture is then absent from the result) instead of raising ``NotReachedError``.
        return_state: with ``True``, also return the state after the call: a TensorDict shaped like
            :func:`tdfunc.state` holding ``state``'s entries (the module's own tensors for those it
            lacks), with the buffers the forward updated (train-mode BatchNorm's running statistics)
            replaced by their new values — as flax's ``mutable=``.  The input state is not changed.
        stop: with ``True``, the forward ends as soon as every captured site has been captured (tdhook's
            ``stop``): caching the first layers of a deep model does not pay for the rest.  The result is
            then the captures alone (no output); a capture without ``@k`` is the site's first call, ``@*``
            is refused, edits the forward did not reach before stopping raise ``NotReachedError`` (with
            ``strict=True``).  The stop is an internal ``BaseException`` raised in the site's hook and caught
            here (model code's ``except Exception`` cannot swallow it); works under ``vmap``, ``grad`` and
            ``torch.compile(fullgraph=True)`` (one graph, holding only the layers before the stop).

    Returns:
        The module's output, or ``(output, captures)`` when ``capture`` is given, with ``captures``
        a TensorDict keyed by site string (``captures["blocks.0.mlp"]``); with ``return_state=True``
        the new state comes last: ``(output, new_state)`` or ``(output, captures, new_state)``.
        With ``stop=True``: ``captures`` alone.

    Raises:
        SiteError: unknown site (with the nearest names), glob matching nothing, bad site syntax.
        EditError: a substitute / delta / edit result whose shape, dtype or device does not fit.
        StateError: a state key that names no parameter or buffer, or an entry of another shape,
            or a dtype / device the rest of the call does not share.
        NotReachedError: an edited or captured site that the forward never reached.
        TypeError: ``args`` given as a list, ``strict`` or ``return_state`` not a bool.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(3, 4)
        >>> y, caps = tdfunc.functional_call(net, tdfunc.state(net), (x,), capture=["1"])
        >>> torch.equal(y, net(x)), caps["1"].shape
        (True, torch.Size([3, 8]))
        >>> z = tdfunc.functional_call(net, None, (x,), edits={"1": torch.zeros(8)})
        >>> torch.allclose(z, net[2].bias.expand(3, 2))
        True
        >>> tdfunc.functional_call(net, None, (x,), capture=["1"], stop=True)["1"].shape  # net[2] never runs
        torch.Size([3, 8])

    Composes with: ``vmap`` (over inputs, edit tensors, stacked states), ``grad`` / ``vjp`` /
    ``jacrev`` (incl. double backward), ``torch.compile(fullgraph=True)`` (after
    :func:`tdfunc.install_sites`).
    """
    _check_module(module)
    module = _unwrap(module)  # DistributedDataParallel, DataParallel, torch.compile: the model inside
    if not isinstance(return_state, bool):
        raise TdfuncTypeError(
            f"return_state must be True or False, got {type(return_state).__name__} ({return_state!r:.60})."
        )
    params = flat_state(module, state)
    if isinstance(args, list):
        raise TdfuncTypeError(
            f"args must be a tuple of positional inputs (or one input that is not a list), got a list of "
            f"length {len(args)}; pass tuple(args), or ([...],) when the module's single input is a list."
        )
    if not isinstance(args, tuple):
        args = (args,)
    args = tuple(a.copy() if isinstance(a, TensorDictBase) else a for a in args)
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TdfuncTypeError(f"kwargs must be a mapping or None, got {type(kwargs).__name__}.")
    kwargs = dict(kwargs or {})
    plan = make_plan(module, edits, capture, strict)
    if not isinstance(stop, bool):  # stop_early
        raise TdfuncTypeError(f"stop must be True or False, got {type(stop).__name__} ({stop!r:.60}).")
    if stop:  # stop_early
        check_stop(plan, capture, return_state)
    written = written_buffers(module)  # train-mode buffers: the forward writes them in place
    given = params
    if written:  # run on clones: neither the module nor a state sharing its storage is written
        params = dict(params)
        for k, b in written.items():
            params[k] = params.get(k, b).clone()
    run = torch.func.functional_call if params else None
    call = (lambda: run(module, params, args, kwargs)) if params else (lambda: module(*args, **kwargs))  # type: ignore[misc]
    if plan is None:
        out = call()
        captures = TensorDict({}, batch_size=[])
    else:
        reparam = None
        if params:  # a checkpointed region's recomputation runs with this state again
            reparam = (module, {**{k: b for k, b in written.items() if k not in given}, **given}, set(written))
        if stop:  # stop_early: the forward raises Stop after the last capture; the captures are the result
            return _run_until_captured(StopFrame(plan, reparam), call)
        out, frame = _runtime.run_frame(Frame(plan, reparam), call)
        captures = finish(frame)
    result = (out, captures) if capture is not None else (out,)
    if return_state:
        result += (_new_state(module, given, params, written),)  # type: ignore[assignment]
    return result if len(result) > 1 else out


def _run_until_captured(frame: StopFrame, call: Callable[[], Any]) -> TensorDict:  # stop_early
    """Run ``call`` under ``frame`` until its last capture (``Stop``); return the captures."""
    try:
        _runtime.run_frame(frame, call)
    except Stop as e:
        if e.args[0] is not frame:  # an enclosing stop=True call's
            raise
    return finish(frame)


def _new_state(module: nn.Module, given: dict, params: dict, written: dict) -> TensorDict:
    """The state after a call: ``given``'s entries, the module's for the rest, the written buffers' new values."""
    nested: dict = {}
    for k, t in list(module.named_parameters()) + list(module.named_buffers()):
        *path, leaf = k.split(".")
        d = nested
        for seg in path:
            d = d.setdefault(seg, {})
        d[leaf] = params[k] if k in written else (given[k] if k in given else t.detach())
    return TensorDict(nested, batch_size=[])


@overload
def intervene(
    f: Callable[_P, _R], module: nn.Module, *, edits: Edits | None = ..., capture: None = ..., strict: bool = ...
) -> Callable[_P, _R]: ...
@overload
def intervene(
    f: Callable[_P, _R], module: nn.Module, *, edits: Edits | None = ..., capture: Capture, strict: bool = ...
) -> Callable[_P, tuple[_R, TensorDict]]: ...
@overload
def intervene(  # stop_early: the captures only
    f: Callable[_P, _R],
    module: nn.Module,
    *,
    edits: Edits | None = ...,
    capture: Capture,
    strict: bool = ...,
    stop: Literal[True],
) -> Callable[_P, TensorDict]: ...
@overload
def intervene(
    f: Callable[_P, _R],
    module: nn.Module,
    *,
    edits: Edits | None = ...,
    capture: Capture | None = ...,
    strict: bool = ...,
) -> Callable[_P, Any]: ...


@public("tdfunc.intervene")
def intervene(
    f: Callable[..., Any],
    module: nn.Module,
    *,
    edits: Edits | None = None,
    capture: Capture | None = None,
    strict: bool = True,
    stop: bool = False,  # stop_early
) -> Callable[..., Any]:
    """Transform ``f`` so every call of ``module`` (and its submodules) inside it is edited / captured.

    ``f`` is opaque: it may call ``module`` directly, through :func:`tdfunc.functional_call`, or
    several times.  Site call indices (``"@k"``) count calls over the whole run of ``f``.

    Nesting order: edits apply innermost first.  In
    ``intervene(lambda x: tdfunc.functional_call(m, s, x, edits=E_in), m, edits=E_out)`` a site
    edited by both gets ``E_out(E_in(value))``: the outer transform sees what the inner function
    computes, and an outer capture sees the value after both.

    Args:
        f: any function.
        module: the module whose sites ``edits`` and ``capture`` name.
        edits: mapping from site to edit (as in :func:`tdfunc.functional_call`).
        capture: sites to return.
        strict: with ``False``, sites ``f`` never reaches are skipped instead of raising
            ``NotReachedError`` (as in :func:`tdfunc.functional_call`).
        stop: with ``True``, ``f`` ends as soon as every captured site has been captured (inside the
            model's forward) and ``g`` returns the captures alone (as :func:`tdfunc.functional_call`'s ``stop``).

    Returns:
        ``g`` with ``f``'s signature, returning ``f(...)``, or ``(f(...), captures)`` when ``capture`` is given
        (``captures`` alone with ``stop=True``).

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> f = lambda x: net(x).sum()
        >>> g = tdfunc.intervene(f, net, edits={"1": lambda v: 0 * v}, capture=["0"])
        >>> out, caps = g(torch.randn(3, 4))
        >>> torch.allclose(out, 3 * net[2].bias.sum()), caps["0"].shape
        (True, torch.Size([3, 8]))

    Composes with: ``vmap``, ``grad``, ``torch.compile(fullgraph=True)``, and nests with itself
    and with :func:`tdfunc.functional_call`.
    """
    bare = _intervene(f, module, edits=edits, capture=capture, strict=strict, stop=stop)
    return public("tdfunc.intervene")(bare)  # its errors, raised when it runs, name intervene


def _intervene(
    f: Callable[..., Any],
    module: nn.Module,
    *,
    edits: Edits | None = None,
    capture: Capture | None = None,
    strict: bool = True,
    stop: bool = False,  # stop_early
) -> Callable[..., Any]:
    """:func:`intervene` without its boundary: tdfunc's own uses, whose errors name the public function
    running them (a rule of ``lrp`` that fails names ``tdfunc.lrp``, not ``tdfunc.intervene``)."""
    if not callable(f):
        raise TdfuncTypeError(f"expected a callable f, got {type(f).__name__} ({f!r:.60}).")
    _check_module(module)
    module = _unwrap(module)  # DistributedDataParallel, DataParallel, torch.compile: the model inside
    plan = make_plan(module, edits, capture, strict)
    if not isinstance(stop, bool):  # stop_early
        raise TdfuncTypeError(f"stop must be True or False, got {type(stop).__name__} ({stop!r:.60}).")
    if stop:  # stop_early
        check_stop(plan, capture, False)

        @functools.wraps(f)
        def stopped(*args: Any, **kwargs: Any) -> TensorDict:  # stop_early
            return _run_until_captured(StopFrame(plan), lambda: f(*args, **kwargs))  # type: ignore[arg-type]

        return stopped

    @functools.wraps(f)
    def intervened(*args: Any, **kwargs: Any) -> Any:
        out, captures = _runtime.run_plan(plan, f, *args, **kwargs)
        return (out, captures) if capture is not None else out

    return intervened
