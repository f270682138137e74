"""What identifies an activation-cache run: digests of the state and the first batch, and a callable's fingerprint.

Everything here returns short hex strings (blake2b, 128 bit) that are stable across processes, devices
and machines for the same values: they are stored in the cache's record and compared on every resume
and every load of a complete cache (:mod:`tdfunc.latent._cache_io`).

* :func:`tensor_digest`: dtype, shape and bytes of a tensor; in full up to ``FULL`` elements, above
  that a strided sample of about ``FULL`` elements (every ``numel // FULL``-th and the last), so the
  cost is bounded (a GPT-2-small state: ~10 ms) but an edit touching only unsampled elements of a
  large tensor is not seen.
* :func:`state_digest`: the tensors a call runs with (the module's own, overridden by ``state``).
* :func:`fingerprint`: a callable's code (bytecode, constants recursively, names, argument names),
  defaults, closure values, the values of the globals it reads, ``functools.partial`` arguments,
  a callable object's ``__call__`` / ``forward`` and attributes, an ``nn.Module``'s tensors.  Python
  functions of the callable's own module are followed into; others (torch, numpy, ...) are identified
  by module and name only.  Values of other types (open files, tokenizers, ...) count by type name.
"""

from __future__ import annotations

import functools
import hashlib
import types
from collections.abc import Mapping
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

__all__ = ["FULL", "tensor_digest", "state_digest", "batch_digest", "fingerprint"]

#: tensors up to this many elements are hashed in full, larger ones by a strided sample of about as many
FULL = 1 << 16
_MAX_ITEMS = 4096  # items of a list / tuple / dict fed to a fingerprint (the length always is)
_MAX_DEPTH = 4


def _hash() -> Any:
    return hashlib.blake2b(digest_size=16)


