"""The runtime behind every tdfunc call: plans, the thread-local frame stack and the site hooks.

A *plan* maps module objects to the operations (edits, then captures) to run at their input or
output.  A call installs the hooks of the plan's modules (reference-counted per module, see
``_sites.acquire``), pushes a *frame* (the plan plus per-call counters and captured values) on a
thread-local stack, and in ``finally`` pops it and removes the hooks no other running call uses.
The hooks read the stack: with no frame they return at once, so a module computes exactly what
it did before.

Nesting: the frames on the stack all apply, innermost (most recently pushed) first, so an outer
:func:`tdfunc.intervene` sees the value an inner call produced.  While a user edit function or rule
runs, a barrier (``None``) hides every frame below it: a model called inside an edit runs plain.

Plans and frames are built in :mod:`tdfunc._plan`, checked at the end of a call in
:mod:`tdfunc._finish`; edits inside checkpointed regions are replayed by :mod:`tdfunc._checkpoint`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from ._edits import Delta, FromSite, GradEdit, Rule  # GradEdit: grad_edit
from ._errors import EditError, NotReachedError, SiteError, shape_str
from ._finish import finish
from ._grad_edit import apply_grad_edit  # grad_edit
from ._ops import OP_OF
from ._plan import Frame, Plan, _Op
from ._sites import ALL_CALLS, acquire, release
from ._stop import StopFrame, stop_if_done  # stop_early

_LOCAL = threading.local()


# --- the stack -----------------------------------------------------------------------------------


def push(frame: Frame | None) -> None:
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    stack.append(frame)


def pop() -> None:
    _LOCAL.stack.pop()


def _user(fn, *args):
    """Run user code (an edit or a rule) outside every active frame."""
    push(None)
    try:
        return fn(*args)
    finally:
        pop()


# --- applying ops --------------------------------------------------------------------------------


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {shape_str(v.shape)}, dtype {v.dtype}, device {v.device}"
    return f"a value of type {type(v).__name__}"


def _fit(site: str, what: str, new: Any, value: Any, exact: bool) -> Any:
    """Check that ``new`` can stand for ``value``; broadcast it when ``exact`` is False."""
    if not isinstance(value, torch.Tensor):
        if isinstance(value, TensorDictBase) and not isinstance(new, TensorDictBase):
            raise EditError(f"{what} at site {site!r} is {_describe(new)}, but the site holds a TensorDict.")
        return new
    if not isinstance(new, torch.Tensor):
        raise EditError(
            f"{what} at site {site!r} is {_describe(new)} ({new!r:.60}), but the site holds "
            f"{_describe(value)}; an edit must give a tensor of that shape."
        )
    if new.dtype != value.dtype:  # cross_device: a device alone is no error (moved below)
        raise EditError(
            f"{what} at site {site!r} has dtype {new.dtype} on {new.device}, but the site's value has "
            f"dtype {value.dtype} on {value.device}; convert it with .to(value.dtype, value.device)."
        )
    if new.device != value.device:  # cross_device: a copy on the site's device (a model spread over devices)
        new = new.to(value.device)
    if new.shape != value.shape:
        ok = False
        if not exact and new.dim() <= value.dim():
            ok = all(a == b or a == 1 for a, b in zip(new.shape[::-1], value.shape[::-1]))
        if not ok:
            how = "broadcastable to" if not exact else "equal to"
            raise EditError(
                f"{what} at site {site!r} has shape {shape_str(new.shape)}, but the site's value has shape "
                f"{shape_str(value.shape)}; give a tensor with a shape {how} {shape_str(value.shape)}."
            )
        if what == "the substitute":
            new = new.expand(value.shape)  # materialised by _own
    return new


def _own(new: Any) -> Any:
    """A fresh, dense copy of what an edit puts into the model.

    The model may write into the value it receives (``ReLU(inplace=True)``) or ``.view`` it: a
    substitute, or a tensor an edit function returns (a closed-over tensor, another call's capture,
    a parameter), must neither be written through nor be a stride-0 broadcast.  ``clone`` keeps
    gradients flowing and works under ``vmap`` and ``torch.compile``.
    """
    if isinstance(new, torch.Tensor):
        return new.clone(memory_format=torch.contiguous_format)
    if isinstance(new, TensorDictBase):
        return new.clone()
    return new


def _edit(frame: Frame, op: _Op, value: Any, module, args, kwargs, output) -> Any:
    p = op.payload
    if isinstance(p, (torch.Tensor, TensorDictBase)):
        return _own(_fit(op.key, "the substitute", p, value, exact=False))
    if isinstance(p, Delta):
        return value + _fit(op.key, "the delta", p.tensor, value, exact=False)
    if isinstance(p, GradEdit):  # grad_edit: identity forward, p.fn on the gradient
        return apply_grad_edit(op.key, p.fn, value)
    if isinstance(p, FromSite):
        seen = frame.values[op.read.slot]  # type: ignore[union-attr]  # a FromSite op has a read
        if not seen:
            raise NotReachedError(
                f"tdfunc.from_site at site {op.key!r} needs the value of {p.source!r}, which has not run yet "
                "in this call; the source must be reached before the edited site."
            )
        new = seen[-1] if p.fn is None else _user(p.fn, seen[-1])
        return _own(_fit(op.key, "the from_site value", new, value, exact=True))
    if isinstance(p, Rule):
        new = _user(p.fn, module, args, kwargs, value if op.element is not None else output)
        if op.element is None and not isinstance(output, (torch.Tensor, TensorDictBase)):
            new = _get(op, new, "output")
        new = _fit(op.key, "the rule's result", new, value, exact=True)
        return new if new is value else _own(new)
    new = _fit(op.key, "the edit function's result", _user(p, value), value, exact=True)
    return new if new is value else _own(new)  # the model's own value (an in-place edit) stays


def _keys(container: Mapping) -> str:
    return repr([k for k in container])


def _get(op: _Op, container: Any, port: str, i: int | str | None = None, kwargs: Any = None) -> Any:
    if i is None:
        i = op.element
    if i is None:
        if isinstance(container, (torch.Tensor, TensorDictBase)):
            return container
        if isinstance(container, Mapping) and port == "output":
            raise SiteError(
                f"site {op.key!r}: the {_what(op)} output is a {type(container).__name__} with keys "
                f"{_keys(container)}; address one entry by key, e.g. "
                f"'{op.key.split('@')[0]}:output.{next(iter(container), 'KEY')}'."
            )
        i = 0
    if isinstance(i, str):  # an output key (a ":input.NAME" was turned into a keyword or a position before)
        if isinstance(container, Mapping) and i in container:
            return container[i]
        if port == "input":
            raise SiteError(
                f"site {op.key!r}: the module's forward received no input named {i!r} in this call (it has no "
                f"such argument, or the argument took its default); name an argument the caller passes."
            )
        keys = f" with keys {_keys(container)}" if isinstance(container, Mapping) else ""
        raise SiteError(
            f"site {op.key!r}: the {_what(op)} output is {_describe(container)}{keys}, with no key {i!r}; "
            + (
                "use one of its keys."
                if keys
                else "address a tuple element as ':output.N', a dict key as ':output.KEY'."
            )
        )
    if isinstance(container, (tuple, list)) and len(container) > i:
        return container[i]
    what = "positional inputs are" if port == "input" else "output is"
    size = f" of length {len(container)}" if isinstance(container, (tuple, list)) else ""
    if op.opname is not None:
        fix = (
            f"the call of {op.opname} has {len(container)} positional inputs; use ':input.N' with N below that."
            if port == "input"
            else "use ':output.N' with a valid N."
        )
        raise SiteError(
            f"site {op.key!r}: the operation's {what} {_describe(container)}{size}, with no element {i}; {fix}"
        )
    fix = (
        "an input passed by keyword cannot be addressed; pass it positionally or edit another site."
        if port == "input"
        else "use 'path:output.N' with a valid N."
    )
    if isinstance(container, Mapping) and port == "output":
        fix = f"it is a {type(container).__name__} with keys {_keys(container)}; address an entry as 'path:output.KEY'."
    if port == "input" and kwargs:
        path = op.key.split(":")[0]
        fix = (
            f"it also received {_keys(kwargs)} by keyword: address one by name, "
            f"e.g. '{path}:input.{next(iter(kwargs))}'."
        )
    raise SiteError(f"site {op.key!r}: the module's {what} {_describe(container)}{size}, with no element {i}; {fix}")


def _what(op: _Op) -> str:
    return "module's" if op.opname is None else f"{op.opname} call's"


def _put(container: Any, op: _Op, new: Any, i: int | str | None = None) -> Any:
    if i is None:
        i = op.element
    if i is None:
        if isinstance(container, (torch.Tensor, TensorDictBase)):
            return new
        i = 0
    if isinstance(i, str):  # a dict or a ModelOutput: a new one of the same type, the entry replaced
        entries = {**container, i: new}
        if type(container) is dict:
            return entries
        if hasattr(container, "to_tuple"):  # transformers' ModelOutput: a dataclass built from its fields
            return type(container)(**entries)
        return type(container)(entries)
    items = list(container)
    items[i] = new
    if isinstance(container, list):
        return items
    if type(container) is tuple:
        return tuple(items)
    if hasattr(type(container), "n_fields"):  # torch.return_types (structseq): built from one sequence
        return type(container)(items)
    return type(container)(*items)  # namedtuples


def _capture_copy(value: Any) -> Any:
    # Clone: a later in-place op (ReLU(inplace=True)) must not rewrite what was captured.
    return value.clone() if isinstance(value, (torch.Tensor, TensorDictBase)) else value


def _run(frame: Frame, ops: list[_Op], counter: int, port: str, module, args, kwargs, container, later=None) -> Any:
    k = frame.counts[counter]
    frame.counts[counter] = k + 1
    return _apply(frame, ops, k, port, module, args, kwargs, container, later)[0]


def _apply(
    frame: Frame, ops: list[_Op], k: int, port: str, module, args, kwargs, container, later: list | None = None
) -> tuple[Any, Any]:
    """Run ``ops`` on call ``k``; return ``(container, kwargs)`` (kwargs change for ``:input.NAME`` sites).

    grad_edit: with ``later`` given, gradient edits are appended to it instead of applied; the hook applies
    them with :func:`_apply_later` after every frame's value edits at the site.
    """
    for op in ops:
        if op.call is not None and op.call != ALL_CALLS and op.call != k:
            continue
        i = op.element
        by_kw = False
        if port == "input" and isinstance(i, str):
            if kwargs is not None and i in kwargs:
                by_kw = True
            elif op.pos is not None and op.pos < len(container):
                i = op.pos
        value = kwargs[i] if by_kw else _get(op, container, port, i, kwargs if port == "input" else None)
        frame.hits[op.slot] += 1
        if op.capture:
            frame.values[op.slot].append(_capture_copy(value))
            if type(frame) is StopFrame:  # stop_early: the forward ends after the hook of the last capture
                frame.captured(op)
        else:
            if later is not None and isinstance(op.payload, GradEdit):  # grad_edit: after every value edit
                later.append((frame, op, i, by_kw))
                continue
            new = _edit(frame, op, value, module, args, kwargs, container)
            if by_kw:
                kwargs = {**kwargs, i: new}
            else:
                container = _put(container, op, new, i)
    return container, kwargs


def _apply_later(later: list, port: str, container: Any, kwargs: Any) -> tuple[Any, Any]:
    """grad_edit: the gradient edits :func:`_apply` put off, in frame order, on the site's final value."""
    for frame, op, i, by_kw in later:
        value = kwargs[i] if by_kw else _get(op, container, port, i)
        new = apply_grad_edit(op.key, op.payload.fn, value)
        if by_kw:
            kwargs = {**kwargs, i: new}
        else:
            container = _put(container, op, new, i)
    return container, kwargs


