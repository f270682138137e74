"""Data-parallel cache_activations for real: ``torchrun --nproc-per-node 2`` (gloo, CPU) equals one process,
a rank killed mid-way resumes (under torchrun, or in one process), and the sharded path's errors pinned
(in-process, a gloo group of one rank)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from tensordict import TensorDict
from torch.utils.data import DataLoader, DistributedSampler

import tdfunc
from tdfunc.latent import CacheError

HERE = os.path.dirname(__file__)
JOB = os.path.join(HERE, "dist_jobs", "cache_job.py")
FN = "tdfunc.latent.cache_activations"
_spec = importlib.util.spec_from_file_location("cache_job", JOB)
job = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(job)  # type: ignore[union-attr]
NET, DATASET = job.build()
SITES = ["0", "2"]
# the reference: one process, the whole dataset in order
REF = tdfunc.latent.cache_activations(
    NET, None, [DATASET[i : i + 2] for i in range(0, 11, 2)], SITES, reduce="mean", progress=False
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        JOB,
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def _same(got, ref=REF) -> None:
    assert sorted(got.keys()) == sorted(ref.keys())
    for k in ref.keys():
        torch.testing.assert_close(torch.as_tensor(got[k]), ref[k], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """A 2-rank job whose rank 1 is killed at its third batch, a copy of its cache, then the job again (resumes)."""
    out = str(tmp_path_factory.mktemp("dist"))
    killed = _torchrun(out, "2")
    assert killed.returncode != 0 and "SIGKILL" in killed.stdout + killed.stderr, killed.stderr[-3000:]
    shutil.copytree(os.path.join(out, "cache"), os.path.join(out, "killed"))
    resumed = _torchrun(out)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return out, [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]


def test_torchrun_two_ranks_equal_one_process(ran):
    _, ranks = ran
    for got in ranks:  # every rank returns all 11 rows once, in dataset order (the padded row written twice)
        _same(got["memory"])
        _same(got["fresh"])
        _same(got["disk"])


def test_torchrun_cache_attributions_equal_one_process(ran):
    _, ranks = ran
    f = lambda td: NET(td["input"])[:, -1, 0]  # noqa: E731
    ref = tdfunc.latent.cache_attributions(
        tdfunc.saliency, f, [DATASET[i : i + 2] for i in range(0, 11, 2)], progress=False
    ).flatten_keys(".")
    for got in ranks:
        _same(got["attr_memory"], ref)
        _same(got["attr_disk"], ref)


def test_torchrun_ranks_running_other_weights_all_refuse(ran):
    _, ranks = ran
    for got in ranks:  # the check runs on every rank after one collective: no rank is left waiting
        assert got["error"] == (
            "tdfunc.latent.cache_activations: rank 1 of the process group runs another job than rank 0: state "
            "differ; every rank must pass the same model state (load the same weights on every rank), sites, reduce "
            "and dataset."
        )


def test_killed_rank_resumes_under_torchrun(ran):
    out, ranks = ran
    mask = open(os.path.join(out, "killed", "rows.mask"), "rb").read()
    assert len(mask) == 11 and not mask[9] and all(mask[r] for r in (1, 3, 5, 7))  # rank 1: [1, 3] [5, 7] | [9, 0]
    assert ranks[1]["rows_run"] == 2  # only the batch it was killed at
    assert ranks[0]["rows_run"] <= 6
    _same(
        tdfunc.latent.cache_activations(
            NET,
            None,
            DataLoader(DATASET, batch_size=3, collate_fn=torch.stack),
            SITES,
            reduce="mean",
            progress=False,
            path=os.path.join(out, "cache"),
        )
    )


def test_killed_two_rank_cache_resumes_in_one_process(ran):
    out, _ = ran
    path = os.path.join(out, "killed1")
    shutil.copytree(os.path.join(out, "killed"), path)
    loader = DataLoader(DATASET, batch_size=4, collate_fn=torch.stack)  # another world size, another batching
    calls = []
    handle = NET[2].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        got = tdfunc.latent.cache_activations(NET, None, loader, SITES, reduce="mean", progress=False, path=path)
    finally:
        handle.remove()
    _same(got)
    assert sum(calls) < 11  # the batches whose rows were all written are skipped
    assert open(os.path.join(path, "rows.mask"), "rb").read() == b"\x01" * 11


# ------------------------------------------------------------------------- in process: a group of one rank


@pytest.fixture
def group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _raises(msg, *args, **kwargs):
    with pytest.raises(CacheError) as e:
        tdfunc.latent.cache_activations(NET, None, *args, reduce="mean", progress=False, **kwargs)
    assert str(e.value) == msg


def test_group_of_one_rank_equals_one_process(group, tmp_path):
    loader = DataLoader(
        DATASET, batch_size=2, sampler=DistributedSampler(DATASET, shuffle=True, seed=3), collate_fn=torch.stack
    )
    _same(tdfunc.latent.cache_activations(NET, None, loader, SITES, reduce="mean", progress=False, group=group))
    _same(
        tdfunc.latent.cache_activations(
            NET, None, loader, SITES, reduce="mean", progress=False, group=group, path=tmp_path / "c"
        )
    )
    # an initialised group of one rank, not passed: the ordinary single-process call
    _same(tdfunc.latent.cache_activations(NET, None, [DATASET[:6], DATASET[6:]], SITES, reduce="mean", progress=False))


def test_errors_sharded(group, tmp_path):
    _raises(
        f"{FN}: in a process group of 1 ranks (or resuming a cache written by one) batches must be a torch "
        "DataLoader over a map-style dataset with batch_size set, got list; the loader's sampler gives every "
        "row's dataset index, e.g. DataLoader(dataset, batch_size=8, sampler=DistributedSampler(dataset, "
        "shuffle=False), collate_fn=torch.stack).",
        [DATASET],
        SITES,
        group=group,
    )
    part = DataLoader(DATASET, batch_size=2, sampler=list(range(9)), collate_fn=torch.stack)
    _raises(
        f"{FN}: 2 of the dataset's 11 rows (first [9, 10]) are in no rank's shard; use a sampler that covers "
        "the dataset (DistributedSampler(dataset, drop_last=False) pads the last shard instead of dropping rows).",
        part,
        SITES,
        group=group,
    )
    _raises(
        f"{FN}: 2 of the dataset's 11 rows (first [9, 10]) are in no rank's shard; use a sampler that covers "
        "the dataset (DistributedSampler(dataset, drop_last=False) pads the last shard instead of dropping rows).",
        part,
        SITES,
        group=group,
        path=tmp_path / "part",
    )
    shuffled = DataLoader(DATASET, batch_size=2, shuffle=True, collate_fn=torch.stack)
    _raises(
        f"{FN}: the loader's sampler gave other indices on a second pass; a data-parallel cache needs a "
        "deterministic sampler (DistributedSampler(dataset, shuffle=False), or a fixed seed and epoch).",
        shuffled,
        SITES,
        group=group,
    )
    path = str(tmp_path / "single")
    tdfunc.latent.cache_activations(NET, None, [DATASET], SITES, reduce="mean", progress=False, path=path)
    loader = DataLoader(DATASET, batch_size=2, collate_fn=torch.stack)
    _raises(
        f"{FN}: the cache at {path!r} was written by a single process (batch by batch), this call runs "
        "data-parallel (a process group, or a DataLoader resuming a sharded cache); finish or load it in one "
        "process, or pass another path.",
        loader,
        SITES,
        group=group,
        path=path,
    )
    with pytest.raises(CacheError) as e:
        tdfunc.latent.cache_activations(NET, None, loader, SITES, progress=False, group="world")
    assert isinstance(e.value, TypeError) and str(e.value) == (
        f"{FN}: group must be a torch.distributed ProcessGroup, None (the default group when one is initialised) "
        "or False (this process alone), got str ('world')."
    )


def test_sharded_cache_refuses_another_dataset_length(group, tmp_path):
    loader = DataLoader(DATASET, batch_size=2, collate_fn=torch.stack)
    path = str(tmp_path / "c")
    tdfunc.latent.cache_activations(NET, None, loader, SITES, reduce="mean", progress=False, group=group, path=path)
    short = DataLoader(DATASET[:10], batch_size=2, collate_fn=torch.stack)
    _raises(
        f"{FN}: the cache at {path!r} holds 11 dataset rows but the loader's dataset has 10; pass the same "
        "dataset to resume or load it, or another path for a new cache.",
        short,
        SITES,
        path=path,
    )
    other = TensorDict({"input": DATASET["input"] + 1}, [11])
    got = tdfunc.latent.cache_activations(NET, None, loader, SITES, reduce="mean", progress=False, path=path)
    _same(got)  # a complete sharded cache loads without a group, without running the model
    del other