def _feed_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"T{tuple(t.shape)}{t.dtype};".encode())
    if t.is_meta or t.numel() == 0:
        return
    flat = t.reshape(-1)
    n = flat.numel()
    if n > FULL:
        flat = torch.cat([flat[:: n // FULL], flat[-1:]])
    flat = flat.to("cpu").contiguous()
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    h.update(flat.view(torch.uint8).numpy())


def tensor_digest(t: torch.Tensor) -> str:
    h = _hash()
    _feed_tensor(h, t)
    return h.hexdigest()


def _feed_tensors(h: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    for k in sorted(tensors):
        h.update(f"K{k};".encode())
        _feed_tensor(h, tensors[k])


def state_digest(module: nn.Module, state: Any) -> str:
    """Digest of the tensors a call runs with: the module's own, overridden by the (partial) ``state``."""
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    h = _hash()
    if state is not None:
        try:
            td = state if isinstance(state, TensorDictBase) else TensorDict(dict(state), batch_size=[])
            tensors.update((k, v) for k, v in td.flatten_keys(".").items() if isinstance(v, torch.Tensor))
        except Exception:  # not a state: the call itself says why; here it only makes the digest differ
            h.update(f"unreadable state {type(state).__qualname__};".encode())
    _feed_tensors(h, tensors)
    return h.hexdigest()


def batch_digest(batch: TensorDictBase) -> str:
    """Digest of a batch's tensor entries (keys, dtypes, shapes, values)."""
    leaves = {}
    for key in batch.keys(include_nested=True, leaves_only=True):
        v = batch.get(key)
        if isinstance(v, torch.Tensor):
            leaves[key if isinstance(key, str) else ".".join(key)] = v
    h = _hash()
    h.update(f"B{tuple(batch.batch_size)};".encode())
    _feed_tensors(h, leaves)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- callables

_SIMPLE = (bool, int, float, complex, str, bytes, type(None), type(Ellipsis), torch.dtype, torch.device)


def _name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _feed(h: Any, obj: Any, home: str | None, seen: set, depth: int) -> None:
    put = h.update
    if isinstance(obj, _SIMPLE):
        put(f"V{type(obj).__name__}:{obj!r};".encode())
        return
    if isinstance(obj, torch.Tensor):
        _feed_tensor(h, obj)
        return
    if depth > _MAX_DEPTH or id(obj) in seen:
        put(f"R{_name(type(obj))};".encode())
        return
    seen = seen | {id(obj)}
    down = functools.partial(_feed, h, home=home, seen=seen, depth=depth + 1)
    if isinstance(obj, (tuple, list, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        put(f"S{type(obj).__name__}{len(items)};".encode())
        for item in list(items)[:_MAX_ITEMS]:
            down(item)
    elif isinstance(obj, Mapping) and not isinstance(obj, TensorDictBase):
        put(f"M{len(obj)};".encode())
        for k in sorted(obj, key=repr)[:_MAX_ITEMS]:
            down(k)
            down(obj[k])
    elif isinstance(obj, types.CodeType):
        put(b"C" + obj.co_code)
        put(repr((obj.co_names, obj.co_varnames, obj.co_argcount, obj.co_kwonlyargcount)).encode())
        for c in obj.co_consts:
            down(c)
    elif isinstance(obj, types.FunctionType):
        if depth and obj.__module__ != home:  # a library function: by name (its code is the library's)
            put(f"F{_name(obj)};".encode())
            return
        down(obj.__code__)
        down(obj.__defaults__)
        down(obj.__kwdefaults__)
        for cell in obj.__closure__ or ():
            try:
                down(cell.cell_contents)
            except ValueError:  # an empty cell
                put(b"empty;")
        for name in _global_names(obj.__code__):
            if name in obj.__globals__:
                put(f"G{name};".encode())
                down(obj.__globals__[name])
    elif isinstance(obj, functools.partial):
        put(b"P")
        down(obj.func)
        down(obj.args)
        down(obj.keywords)
    elif isinstance(obj, types.MethodType):
        put(b"m")
        down(obj.__func__)
        down(obj.__self__)
    elif isinstance(obj, types.ModuleType):
        put(f"module {obj.__name__};".encode())
    elif isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType, type)):
        put(f"F{_name(obj)};".encode())
    elif isinstance(obj, TensorDictBase):
        _feed_tensors(
            h,
            {
                ".".join(k) if isinstance(k, tuple) else k: obj.get(k)
                for k in obj.keys(include_nested=True, leaves_only=True)
                if isinstance(obj.get(k), torch.Tensor)
            },
        )
    elif isinstance(obj, nn.Module):
        put(f"N{_name(type(obj))};".encode())
        if type(obj).__module__ == home or depth == 0:
            down(type(obj).forward)
        _feed_tensors(h, obj.state_dict(keep_vars=True))
    else:  # any other object: its class, its __call__ when it is the callable, its attributes
        put(f"O{_name(type(obj))};".encode())
        if depth == 0 and isinstance(getattr(type(obj), "__call__", None), types.FunctionType):
            down(type(obj).__call__)
        attrs = getattr(obj, "__dict__", None)
        if isinstance(attrs, dict):
            try:
                down({k: v for k, v in attrs.items() if not k.startswith("__")})
            except Exception:  # an attribute that cannot be read or ordered: counted by the class alone
                put(b"unreadable attributes;")


def _global_names(code: types.CodeType) -> list[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names.update(_global_names(c))
    return sorted(names)


def fingerprint(fn: Any) -> str:
    """A stable digest of what a callable computes, as far as its code and reachable values show it."""
    home = getattr(fn, "__module__", None)
    if isinstance(fn, functools.partial):
        home = getattr(fn.func, "__module__", None)
    elif isinstance(fn, types.MethodType):
        home = getattr(fn.__func__, "__module__", None)
    elif not isinstance(fn, types.FunctionType):
        home = type(fn).__module__
    h = _hash()
    _feed(h, fn, home, set(), 0)
    return h.hexdigest()