_NO_OUTPUT = object()


def _active(stack: list) -> list[Frame]:
    frames = []
    i = len(stack) - 1
    while i >= 0 and stack[i] is not None:
        frames.append(stack[i])
        i -= 1
    return frames


def input_hook(module, args, kwargs=None):
    # kwargs is None only when torch calls the hook without kwargs: another thread was adding or
    # removing it during this call, which no call of this thread is using (it would hold the site)
    stack = getattr(_LOCAL, "stack", None)
    if not stack or kwargs is None:
        return None
    changed = False
    later: list = []  # grad_edit
    frames = _active(stack)
    for frame in frames:
        entry = frame.plan.entries.get(module)
        if entry is not None:
            if entry.scope is not None:  # operation sites under this module count from now on
                if not changed:
                    watch_checkpoints(frames)
                frame.counts[entry.scope] += 1
            for b in entry.blocks:  # and pause while a submodule runs
                frame.counts[b] -= 1
            if entry.inputs:
                if not changed:
                    watch_checkpoints(frames)
                counter = entry.counter
                k = frame.counts[counter]
                frame.counts[counter] = k + 1
                args, kwargs = _apply(frame, entry.inputs, k, "input", module, args, kwargs, args, later)
                changed = True
    if later:  # grad_edit
        args, kwargs = _apply_later(later, "input", args, kwargs)
    if changed:  # stop_early
        stop_if_done(frames)
    return (args, kwargs) if changed else None


