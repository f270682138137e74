"""Activation caching over a dataset: captures of many batches in one TensorDict, in memory or on disk.

:func:`cache_activations` runs :func:`tdfunc.functional_call` over an iterable of TensorDict batches,
optionally reduces each captured value per batch (last position, mean over positions, any callable)
and concatenates the results along the batch dimension.  With ``path`` the cache lives on disk as
raw memory-mapped files (tensordict's :class:`~tensordict.MemoryMappedTensor`) and is resumable: a
run killed mid-way continues where it stopped, with no row lost or written twice.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torch.distributed import ProcessGroup

from .._call import functional_call
from .._checks import check_bool, check_int, check_module, check_position_dim, type_error
from .._errors import public
from .._progress import progress_bar
from .._state import unwrap
from .._types import Reduction
from . import _cache_io as disk
from . import _cache_shard as shard
from ._cache_id import batch_digest, fingerprint, state_digest
from ._cache_io import CacheError

__all__ = ["CacheError", "cache_activations"]

FN = "tdfunc.latent.cache_activations"
REDUCTIONS: tuple[Reduction, ...] = ("last", "mean", "masked_mean")


# ---------------------------------------------------------------------------------------------- checks


def _takes_batch(fn: Callable) -> bool:
    """Whether a callable ``reduce`` is called as ``reduce(value, batch)``: two required positional parameters."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the one-argument form
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is p.empty for p in params) >= 2


def _reducer(reduce, mask_key) -> Callable | None:
    """``reducer(value, key, batch, i)``, or None for no reduction."""
    if reduce is None:
        return None
    if callable(reduce):
        if _takes_batch(reduce):
            return lambda v, key, batch, i: reduce(v, batch)
        return lambda v, key, batch, i: reduce(v)
    if isinstance(reduce, str) and reduce in REDUCTIONS:

        def named(v: torch.Tensor, key: str, batch: TensorDictBase, i: int) -> torch.Tensor:
            check_position_dim(f"reduce={reduce!r}", key, v, CacheError)  # (B, D): dim 1 is the features
            if reduce == "last":
                return v[:, -1]
            if reduce == "mean":
                return v.mean(1)
            return _masked_mean(v, key, batch, i, mask_key)

        return named
    raise CacheError(
        f"{FN}: unknown reduce {reduce!r}; use None, 'last' (last position along dim 1), "
        "'mean' (mean over dim 1) or a callable value -> value."
    )


def _masked_mean(v: torch.Tensor, key: str, batch: TensorDictBase, i: int, mask_key) -> torch.Tensor:
    if mask_key not in batch.keys(include_nested=True):
        keys = sorted(_key_str(k) for k in batch.keys(include_nested=True, leaves_only=True))
        raise CacheError(
            f"{FN}: reduce='masked_mean' reads the mask {mask_key!r} of each batch but batch {i} has "
            f"no such key (keys: {keys}); set mask_key to the batch's attention mask, or use "
            "reduce='mean' (which averages over padding too)."
        )
    mask = batch.get(mask_key)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(v.shape[:2]):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise CacheError(
            f"{FN}: the mask {mask_key!r} of batch {i} has shape {shape} but the value at {key!r} has "
            f"shape {tuple(v.shape)}; the mask must be (batch, positions) = {tuple(v.shape[:2])}, "
            "1 for real tokens and 0 for padding."
        )
    m = mask.to(device=v.device, dtype=v.dtype if v.is_floating_point() else torch.float32)
    m = m.reshape(*m.shape, *([1] * (v.dim() - 2)))
    return (v * m).sum(1) / m.sum(1).clamp_min(1)  # a row without any real token gives zeros


def _check_sites(sites: Any) -> None:
    if isinstance(sites, str):
        return
    if not isinstance(sites, (list, tuple)) or not sites or not all(isinstance(s, str) for s in sites):
        raise type_error(CacheError)(
            f"{FN}: sites must be a site string or a non-empty list of site strings, got {type(sites).__name__} "
            f"({sites!r:.60}); e.g. sites='blocks.*' or sites=['blocks.0', 'blocks.1.attn']."
        )


def _key_str(key) -> str:
    return key if isinstance(key, str) else ".".join(key)


def _leaves(caps: TensorDictBase) -> dict[tuple[str, ...], torch.Tensor]:
    out = {}
    for key in caps.keys(include_nested=True, leaves_only=True):
        key = (key,) if isinstance(key, str) else tuple(key)
        out[key] = caps.get(key)
    return out


