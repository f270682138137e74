"""Activation caching over a dataset: captures of many batches in one TensorDict, in memory or on disk.

:func:`cache_activations` runs :func:`tdfunc.functional_call` over an iterable of TensorDict batches,
optionally reduces each captured value per batch (last position, mean over positions, any callable)
and concatenates the results along the batch dimension.  With ``path`` the cache lives on disk as
raw memory-mapped files (tensordict's :class:`~tensordict.MemoryMappedTensor`) and is resumable: a
run killed mid-way continues where it stopped, with no row lost or written twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from tensordict import MemoryMappedTensor, TensorDict, TensorDictBase
from torch import nn

from .._call import functional_call
from .._checks import check_bool, check_int, check_module
from .._progress import progress_bar
from ._common import LatentError

__all__ = ["CacheError", "cache_activations"]

FN = "tdfunc.latent.cache_activations"
REDUCTIONS = ("last", "mean")
RECORD = "cache.json"
_VERSION = 1


class CacheError(LatentError):
    """Bad input to :func:`tdfunc.latent.cache_activations` (reduction, batches, or an incompatible cache on disk)."""


# ---------------------------------------------------------------------------------------------- checks


def _reducer(reduce) -> Callable[[torch.Tensor, str], torch.Tensor] | None:
    if reduce is None:
        return None
    if callable(reduce):
        return lambda v, key: reduce(v)
    if isinstance(reduce, str) and reduce in REDUCTIONS:

        def named(v: torch.Tensor, key: str) -> torch.Tensor:
            if v.dim() < 2:
                raise CacheError(f"{FN}: reduce={reduce!r} reduces dim 1 but the value at {key!r} has shape "
                                 f"{tuple(v.shape)}; use reduce=None or a callable for this site.")
            return v[:, -1] if reduce == "last" else v.mean(1)

        return named
    raise CacheError(f"{FN}: unknown reduce {reduce!r}; use None, 'last' (last position along dim 1), "
                     "'mean' (mean over dim 1) or a callable value -> value.")


def _key_str(key) -> str:
    return key if isinstance(key, str) else ".".join(key)


def _leaves(caps: TensorDictBase) -> dict[tuple[str, ...], torch.Tensor]:
    out = {}
    for key in caps.keys(include_nested=True, leaves_only=True):
        key = (key,) if isinstance(key, str) else tuple(key)
        out[key] = caps.get(key)
    return out


def _row_spec(values: dict) -> dict:
    return {_key_str(k): {"key": list(k), "shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in values.items()}


def _batch_values(module, state, batch, i, sites, call_inputs, input_key, reduce) -> dict:
    if not isinstance(batch, TensorDictBase):
        raise CacheError(f"{FN}: batch {i} is a {type(batch).__name__}, not a TensorDict; yield TensorDict "
                         "batches (e.g. TensorDict({'input': x}, batch_size=[len(x)])).")
    if call_inputs is None:
        if input_key is None:
            args, kwargs = (batch,), {}
        elif input_key not in batch.keys(include_nested=True):
            keys = sorted(_key_str(k) for k in batch.keys(include_nested=True, leaves_only=True))
            raise CacheError(f"{FN}: batch {i} has no key {input_key!r} (keys: {keys}); set input_key to the key "
                             "holding the model input, or pass inputs=lambda batch: ((...,), {}).")
        else:
            args, kwargs = (batch.get(input_key),), {}
    else:
        got = call_inputs(batch)
        if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict)):
            raise CacheError(f"{FN}: inputs(batch) must return (args, kwargs) with kwargs a dict, got "
                             f"{type(got).__name__}; e.g. inputs=lambda batch: ((batch['x'],), {{}}).")
        args, kwargs = got
    with torch.no_grad():
        _, caps = functional_call(module, state, args, kwargs, capture=sites)
    values = {}
    for key, v in _leaves(caps).items():
        if reduce is not None:
            v = reduce(v, _key_str(key))
            if not isinstance(v, torch.Tensor):
                raise CacheError(f"{FN}: reduce returned a {type(v).__name__} for {_key_str(key)!r}; it must "
                                 "return a tensor whose dim 0 is the batch.")
        values[key] = v.detach().to("cpu").contiguous()
    if not values:
        raise CacheError(f"{FN}: sites {sites!r} captured nothing; give at least one site.")
    rows = {_key_str(k): v.shape[0] if v.dim() else None for k, v in values.items()}
    if len(set(rows.values())) != 1 or None in rows.values():
        raise CacheError(f"{FN}: the captured values of batch {i} disagree on the batch dim 0 {rows}; every "
                         "value must have the batch on dim 0 (reduce with a callable that moves it there).")
    return values


# ---------------------------------------------------------------------------------------------- on disk


def _write_json(path: str, record: dict) -> None:
    """Atomic: the record is either the old one or the new one, never a torn write."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_progress(path: str, record: dict) -> None:
    _write_json(os.path.join(path, RECORD), record)