def output_hook(module, args, kwargs, output=_NO_OUTPUT):
    stack = getattr(_LOCAL, "stack", None)
    if not stack or output is _NO_OUTPUT:  # called without kwargs: see input_hook
        return None
    changed = False
    later: list = []  # grad_edit
    frames = _active(stack)
    for frame in frames:
        entry = frame.plan.entries.get(module)
        if entry is not None:
            if entry.scope is not None:
                frame.counts[entry.scope] -= 1
            for b in entry.blocks:
                frame.counts[b] += 1
            if entry.outputs:
                if not changed:
                    watch_checkpoints(frames)
                output = _run(frame, entry.outputs, entry.counter + 1, "output", module, args, kwargs, output, later)
                changed = True
    if later:  # grad_edit
        output = _apply_later(later, "output", output, None)[0]
    if changed:  # stop_early
        stop_if_done(frames)
    return output if changed else None


# --- operation sites -----------------------------------------------------------------------------
# A call whose plan has operation sites runs under one _OpMode (a TorchFunctionMode): it sees every
# torch function called from Python during the call, maps it to an operation name (``_ops.OP_OF``)
# and applies the ops of every active frame whose module scope is open (the module's input hook
# opened it, its output hook closes it: the counters live in the frame, as '@k' counters do).  The
# mode keeps no state of its own: compiled code reads nothing back from it.  Only one _OpMode runs
# per thread (``_LOCAL.modes``): it serves every frame, innermost first, so nested calls compose as
# module sites do.  torch runs a mode's handler with the mode popped, so while it runs user code (an
# edit) it is not live, and a call with operation sites inside that edit enters its own mode.