def _row_spec(values: dict) -> dict:
    return {
        _key_str(k): {"key": list(k), "shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in values.items()
    }


def _check_batch(batch: Any, i: int) -> None:
    if not isinstance(batch, TensorDictBase):
        raise CacheError(
            f"{FN}: batch {i} is a {type(batch).__name__}, not a TensorDict; yield TensorDict "
            "batches (e.g. TensorDict({'input': x}, batch_size=[len(x)]))."
        )


def _batch_values(module, state, batch, i, sites, call_inputs, input_key, reduce, stop_early=False) -> dict:
    _check_batch(batch, i)
    if call_inputs is None:
        if input_key is None:
            args, kwargs = (batch,), {}  # type: ignore[var-annotated]
        elif input_key not in batch.keys(include_nested=True):
            keys = sorted(_key_str(k) for k in batch.keys(include_nested=True, leaves_only=True))
            raise CacheError(
                f"{FN}: batch {i} has no key {input_key!r} (keys: {keys}); set input_key to the key "
                "holding the model input, or pass inputs=lambda batch: ((...,), {})."
            )
        else:
            args, kwargs = (batch.get(input_key),), {}
    else:
        got = call_inputs(batch)
        if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict)):
            raise CacheError(
                f"{FN}: inputs(batch) must return (args, kwargs) with kwargs a dict, got "
                f"{type(got).__name__}; e.g. inputs=lambda batch: ((batch['x'],), {{}})."
            )
        args, kwargs = got
    with torch.no_grad():
        if stop_early:  # stop_early: the forward ends at the last site
            caps = functional_call(module, state, args, kwargs, capture=sites, stop=True)
        else:
            _, caps = functional_call(module, state, args, kwargs, capture=sites)
    values = {}
    for key, v in _leaves(caps).items():
        if reduce is not None:
            v = reduce(v, _key_str(key), batch, i)
            if not isinstance(v, torch.Tensor):
                raise CacheError(
                    f"{FN}: reduce returned a {type(v).__name__} for {_key_str(key)!r}; it must "
                    "return a tensor whose dim 0 is the batch."
                )
        values[key] = v.detach().to("cpu").contiguous()
    if not values:
        raise CacheError(f"{FN}: sites {sites!r} captured nothing; give at least one site.")
    rows = {_key_str(k): v.shape[0] if v.dim() else None for k, v in values.items()}
    if len(set(rows.values())) != 1 or None in rows.values():
        raise CacheError(
            f"{FN}: the captured values of batch {i} disagree on the batch dim 0 {rows}; every "
            "value must have the batch on dim 0 (reduce with a callable that moves it there)."
        )
    return values


# ---------------------------------------------------------------------------------------------- identity


class _Lost(Exception):
    """Another process published a cache at the path while this call was building its own: start over."""


def _first_digest(batches: Iterable) -> str:
    for batch in batches:
        _check_batch(batch, 0)
        return batch_digest(batch)
    raise CacheError(
        f"{FN}: batches yielded no batch; pass a non-empty, re-iterable iterable of TensorDict "
        "batches (a list, or a DataLoader)."
    )


def _open(path: str, ident: dict, n_batches: int | None, batches: Iterable) -> tuple[dict | None, int | None]:
    """The verified record of the cache at ``path`` (None for a new cache) and the writers' lock when not complete."""
    record = disk.read_record(path)
    if record is None:
        return None, None
    disk.check_run(path, record, ident["sites"], ident["reduce"])
    fd = None
    if not record["complete"]:
        fd = disk.lock(path)
        try:
            record = disk.read_record(path)  # as it is now that this process holds the lock
            if record is not None and record["complete"]:
                disk.unlock(fd)
                fd = None
        except BaseException:
            disk.unlock(fd)
            raise
        if record is None:
            disk.unlock(fd)
            return None, None
    try:
        disk.check_run(path, record, ident["sites"], ident["reduce"])
        disk.verify(path, record, ident, n_batches, _first_digest(batches) if record["complete"] else None)
        disk.check_files(path, record, exact=record["complete"])
    except BaseException:
        disk.unlock(fd)
        raise
    return record, fd


# ---------------------------------------------------------------------------------------------- public


