"""Progress bars of long calls: one tqdm helper, silent inside function transforms and compiled code.

A bar is shown only when the caller asked for it (``progress=True``) *and* the call runs eagerly:
inside ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``, ``vjp``, ...: a functorch level is
active) and inside ``torch.compile`` (``torch.compiler.is_compiling()``) no tqdm object is created
and the caller runs exactly its ``progress=False`` code.  Bars go to stderr (``tqdm.auto``: a widget
in notebooks).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["active", "progress_bar", "n_chunks", "vmap_chunks"]


def active(enabled: bool) -> bool:
    """Whether a bar may be shown: ``enabled``, not compiling, and outside every ``torch.func`` transform."""
    if not enabled:
        return False
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.maybe_current_level() is None


def progress_bar(
    iterable: Iterable | None = None, *, enabled: bool, desc: str, total: int | None = None, **tqdm_kwargs: Any
) -> Any:
    """A ``tqdm.auto`` bar over ``iterable`` (a manual bar when it is None), or ``iterable`` itself when off.

    Off means ``enabled`` is False or :func:`active` says no (under ``vmap`` / ``grad`` / compile):
    then nothing is created and ``iterable`` (``None`` for a manual bar) is returned unchanged.
    """
    if not active(enabled):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, **tqdm_kwargs)


def n_chunks(n: int, chunk_size: int | None) -> int:
    """Number of chunks ``vmap(..., chunk_size=chunk_size)`` makes of ``n`` items (1 when None)."""
    return 1 if chunk_size is None else max(-(-n // chunk_size), 1)


def vmap_chunks(func: Callable, chunk_size: int | None, bar: Any, *, randomness: str = "error") -> Callable:
    """``vmap(func, chunk_size=chunk_size)`` (in and out dims 0), ticking ``bar`` once per chunk.

    With ``bar`` None this *is* ``vmap(func, chunk_size=chunk_size)``.  With a bar the chunks are an
    explicit Python loop doing what ``vmap``'s own chunking does (split dim 0 into pieces of
    ``chunk_size``, the last one shorter; ``vmap(func)`` per piece; ``torch.cat`` of the outputs), so
    the results are the same.  ``randomness``: ``vmap``'s flag.
    """
    if bar is None:
        return vmap(func, chunk_size=chunk_size, randomness=randomness)

    def run(*args):
        if chunk_size is None:
            out = vmap(func, randomness=randomness)(*args)
            bar.update(1)
            return out
        flat, spec = tree_flatten(args)
        n = flat[0].shape[0]
        outs = []
        for start in range(0, n, chunk_size):
            piece = [t[start : start + chunk_size] for t in flat]
            outs.append(tree_flatten(vmap(func, randomness=randomness)(*tree_unflatten(piece, spec))))
            bar.update(1)
        out_spec = outs[0][1]
        return tree_unflatten([torch.cat(parts) for parts in zip(*(o[0] for o in outs))], out_spec)

    return run