class _OpMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        name = OP_OF.get(func)
        stack = getattr(_LOCAL, "stack", None)
        if name is None or not stack:
            return func(*args, **kwargs)
        hits = []
        i = len(stack) - 1
        while i >= 0 and stack[i] is not None:  # the active frames, innermost first (as _active)
            frame = stack[i]
            for oe in frame.plan.ops.get(name, ()):
                if frame.counts[oe.scope] > 0:
                    k = frame.counts[oe.counter]
                    frame.counts[oe.counter] = k + 1
                    hits.append((frame, oe, k))
            i -= 1
        if not hits:
            return func(*args, **kwargs)
        modes = _LOCAL.modes
        modes.pop()  # torch popped this mode while its handler runs: not live for user code run here
        try:
            later: list = []  # grad_edit
            for frame, oe, k in hits:
                if oe.inputs:
                    args, kwargs = _apply(frame, oe.inputs, k, "input", func, args, kwargs, args, later)
            if later:  # grad_edit
                args, kwargs = _apply_later(later, "input", args, kwargs)
                later = []
            out = func(*args, **kwargs)
            for frame, oe, k in hits:
                if oe.outputs:
                    out = _apply(frame, oe.outputs, k, "output", func, args, kwargs, out, later)[0]
            if later:  # grad_edit
                out = _apply_later(later, "output", out, None)[0]
            stop_if_done([f for f, _, _ in hits])  # stop_early
        finally:
            modes.append(self)
        return out


def _modes() -> list:
    modes = getattr(_LOCAL, "modes", None)
    if modes is None:
        modes = _LOCAL.modes = []
    return modes


def call_with_ops(needs_mode: bool, fn, args: tuple, kwargs: dict):
    """``fn(*args, **kwargs)``, under an :class:`_OpMode` when ``needs_mode`` and none is live in this thread."""
    if not needs_mode:
        return fn(*args, **kwargs)
    modes = _modes()
    if modes:
        return fn(*args, **kwargs)
    mode = _OpMode()
    modes.append(mode)
    try:
        with mode:
            return fn(*args, **kwargs)
    finally:
        modes.pop()


def run_in_frame(plan: Plan, fn, *args, **kwargs):
    """Call ``fn`` with ``plan``'s sites installed and its frame on the stack; return (result, frame).

    The sites are acquired for this call only and released in ``finally`` (also when ``fn``
    raises): the last running call using a site removes its hooks, unless it is pinned.
    """
    return run_frame(Frame(plan), fn, args, kwargs)


def run_frame(frame: Frame, fn, args: tuple = (), kwargs: dict | None = None):
    """:func:`run_in_frame` with a frame built by the caller (``functional_call`` adds its state to it)."""
    held = acquire(frame.plan.sites)
    push(frame)
    try:
        result = call_with_ops(bool(frame.plan.ops), fn, args, kwargs or {})
    finally:
        pop()
        release(held)
    return result, frame


def run_plan(plan: Plan | None, fn, *args, **kwargs) -> tuple[Any, TensorDict]:
    """``fn(*args, **kwargs)`` under ``plan`` (``None``: plainly) -> ``(result, captures)``, edits checked applied."""
    if plan is None:
        return fn(*args, **kwargs), TensorDict({}, batch_size=[])
    out, frame = run_in_frame(plan, fn, *args, **kwargs)
    return out, finish(frame)


from ._checkpoint import watch_checkpoints  # noqa: E402  # it calls back into this module (push, pop, run_frame)
