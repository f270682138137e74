"""Data-parallel activation caching: every rank of a ``torch.distributed`` process group caches its shard.

:func:`tdfunc.latent.cache_activations` comes here when it runs in a process group of more than one
rank (an initialised default group under ``torchrun``, or ``group=``), or resumes a cache written so.
Each rank iterates its own ``DataLoader`` (e.g. with a :class:`~torch.utils.data.DistributedSampler`);
the loader's batch sampler gives every row's dataset index, so the result is the dataset in its own
order, as one process would cache it with a sequential loader:

* ``path=None``: the rows are gathered (``all_gather_object``) and every rank returns all of them.
* ``path``: one cache directory on storage every rank sees, preallocated to the dataset's rows;
  each rank writes its rows at their indices, fsyncs, then marks them in a row mask (one byte per
  row).  A row written twice (the padding of a ``DistributedSampler``) holds the same bytes.  A
  resume, after any rank was killed, skips the batches whose rows are all marked, with any world
  size (one process too).  Rank 0 holds the writers' lock ``.lock``, rank ``r`` ``.lock.rank<r>``.

Every collective carries each rank's error, so one rank's failure raises on every rank (naming it)
instead of leaving the others waiting.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from tensordict import TensorDict
from torch.utils.data import DataLoader

from .._progress import progress_bar
from . import _cache_io as disk
from ._cache_io import CacheError

__all__ = ["world", "run_sharded"]

FN = "tdfunc.latent.cache_activations"


def world(group: Any) -> tuple[Any, int, int]:
    """``(group, rank, world size)`` of the call: ``group=None`` means the default group when one is initialised."""
    if group is False:
        return None, 0, 1
    available = dist.is_available() and dist.is_initialized()
    if group is None:
        if not available:
            return None, 0, 1
        group = dist.group.WORLD
    elif not isinstance(group, dist.ProcessGroup):
        from .._checks import type_error

        raise type_error(CacheError)(
            f"{FN}: group must be a torch.distributed ProcessGroup, None (the default group when one is "
            f"initialised) or False (this process alone), got {type(group).__name__} ({group!r:.60})."
        )
    elif not available:  # pragma: no cover - a ProcessGroup exists only once torch.distributed is initialised
        raise CacheError(
            f"{FN}: group={group!r} but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first (torchrun sets it up)."
        )
    return group, dist.get_rank(group), dist.get_world_size(group)


def _plan(batches: Any, size: int) -> tuple[list[list[int]], int]:
    """The dataset indices of every batch's rows (from the loader's batch sampler) and the dataset's length."""
    if not isinstance(batches, DataLoader) or batches.batch_sampler is None:
        raise CacheError(
            f"{FN}: in a process group of {size} ranks (or resuming a cache written by one) batches must be a "
            f"torch DataLoader over a map-style dataset with batch_size set, got {type(batches).__name__}; the "
            "loader's sampler gives every row's dataset index, e.g. DataLoader(dataset, batch_size=8, "
            "sampler=DistributedSampler(dataset, shuffle=False), collate_fn=torch.stack)."
        )
    passes = [[[int(i) for i in b] for b in batches.batch_sampler] for _ in range(2)]
    if passes[0] != passes[1]:
        raise CacheError(
            f"{FN}: the loader's sampler gave other indices on a second pass; a data-parallel cache "
            "needs a deterministic sampler (DistributedSampler(dataset, shuffle=False), or a fixed "
            "seed and epoch)."
        )
    n = len(batches.dataset)  # type: ignore[arg-type]
    bad = [i for b in passes[0] for i in b if not 0 <= i < n]
    if bad:
        raise CacheError(
            f"{FN}: the loader's sampler gave index {bad[0]} outside the dataset's {n} rows; use a "
            "sampler over this dataset."
        )
    return passes[0], n


def _sync(group: Any, payload: Any, err: BaseException | None) -> list[Any]:
    """All-gather ``payload`` with every rank's error; re-raise this rank's own, or the first other rank's."""
    out: list[Any] = [None] * dist.get_world_size(group)
    msg = None if err is None else f"{type(err).__name__}: {err}"
    dist.all_gather_object(out, (msg, payload), group=group)
    if err is not None:
        raise err
    for r, (m, _) in enumerate(out):
        if m is not None:
            raise CacheError(f"{FN}: rank {r} of the process group failed: {m}")
    return [p for _, p in out]


