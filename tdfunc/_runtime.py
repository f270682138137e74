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
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Mapping
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from ._edits import Delta, FromSite, Rule
from ._errors import EditError, NotReachedError, SiteError, shape_str
from ._ops import OP_OF
from ._sites import ALL_CALLS, SiteSpec, acquire, module_table, parse_site, release, resolve_site

_LOCAL = threading.local()


class _Op:
    """One edit or capture at one (module, port), or at one (module, operation, port)."""

    __slots__ = ("slot", "key", "element", "call", "payload", "capture", "port", "hidden", "read", "pos", "opname")

    def __init__(self, slot, key, port, element, call, payload, capture, hidden=False):
        self.slot, self.key, self.port, self.element = slot, key, port, element
        self.call, self.payload, self.capture = call, payload, capture
        self.hidden = hidden  # a read for a from_site edit: recorded, never returned
        self.read: _Op | None = None  # for from_site edits: the op recording the source
        self.pos: int | None = None  # ":input.NAME": NAME's position in the forward's signature, if any
        self.opname: str | None = None  # an operation site: the operation's name


class _Entry:
    """The ops of one module, per port, and the index of its call counters."""

    __slots__ = ("counter", "inputs", "outputs", "scope", "blocks")

    def __init__(self, counter):
        self.counter = counter
        self.inputs: list[_Op] = []
        self.outputs: list[_Op] = []
        self.scope: int | None = None  # counter > 0 while this module's own code runs (operation sites under it)
        self.blocks: list[int] = []  # scope counters of ancestors: their operation sites pause while this runs


class _OpEntry:
    """The ops of one operation under one module: the module's scope counter and the operation's call counter."""

    __slots__ = ("scope", "counter", "inputs", "outputs", "path")

    def __init__(self, scope: int, counter: int, path: str):
        self.scope, self.counter, self.path = scope, counter, path
        self.inputs: list[_Op] = []
        self.outputs: list[_Op] = []


class Plan:
    __slots__ = ("fn", "entries", "edits", "captures", "n_counters", "strict", "sites", "ops")

    def __init__(self, fn: str, strict: bool = True):
        self.fn = fn
        self.strict = strict  # False: unreached edits are skipped and unreached captures left out
        self.entries: dict[nn.Module, _Entry] = {}
        self.edits: list[_Op] = []
        self.captures: list[_Op] = []
        self.n_counters = 0
        self.sites: list[tuple[str, nn.Module]] = []  # (name, module) of every entry, installed per call
        self.ops: dict[str, list[_OpEntry]] = {}  # operation name -> its entries (empty: no operation site)


class Frame:
    __slots__ = ("plan", "counts", "hits", "values", "reparam")

    def __init__(self, plan: Plan, reparam: Any = None):
        self.plan = plan
        self.counts = [0] * plan.n_counters
        n = len(plan.edits) + len(plan.captures)
        self.hits = [0] * n
        self.values: list[list[Any]] = [[] for _ in range(n)]
        # (module, flat state, buffer names to clone) of a functional_call: what a checkpoint
        # recomputation of part of the forward must run with again (see _watch_checkpoints)
        self.reparam = reparam

    def snapshot(self) -> Frame:
        """A copy of this frame as it is now (counters, recorded values), for a later recomputation."""
        f = Frame.__new__(Frame)
        f.plan, f.reparam = self.plan, self.reparam
        f.counts, f.hits = list(self.counts), list(self.hits)
        f.values = [list(v) for v in self.values]
        return f


# --- planning ------------------------------------------------------------------------------------


def _walk(root: nn.Module, path: str) -> nn.Module | None:
    m: nn.Module | None = root
    for seg in path.split("."):
        m = m._modules.get(seg) if m is not None else None
    return m


def _resolve(fn: str, root: nn.Module, spec: SiteSpec, cache: dict) -> list[tuple[str, nn.Module]]:
    if not spec.is_glob:
        m = _walk(root, spec.path)
        if m is not None:
            return [(spec.path, m)]
    if "table" not in cache:
        cache["table"] = module_table(root)
    return resolve_site(fn, root, spec, cache["table"])


