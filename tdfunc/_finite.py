"""The non-finite policy shared by every method family (README "Errors and non-finite values").

Inputs are checked at the public boundary: a NaN or infinite value in an input tensor, baseline, alpha or
activation set raises the family's ``ValueError`` naming the entry (one ``torch.isfinite(x).all()`` per
input).  A non-finite *result* of a method warns with :class:`NonFiniteWarning` (the inputs were finite, so
the model or ``f`` produced it).  Neither check runs inside ``torch.func`` transforms (``vmap``, ``grad``,
...), ``torch.compile`` or a ``torch.jit`` trace, where a tensor's values cannot be read: there the check is
the caller's job.
"""

from __future__ import annotations

import warnings
from typing import TypeGuard

import torch

from ._errors import here

__all__ = ["NonFiniteWarning", "readable", "check_finite", "warn_nonfinite"]


class NonFiniteWarning(UserWarning):
    """A method returned NaN or infinite values from finite inputs (the model or ``f`` produced them)."""


def readable(t: object) -> TypeGuard[torch.Tensor]:
    """Whether ``t``'s values can be read here: a real tensor, outside transforms, compile and tracing."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta" or not (t.is_floating_point() or t.is_complex()):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return torch._C._functorch.maybe_current_level() is None


def _counts(t: torch.Tensor) -> str:
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    parts = ([f"{nan} NaN"] if nan else []) + ([f"{inf} infinite"] if inf else [])
    return " and ".join(parts) + f" value{'s' if nan + inf > 1 else ''} (of {t.numel()})"


def check_finite(what: str, t: object, family: type[Exception], fix: str = "") -> None:
    """Raise ``family`` when the tensor ``t`` holds NaN or inf (skipped where values cannot be read).

    Message (the public function adds its name): ``"{what} holds {n} NaN and {m} infinite values (of {numel});
    {fix or default}."``.
    """
    if not readable(t) or bool(torch.isfinite(t).all()):
        return
    fix = fix or "replace them (e.g. torch.nan_to_num) or drop those rows before the call"
    raise family(f"{what} holds {_counts(t)}; {fix}.")


def warn_nonfinite(what: str, t: object, hint: str = "") -> None:
    """Warn with :class:`NonFiniteWarning` when the result ``t`` holds NaN or inf (skipped where unreadable)."""
    if not readable(t) or bool(torch.isfinite(t).all()):
        return
    hint = hint or "the inputs were finite, so the model (or f) produced them; check it for overflow or 0/0"
    warnings.warn(f"{here()}: the result {what} holds {_counts(t)}; {hint}.", NonFiniteWarning, stacklevel=3)
