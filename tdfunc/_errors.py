"""Exception types and message helpers shared by every public function."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["TdfuncError", "SiteError", "EditError", "StateError", "NotReachedError", "suggest"]


class TdfuncError(Exception):
    """Base class of every error tdfunc raises on bad input."""


class SiteError(TdfuncError, ValueError):
    """A site string is malformed, names no module, or a glob matches nothing."""


class EditError(TdfuncError, ValueError):
    """An edit does not fit its site (shape, dtype, device, or type of the result)."""


class StateError(TdfuncError, ValueError):
    """A state entry names no parameter or buffer of the module."""


class NotReachedError(TdfuncError, RuntimeError):
    """An edited or captured site was never reached (or reached too often) in the forward."""


def suggest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """` Did you mean 'a', 'b'?` with the nearest candidates, or an empty string."""
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + ", ".join(repr(c) for c in close) + "?"


def shape_str(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"