def _sites_of(fn: str, what: str, value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TypeError(
        f"{fn}: {what} must be a site string or a list of site strings, got {type(value).__name__} "
        f"({value!r:.80}); e.g. {what}=['blocks.0.mlp', 'blocks.*.attn']."
    )


def _check_edit_value(fn: str, site: str, payload: Any) -> None:
    if isinstance(payload, (torch.Tensor, Delta, Rule, FromSite, TensorDictBase)) or callable(payload):
        return
    raise EditError(
        f"{fn}: the edit at site {site!r} is a value of type {type(payload).__name__} ({payload!r:.60}); expected a "
        "Tensor (substitute the value), a callable fn(value) -> value, tdfunc.delta(t) (add t), "
        "tdfunc.from_site(site, fn) (compute it from another site) or tdfunc.rule(fn) (rewrite the module's output)."
    )


def make_plan(fn: str, root: nn.Module, edits: Mapping | None, capture: Any, strict: bool = True) -> Plan | None:
    """Resolve edits and captures to module objects. ``None`` if empty.

    Nothing is installed here: :func:`run_in_frame` installs the plan's sites for each call.
    """
    if not isinstance(strict, bool):
        raise TypeError(f"{fn}: strict must be True or False, got {type(strict).__name__} ({strict!r:.60}).")
    if edits is not None and not isinstance(edits, Mapping):
        raise TypeError(
            f"{fn}: edits must be a mapping from site to edit, got {type(edits).__name__} ({edits!r:.80}); "
            "e.g. edits={'blocks.0.mlp': tdfunc.delta(v)}."
        )
    cap_sites = _sites_of(fn, "capture", capture)
    if not edits and not cap_sites:
        return None
    plan, cache = Plan(fn, strict), {}  # type: ignore[var-annotated]
    seen_keys: set[str] = set()
    requests = [(s, v, False) for s, v in (edits or {}).items()] + [(s, None, True) for s in cap_sites]

    op_entries: dict[tuple[nn.Module, str], _OpEntry] = {}

    def entry_of(name: str, m: nn.Module) -> _Entry:
        entry = plan.entries.get(m)
        if entry is None:
            entry = plan.entries[m] = _Entry(plan.n_counters)
            plan.n_counters += 2
            plan.sites.append((name, m))
        return entry

    def add(name, m, spec, key, payload, is_capture, hidden=False) -> _Op:
        entry = entry_of(name, m)
        op = _Op(
            len(plan.edits) + len(plan.captures), key, spec.port, spec.element, spec.call, payload, is_capture, hidden
        )
        (plan.captures if is_capture else plan.edits).append(op)
        target: _Entry | _OpEntry = entry
        if spec.op is not None:
            op.opname = spec.op
            if entry.scope is None:
                entry.scope = plan.n_counters
                plan.n_counters += 1
                for sub, d in m.named_modules(prefix=name, remove_duplicate=False):
                    if d is not m:  # the module's own code only: a submodule's operations are its own sites
                        entry_of(sub, d).blocks.append(entry.scope)
            target = op_entries.get((m, spec.op))  # type: ignore[assignment]
            if target is None:
                target = op_entries[(m, spec.op)] = _OpEntry(entry.scope, plan.n_counters, name)
                plan.n_counters += 1
                plan.ops.setdefault(spec.op, []).append(target)
        elif spec.port == "input" and isinstance(spec.element, str):
            op.pos = _position(m, spec.element)
        (target.inputs if spec.port == "input" else target.outputs).append(op)
        return op

    for site, payload, is_capture in requests:
        spec = parse_site(fn, site)
        if not is_capture:
            _check_edit_value(fn, spec.text, payload)
            if isinstance(payload, Rule) and spec.port != "output":
                raise EditError(
                    f"{fn}: tdfunc.rule edits rewrite a module's output, but site {spec.text!r} is an input; "
                    f"use the output site {spec.path!r} or a plain callable edit."
                )
        for name, m in _resolve(fn, root, spec, cache):
            key = name + spec.suffix if spec.is_glob else spec.text
            if is_capture:
                if key in seen_keys:
                    continue
                seen_keys.add(key)
            op = add(name, m, spec, key, payload, is_capture)
            if isinstance(payload, FromSite):
                src = parse_site(fn, payload.source)
                if src.is_glob:
                    raise SiteError(
                        f"{fn}: tdfunc.from_site source {src.text!r} at site {spec.text!r} is a glob; name one site."
                    )
                ((src_name, src_m),) = _resolve(fn, root, src, cache)
                op.read = add(src_name, src_m, src, src.text, None, True, hidden=True)
    every: list[_Entry | _OpEntry] = [*plan.entries.values(), *op_entries.values()]
    for e in every:  # per frame: its edits first, then its captures
        e.inputs.sort(key=lambda o: o.capture)
        e.outputs.sort(key=lambda o: o.capture)
    return plan


def _position(module: nn.Module, name: str) -> int | None:
    """The position of argument ``name`` in ``module.forward``'s signature (``None``: keyword-only or absent)."""
    import inspect

    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.KEYWORD_ONLY, p.VAR_KEYWORD):
            return None
        if p.name == name:
            return i
    return None


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