def _file(path: str, j: int) -> str:
    return os.path.join(path, f"{j}.memmap")


def _open_record(path: str, sites: list[str], reduce_name) -> dict | None:
    if not os.path.exists(path):
        return None
    rec_path = os.path.join(path, RECORD)
    if not os.path.isdir(path) or (not os.path.exists(rec_path) and os.listdir(path)):
        raise CacheError(f"{FN}: path {path!r} exists and is not a tdfunc activation cache (no {RECORD}); pass a "
                         "new path or an empty directory.")
    if not os.path.exists(rec_path):
        return None
    with open(rec_path) as f:
        record = json.load(f)
    if record.get("sites") != sites or record.get("reduce") != reduce_name:
        raise CacheError(f"{FN}: the cache at {path!r} was written for sites {record.get('sites')} with reduce="
                         f"{record.get('reduce')!r} but this call has sites {sites} with reduce={reduce_name!r}; "
                         "pass the same sites and reduce to resume it, or another path for a new cache.")
    return record


def _check_spec(path: str, record: dict, spec: dict, i: int) -> None:
    if record["spec"] != spec:
        have = {k: (tuple(s["shape"]), s["dtype"]) for k, s in record["spec"].items()}
        got = {k: (tuple(s["shape"]), s["dtype"]) for k, s in spec.items()}
        raise CacheError(f"{FN}: the cache at {path!r} holds rows {have} (shape after the batch dim, dtype) but "
                         f"batch {i} gives {got}; pass the same model, sites and reduce to resume it, or another "
                         "path for a new cache.")


def _append(path: str, record: dict, values: dict) -> None:
    """Write a batch's rows at offset ``rows_done`` of every file, then fsync (idempotent on rerun)."""
    start = record["rows_done"]
    index = {k: j for j, k in enumerate(record["spec"])}
    for key, v in values.items():
        j = index[_key_str(key)]
        raw = v.view(torch.uint8).reshape(-1).numpy() if v.numel() else b""
        row_bytes = v[0].numel() * v.element_size() if v.shape[0] else 0
        with open(_file(path, j), "r+b") as f:
            f.seek(start * row_bytes)
            f.write(memoryview(raw) if len(raw) else b"")
            f.flush()
            os.fsync(f.fileno())


def _create(path: str, sites: list[str], reduce_name, spec: dict, rows_hint: int | None) -> dict:
    os.makedirs(path, exist_ok=True)
    for j, s in enumerate(spec.values()):
        dtype = getattr(torch, s["dtype"])
        if rows_hint:  # preallocate the whole cache (sparse on most file systems)
            MemoryMappedTensor.empty((rows_hint, *s["shape"]), dtype=dtype, filename=_file(path, j))
        else:
            open(_file(path, j), "wb").close()
    record = {"version": _VERSION, "sites": sites, "reduce": reduce_name, "spec": spec,
              "batches_done": 0, "rows_done": 0, "complete": False}
    _write_progress(path, record)
    return record


def _load(path: str, record: dict) -> TensorDict:
    n = record["rows_done"]
    out = TensorDict({}, batch_size=[n])
    for j, s in enumerate(record["spec"].values()):
        dtype = getattr(torch, s["dtype"])
        out.set(tuple(s["key"]), MemoryMappedTensor.from_filename(_file(path, j), dtype, (n, *s["shape"])))
    return out


# ---------------------------------------------------------------------------------------------- public


