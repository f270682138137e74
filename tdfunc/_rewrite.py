"""Record-then-rewrite: value-preserving rewrites of module outputs, with constants from a first forward.

A rewrite replaces a module's output ``z`` by an expression equal to ``z`` in value whose Jacobian is a
modified one (LRP rules, guided backprop).  What it needs besides the call (ratios, masks, ``z`` itself)
must be a constant to the inner vector-Jacobian product, yet a function of the weights and inputs to
outer derivatives; ``.detach()`` gives the first and loses the second.  So ``f`` runs twice: a first
forward records each site's constants (its output flows on unchanged), a second applies the rewrites
with them as :func:`tdfunc.rule` edits, the records of a site replayed in call order.  Under
``torch.no_grad()``, where nothing can differentiate the result, one forward does both, the constants
recorded from detached values: equal values, one forward fewer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ._call import _intervene as intervene
from ._edits import rule
from ._errors import NotReachedError

__all__ = ["Rewrite", "main_output", "record_then_rewrite"]


class Rewrite:
    """The two halves of a value-preserving rewrite of a module's output (one object may serve many sites)."""

    def record(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        """First pass: the constants :meth:`rewrite` needs, from the call's inputs and output."""
        raise NotImplementedError(f"{type(self).__name__}.record is not implemented")

    def rewrite(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, constants: Any
    ) -> Any:
        """Second pass: the module's new output (its first element for a tuple output), equal to it in value."""
        raise NotImplementedError(f"{type(self).__name__}.rewrite is not implemented")

    def recorded_output(self, out: Any, constants: Any) -> Any:
        """The value the first forward continues with: ``out`` (a rewrite that recomputes the module may
        return its recomputation, e.g. where the module's own kernel has no double backward)."""
        return out


def main_output(out: Any) -> Any:
    """The tensor a rewrite replaces: the module's output, or its first element (``nn.MultiheadAttention``)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def _detached(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, (tuple, list)):
        return type(v)(_detached(e) for e in v)
    return v


def _recording(site: Rewrite, seen: list) -> Callable:
    def fn(module, args, kwargs, out):
        constants = site.record(module, args, kwargs, out)
        seen.append((main_output(out).shape, constants))
        return site.recorded_output(out, constants)

    return fn


def _what(module: Any) -> str:
    """``"Linear module"``, or ``"operation"`` at an operation site (the rule then gets the torch function)."""
    return f"{type(module).__name__} module" if isinstance(module, nn.Module) else "operation"


def _replaying(name: str, site: Rewrite, seen: list) -> Callable:
    calls = iter(seen)

    def fn(module, args, kwargs, out):
        rec = next(calls, None)
        if rec is None or rec[0] != main_output(out).shape:
            raise NotReachedError(
                f"f called the {_what(module)} {name!r} more often, or with other shapes, "
                "than in the first of its two forwards; f must be deterministic (put dropout layers in eval())."
            )
        return site.rewrite(module, args, kwargs, out, rec[1])

    return fn


def _one_pass(site: Rewrite) -> Callable:
    """Record and rewrite in the same forward, the constants from detached values: the same value and inner
    Jacobian, but outer derivatives would miss the constants' dependence on the weights (the ``.detach()``
    trick), so this runs only where no outer derivative can be taken (grad mode off)."""

    def fn(module, args, kwargs, out):
        constants = site.record(module, _detached(args), {k: _detached(v) for k, v in kwargs.items()}, _detached(out))
        return site.rewrite(module, args, kwargs, out, constants)

    return fn


def record_then_rewrite(
    f: Callable,
    module: nn.Module,
    sites: Mapping[str, Rewrite],
    first_args: tuple,
    outputs: list | None = None,
    watch: Callable[[Callable], Callable] | None = None,
) -> Callable:
    """``f`` with every site's output rewritten, the constants recorded by running ``f(*first_args)`` now.

    With grad mode on (decided here, once), ``f(*first_args)`` runs now with each site's :meth:`Rewrite.record`,
    and every call of the returned function replays the records in order into :meth:`Rewrite.rewrite`
    (``NotReachedError`` if a site runs more often, or with another output shape, than it did).  With grad
    mode off nothing runs now and each call records and rewrites in one forward.  Sites ``f`` does not
    reach are skipped (non-strict).  ``outputs``, if given,
    receives ``f(*first_args)`` (the first forward's output; with grad mode off, one plain forward more).
    ``watch``, if given, wraps ``f`` for its first forward (the recording one; with grad mode off, the first call
    of the returned function), e.g. to check what that forward computes.
    """
    if not sites:
        if outputs is not None:
            outputs.append(f(*first_args))
        return f
    if torch.is_grad_enabled():
        seen: dict[str, list] = {s: [] for s in sites}
        f1 = f if watch is None else watch(f)
        out = intervene(f1, module, edits={s: rule(_recording(r, seen[s])) for s, r in sites.items()}, strict=False)(
            *first_args
        )
        watch = None
        if outputs is not None:
            outputs.append(out)
        make = lambda s, r: _replaying(s, r, seen[s])  # noqa: E731  fresh iterators over the records per call
    else:
        if outputs is not None:
            outputs.append(f(*first_args))
        make = lambda s, r: _one_pass(r)  # noqa: E731

    pending = [] if watch is None else [watch]  # grad mode off: the first call is the first forward

    def rewritten(*args: Any, **kwargs: Any) -> Any:
        g = pending.pop()(f) if pending else f
        return intervene(g, module, edits={s: rule(make(s, r)) for s, r in sites.items()}, strict=False)(
            *args, **kwargs
        )

    return rewritten