@public("tdfunc.latent.cache_activations")
def cache_activations(
    module: nn.Module,
    state: Any,
    batches: Iterable[TensorDictBase],
    sites: str | Sequence[str],
    *,
    path: str | os.PathLike[str] | None = None,
    reduce: Reduction | Callable[..., torch.Tensor] | None = None,
    mask_key: str | tuple[str, ...] = "attention_mask",
    input_key: str | None = "input",
    inputs: Callable[[TensorDictBase], tuple[tuple[Any, ...], dict[str, Any]]] | None = None,
    total: int | None = None,
    progress: bool = True,
    group: ProcessGroup | Literal[False] | None = None,
    stop_early: bool = False,
) -> TensorDict:
    """Capture ``sites`` over every batch of a dataset into one TensorDict ``{site: (N, ...)}``.

    .. math::  C_s = \\mathrm{concat}_b\\; r\\big(a_s(\\theta, x_b), x_b\\big) \\quad \\forall s \\in S

    Each batch is run with :func:`tdfunc.functional_call` under ``torch.no_grad()``; each captured
    value is reduced by ``reduce`` and moved to the CPU; the rows of all batches are concatenated
    along dim 0.  Globs give one entry per matched module.  Reductions: ``'last'``: ``v[:, -1]``;
    ``'mean'``: ``v.mean(1)``, **padding included**; ``'masked_mean'``: the mean over the positions
    where the batch's ``mask_key`` entry (``(batch, positions)``, 1 = real token) is nonzero (zeros
    for a row without any); a callable ``reduce(v)``, or ``reduce(v, batch)`` when it has two
    required positional parameters, keeping the batch on dim 0.

    With ``path`` the cache is a directory of raw memory-mapped files (one per entry, preallocated to
    ``total`` rows, or to ``len(batches)`` × the first batch's rows, and grown past that) and a
    record ``cache.json``.  The directory appears atomically (built as a hidden sibling and renamed
    into place).  After each batch its rows are written and fsynced, and only then is the record
    (batches and rows done) replaced atomically.  Calling again with the same arguments resumes a
    killed run: the batches already recorded are skipped without running the model, and rows written
    after the last record are overwritten, so nothing is lost or duplicated.  **The iterable must be
    re-iterable and deterministic** (same batches in the same order on every pass: a list, or a
    ``DataLoader`` without shuffling).  A complete cache is returned without running the model.

    **Data-parallel** (``torchrun``): in a ``torch.distributed`` process group of more than one rank
    (the default group once initialised, or ``group``) the same call caches each rank's shard and
    returns one result, every row once, in dataset order, equal to one process's cache of the whole
    dataset.  ``batches`` is then each rank's ``DataLoader`` over a map-style dataset, e.g. with
    ``sampler=DistributedSampler(dataset, shuffle=False)``: its batch sampler gives every row's dataset
    index (a padded last shard writes its repeated rows twice, with the same bytes).  Without ``path``
    the rows are gathered on every rank; with ``path`` (storage every rank sees) each rank writes its
    rows at their indices into one preallocated cache and marks them in a row mask (``rows.mask``)
    after the fsync, so a run killed on any rank resumes with any world size, a single process too.
    Every rank must run the same state, sites and reduce (checked); an error on one rank is raised
    on every rank, naming it.

    The record identifies the run, and every resume and every load of a complete cache checks it:
    sites, reduction (a callable by a fingerprint of its code, constants, defaults, closure and the
    globals it reads; ``mask_key``), the state (a digest of every tensor: in full up to 65,536
    elements, a strided sample above), a digest of the first batch, the number of batches (when
    ``batches`` has a length) and the size of every file.  One writer at a time: a second process
    gets a CacheError naming the first's pid (a lock the kernel releases when its holder dies).

    Args:
        module: the model.
        state: its state (:func:`tdfunc.state`), or ``None`` for the module's own tensors.
        batches: an iterable of TensorDict batches (dim 0 = examples).
        sites: a site or list of sites (any :func:`tdfunc.functional_call` capture site, globs too).
        path: a directory for an on-disk, resumable cache; ``None`` keeps it in memory.
        reduce: ``None``, ``'last'``, ``'mean'``, ``'masked_mean'`` or a callable ``v -> v'`` /
            ``(v, batch) -> v'`` applied to every captured value.
        mask_key: the batch entry ``'masked_mean'`` reads.
        input_key: the batch entry passed as the model's one positional input; ``None`` passes the
            batch TensorDict itself (for a ``TensorDictModule``).
        inputs: ``inputs(batch) -> (args, kwargs)`` to call the model any other way (overrides
            ``input_key``).
        total: the number of rows N, to preallocate the files (a hint: the cache ends at the rows
            actually produced).
        progress: show a tqdm progress bar on stderr over the batches (never inside ``torch.compile``
            or a ``torch.func`` transform).
        group: the ``torch.distributed`` process group to shard over (data-parallel, also with one
            rank); ``None``: the default group when one is initialised with more than one rank (one
            process otherwise); ``False``: this process alone.
        stop_early: with ``True`` each batch's forward ends once every site has been captured
            (``functional_call(..., stop=True)``, tdhook's ``stop``): caching the first layers of a deep
            model does not run the rest.  Same values; a site without ``@k`` is its first call, ``@*``
            is refused.

    Returns:
        A TensorDict with batch size ``[N]``: in-memory tensors, or ``MemoryMappedTensor`` leaves
        reading the files under ``path``.

    Raises:
        CacheError: unknown ``reduce``; no batches; a batch that is not a TensorDict or lacks
            ``input_key`` or ``mask_key``; captures without a common batch dim 0; ``path`` not a
            cache, or a cache written by another run (sites, reduce, state, data, number of batches,
            shapes or dtypes) or damaged (torn record, truncated or missing file); fewer batches than
            already cached; another process writing the cache; any I/O failure (disk full, ...),
            with the ``OSError`` as ``__cause__``.  Data-parallel: ``batches`` not a ``DataLoader`` with a
            deterministic sampler; ranks running other states, sites or reduce; rows in no rank's shard;
            an error on another rank.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> data = [TensorDict({"input": torch.randn(5, 4)}, batch_size=[5]) for _ in range(3)]
        >>> cache = tdfunc.latent.cache_activations(net, tdfunc.state(net), data, ["*"], progress=False)
        >>> sorted(cache.keys()), cache["1"].shape
        (['0', '1', '2'], torch.Size([15, 8]))

    Composes with: any site :func:`tdfunc.functional_call` captures; the result feeds
    :func:`tdfunc.latent.cka`, :func:`tdfunc.latent.twonn_dimension` and SAE training (``sae_init``).
    """
    check_module(module, CacheError, fix="; pass the model itself (the nn.Module to run)")
    module = unwrap(module)  # DistributedDataParallel, DataParallel, torch.compile: the model inside
    if not (
        isinstance(mask_key, str)
        or (isinstance(mask_key, tuple) and mask_key and all(isinstance(k, str) for k in mask_key))
    ):
        raise type_error(CacheError)(
            f"{FN}: mask_key must be a batch key (a string or a tuple of strings), got "
            f"{type(mask_key).__name__} ({mask_key!r:.60})."
        )
    reducer = _reducer(reduce, mask_key)
    _check_sites(sites)
    check_int("total", total, CacheError, optional=True)
    check_bool("progress", progress, CacheError)
    check_bool("stop_early", stop_early, CacheError)  # stop_early
    if stop_early and any(str(x).endswith("@*") for x in ([sites] if isinstance(sites, str) else sites)):  # stop_early
        raise CacheError(
            f"{FN}: stop_early=True cannot tell when the forward has made its last call of an '@*' site "
            f"(sites={sites!r}); cache the calls you need as '@0', '@1', …, or drop stop_early=True."
        )
    explicit = group is not None and group is not False  # a given group shards, even of one rank
    group, _, size = shard.world(group)
    for _ in range(3):
        try:
            return _cache(
                module,
                state,
                batches,
                sites,
                path,
                reduce,
                mask_key,
                reducer,
                input_key,
                inputs,
                total,
                progress,
                group if size > 1 or explicit else False,
                stop_early,  # stop_early
            )
        except _Lost:
            continue
    raise CacheError(f"{FN}: other processes keep creating the cache at {path!r}; pass another path.")