def cache_activations(
    module: nn.Module,
    state: Any,
    batches: Iterable[TensorDictBase],
    sites: str | Sequence[str],
    *,
    path: str | os.PathLike | None = None,
    reduce: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
    input_key: str | None = "input",
    inputs: Callable[[TensorDictBase], tuple[tuple, dict]] | None = None,
    total: int | None = None,
    progress: bool = True,
) -> TensorDict:
    """Capture ``sites`` over every batch of a dataset into one TensorDict ``{site: (N, ...)}``.

    .. math::  C_s = \\mathrm{concat}_b\\; r\\big(a_s(\\theta, x_b)\\big) \\quad \\forall s \\in S

    Each batch is run with :func:`tdfunc.functional_call` under ``torch.no_grad()``; each captured
    value is reduced by ``reduce`` (``'last'``: ``v[:, -1]``, ``'mean'``: ``v.mean(1)``, a callable
    ``v -> v'`` keeping the batch on dim 0) and moved to the CPU; the rows of all batches are
    concatenated along dim 0.  Globs give one entry per matched module.

    With ``path`` the cache is a directory of raw memory-mapped files (one per entry, preallocated to
    ``total`` rows, or to ``len(batches)`` × the first batch's rows, and grown past that) and a
    progress record ``cache.json``.  After each batch its rows are written and fsynced, and only then
    is the record (batches and rows done) replaced atomically.  Calling again with the same arguments
    resumes a killed run: the batches already recorded are skipped without running the model, and
    rows written after the last record are overwritten, so nothing is lost or duplicated.  **The
    iterable must be re-iterable and deterministic** (same batches in the same order on every pass:
    a list, or a ``DataLoader`` without shuffling).  A complete cache is returned without running the
    model.

    Args:
        module: the model.
        state: its state (:func:`tdfunc.state`), or ``None`` for the module's own tensors.
        batches: an iterable of TensorDict batches (dim 0 = examples).
        sites: a site or list of sites (any :func:`tdfunc.functional_call` capture site, globs too).
        path: a directory for an on-disk, resumable cache; ``None`` keeps it in memory.
        reduce: ``None``, ``'last'``, ``'mean'`` or a callable applied to every captured value.
        input_key: the batch entry passed as the model's one positional input; ``None`` passes the
            batch TensorDict itself (for a ``TensorDictModule``).
        inputs: ``inputs(batch) -> (args, kwargs)`` to call the model any other way (overrides
            ``input_key``).
        total: the number of rows N, to preallocate the files (a hint: the cache ends at the rows
            actually produced).
        progress: show a tqdm progress bar on stderr over the batches (never inside ``torch.compile``
            or a ``torch.func`` transform).

    Returns:
        A TensorDict with batch size ``[N]``: in-memory tensors, or ``MemoryMappedTensor`` leaves
        reading the files under ``path``.

    Raises:
        CacheError: unknown ``reduce``; no batches; a batch that is not a TensorDict or lacks
            ``input_key``; captures without a common batch dim 0; ``path`` not a cache, or a cache
            written for other sites, reduce, shapes or dtypes; fewer batches than already cached.

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
    check_module(FN, module, CacheError, fix="; pass the model itself (the nn.Module to run)")
    reducer = _reducer(reduce)
    reduce_name = reduce if isinstance(reduce, str) or reduce is None else "<callable>"
    check_int(FN, "total", total, CacheError, optional=True)
    check_bool(FN, "progress", progress, CacheError)
    site_list = [sites] if isinstance(sites, str) else list(sites)
    n_batches = len(batches) if hasattr(batches, "__len__") else None
    path = os.fspath(path) if path is not None else None
    record = _open_record(path, site_list, reduce_name) if path is not None else None
    if record is not None and record["complete"]:
        return _load(path, record)
    done = record["batches_done"] if record is not None else 0

    bar = progress_bar(enabled=progress, desc=FN, total=n_batches, initial=done, unit="batch")
    chunks: dict = {}
    seen = 0
    try:
        for i, batch in enumerate(batches):
            seen = i + 1
            if i < done:
                continue
            values = _batch_values(module, state, batch, i, site_list, inputs, input_key, reducer)
            spec = _row_spec(values)
            rows = next(iter(values.values())).shape[0]
            if path is None:
                first = not chunks
                if not first and list(chunks) != list(values):
                    raise CacheError(f"{FN}: batch {i} captured {[_key_str(k) for k in values]} but batch 0 "
                                     f"captured {[_key_str(k) for k in chunks]}; every batch must capture the same sites.")
                for key, v in values.items():
                    if not first and (chunks[key][0].shape[1:] != v.shape[1:] or chunks[key][0].dtype != v.dtype):
                        raise CacheError(f"{FN}: batch {i} gives {_key_str(key)!r} rows of shape {tuple(v.shape[1:])} "
                                         f"{v.dtype} but batch 0 gave {tuple(chunks[key][0].shape[1:])} "
                                         f"{chunks[key][0].dtype}; every batch must give the same row shape "
                                         "(pad the inputs, or reduce over the varying dim).")
                    chunks.setdefault(key, []).append(v)
            else:
                if record is None:
                    hint = total if total is not None else (n_batches * rows if n_batches else None)
                    record = _create(path, site_list, reduce_name, spec, hint)
                _check_spec(path, record, spec, i)
                _append(path, record, values)
                record = {**record, "batches_done": i + 1, "rows_done": record["rows_done"] + rows}
                _write_progress(path, record)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if seen == 0:
        raise CacheError(f"{FN}: batches yielded no batch; pass a non-empty, re-iterable iterable of TensorDict "
                         "batches (a list, or a DataLoader).")
    if seen < done:
        raise CacheError(f"{FN}: batches yielded {seen} batches but the cache at {path!r} already holds {done}; "
                         "batches must be the same deterministic iterable as in the interrupted run.")
    if path is None:
        n = sum(c.shape[0] for c in next(iter(chunks.values())))
        out = TensorDict({}, batch_size=[n])
        for key, cs in chunks.items():
            out.set(key, torch.cat(cs))
        return out
    for j, s in enumerate(record["spec"].values()):  # drop any preallocated rows past the end
        row_bytes = getattr(torch, s["dtype"]).itemsize
        for d in s["shape"]:
            row_bytes *= d
        os.truncate(_file(path, j), record["rows_done"] * row_bytes)
    record = {**record, "complete": True}
    _write_progress(path, record)
    return _load(path, record)
