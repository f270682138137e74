"""Plans and frames: what a tdfunc call does at which module, resolved once, and its per-call state.

A *plan* maps module objects to the operations (edits, then captures) to run at their input or
output, and operation names to the operations to run at the k-th call of a torch function under a
module.  A *frame* is one call's counters and recorded values over a plan.  Nothing here installs
a hook or runs a model: :mod:`tdfunc._runtime` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from tensordict import TensorDictBase
from torch import nn

from ._edits import Delta, FromSite, GradEdit, Rule  # GradEdit: grad_edit
from ._errors import EditError, SiteError, TdfuncTypeError
from ._sites import SiteSpec, module_table, parse_site, resolve_site


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
    __slots__ = ("entries", "edits", "captures", "n_counters", "strict", "sites", "ops")

    def __init__(self, strict: bool = True):
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
        # recomputation of part of the forward must run with again (see _checkpoint.watch_checkpoints)
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


def _resolve(root: nn.Module, spec: SiteSpec, cache: dict) -> list[tuple[str, nn.Module]]:
    if not spec.is_glob:
        m = _walk(root, spec.path)
        if m is not None:
            return [(spec.path, m)]
    if "table" not in cache:
        cache["table"] = module_table(root)
    return resolve_site(root, spec, cache["table"])


def _sites_of(what: str, value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TdfuncTypeError(
        f"{what} must be a site string or a list of site strings, got {type(value).__name__} "
        f"({value!r:.80}); e.g. {what}=['blocks.0.mlp', 'blocks.*.attn']."
    )


def _check_edit_value(site: str, payload: Any) -> None:
    if isinstance(payload, (torch.Tensor, Delta, Rule, FromSite, TensorDictBase)) or callable(payload):
        return
    if isinstance(payload, GradEdit):  # grad_edit
        return
    raise EditError(
        f"the edit at site {site!r} is a value of type {type(payload).__name__} ({payload!r:.60}); expected a "
        "Tensor (substitute the value), a callable fn(value) -> value, tdfunc.delta(t) (add t), "
        "tdfunc.from_site(site, fn) (compute it from another site) or tdfunc.rule(fn) (rewrite the module's output)."
    )


def make_plan(root: nn.Module, edits: Mapping | None, capture: Any, strict: bool = True) -> Plan | None:
    """Resolve edits and captures to module objects. ``None`` if empty.

    Nothing is installed here: :func:`run_in_frame` installs the plan's sites for each call.
    """
    if not isinstance(strict, bool):
        raise TdfuncTypeError(f"strict must be True or False, got {type(strict).__name__} ({strict!r:.60}).")
    if edits is not None and not isinstance(edits, Mapping):
        raise TdfuncTypeError(
            f"edits must be a mapping from site to edit, got {type(edits).__name__} ({edits!r:.80}); "
            "e.g. edits={'blocks.0.mlp': tdfunc.delta(v)}."
        )
    cap_sites = _sites_of("capture", capture)
    if not edits and not cap_sites:
        return None
    plan, cache = Plan(strict), {}  # type: ignore[var-annotated]
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
        spec = parse_site(site)
        if not is_capture:
            _check_edit_value(spec.text, payload)
            if isinstance(payload, Rule) and spec.port != "output":
                raise EditError(
                    f"tdfunc.rule edits rewrite a module's output, but site {spec.text!r} is an input; "
                    f"use the output site {spec.path!r} or a plain callable edit."
                )
        for name, m in _resolve(root, spec, cache):
            key = name + spec.suffix if spec.is_glob else spec.text
            if is_capture:
                if key in seen_keys:
                    continue
                seen_keys.add(key)
            op = add(name, m, spec, key, payload, is_capture)
            if isinstance(payload, FromSite):
                src = parse_site(payload.source)
                if src.is_glob:
                    raise SiteError(
                        f"tdfunc.from_site source {src.text!r} at site {spec.text!r} is a glob; name one site."
                    )
                ((src_name, src_m),) = _resolve(root, src, cache)
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