def _same_run(idents: list[dict], ns: list[int]) -> None:
    """Every rank caches the same sites with the same reduction and state over the same dataset."""
    for r, (ident, n) in enumerate(zip(idents, ns)):
        diffs = [k for k in ("sites", "reduce", "mask_key", "reduce_fingerprint", "state") if ident[k] != idents[0][k]]
        if n != ns[0]:
            diffs.append(f"dataset length ({n} rows, rank 0 {ns[0]})")
        if diffs:
            raise CacheError(
                f"{FN}: rank {r} of the process group runs another job than rank 0: {', '.join(diffs)} "
                "differ; every rank must pass the same model state (load the same weights on every "
                "rank), sites, reduce and dataset."
            )


def _missing(mask: bytes | list[bool], n: int) -> None:
    missing = [i for i in range(n) if not mask[i]]
    if missing:
        raise CacheError(
            f"{FN}: {len(missing)} of the dataset's {n} rows (first {missing[:5]}) are in no rank's "
            "shard; use a sampler that covers the dataset (DistributedSampler(dataset, drop_last=False)"
            " pads the last shard instead of dropping rows)."
        )


def run_sharded(batches, path, progress, ident, group, values_of) -> TensorDict:
    """The data-parallel :func:`cache_activations`; ``values_of(batch, i)`` captures and reduces one batch."""
    group, rank, size = world(group)
    sync = (
        (lambda payload, err: _sync(group, payload, err))
        if group is not None
        else (lambda payload, err: _raise_or([payload], err))
    )
    if path is None:
        return _in_memory(batches, size, rank, progress, values_of, sync, ident)
    held: list[int | None] = [None]
    try:
        return _on_disk(batches, size, rank, path, progress, values_of, sync, ident, held)
    finally:
        disk.unlock(held[0])


def _raise_or(out: list[Any], err: BaseException | None) -> list[Any]:
    if err is not None:
        raise err
    return out


def _bar(progress: bool | str, total: int, initial: int, rank: int) -> Any:
    """``progress``: False, or the bar's description (the public function's name)."""
    desc = progress if isinstance(progress, str) else FN
    return progress_bar(
        enabled=bool(progress), desc=f"{desc} (rank {rank})", total=total, initial=initial, unit="batch"
    )


def _checked(values: dict, idx: list[int], i: int) -> dict:
    rows = next(iter(values.values())).shape[0]
    if rows != len(idx):
        raise CacheError(
            f"{FN}: batch {i} gives {rows} rows but the loader's sampler gave it {len(idx)} indices; "
            "the collate_fn must keep one row per sampled index."
        )
    return values


def _in_memory(batches, size, rank, progress, values_of, sync, ident):
    err, plan, n, mine = None, [], 0, []
    try:
        plan, n = _plan(batches, size)
        bar = _bar(progress, len(plan), 0, rank)
        try:
            for i, batch in enumerate(batches):
                mine.append((plan[i], _checked(values_of(batch, i), plan[i], i)))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    except BaseException as e:  # noqa: BLE001 - handed to every rank by the collective, then re-raised
        err = e
    gathered = sync((ident, n, mine), err)
    _same_run([g[0] for g in gathered], [g[1] for g in gathered])
    parts = [part for g in gathered for part in g[2]]
    if not parts:
        raise CacheError(f"{FN}: batches yielded no batch on any rank; pass a non-empty DataLoader.")
    first = parts[0][1]
    out = TensorDict({}, batch_size=[n])
    for key, v in first.items():
        out.set(key, torch.zeros((n, *v.shape[1:]), dtype=v.dtype))
    seen = [False] * n
    for idx, values in parts:
        if list(values) != list(first) or any(values[k].shape[1:] != first[k].shape[1:] for k in first):
            raise CacheError(
                f"{FN}: the ranks' batches capture different entries or row shapes; every batch must "
                "give the same row shape (pad the inputs, or reduce over the varying dim)."
            )
        t = torch.tensor(idx, dtype=torch.long)
        for key, v in values.items():
            out.get(key)[t] = v
        for r in idx:
            seen[r] = True
    _missing(seen, n)
    return out


