"""The on-disk activation cache: its record, its files, the writers' lock, and every I/O failure as a CacheError.

Layout of a cache directory ``path``::

    cache.json      the record: what identifies the run (sites, reduction, fingerprints, digests,
                    dataset length) and the progress (batches and rows done, complete or not)
    .lock           held with ``fcntl.flock`` by the one process writing (its pid inside)
    0.memmap, ...   one raw file per captured entry, rows back to back (row-major, native order)

The directory appears atomically: it is built as a hidden sibling (``.<name>.tmp-<pid>-*``, files,
lock and first record) and renamed into place, so a kill before that leaves no cache (the sibling is
removed by the next call) and a kill after leaves a resumable one.  The record is replaced atomically
after each batch's rows are written and fsynced.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from tensordict import MemoryMappedTensor, TensorDict

from ._common import LatentError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock between writers
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CacheError",
    "RECORD",
    "LOCK",
    "VERSION",
    "disk",
    "read_record",
    "lock",
    "unlock",
    "create",
    "append",
    "write_progress",
    "check_run",
    "verify",
    "check_spec",
    "check_files",
    "finish",
    "load",
    "MASK",
    "write_at",
    "read_mask",
]

FN = "tdfunc.latent.cache_activations"
RECORD = "cache.json"
LOCK = ".lock"
VERSION = 2
_FIX = "delete the directory or pass a new path to start a new cache"


class CacheError(LatentError):
    """Bad input to :func:`tdfunc.latent.cache_activations` (reduction, batches, or an incompatible cache on disk)."""


@contextlib.contextmanager
def disk(doing: str, path: str) -> Iterator[None]:
    """Turn an ``OSError`` raised while ``doing`` into a CacheError saying what to do (the original as
    ``__cause__``)."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC or e.errno == getattr(errno, "EDQUOT", None):
            msg = (
                f"{FN}: {doing} failed: no space left on the device holding {path!r} ({e}); free some space "
                "and call again with the same arguments: the cache resumes after the last recorded batch."
            )
        else:
            msg = (
                f"{FN}: {doing} failed: {e}; check that {path!r} is writable (permissions, a mounted file "
                "system, free space) and call again with the same arguments to resume, or pass another path."
            )
        raise CacheError(msg) from e


def file(path: str, j: int) -> str:
    return os.path.join(path, f"{j}.memmap")


def row_bytes(spec_entry: dict) -> int:
    n = getattr(torch, spec_entry["dtype"]).itemsize
    for d in spec_entry["shape"]:
        n *= d
    return n


# ---------------------------------------------------------------------------------------------- record


def read_record(path: str) -> dict | None:
    """The record of the cache at ``path``; None when there is no cache there yet (absent or empty directory)."""
    rec_path = os.path.join(path, RECORD)
    with disk(f"reading the cache at {path!r}", path):
        if not os.path.exists(path):
            return None
        if not os.path.isdir(path) or (not os.path.exists(rec_path) and os.listdir(path)):
            raise CacheError(
                f"{FN}: path {path!r} exists and is not a tdfunc activation cache (no {RECORD}); pass "
                "a new path or an empty directory."
            )
        if not os.path.exists(rec_path):
            return None
        with open(rec_path, "rb") as f:
            raw = f.read()
    try:
        record = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CacheError(
            f"{FN}: the record {rec_path!r} is not valid JSON ({e}): it was torn or edited outside "
            f"tdfunc, so what the cache holds is unknown; {_FIX}."
        ) from e
    keys = ("version", "sites", "reduce", "spec", "batches_done", "rows_done", "complete")
    if not isinstance(record, dict) or any(k not in record for k in keys):
        raise CacheError(
            f"{FN}: the record {rec_path!r} lacks entries of a tdfunc activation cache (needs {list(keys)}); {_FIX}."
        )
    if record["version"] != VERSION:
        raise CacheError(
            f"{FN}: the cache at {path!r} has format version {record['version']!r}, this tdfunc writes "
            f"version {VERSION} (which records what identifies the run); {_FIX}."
        )
    return record