def _times(n: int) -> str:
    return {0: "never ran", 1: "ran once"}.get(n, f"ran {n} times")


def _fit(fn: str, site: str, what: str, new: Any, value: Any, exact: bool) -> Any:
    """Check that ``new`` can stand for ``value``; broadcast it when ``exact`` is False."""
    if not isinstance(value, torch.Tensor):
        if isinstance(value, TensorDictBase) and not isinstance(new, TensorDictBase):
            raise EditError(f"{fn}: {what} at site {site!r} is {_describe(new)}, but the site holds a TensorDict.")
        return new
    if not isinstance(new, torch.Tensor):
        raise EditError(
            f"{fn}: {what} at site {site!r} is {_describe(new)} ({new!r:.60}), but the site holds "
            f"{_describe(value)}; an edit must give a tensor of that shape."
        )
    if new.dtype != value.dtype or new.device != value.device:
        raise EditError(
            f"{fn}: {what} at site {site!r} has dtype {new.dtype} on {new.device}, but the site's value has "
            f"dtype {value.dtype} on {value.device}; convert it with .to(value.dtype, value.device)."
        )
    if new.shape != value.shape:
        ok = False
        if not exact and new.dim() <= value.dim():
            ok = all(a == b or a == 1 for a, b in zip(new.shape[::-1], value.shape[::-1]))
        if not ok:
            how = "broadcastable to" if not exact else "equal to"
            raise EditError(
                f"{fn}: {what} at site {site!r} has shape {shape_str(new.shape)}, but the site's value has shape "
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
    fn, p = frame.plan.fn, op.payload
    if isinstance(p, (torch.Tensor, TensorDictBase)):
        return _own(_fit(fn, op.key, "the substitute", p, value, exact=False))
    if isinstance(p, Delta):
        return value + _fit(fn, op.key, "the delta", p.tensor, value, exact=False)
    if isinstance(p, FromSite):
        seen = frame.values[op.read.slot]  # type: ignore[union-attr]  # a FromSite op has a read
        if not seen:
            raise NotReachedError(
                f"{fn}: tdfunc.from_site at site {op.key!r} needs the value of {p.source!r}, which has not run yet "
                "in this call; the source must be reached before the edited site."
            )
        new = seen[-1] if p.fn is None else _user(p.fn, seen[-1])
        return _own(_fit(fn, op.key, "the from_site value", new, value, exact=True))
    if isinstance(p, Rule):
        new = _user(p.fn, module, args, kwargs, value if op.element is not None else output)
        if op.element is None and not isinstance(output, (torch.Tensor, TensorDictBase)):
            new = _get(fn, op, new, "output")
        new = _fit(fn, op.key, "the rule's result", new, value, exact=True)
        return new if new is value else _own(new)
    new = _fit(fn, op.key, "the edit function's result", _user(p, value), value, exact=True)
    return new if new is value else _own(new)  # the model's own value (an in-place edit) stays


def _keys(container: Mapping) -> str:
    return repr([k for k in container])


def _get(fn: str, op: _Op, container: Any, port: str, i: int | str | None = None, kwargs: Any = None) -> Any:
    if i is None:
        i = op.element
    if i is None:
        if isinstance(container, (torch.Tensor, TensorDictBase)):
            return container
        if isinstance(container, Mapping) and port == "output":
            raise SiteError(
                f"{fn}: site {op.key!r}: the {_what(op)} output is a {type(container).__name__} with keys "
                f"{_keys(container)}; address one entry by key, e.g. "
                f"'{op.key.split('@')[0]}:output.{next(iter(container), 'KEY')}'."
            )
        i = 0
    if isinstance(i, str):  # an output key (a ":input.NAME" was turned into a keyword or a position before)
        if isinstance(container, Mapping) and i in container:
            return container[i]
        if port == "input":
            raise SiteError(
                f"{fn}: site {op.key!r}: the module's forward received no input named {i!r} in this call (it has no "
                f"such argument, or the argument took its default); name an argument the caller passes."
            )
        keys = f" with keys {_keys(container)}" if isinstance(container, Mapping) else ""
        raise SiteError(
            f"{fn}: site {op.key!r}: the {_what(op)} output is {_describe(container)}{keys}, with no key {i!r}; "
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
            f"{fn}: site {op.key!r}: the operation's {what} {_describe(container)}{size}, with no element {i}; {fix}"
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
    raise SiteError(
        f"{fn}: site {op.key!r}: the module's {what} {_describe(container)}{size}, with no element {i}; {fix}"
    )


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


def _run(frame: Frame, ops: list[_Op], counter: int, port: str, module, args, kwargs, container) -> Any:
    k = frame.counts[counter]
    frame.counts[counter] = k + 1
    return _apply(frame, ops, k, port, module, args, kwargs, container)[0]


def _apply(frame: Frame, ops: list[_Op], k: int, port: str, module, args, kwargs, container) -> tuple[Any, Any]:
    """Run ``ops`` on call ``k``; return ``(container, kwargs)`` (kwargs change for ``:input.NAME`` sites)."""
    fn = frame.plan.fn
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
        value = kwargs[i] if by_kw else _get(fn, op, container, port, i, kwargs if port == "input" else None)
        frame.hits[op.slot] += 1
        if op.capture:
            frame.values[op.slot].append(_capture_copy(value))
        else:
            new = _edit(frame, op, value, module, args, kwargs, container)
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
    frames = _active(stack)
    for frame in frames:
        entry = frame.plan.entries.get(module)
        if entry is not None:
            if entry.scope is not None:  # operation sites under this module count from now on
                if not changed:
                    _watch_checkpoints(frames)
                frame.counts[entry.scope] += 1
            for b in entry.blocks:  # and pause while a submodule runs
                frame.counts[b] -= 1
            if entry.inputs:
                if not changed:
                    _watch_checkpoints(frames)
                counter = entry.counter
                k = frame.counts[counter]
                frame.counts[counter] = k + 1
                args, kwargs = _apply(frame, entry.inputs, k, "input", module, args, kwargs, args)
                changed = True
    return (args, kwargs) if changed else None


def output_hook(module, args, kwargs, output=_NO_OUTPUT):
    stack = getattr(_LOCAL, "stack", None)
    if not stack or output is _NO_OUTPUT:  # called without kwargs: see input_hook
        return None
    changed = False
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
                    _watch_checkpoints(frames)
                output = _run(frame, entry.outputs, entry.counter + 1, "output", module, args, kwargs, output)
                changed = True
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
            for frame, oe, k in hits:
                if oe.inputs:
                    args, kwargs = _apply(frame, oe.inputs, k, "input", func, args, kwargs, args)
            out = func(*args, **kwargs)
            for frame, oe, k in hits:
                if oe.outputs:
                    out = _apply(frame, oe.outputs, k, "output", func, args, kwargs, out)[0]
        finally:
            modes.append(self)
        return out


def _modes() -> list:
    modes = getattr(_LOCAL, "modes", None)
    if modes is None:
        modes = _LOCAL.modes = []
    return modes


def _call_with_ops(needs_mode: bool, fn, args: tuple, kwargs: dict):
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


# --- torch.utils.checkpoint ----------------------------------------------------------------------
# A checkpointed region (torch.utils.checkpoint, reentrant or not; transformers'
# gradient_checkpointing_enable) runs its forward again during backward, after the call that
# edited it has returned.  Recomputed without the call's frames (and with the module's own
# parameters instead of the call's state), it would give the backward other values than the
# forward: a silently wrong gradient.  So the first hook that applies an op inside such a region
# finds the region on the Python stack and wraps its recompute function: the recomputation runs
# under copies of the frames as they were when the region began (counters and recorded values, so
# '@k' and from_site see the same calls), the same substituted state, with the sites installed.


def _wrap_recompute(owner: Any, attr: str, frames: list[Frame]) -> None:
    fn = getattr(owner, attr, None)
    if fn is None or getattr(fn, "_tdfunc_replay", False):
        return
    snaps = [f.snapshot() for f in reversed(frames)]  # push order: outermost first

    def recompute(*args, **kwargs):
        return _replay(snaps, fn, args, kwargs)

    recompute._tdfunc_replay = True  # type: ignore[attr-defined]
    setattr(owner, attr, recompute)


def _replay(snaps: list[Frame], fn, args, kwargs):
    n_frames = len(snaps)  # read by _watch_checkpoints: the frames this function pushed  # noqa: F841
    frames = [s.snapshot() for s in snaps]  # every recomputation (one per backward) starts afresh
    with contextlib.ExitStack() as stack:
        for f in frames:
            if f.reparam is not None:
                module, params, fresh = f.reparam
                params = {k: (v.clone() if k in fresh else v) for k, v in params.items()} if fresh else params
                stack.enter_context(torch.nn.utils.stateless._reparametrize_module(module, params, tie_weights=True))
        held = []
        try:
            for f in frames:
                held.append(acquire(f.plan.fn, f.plan.sites))
            for f in frames:
                push(f)
            try:
                return _call_with_ops(any(f.plan.ops for f in frames), fn, args, kwargs)
            finally:
                for _ in frames:
                    pop()
        finally:
            for h in held:
                release(h)


_CODES: tuple | None = None


def _codes() -> tuple:
    global _CODES
    if _CODES is None:
        import inspect

        import torch.utils.checkpoint as ckpt

        _CODES = (
            inspect.unwrap(ckpt.checkpoint).__code__,
            ckpt.CheckpointFunction.forward.__code__,
            run_frame.__code__,
            _replay.__code__,
        )
    return _CODES


def _watch_checkpoints(frames: list[Frame]) -> None:
    """Wrap the recompute function of every checkpoint region entered inside ``frames``' calls."""
    if torch.compiler.is_compiling():  # compiled checkpoints are traced, not recomputed by these functions
        return
    free, reentrant, call, replay = _codes()
    n, passed = len(frames), 0
    f = sys._getframe(2)
    while f is not None and passed < n:
        code = f.f_code
        if code is call:
            passed += 1  # frames[passed:] were pushed before anything further up the stack
        elif code is replay:
            passed += f.f_locals["n_frames"]
        elif code is free:  # use_reentrant=False: the region's _CheckpointFrame lives in the generator
            gen = f.f_locals.get("gen")
            gi = getattr(gen, "gi_frame", None)
            ck = gi.f_locals.get("new_frame") if gi is not None else None
            if ck is not None:
                _wrap_recompute(ck, "recompute_fn", frames[passed:])
        elif code is reentrant:  # use_reentrant=True: backward calls ctx.run_function again
            ctx = f.f_locals.get("ctx")
            if ctx is not None:
                _wrap_recompute(ctx, "run_function", frames[passed:])
        f = f.f_back  # type: ignore[assignment]  # None ends the loop


# --- finishing a frame ---------------------------------------------------------------------------


def _calls(frame: Frame, op: _Op) -> int:
    for m, entry in frame.plan.entries.items():
        if op in entry.inputs:
            return frame.counts[entry.counter]
        if op in entry.outputs:
            return frame.counts[entry.counter + 1]
    for oes in frame.plan.ops.values():
        for oe in oes:
            if op in oe.inputs or op in oe.outputs:
                return frame.counts[oe.counter]
    return 0


def _ran(frame: Frame, op: _Op) -> str:
    """How often the site's module (or operation) ran in this call, for a NotReachedError."""
    n = _calls(frame, op)
    if op.opname is None:
        return f"the module {_times(n)} in this call"
    path = op.key.split("/")[0]
    calls = {0: "was never called", 1: "was called once"}.get(n, f"was called {n} times")
    return f"{op.opname} {calls} under {path!r} in this call"


def _op_hint(op: _Op) -> str:
    if op.opname != "softmax":
        return ""
    return (
        " A model whose attention runs torch's scaled_dot_product_attention (transformers' default, "
        "attn_implementation='sdpa') never forms the attention pattern: load it with attn_implementation='eager' "
        "to address the softmax, or use the site '…/scaled_dot_product_attention' for the attention output."
    )


def finish(frame: Frame) -> TensorDict:
    """Check every edit was applied and every capture found once; return the captures."""
    fn = frame.plan.fn
    for op in frame.plan.edits:
        if frame.hits[op.slot] == 0 and frame.plan.strict:
            raise NotReachedError(
                f"{fn}: the edit at site {op.key!r} was never applied: {_ran(frame, op)}"
                + (f", so it has no call {op.call}" if op.call not in (None, ALL_CALLS) else "")
                + ". Check that the forward reaches this module (and with these inputs), or remove the edit."
                + _op_hint(op)
            )
    out = {}
    for op in frame.plan.captures:
        if op.hidden:
            continue
        vals = frame.values[op.slot]
        if not vals and not frame.plan.strict:
            continue
        if not vals:
            raise NotReachedError(
                f"{fn}: nothing was captured at site {op.key!r}: {_ran(frame, op)}"
                + (f", so it has no call {op.call}" if op.call not in (None, ALL_CALLS) else "")
                + ". Capture a site the forward reaches."
                + _op_hint(op)
            )
        if op.call is None and len(vals) > 1:
            raise NotReachedError(
                f"{fn}: site {op.key!r} ran {len(vals)} times in this call, so a single capture is ambiguous; "
                f"capture '{op.key}@0' … '{op.key}@{len(vals) - 1}' for one call, or '{op.key}@*' for all of them "
                "stacked on a new leading dimension."
            )
        if op.call == ALL_CALLS:
            shapes = {tuple(v.shape) for v in vals if isinstance(v, torch.Tensor)}
            if len(shapes) > 1:
                raise NotReachedError(
                    f"{fn}: site {op.key!r} gave values of different shapes {sorted(shapes)} over its "
                    f"{len(vals)} calls and cannot be stacked; capture each call with '@k'."
                )
            out[op.key] = torch.stack(vals)
        else:
            out[op.key] = vals[0]
    return TensorDict(out, batch_size=[])


def run_in_frame(plan: Plan, fn, *args, **kwargs):
    """Call ``fn`` with ``plan``'s sites installed and its frame on the stack; return (result, frame).

    The sites are acquired for this call only and released in ``finally`` (also when ``fn``
    raises): the last running call using a site removes its hooks, unless it is pinned.
    """
    return run_frame(Frame(plan), fn, args, kwargs)


def run_frame(frame: Frame, fn, args: tuple = (), kwargs: dict | None = None):
    """:func:`run_in_frame` with a frame built by the caller (``functional_call`` adds its state to it)."""
    held = acquire(frame.plan.fn, frame.plan.sites)
    push(frame)
    try:
        result = _call_with_ops(bool(frame.plan.ops), fn, args, kwargs or {})
    finally:
        pop()
        release(held)
    return result, frame