def _on_disk(batches, size, rank, path, progress, values_of, sync, ident, held):
    from ._cache import _key_str, _row_spec

    err, plan, n, record, spec, pending, mask = None, [], 0, None, None, None, b""
    try:
        plan, n = _plan(batches, size)
        ident = {**ident, "n_batches": None, "rows_total": n}
        record = disk.read_record(path)
        if record is not None:
            _check_sharded(path, record, ident)
            if not record["complete"]:
                held[0] = disk.lock(path, disk.LOCK if rank == 0 else f"{disk.LOCK}.rank{rank}")
                mask = disk.read_mask(path, n)
        if record is None or not record["complete"]:
            for i, batch in enumerate(batches):  # this rank's first batch not written yet gives the row spec
                if mask and all(mask[r] for r in plan[i]):
                    continue
                pending = (i, _checked(values_of(batch, i), plan[i], i))
                spec = _row_spec(pending[1])
                break
    except BaseException as e:  # noqa: BLE001 - handed to every rank by the collective, then re-raised
        err = e
    gathered = sync((ident, n, spec, record is not None and record["complete"]), err)
    _same_run([g[0] for g in gathered], [g[1] for g in gathered])
    if gathered[0][3]:
        return disk.load(path, record)
    err = None
    try:
        specs = [g[2] for g in gathered if g[2] is not None]
        if any(s != specs[0] for s in specs):
            raise CacheError(
                f"{FN}: the ranks' first batches give different rows ({specs}); every batch must give "
                "the same row shape (pad the inputs, or reduce over the varying dim)."
            )
        if record is None and rank == 0:
            if not specs:
                raise CacheError(f"{FN}: batches yielded no batch on any rank; pass a non-empty DataLoader.")
            new = {
                "version": disk.VERSION,
                **ident,
                "first_batch": None,
                "spec": specs[0],
                "batches_done": 0,
                "rows_done": n,
                "complete": False,
                "sharded": True,
            }
            made = disk.create(path, new, n, {disk.MASK: n})
            if made is None:
                raise disk.busy(path, "unknown")
            record, held[0] = made
    except BaseException as e:  # noqa: BLE001
        err = e
    sync(None, err)
    try:
        if record is None:  # created by rank 0 just now
            record = disk.read_record(path)
            if record is None:
                raise CacheError(
                    f"{FN}: the cache at {path!r} that rank 0 created is not visible on rank {rank}; "
                    "path must be on storage every rank shares."
                )
        if held[0] is None:
            held[0] = disk.lock(path, f"{disk.LOCK}.rank{rank}")
        mask = disk.read_mask(path, n)
        done = sum(all(mask[r] for r in b) for b in plan)
        bar = _bar(progress, len(plan), done, rank)
        try:
            for i, batch in enumerate(batches):
                if all(mask[r] for r in plan[i]):
                    continue
                if pending is not None and pending[0] == i:
                    values = pending[1]
                else:
                    values = _checked(values_of(batch, i), plan[i], i)
                disk.check_spec(path, record, _row_spec(values), i)
                disk.write_at(path, record, {_key_str(k): v for k, v in values.items()}, plan[i])
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    except BaseException as e:  # noqa: BLE001
        err = e
    sync(None, err)
    err = None
    try:
        _missing(disk.read_mask(path, n), n)
        if rank == 0:
            record = disk.finish(path, record)
    except BaseException as e:  # noqa: BLE001
        err = e
    sync(None, err)
    return disk.load(path, {**record, "complete": True})


def _check_sharded(path: str, record: dict, ident: dict) -> None:
    disk.check_run(path, record, ident["sites"], ident["reduce"])
    if not record.get("sharded"):
        raise CacheError(
            f"{FN}: the cache at {path!r} was written by a single process (batch by batch), this call "
            "runs data-parallel (a process group, or a DataLoader resuming a sharded cache); finish or "
            "load it in one process, or pass another path."
        )
    disk.verify(path, record, ident, None, None)
    if record.get("rows_total") != ident["rows_total"]:
        raise CacheError(
            f"{FN}: the cache at {path!r} holds {record.get('rows_total')} dataset rows but the loader's "
            f"dataset has {ident['rows_total']}; pass the same dataset to resume or load it, or another "
            "path for a new cache."
        )
    disk.check_files(path, record, exact=True)