def write_json(target: str, record: dict) -> None:
    """Atomic: the record is either the old one or the new one, never a torn write."""
    tmp = f"{target}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def write_progress(path: str, record: dict) -> None:
    with disk(f"recording progress in {os.path.join(path, RECORD)!r}", path):
        write_json(os.path.join(path, RECORD), record)


def check_run(path: str, record: dict, sites: list[str], reduce_name) -> None:
    if record["sites"] != sites or record["reduce"] != reduce_name:
        raise CacheError(
            f"{FN}: the cache at {path!r} was written for sites {record['sites']} with reduce="
            f"{record['reduce']!r} but this call has sites {sites} with reduce={reduce_name!r}; "
            "pass the same sites and reduce to resume it, or another path for a new cache."
        )


def verify(path: str, record: dict, ident: dict, n_batches: int | None, first: str | None) -> None:
    """Raise a CacheError listing everything that identifies the run and differs from the cache's record."""
    diffs = []
    if record.get("reduce_fingerprint") != ident["reduce_fingerprint"]:
        diffs.append(
            "the reduce callable differs (another function, or its code, constants, defaults, closure or "
            "globals changed)"
        )
    if record.get("mask_key") != ident["mask_key"]:
        diffs.append(
            f"reduce='masked_mean' read the mask {record.get('mask_key')!r} there but reads {ident['mask_key']!r} here"
        )
    if record.get("state") != ident["state"]:
        diffs.append(
            f"the model state differs (digest {str(record.get('state'))[:12]} there, "
            f"{ident['state'][:12]} here: other weights or buffers)"
        )
    if first is not None and record.get("first_batch") != first:
        diffs.append("the first batch differs (other data, or another order)")
    written = record["batches_done"] if record["complete"] else record.get("n_batches")
    if n_batches is not None and written is not None and n_batches != written:
        diffs.append(f"the batches number {n_batches} here but {written} there")
    if diffs:
        raise CacheError(
            f"{FN}: the cache at {path!r} was written by another run: {'; '.join(diffs)}. To resume or "
            f"load it pass the same state, batches and reduce; otherwise {_FIX}."
        )


def check_spec(path: str, record: dict, spec: dict, i: int) -> None:
    if record["spec"] != spec:
        have = {k: (tuple(s["shape"]), s["dtype"]) for k, s in record["spec"].items()}
        got = {k: (tuple(s["shape"]), s["dtype"]) for k, s in spec.items()}
        raise CacheError(
            f"{FN}: the cache at {path!r} holds rows {have} (shape after the batch dim, dtype) but "
            f"batch {i} gives {got}; pass the same model, sites and reduce to resume it, or another "
            "path for a new cache."
        )


# ---------------------------------------------------------------------------------------------- lock


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        pid = os.read(fd, 32).decode().strip()
    except (OSError, UnicodeDecodeError):
        pid = ""
    return pid if pid.isdigit() else "unknown"


def _try_lock(fd: int) -> bool:
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _claim(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, str(os.getpid()).encode())


def busy(path: str, pid: str) -> CacheError:
    return CacheError(
        f"{FN}: another process is writing this cache (pid {pid}) at {path!r}; wait until it "
        "finishes and call again (a complete cache is then loaded), or pass another path."
    )


