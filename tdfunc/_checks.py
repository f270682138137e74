"""Argument checks shared by every public function: one rule, one message shape.

The rule: a wrong *type* raises ``TypeError``, a wrong *value* the family's ``ValueError`` subclass
(``AttributionError``, a ``LatentError`` subclass, ``WeightError``).  A wrong type raised for a family
is an instance of both ``TypeError`` and the family's error (``type_error(family)``), so code that
catches the family's error keeps catching it.  Every message echoes the value and says what to pass
instead; the public function's name is added where the error leaves it (``tdfunc._errors.public``), so
the messages below are written without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ._errors import TdfuncError, TdfuncTypeError

__all__ = [
    "type_error",
    "check_int",
    "check_bool",
    "check_chunk_size",
    "check_generator",
    "check_module",
    "check_args",
    "broadcasts_to",
    "per_input",
    "check_input_keys",
    "check_callable",
    "check_randomness",
    "random_op_error",
    "check_position_dim",
    "renamed",
]

_TYPE_ERRORS: dict[type, type] = {}


def type_error(family: type[Exception] | None) -> type[TypeError]:
    """``TypeError`` that is also a ``family`` error (the core's :class:`TdfuncTypeError` for ``None``)."""
    if family is None or family is TdfuncError:
        return TdfuncTypeError
    if issubclass(family, TypeError):
        return family
    cls = _TYPE_ERRORS.get(family)
    if cls is None:
        name = family.__name__.removesuffix("Error") + "TypeError"
        cls = _TYPE_ERRORS[family] = type(name, (family, TypeError), {"__module__": family.__module__})
    return cls


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(
    name: str, v: Any, family: type[Exception], *, lo: int = 1, optional: bool = False, fix: str = ""
) -> int | None:
    """``v`` an integer >= ``lo`` (or None when ``optional``).

    Message: ``"{name} must be [None or ]an integer >= {lo}, got {v!r}.{fix}"``.
    """
    if optional and v is None:
        return None
    if not _is_int(v) or v < lo:
        msg = f"{name} must be {'None or ' if optional else ''}an integer >= {lo}, got {v!r}.{fix}"
        raise (type_error(family) if not _is_int(v) else family)(msg)
    return v


def check_bool(name: str, v: Any, family: type[Exception] | None = None) -> bool:
    """``v`` a ``bool``.

    Message: ``"{name} must be True or False, got {type} ({value}); pass {name}=True or {name}=False."``.
    """
    if not isinstance(v, bool):
        raise type_error(family)(
            f"{name} must be True or False, got {type(v).__name__} ({v!r:.60}); pass {name}=True or {name}=False."
        )
    return v


def check_chunk_size(chunk_size: Any, family: type[Exception]) -> int | None:
    """``chunk_size`` None or an integer >= 1 (checked here, before ``vmap`` gives its own message)."""
    return check_int("chunk_size", chunk_size, family, optional=True)


def check_generator(generator: Any, family: type[Exception] | None = None) -> torch.Generator | None:
    """``generator`` None or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise type_error(family)(
            f"generator must be a torch.Generator or None, got {type(generator).__name__} "
            f"({generator!r:.60}); e.g. generator=torch.Generator().manual_seed(0)."
        )
    return generator


def check_module(
    module: Any,
    family: type[Exception] | None = None,
    *,
    expected: str = "an nn.Module as the module",
    fix: str = "",
) -> nn.Module:
    """``module`` an ``nn.Module``. Message: ``"expected {expected}, got {type} ({value}){fix}."``."""
    if not isinstance(module, nn.Module):
        raise type_error(family)(f"expected {expected}, got {type(module).__name__} ({module!r:.60}){fix}.")
    return module


def check_args(args: Any, fix: str = "") -> tuple:
    """A module's positional inputs as a tuple: a tuple as is, one non-list value wrapped; a list is refused
    (ambiguous: the inputs, or one list input). Message ends ``"; pass tuple(args){fix}."``."""
    if isinstance(args, list):
        raise TdfuncTypeError(
            f"args must be a tuple of positional inputs (or one input that is not a list), got a list of "
            f"length {len(args)}; pass tuple(args){fix}."
        )
    return args if isinstance(args, tuple) else (args,)


def broadcasts_to(shape: Sequence[int], target: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts to exactly ``target`` (torch's rule; never more dims)."""
    try:
        return torch.broadcast_shapes(tuple(shape), target) == target
    except RuntimeError:
        return False


def _norm(key: Any) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def _show(key: tuple) -> str:
    return repr(key[0]) if len(key) == 1 else repr(key)


def _names(keys: Sequence[tuple]) -> str:
    return "[" + ", ".join(_show(k) for k in keys) + "]"


def check_input_keys(
    name: str, given: Sequence[tuple], keys: Sequence[tuple], family: type[Exception], fix: str
) -> None:
    """Every key of a per-input mapping names an attributed input."""
    for k in given:
        if k not in keys:
            raise family(f"{name} names {_show(k)}, which is not an attributed input ({_names(keys)}); {fix}.")


def per_input(name: str, value: Any, keys: Sequence[tuple], what: str, family: type[Exception]) -> dict:
    """A per-input option given as a dict key -> value, or a bare value when there is one input.

    Every attributed input needs an entry, and every entry must name an attributed input.
    """
    if isinstance(value, Mapping):
        given = {_norm(k): v for k, v in value.items()}
        for k in keys:
            if k not in given:
                raise family(
                    f"{name} has no entry for {_show(k)}; give one {what} per attributed input "
                    f"(a dict key -> {what}, or a bare {what} when there is one input)."
                )
        check_input_keys(
            name,
            list(given),
            keys,
            family,
            f"give one {what} per attributed input (a dict key -> {what}, or a bare {what} when there is one input)",
        )
        return {k: given[k] for k in keys}
    if len(keys) != 1:
        raise family(
            f"{name} must be a dict key -> {what} when attributing several inputs "
            f"({', '.join(_show(k) for k in keys)}), got {type(value).__name__}."
        )
    return {keys[0]: value}


def check_callable(name: str, f: Any, family: type[Exception] | None = None, *, expected: str = "") -> Callable:
    """``f`` callable.

    Message: ``"{name} must be a callable {expected}, got {type} ({value}); pass a function."``.
    """
    if not callable(f):
        raise type_error(family)(
            f"{name} must be a callable{' ' + expected if expected else ''}, got "
            f"{type(f).__name__} ({f!r:.60}); pass a function (a lambda, a def or an nn.Module)."
        )
    return f


RANDOMNESS = ("error", "different", "same")
_RANDOM_OP = "called random operation while in randomness error mode"


def check_randomness(randomness: Any, family: type[Exception]) -> str:
    """``randomness`` one of ``torch.func.vmap``'s flags ``"error"``, ``"different"``, ``"same"``."""
    if randomness not in RANDOMNESS or not isinstance(randomness, str):
        raise family(f"randomness must be 'error', 'different' or 'same' (torch.func.vmap's flag), got {randomness!r}.")
    return randomness


def random_op_error(e: BaseException, family: type[Exception], what: str = "f") -> Exception | None:
    """The family's error for torch's "random operation in randomness error mode" from a vmap ``fn`` runs, or None."""
    if not isinstance(e, RuntimeError) or _RANDOM_OP not in str(e):
        return None
    return family(
        f"{what} calls a random operation (train-mode Dropout, a sampling policy, torch.rand...) inside the "
        "vmap this method runs, where torch's default randomness='error' forbids it; pass "
        "randomness='different' (independent draws per vmapped input) or randomness='same' (one draw "
        f"shared by all), or make {what} deterministic (model.eval())."
    )


def check_position_dim(option: str, key: str, v: Any, family: type[Exception]) -> None:
    """A value reduced over positions (dim 1) must be ``(B, T, ..., D)``: 3 dims or more.

    Message: ``"{option} reduces dim 1 (positions) of a (B, T, ..., D) value, but the value at {key!r} has
    shape {shape}, with no position dim (it would reduce the features); use reduce=None or a callable for this site."``
    """
    if isinstance(v, torch.Tensor) and v.dim() < 3:
        raise family(
            f"{option} reduces dim 1 (positions) of a (B, T, ..., D) value, but the value at {key!r} "
            f"has shape {tuple(v.shape)}, with no position dim (it would reduce the features); use "
            "reduce=None or a callable for this site."
        )


_INNER = ("tdfunc.functional_call: ", "tdfunc.intervene: ")


@contextmanager
def renamed(inner: tuple[str, ...] = _INNER) -> Iterator[None]:
    """Let a ``TdfuncError`` of a public call tdfunc makes itself (``tdfunc.functional_call`` /
    ``tdfunc.intervene``, or the names in ``inner``) leave without that name, so the enclosing public
    function's boundary names it instead: the same error type, the message after the inner name.  Wrap only
    the calls tdfunc makes itself, never the user's ``f`` / ``metric``, whose own errors keep their names."""
    try:
        yield
    except TdfuncError as e:
        msg = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else ""
        for prefix in inner:
            if msg.startswith(prefix):
                raise type(e)(msg[len(prefix) :]) from e
        raise
