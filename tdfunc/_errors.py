"""Exception types and message helpers shared by every public function."""

from __future__ import annotations

import difflib
import functools
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = [
    "TdfuncError",
    "TdfuncTypeError",
    "SiteError",
    "EditError",
    "StateError",
    "NotReachedError",
    "suggest",
    "public",
    "here",
]

F = TypeVar("F", bound=Callable[..., Any])


class TdfuncError(Exception):
    """Base class of every error tdfunc raises on bad input."""


class TdfuncTypeError(TdfuncError, TypeError):
    """A wrong type given to a tdfunc function that belongs to no family (the core's ``TypeError``)."""


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


# The public boundary.  Private code raises its errors without a name; the public function the call
# entered adds "tdfunc.<name>: " on the way out (``public``).  A message that already starts with
# "tdfunc." names its function (a public call nested inside another, or a name fixed in the text) and
# keeps it.  The few texts that need the name where no error leaves (warnings, progress bars, an example
# inside a message) read the innermost public call with ``here()``.

_STACK = threading.local()


def _names() -> list[str]:
    names = getattr(_STACK, "names", None)
    if names is None:
        names = _STACK.names = []
    return names


def here() -> str:
    """The name of the innermost public tdfunc call running in this thread (``"tdfunc"`` outside one)."""
    names = _names()
    return names[-1] if names else "tdfunc"


def public(name: str) -> Callable[[F], F]:
    """Mark ``name``'s implementation: a ``TdfuncError`` leaving it without a name gets ``"{name}: "``.

    The error keeps its type and cause (a new instance of the same class; ``e.args[0]`` is prefixed, never
    ``str(e)``, so ``torch.compile``'s report of an error raised while tracing reads the same as eager's).
    """

    def mark(f: F) -> F:
        @functools.wraps(f)
        def call(*args: Any, **kwargs: Any) -> Any:
            names = _names()
            names.append(name)
            try:
                return f(*args, **kwargs)
            except TdfuncError as e:
                msg = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else ""
                head, sep, _ = msg.partition(": ")
                if not msg or (sep and head.startswith("tdfunc.") and " " not in head):
                    raise  # no text to name, or already named
                raise type(e)(name + ": " + msg) from e.__cause__
            finally:
                names.pop()

        call.__tdfunc_public__ = name  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return mark
