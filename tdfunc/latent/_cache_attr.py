"""Attributions over a dataset: any attribution method, batch by batch, into one TensorDict
(the activation cache's machinery).

:func:`cache_attributions` runs ``method(f, batch, **options)`` over every batch and concatenates the
result's leaves along the batch dim, exactly as :func:`tdfunc.latent.cache_activations` does with
captures: in memory, memory-mapped on disk and resumable (``path``), and data-parallel under
``torchrun`` (each rank its ``DataLoader`` shard, one result in dataset order).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from tensordict import TensorDict, TensorDictBase
from torch.distributed import ProcessGroup

from .._checks import check_bool, check_callable, check_int
from .._errors import public
from . import _cache_shard as shard
from ._cache import _check_batch, _key_str, _leaves, _Lost, drive
from ._cache_id import fingerprint
from ._cache_io import CacheError

__all__ = ["cache_attributions"]

FN = "tdfunc.latent.cache_attributions"
_INNER = "tdfunc.latent.cache_activations: "


def _values(method: Callable, f: Callable, batch: Any, i: int, options: dict) -> dict:
    _check_batch(batch, i)
    got = method(f, batch, **options)
    if not isinstance(got, TensorDictBase):
        raise CacheError(
            f"{FN}: method returned a {type(got).__name__} for batch {i}, not a TensorDict; pass a "
            "tdfunc attribution method (tdfunc.saliency, tdfunc.integrated_gradients, ...)."
        )
    rows = batch.batch_size[0] if batch.batch_dims else None
    values = {}
    for key, v in _leaves(got).items():
        if v.dim() == 0 or v.shape[0] != rows:
            raise CacheError(
                f"{FN}: the result's {_key_str(key)!r} of batch {i} has shape {tuple(v.shape)}, not the "
                f"batch's {rows} rows on dim 0; give one target per example (a per-class result puts "
                "the classes first: select one, or move them after the batch dim in f)."
            )
        values[key] = v.detach().to("cpu").contiguous()
    if not values:
        raise CacheError(f"{FN}: method returned an empty TensorDict for batch {i}; it must attribute something.")
    return values


def _reworded(msg: str) -> str:
    """cache_activations' words for a run (sites, reduce, state) in this function's (method, f, options)."""
    msg = re.sub(
        r"was written for sites \['(.+?)'\] with reduce=None but this call has sites \['(.+?)'\] with "
        r"reduce=None; pass the same sites and reduce to resume it",
        r"was written by the method \1 but this call runs \2; pass the same method to resume it",
        msg,
    )
    for old, new in (
        ("the model state differs", "f or the options differ"),
        (": other weights or buffers)", ": f's code or closure, the model's tensors, or the options)"),
        ("the reduce callable differs", "the method differs"),
        ("pass the same state, batches and reduce", "pass the same method, f, options and batches"),
    ):
        msg = msg.replace(old, new)
    return msg


@public("tdfunc.latent.cache_attributions")
def cache_attributions(
    method: Callable[..., TensorDictBase],
    f: Callable[[TensorDictBase], torch.Tensor],
    batches: Iterable[TensorDictBase],
    *,
    path: str | os.PathLike[str] | None = None,
    total: int | None = None,
    progress: bool = True,
    group: ProcessGroup | Literal[False] | None = None,
    **options: Any,
) -> TensorDict:
    """Run an attribution method over every batch of a dataset into one TensorDict ``{leaf: (N, ...)}``.

    .. math::  A = \\mathrm{concat}_b\\; \\mathrm{method}(f, x_b, \\ldots)

    ``method(f, batch, **options)`` (any tdfunc attribution: :func:`tdfunc.saliency`,
    :func:`tdfunc.integrated_gradients`, :func:`tdfunc.lrp`, ...) runs on each TensorDict batch; the
    leaves of its result (``("attr", "x")``, and ``("delta",)`` or others the method returns) must have
    the batch's rows on dim 0; they are moved to the CPU and concatenated.  Everything else is
    :func:`tdfunc.latent.cache_activations`'s machinery: with ``path`` raw memory-mapped files,
    resumable after a kill with nothing lost or duplicated, identified by fingerprints of ``method``,
    ``f`` (its code and closure, the model's tensors included) and ``options``; **data-parallel**
    under ``torchrun`` (an initialised process group of more than one rank, or ``group``) with each
    rank's ``DataLoader`` (e.g. ``sampler=DistributedSampler(dataset, shuffle=False)``): one result
    in dataset order, gathered on every rank, or written into one cache at ``path``.

    Args:
        method: a tdfunc attribution method ``method(f, td, **options) -> TensorDict``.
        f: the function attributed, as the method takes it.
        batches: an iterable of TensorDict batches (dim 0 = examples); data-parallel: each rank's
            ``DataLoader``.
        path: a directory for an on-disk, resumable result; ``None`` keeps it in memory.
        total: the number of rows N, to preallocate the files (a hint).
        progress: show a progress bar over the batches.
        group: as in :func:`tdfunc.latent.cache_activations`.
        **options: passed to ``method`` (``n_steps=``, ``baselines=``, ...).

    Returns:
        A TensorDict with batch size ``[N]`` of the method's result leaves.

    Raises:
        CacheError: ``method`` or ``f`` not callable; a result that is not a TensorDict or whose leaves
            lack the batch's rows on dim 0; and every error of :func:`tdfunc.latent.cache_activations`
            (a cache at ``path`` written by another run, damaged files, a data-parallel loader without
            a deterministic sampler, ...), named for this function.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> data = [TensorDict({"x": torch.randn(5, 4)}, batch_size=[5]) for _ in range(3)]
        >>> f = lambda td: net(td["x"])[:, 0]
        >>> attr = tdfunc.latent.cache_attributions(tdfunc.saliency, f, data, progress=False)
        >>> attr["attr", "x"].shape, torch.equal(attr["attr", "x"][5:10], tdfunc.saliency(f, data[1])["attr", "x"])
        (torch.Size([15, 4]), True)

    Composes with: every tdfunc attribution method; the result feeds :mod:`tdfunc.plot` and the
    attribution metrics.  (A loop over data: no ``vmap`` / ``grad`` / ``compile`` of the whole call.)
    """
    check_callable("method", method, CacheError, expected="method(f, td, **options) -> TensorDict")
    check_callable("f", f, CacheError, expected="f(td) -> Tensor")
    check_int("total", total, CacheError, optional=True)
    check_bool("progress", progress, CacheError)
    explicit = group is not None and group is not False
    group, _, size = shard.world(group)
    name = f"{getattr(method, '__module__', '')}.{getattr(method, '__qualname__', type(method).__name__)}"

    def ident() -> dict:
        return {
            "sites": [name],
            "reduce": None,
            "mask_key": None,
            "reduce_fingerprint": fingerprint(method),
            "state": fingerprint(functools.partial(f, **options)),
        }

    try:
        for _ in range(3):
            try:
                return drive(
                    batches,
                    path,
                    total,
                    progress,
                    group if size > 1 or explicit else False,
                    ident,
                    lambda batch, i: _values(method, f, batch, i, options),
                    desc=FN,
                )
            except _Lost:
                continue
        raise CacheError(f"{FN}: other processes keep creating the cache at {path!r}; pass another path.")
    except CacheError as e:
        msg = str(e)
        if msg.startswith(_INNER):
            raise type(e)(FN + ": " + _reworded(msg[len(_INNER) :])) from e
        raise
