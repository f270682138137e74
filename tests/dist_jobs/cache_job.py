"""A data-parallel job for tests/test_distributed.py: ``torchrun --nproc-per-node 2 cache_job.py OUT [K]``.

Each rank caches its DistributedSampler shard of an 11-row dataset (2 ranks: the last shard is padded)
on disk under OUT/cache.  With K, rank 1 kills itself (SIGKILL) when it fetches its K-th batch (torchrun
then stops rank 0).  Without K the job resumes OUT/cache, caches in memory and into a fresh OUT/fresh,
and saves what it got and how many rows it ran to OUT/rank<r>.pt; also cache_attributions (saliency), gathered
and into OUT/attr.

(One launch with ``--max-restarts 1`` would do both, but gloo fails to reconnect after an elastic
restart here: ``Gloo connectFullMesh failed ... Connection refused``.)
"""

import os
import signal
import sys

import torch
import torch.distributed as dist
from tensordict import TensorDict
from torch.utils.data import DataLoader, DistributedSampler

import tdfunc


def build():
    """The model and the dataset, the same in every process (the test's reference too)."""
    g = torch.Generator().manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    for p in net.parameters():
        p.data = torch.randn(p.shape, generator=g)
    return net, TensorDict({"input": torch.randn(11, 5, 4, generator=g)}, batch_size=[11])


class Killing(DataLoader):
    """The loader, but the process dies when it fetches batch ``kill`` (the earlier ones are written and marked)."""

    def __init__(self, dataset, kill, **kwargs):
        super().__init__(dataset, **kwargs)
        self.kill = kill

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if i == self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch


def main(out, kill):
    torch.set_num_threads(1)
    NET, DATASET = build()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    kwargs = dict(batch_size=2, sampler=DistributedSampler(DATASET, shuffle=False), collate_fn=torch.stack)
    loader = DataLoader(DATASET, **kwargs)
    calls = []
    NET[2].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    path = os.path.join(out, "cache")
    if kill is not None:
        data = loader if rank != 1 else Killing(DATASET, kill, **kwargs)
        tdfunc.latent.cache_activations(NET, None, data, ["0", "2"], reduce="mean", progress=False, path=path)
        raise SystemExit("rank 1 was not killed")
    got = {
        "disk": tdfunc.latent.cache_activations(NET, None, loader, ["0", "2"], reduce="mean", progress=False, path=path)
    }
    got["rows_run"] = sum(calls)
    got["memory"] = tdfunc.latent.cache_activations(NET, None, loader, ["0", "2"], reduce="mean", progress=False)
    got["fresh"] = tdfunc.latent.cache_activations(
        NET, None, loader, ["0", "2"], reduce="mean", progress=False, path=os.path.join(out, "fresh")
    )
    f = lambda td: NET(td["input"])[:, -1, 0]  # noqa: E731
    got["attr_memory"] = tdfunc.latent.cache_attributions(tdfunc.saliency, f, loader, progress=False)
    got["attr_disk"] = tdfunc.latent.cache_attributions(
        tdfunc.saliency, f, loader, progress=False, path=os.path.join(out, "attr")
    )
    other = {"2": {"bias": NET[2].bias + rank}}  # rank 1 runs other weights: every rank must refuse, naming it
    try:
        tdfunc.latent.cache_activations(NET, other, loader, ["0", "2"], progress=False)
        errors = None
    except tdfunc.latent.CacheError as e:
        errors = str(e)
    torch.save(
        {
            k: v if k == "rows_run" else {key: torch.as_tensor(t).clone() for key, t in v.flatten_keys(".").items()}
            for k, v in got.items()
        }
        | {"error": errors},
        os.path.join(out, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