def _cache(
    module, state, batches, sites, path, reduce, mask_key, reducer, input_key, inputs, total, progress, group, stop
):  # stop: stop_early
    reduce_name = reduce if isinstance(reduce, str) or reduce is None else "<callable>"
    site_list = [sites] if isinstance(sites, str) else list(sites)
    key = mask_key if isinstance(mask_key, str) else list(mask_key)  # as JSON stores it

    def ident() -> dict:
        return {
            "sites": site_list,
            "reduce": reduce_name,
            "mask_key": key if reduce == "masked_mean" else None,
            "reduce_fingerprint": fingerprint(reduce) if reduce_name == "<callable>" else None,
            "state": state_digest(module, state),
        }

    return drive(
        batches,
        path,
        total,
        progress,
        group,
        ident,
        lambda batch, i: _batch_values(
            module, state, batch, i, site_list, inputs, input_key, reducer, stop
        ),  # stop_early
    )


def drive(batches, path, total, progress, group, make_ident, values_of, desc=FN):
    """Run ``values_of(batch, i) -> {key: (rows, ...)}`` over ``batches`` into one cache (in memory, on disk,
    data-parallel); ``make_ident()`` gives what identifies the run (sites, reduce, fingerprints, state digest)."""
    n_batches = len(batches) if hasattr(batches, "__len__") else None
    path = os.fspath(path) if path is not None else None
    record, fd, ident = None, None, None
    sharded = group is not False or (path is not None and bool((disk.read_record(path) or {}).get("sharded")))
    if path is not None or sharded:
        ident = {**make_ident(), "n_batches": n_batches}
    if sharded:  # data-parallel: each rank its shard, or resuming a cache written so
        return shard.run_sharded(batches, path, progress and desc, ident, group, values_of)
    if path is not None:
        record, fd = _open(path, ident, n_batches, batches)
        if record is not None and record["complete"]:
            return disk.load(path, record)
    held = [fd]  # the writers' lock, from here to the end of the call (create() takes it for a new cache)
    try:
        return _run(batches, path, total, progress and desc, n_batches, record, held, ident, values_of)
    finally:
        disk.unlock(held[0])


