"""Helpers shared by the weight-intervention family: leaf walks, key parsing, tree checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from tensordict import TensorDict, TensorDictBase

from .._errors import TdfuncError, TdfuncTypeError, shape_str, suggest
from .._finite import check_finite
from .._match import entry_match

__all__ = ["WeightError", "leaves", "dotted", "parse_key", "check_td", "check_alphas", "rebuild", "float_keys"]


class WeightError(TdfuncError, ValueError):
    """Bad input to a weight intervention (tree mismatch, amount, dimension, adapter shape)."""


Key = tuple
#: a state's own TensorDict class: a weight edit returns the class it was given
TD = TypeVar("TD", bound=TensorDictBase)


def dotted(key: Key) -> str:
    return ".".join(key)


def check_td(what: str, td: Any) -> TensorDictBase:
    if not isinstance(td, TensorDictBase):
        raise TdfuncTypeError(
            f"{what} must be a TensorDict (e.g. tdfunc.state(model)), got {type(td).__name__} ({td!r:.60})."
        )
    return td


def leaves(td: TensorDictBase) -> dict[Key, torch.Tensor]:
    """Tensor leaves keyed by tuple path, in the TensorDict's order."""
    out: dict[Key, torch.Tensor] = {}

    def walk(d: TensorDictBase, prefix: Key) -> None:
        for k in d.keys():
            v = d.get(k)
            if isinstance(v, TensorDictBase):
                walk(v, prefix + (k,))
            elif isinstance(v, torch.Tensor):
                out[prefix + (k,)] = v

    walk(td, ())
    return out


def float_keys(flat: dict[Key, torch.Tensor]) -> list[Key]:
    return [k for k, v in flat.items() if v.is_floating_point()]


def parse_key(what: str, key: Any) -> Key:
    if isinstance(key, str) and key:
        return tuple(key.split("."))
    if isinstance(key, tuple) and key and all(isinstance(s, str) for s in key):
        return key
    raise TdfuncTypeError(
        f"each entry of {what} must be a dotted name ('fc1.weight') or a tuple of strings "
        f"(('fc1', 'weight')), got {type(key).__name__} ({key!r:.60})."
    )


def known_names(flat: dict[Key, torch.Tensor]) -> list[str]:
    """Dotted leaf names and module names (prefixes), for suggestions."""
    out: list[str] = []
    for k in flat:
        for i in range(1, len(k) + 1):
            if dotted(k[:i]) not in out:
                out.append(dotted(k[:i]))
    return out


def select(what: str, flat: dict[Key, torch.Tensor], patterns: Sequence | str) -> list[Key]:
    """Leaves whose dotted name, or a module holding them, matches one of the patterns (``tdfunc._match``)."""
    if isinstance(patterns, (str, tuple)):
        patterns = [patterns]
    names = known_names(flat)
    chosen: list[Key] = []
    for p in patterns:
        segs = list(parse_key(what, p))
        hit = [k for k in flat if entry_match(segs, k)]
        if not hit:
            raise WeightError(
                f"{what} entry {dotted(tuple(segs))!r} matches no entry of the state."
                f"{suggest(dotted(tuple(segs)), names)}"
                " Use dotted names as in the state ('fc1.weight'), a module name ('fc1') or globs ('**.weight')."
            )
        chosen += [k for k in hit if k not in chosen]
    return [k for k in flat if k in chosen]  # state order


def missing_entry(k: Key, tree: dict, what: str, fix: str) -> WeightError:
    """The error for a key ``k`` that ``tree`` lacks: ``what`` happened, the nearest names in ``tree``, ``fix``."""
    return WeightError(f"{what}{suggest(dotted(k), [dotted(j) for j in tree])} {fix}")


def check_same_tree(a_name: str, a: dict, b_name: str, b: dict, keys: list[Key]) -> None:
    """Every key is in both trees with the same shape."""
    for k in keys:
        if k not in b:
            raise missing_entry(
                k,
                b,
                f"{a_name} has entry {dotted(k)!r} but {b_name} has not.",
                "Both must come from the same architecture (tdfunc.state of the same model class).",
            )
        if a[k].shape != b[k].shape:
            raise WeightError(
                f"entry {dotted(k)!r} has shape {shape_str(a[k].shape)} in {a_name} but "
                f"{shape_str(b[k].shape)} in {b_name}; both must come from the same architecture."
            )


def check_alphas(alphas: Any, like: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor of interpolation / scaling coefficients in ``like``'s dtype and device."""
    if isinstance(alphas, torch.Tensor):
        t = alphas
    elif isinstance(alphas, (list, tuple)) and all(
        isinstance(a, (int, float)) and not isinstance(a, bool) for a in alphas
    ):
        t = torch.tensor(alphas, dtype=like.dtype, device=like.device)
    else:
        raise TdfuncTypeError(
            f"alphas must be a 1-D tensor or a list of numbers, got {type(alphas).__name__} ({alphas!r:.60})."
        )
    if t.dim() != 1 or t.shape[0] == 0:
        raise WeightError(
            f"alphas must be 1-D and non-empty, got shape {shape_str(t.shape)}; pass e.g. "
            "torch.linspace(0, 1, 11) (one state per alpha)."
        )
    if not t.is_floating_point():
        t = t.to(like.dtype)
    check_finite("alphas", t, WeightError, "give finite coefficients, e.g. torch.linspace(0, 1, 11)")
    return t


def check_scale(what: str, a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        if a.dim() != 0:
            raise WeightError(
                f"{what} must be a number or a 0-d tensor, got shape {shape_str(a.shape)}; to sweep several "
                f"values, vmap over a 1-D tensor of them."
            )
        return a
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return a
    raise TdfuncTypeError(f"{what} must be a number or a 0-d tensor, got {type(a).__name__} ({a!r:.60}).")


def rebuild(base: TD, new: dict[Key, torch.Tensor]) -> TD:
    """A shallow copy of ``base`` with the entries of ``new`` replaced (``base`` is not touched)."""
    out = base.copy()
    for k, v in new.items():
        out.set(k, v)
    return out


def from_leaves(flat: dict[Key, torch.Tensor], batch_size=()) -> TensorDict:
    out = TensorDict({}, batch_size=batch_size)
    for k, v in flat.items():
        out.set(k, v)
    return out