def lock(path: str, name: str = LOCK) -> int:
    """Hold the writers' lock of the cache at ``path`` (a file descriptor; the kernel releases it if we die).

    ``name``: the lock file; a sharded cache's rank ``r > 0`` holds ``.lock.rank<r>`` (rank 0 holds ``.lock``)."""
    with disk(f"locking the cache at {path!r}", path):
        fd = os.open(os.path.join(path, name), os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            pid = _holder(fd)
            os.close(fd)
            raise busy(path, pid)
        _claim(fd)
        for entry in os.listdir(path):  # records torn by a killed writer (never renamed into place)
            if entry.startswith(RECORD + ".tmp-"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(path, entry))
    return fd


def unlock(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


# ---------------------------------------------------------------------------------------------- create


def _stale_siblings(path: str) -> None:
    """Remove the half-built directories of killed writers (their lock is free: the kernel released it)."""
    parent, name = os.path.split(os.path.abspath(path))
    with contextlib.suppress(OSError):
        for entry in os.listdir(parent):
            if not entry.startswith(f".{name}.tmp-"):
                continue
            d = os.path.join(parent, entry)
            try:
                fd = os.open(os.path.join(d, LOCK), os.O_RDWR)
            except FileNotFoundError:  # killed before its lock existed: its pid tells whether it lives
                pid = entry.removeprefix(f".{name}.tmp-").split("-")[0]
                if pid.isdigit() and not _alive(int(pid)):
                    shutil.rmtree(d, ignore_errors=True)
                continue
            try:
                if _try_lock(fd):
                    shutil.rmtree(d, ignore_errors=True)
            finally:
                os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def preallocate(target: str, nbytes: int) -> None:
    with open(target, "wb") as f:
        if nbytes:
            f.truncate(nbytes)  # sparse on most file systems


def publish(tmp: str, path: str) -> None:
    os.replace(tmp, path)  # a directory onto an absent or empty one: atomic


def create(
    path: str, record: dict, rows_hint: int | None, extra: dict[str, int] | None = None
) -> tuple[dict, int] | None:
    """Build the cache in a hidden sibling and rename it to ``path``, holding its lock throughout.

    Returns ``(record, lock fd)``, or None when another process published a cache at ``path`` first.
    """
    parent = os.path.dirname(os.path.abspath(path))
    with disk(f"creating the cache at {path!r}", path):
        _stale_siblings(path)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.tmp-{os.getpid()}-", dir=parent)
        fd = None
        try:
            fd = os.open(os.path.join(tmp, LOCK + ".new"), os.O_RDWR | os.O_CREAT, 0o644)
            _try_lock(fd)
            _claim(fd)
            os.replace(os.path.join(tmp, LOCK + ".new"), os.path.join(tmp, LOCK))  # visible only once held
            for j, s in enumerate(record["spec"].values()):
                preallocate(file(tmp, j), (rows_hint or 0) * row_bytes(s))
            for name, nbytes in (extra or {}).items():  # a sharded cache's row mask, zeros
                preallocate(os.path.join(tmp, name), nbytes)
            write_json(os.path.join(tmp, RECORD), record)
            try:
                publish(tmp, path)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                unlock(fd)
                return None
            with contextlib.suppress(OSError):  # make the rename durable
                dfd = os.open(parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            unlock(fd)
            raise
    return record, fd


# ---------------------------------------------------------------------------------------------- rows


def write_rows(target: str, offset: int, raw: Any) -> None:
    with open(target, "r+b") as f:
        f.seek(offset)
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())


def append(path: str, record: dict, values: dict[str, torch.Tensor]) -> None:
    """Write a batch's rows at offset ``rows_done`` of every file, then fsync (idempotent on rerun)."""
    start = record["rows_done"]
    index = {k: j for j, k in enumerate(record["spec"])}
    with disk(f"writing rows {start}.. of the cache at {path!r}", path):
        for key, v in values.items():
            j = index[key]
            raw = v.reshape(-1).view(torch.uint8).numpy() if v.numel() else b""
            write_rows(file(path, j), start * row_bytes(record["spec"][key]), raw)


def check_files(path: str, record: dict, *, exact: bool) -> None:
    """Every file exists and holds the recorded rows (exactly, for a complete cache)."""
    n = record["rows_done"]
    for j, (key, s) in enumerate(record["spec"].items()):
        target, want = file(path, j), n * row_bytes(s)
        try:
            size = os.path.getsize(target)
        except FileNotFoundError as e:
            raise CacheError(
                f"{FN}: the file {target!r} of entry {key!r} is missing from the cache at {path!r} "
                f"(the record says {n} rows, {want} bytes); {_FIX}."
            ) from e
        except OSError as e:
            raise CacheError(f"{FN}: cannot read the file {target!r} of the cache at {path!r} ({e}); {_FIX}.") from e
        if size < want or (exact and size != want):
            raise CacheError(
                f"{FN}: the file {target!r} of entry {key!r} holds {size} bytes but the record says "
                f"{n} rows = {want} bytes: it was truncated or replaced outside tdfunc; {_FIX}."
            )


def finish(path: str, record: dict) -> dict:
    """Drop preallocated rows past the end, then mark the record complete."""
    with disk(f"finishing the cache at {path!r}", path):
        for j, s in enumerate(record["spec"].values()):
            os.truncate(file(path, j), record["rows_done"] * row_bytes(s))
    record = {**record, "complete": True}
    write_progress(path, record)
    return record


def load(path: str, record: dict) -> TensorDict:
    n = record["rows_done"]
    out = TensorDict({}, batch_size=[n])
    with disk(f"loading the cache at {path!r}", path):
        for j, s in enumerate(record["spec"].values()):
            dtype = getattr(torch, s["dtype"])
            out.set(tuple(s["key"]), MemoryMappedTensor.from_filename(file(path, j), dtype, (n, *s["shape"])))
    return out


# ---------------------------------------------------------------------------------------------- sharded rows

#: a sharded cache's row mask: one byte per dataset row, 1 once the row is written and fsynced
MASK = "rows.mask"


def _runs(indices: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs ``(position in indices, first row, length)`` of consecutive row indices, in the given order."""
    out: list[tuple[int, int, int]] = []
    for k, r in enumerate(indices):
        if out and out[-1][1] + out[-1][2] == r:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((k, r, 1))
    return out


def write_at(path: str, record: dict, values: dict[str, torch.Tensor], indices: list[int]) -> None:
    """Write a batch's rows at their dataset indices in every file, fsync, then mark them in the row mask.

    Idempotent: a row written twice (a padded shard, a rerun) holds the same bytes; a kill between the
    data and the mask leaves the rows unmarked, so they are written again on resume."""
    index = {k: j for j, k in enumerate(record["spec"])}
    runs = _runs(indices)
    with disk(f"writing rows {indices[:4]}.. of the cache at {path!r}", path):
        for key, v in values.items():
            rb = row_bytes(record["spec"][key])
            raw = v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b""
            fd = os.open(file(path, index[key]), os.O_RDWR)
            try:
                for k, r, n in runs:
                    os.pwrite(fd, raw[k * rb : (k + n) * rb], r * rb)
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(os.path.join(path, MASK), os.O_RDWR)
        try:
            for _, r, n in runs:
                os.pwrite(fd, b"\x01" * n, r)
            os.fsync(fd)
        finally:
            os.close(fd)


def read_mask(path: str, n: int) -> bytes:
    """The row mask of a sharded cache (``n`` bytes), a CacheError when it is missing or of another size."""
    target = os.path.join(path, MASK)
    try:
        with open(target, "rb") as f:
            mask = f.read()
    except FileNotFoundError as e:
        raise CacheError(f"{FN}: the row mask {target!r} is missing from the sharded cache at {path!r}; {_FIX}.") from e
    except OSError as e:
        raise CacheError(f"{FN}: cannot read the row mask {target!r} ({e}); {_FIX}.") from e
    if len(mask) != n:
        raise CacheError(
            f"{FN}: the row mask {target!r} holds {len(mask)} bytes but the record says {n} rows: it "
            f"was truncated or replaced outside tdfunc; {_FIX}."
        )
    return mask