def _run(batches, path, total, progress, n_batches, record, held, ident, values_of):
    done = record["batches_done"] if record is not None else 0

    bar = progress_bar(enabled=bool(progress), desc=progress or FN, total=n_batches, initial=done, unit="batch")
    chunks: dict = {}
    seen = 0
    try:
        for i, batch in enumerate(batches):
            seen = i + 1
            if i == 0 and path is not None:
                _check_batch(batch, 0)
                first_digest = batch_digest(batch)
                if record is not None:
                    disk.verify(path, record, ident, None, first_digest)
            if i < done:
                continue
            values = values_of(batch, i)
            spec = _row_spec(values)
            rows = next(iter(values.values())).shape[0]
            if path is None:
                first = not chunks
                if not first and list(chunks) != list(values):
                    raise CacheError(
                        f"{FN}: batch {i} captured {[_key_str(k) for k in values]} but batch 0 "
                        f"captured {[_key_str(k) for k in chunks]}; every batch must capture the same sites."
                    )
                for key, v in values.items():
                    if not first and (chunks[key][0].shape[1:] != v.shape[1:] or chunks[key][0].dtype != v.dtype):
                        raise CacheError(
                            f"{FN}: batch {i} gives {_key_str(key)!r} rows of shape {tuple(v.shape[1:])} "
                            f"{v.dtype} but batch 0 gave {tuple(chunks[key][0].shape[1:])} "
                            f"{chunks[key][0].dtype}; every batch must give the same row shape "
                            "(pad the inputs, or reduce over the varying dim)."
                        )
                    chunks.setdefault(key, []).append(v)
            else:
                if record is None:
                    hint = total if total is not None else (n_batches * rows if n_batches else None)
                    new = {
                        "version": disk.VERSION,
                        **ident,
                        "first_batch": first_digest,
                        "spec": spec,
                        "batches_done": 0,
                        "rows_done": 0,
                        "complete": False,
                    }
                    made = disk.create(path, new, hint)
                    if made is None:  # another process published this cache first
                        disk.unlock(disk.lock(path))  # a CacheError naming it while it writes; else start over
                        raise _Lost
                    record, held[0] = made
                disk.check_spec(path, record, spec, i)
                disk.append(path, record, {_key_str(k): v for k, v in values.items()})
                record = {**record, "batches_done": i + 1, "rows_done": record["rows_done"] + rows}
                disk.write_progress(path, record)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if seen == 0:
        raise CacheError(
            f"{FN}: batches yielded no batch; pass a non-empty, re-iterable iterable of TensorDict "
            "batches (a list, or a DataLoader)."
        )
    if seen < done:
        raise CacheError(
            f"{FN}: batches yielded {seen} batches but the cache at {path!r} already holds {done}; "
            "batches must be the same deterministic iterable as in the interrupted run."
        )
    if path is None:
        n = sum(c.shape[0] for c in next(iter(chunks.values())))
        out = TensorDict({}, batch_size=[n])
        for key, cs in chunks.items():
            out.set(key, torch.cat(cs))
        return out
    if not record["complete"]:
        record = disk.finish(path, record)
    return disk.load(path, record)
