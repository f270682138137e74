"""Argument checks shared by every public function: one rule, one message shape.

The rule: a wrong *type* raises ``TypeError``, a wrong *value* the family's ``ValueError`` subclass
(``AttributionError``, a ``LatentError`` subclass, ``WeightError``).  A wrong type raised for a family
is an instance of both ``TypeError`` and the family's error (``type_error(family)``), so code that
catches the family's error keeps catching it.  Every message names the public function (``fn``),
echoes the value and says what to pass instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "type_error",
    "check_int",
    "check_bool",
    "check_chunk_size",
    "check_generator",
    "check_module",
    "per_input",
    "check_input_keys",
]

_TYPE_ERRORS: dict[type, type] = {}


def type_error(family: type[Exception] | None) -> type[TypeError]:
    """``TypeError`` that is also a ``family`` error (plain ``TypeError`` for ``None``)."""
    if family is None or issubclass(family, TypeError):
        return family or TypeError
    cls = _TYPE_ERRORS.get(family)
    if cls is None:
        name = family.__name__.removesuffix("Error") + "TypeError"
        cls = _TYPE_ERRORS[family] = type(name, (family, TypeError), {"__module__": family.__module__})
    return cls


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(fn: str, name: str, v: Any, family: type[Exception], *, lo: int = 1, optional: bool = False,
              fix: str = "") -> int | None:
    """``v`` an integer >= ``lo`` (or None when ``optional``).

    Message: ``"{fn}: {name} must be [None or ]an integer >= {lo}, got {v!r}.{fix}"``.
    """
    if optional and v is None:
        return None
    if not _is_int(v) or v < lo:
        msg = f"{fn}: {name} must be {'None or ' if optional else ''}an integer >= {lo}, got {v!r}.{fix}"
        raise (type_error(family) if not _is_int(v) else family)(msg)
    return v


def check_bool(fn: str, name: str, v: Any, family: type[Exception] | None = None) -> bool:
    """``v`` a ``bool``. Message: ``"{fn}: {name} must be True or False, got {type} ({value}); pass {name}=True or {name}=False."``."""
    if not isinstance(v, bool):
        raise type_error(family)(f"{fn}: {name} must be True or False, got {type(v).__name__} ({v!r:.60}); "
                                 f"pass {name}=True or {name}=False.")
    return v


def check_chunk_size(fn: str, chunk_size: Any, family: type[Exception]) -> int | None:
    """``chunk_size`` None or an integer >= 1 (checked here, before ``vmap`` gives its own message)."""
    return check_int(fn, "chunk_size", chunk_size, family, optional=True)


def check_generator(fn: str, generator: Any, family: type[Exception] | None = None) -> torch.Generator | None:
    """``generator`` None or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise type_error(family)(
            f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__} "
            f"({generator!r:.60}); e.g. generator=torch.Generator().manual_seed(0)."
        )
    return generator


def check_module(fn: str, module: Any, family: type[Exception] | None = None, *,
                 expected: str = "an nn.Module as the module", fix: str = "") -> nn.Module:
    """``module`` an ``nn.Module``. Message: ``"{fn}: expected {expected}, got {type} ({value}){fix}."``."""
    if not isinstance(module, nn.Module):
        raise type_error(family)(f"{fn}: expected {expected}, got {type(module).__name__} ({module!r:.60}){fix}.")
    return module


def _norm(key: Any) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def _show(key: tuple) -> str:
    return repr(key[0]) if len(key) == 1 else repr(key)


def _names(keys: Sequence[tuple]) -> str:
    return "[" + ", ".join(_show(k) for k in keys) + "]"


def check_input_keys(fn: str, name: str, given: Sequence[tuple], keys: Sequence[tuple], family: type[Exception],
                     fix: str) -> None:
    """Every key of a per-input mapping names an attributed input."""
    for k in given:
        if k not in keys:
            raise family(f"{fn}: {name} names {_show(k)}, which is not an attributed input ({_names(keys)}); {fix}.")


def per_input(fn: str, name: str, value: Any, keys: Sequence[tuple], what: str, family: type[Exception]) -> dict:
    """A per-input option given as a dict key -> value, or a bare value when there is one input.

    Every attributed input needs an entry, and every entry must name an attributed input.
    """
    if isinstance(value, Mapping):
        given = {_norm(k): v for k, v in value.items()}
        for k in keys:
            if k not in given:
                raise family(
                    f"{fn}: {name} has no entry for {_show(k)}; give one {what} per attributed input "
                    f"(a dict key -> {what}, or a bare {what} when there is one input)."
                )
        check_input_keys(fn, name, list(given), keys, family,
                         f"give one {what} per attributed input (a dict key -> {what}, or a bare {what} when there "
                         "is one input)")
        return {k: given[k] for k in keys}
    if len(keys) != 1:
        raise family(
            f"{fn}: {name} must be a dict key -> {what} when attributing several inputs "
            f"({', '.join(_show(k) for k in keys)}), got {type(value).__name__}."
        )
    return {keys[0]: value}
