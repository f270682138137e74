"""Activation-patching sweep, every block output x every position: tdfunc's one call vs loops of single patches.

Model: the GPT-2 of ``bench_cache`` (``transformers.GPT2LMHeadModel`` from ``GPT2Config``: 6 layers,
d 256, 4 heads, vocab 4096, eager attention, eval, seed 0). Clean and corrupted prompts are random
token ids of the same shape (batch 4, T 32). Metric: the logit difference of tokens 11 and 22 at
the last position, averaged over the batch. A patch puts the clean run's block output at one
(layer, position) into the corrupted run; the sweep gives the (6 x 32) matrix of metrics, 192
patches. Every variant computes the whole matrix from the two prompts (the clean run included),
under ``torch.no_grad()``; all matrices are asserted equal (atol/rtol 1e-4) before any timing.

Variants (reference: ``tdfunc patching_sweep``):

- ``tdfunc patching_sweep``: ``tdfunc.latent.patching_sweep(model, state, (clean,), (corrupt,),
  "transformer.h.*", metric)``: one call, ``vmap`` over one-hot position masks; ``chunk_size=8``:
  at most 8 patches per vmapped forward.
- ``tdfunc loop of tdfunc.latent.patch``: our own loop baseline, one ``tdfunc.latent.patch(..., positions=p)``
  per (layer, position).
- ``tdhook loop``: tdhook 0.3.0, per patch ``with HookSession(model) as s: s.replace(Target(
  "transformer.h.l", "activation", 1, (p,)), clean_l[:, [p]])`` (clean values captured once with
  ``HookSession.capture``).
- ``TransformerLens loop``: TL 3.9 ``HookedTransformer`` with the HF weights; clean
  ``run_with_cache``, then per patch ``run_with_hooks(corrupt, fwd_hooks=[("blocks.l.hook_resid_post",
  hook)])`` (the TL tutorial's loop).
- ``nnsight loop``: nnsight 0.8.1, one ``with NNsight(model).trace(corrupt):`` per patch, setting
  ``transformer.h[l].output[:, p]`` (the nnsight tutorial's loop).
- ``nnsight one trace, 192 invokes``: nnsight's batching: one ``LanguageModel(model).trace()``
  with one ``tracer.invoke(corrupt)`` per patch, run as one batched forward (a ``LanguageModel``
  needs a tokenizer to batch, so a word-level one is built offline; it is never used on text).

Peers are imported lazily; a missing one is skipped with a printed note
(``pip install -r requirements-bench.txt``). Each library gets its own copy of the model.

Second case, sweeps that skip work (``reuse_prefix``): a compute-bound GPT-2 (6 layers, d 512, 8 heads,
the real vocab 50257, eager attention; batch 4, T 24), block outputs x positions (144 patches), the same
metric. Variants, all the same (6 x 24) matrix, asserted equal (atol 1e-4 relative to its scale):

- ``tdfunc patching_sweep(reuse_prefix=True, logits_to_keep=1)`` (reference): the corrupted run once
  with the KV cache, then per site and chunk of positions only the suffix, the LM head at the last position.
- ``tdfunc patching_sweep(reuse_prefix=True)``: the same, full logits (the head at every suffix position).
- ``tdfunc patching_sweep (one call)``: the plain one-call sweep, every patch a full forward.
- ``PyTorch forward-hook loop``: one ``register_forward_hook`` patch and full forward per cell, as users write it.

Run: ``python -m bench.run --only patching --threads 1``. ``--quick``: 2 layers, d 64, T 8, batch 2
(the skip case: 2 layers, d 64, vocab 512, T 8).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch

from bench.bench_cache import gpt2, nnsight_wrap, peer, transformer_lens_copy
from bench.harness import Bench

NAME = "patching"
FULL = {"n_layer": 6, "n_embd": 256, "n_head": 4, "vocab": 4096, "seq_len": 32, "batch": 4, "chunk_size": 8}
QUICK = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab": 256, "seq_len": 8, "batch": 2, "chunk_size": 4}
SKIP = {"n_layer": 6, "n_embd": 512, "n_head": 8, "vocab": 50257, "seq_len": 24, "batch": 4}
SKIP_QUICK = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab": 512, "seq_len": 8, "batch": 2}
TOKEN_A, TOKEN_B = 11, 22  # metric: logit[A] - logit[B] at the last position, mean over the batch


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, TOKEN_A] - logits[:, -1, TOKEN_B]).mean()


def prompts(cfg: dict, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (cfg["batch"], cfg["seq_len"])
    clean = torch.randint(0, cfg["vocab"], shape, generator=g)
    corrupt = torch.randint(0, cfg["vocab"], shape, generator=g)
    return clean.to(device), corrupt.to(device)


def _offline_tokenizer(vocab: int):
    """A word-level tokenizer over ``t0 .. t{vocab-1}``: nnsight's LanguageModel batches invokes only with one."""
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tk = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", eos_token="t0", pad_token="t0")


def make_variants(
    hf, clean: torch.Tensor, corrupt: torch.Tensor, chunk_size: int
) -> tuple[dict[str, Callable], dict[str, str]]:
    import tdfunc
    from tdfunc.latent._patch import patch, patching_sweep

    n_layer, seq = hf.config.n_layer, clean.shape[1]
    n_patch = n_layer * seq
    sites = [f"transformer.h.{i}" for i in range(n_layer)]
    hf_td = copy.deepcopy(hf)
    state = tdfunc.state(hf_td)
    metric = lambda out: logit_diff(out.logits)  # noqa: E731

    def sweep(chunk=None):
        return lambda: patching_sweep(hf_td, state, (clean,), (corrupt,), "transformer.h.*", metric, chunk_size=chunk)

    def tdfunc_loop():
        _, caps = tdfunc.functional_call(hf_td, state, (clean,), capture=sites)
        res = torch.empty(n_layer, seq, device=clean.device)
        for layer, site in enumerate(sites):
            for p in range(seq):
                res[layer, p] = metric(patch(hf_td, state, (corrupt,), caps, site, positions=p))
        return res

    variants = {
        "tdfunc patching_sweep": sweep(),
        f"tdfunc patching_sweep chunk_size={chunk_size}": sweep(chunk_size),
        "tdfunc loop of tdfunc.latent.patch": tdfunc_loop,
    }
    notes = {
        "tdfunc patching_sweep": "reference: `tdfunc.latent.patching_sweep(model, state, (clean,), (corrupt,), 'transformer.h.*', metric)`, one call",
        f"tdfunc patching_sweep chunk_size={chunk_size}": f"the same with `chunk_size={chunk_size}` (at most {chunk_size} patches per vmapped forward)",
        "tdfunc loop of tdfunc.latent.patch": f"clean captures, then {n_patch} x `tdfunc.latent.patch(model, state, (corrupt,), caps, 'transformer.h.l', positions=p)`",
    }

    if peer("tdhook", NAME, "the tdhook loop") is not None:
        from tdhook.session import HookSession
        from tdhook.targets import Target

        hf_th = copy.deepcopy(hf)
        every_position = tuple(range(seq))

        def tdhook_loop():
            with HookSession(hf_th) as s:
                captured = [s.capture(Target(site, "activation", 1, every_position)) for site in sites]
                hf_th(clean)
            values = [c.values[-1] for c in captured]
            res = torch.empty(n_layer, seq, device=clean.device)
            for layer, site in enumerate(sites):
                for p in range(seq):
                    with HookSession(hf_th) as s:
                        s.replace(Target(site, "activation", 1, (p,)), values[layer][:, [p]])
                        res[layer, p] = logit_diff(hf_th(corrupt).logits)
            return res

        variants["tdhook loop"] = tdhook_loop
        notes["tdhook loop"] = (
            f"tdhook 0.3.0: clean `HookSession.capture`, then {n_patch} x `with HookSession(model) as s: "
            "s.replace(Target('transformer.h.l', 'activation', 1, (p,)), clean_l[:, [p]])`"
        )

    tl = transformer_lens_copy(hf, NAME)
    if tl is not None:
        resid = [f"blocks.{i}.hook_resid_post" for i in range(n_layer)]
        wanted = set(resid)

        def tl_loop():
            _, cache = tl.run_with_cache(clean, names_filter=lambda name: name in wanted)
            res = torch.empty(n_layer, seq, device=clean.device)
            for layer, name in enumerate(resid):
                value = cache[name]
                for p in range(seq):

                    def hook(act, hook, p=p, value=value):
                        act[:, p] = value[:, p]
                        return act

                    res[layer, p] = logit_diff(tl.run_with_hooks(corrupt, fwd_hooks=[(name, hook)]))
            return res

        variants["TransformerLens loop"] = tl_loop
        notes["TransformerLens loop"] = (
            f"TL 3.9: clean `run_with_cache`, then {n_patch} x `tl.run_with_hooks(corrupt, "
            "fwd_hooks=[('blocks.l.hook_resid_post', hook)])`, hook sets `act[:, p]`"
        )

    nm = nnsight_wrap(hf, NAME)
    if nm is not None:

        def nnsight_clean(model):
            saved = []
            with model.trace(clean):
                for i in range(n_layer):
                    saved.append(model.transformer.h[i].output.save())
            return saved

        def nnsight_loop():
            hs = nnsight_clean(nm)
            res = []
            for layer in range(n_layer):
                for p in range(seq):
                    with nm.trace(corrupt):
                        nm.transformer.h[layer].output[:, p] = hs[layer][:, p]
                        res.append(logit_diff(nm.output.logits).save())
            return torch.stack(res).view(n_layer, seq)

        variants["nnsight loop"] = nnsight_loop
        notes["nnsight loop"] = (
            f"nnsight 0.8.1: {n_patch} x `with NNsight(model).trace(corrupt): model.transformer.h[l].output[:, p] = clean_l[:, p]`"
        )

        lm = None
        try:
            import nnsight

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lm = nnsight.LanguageModel(copy.deepcopy(hf), tokenizer=_offline_tokenizer(hf.config.vocab_size))
        except Exception as e:  # noqa: BLE001 - a peer's setup failing only drops its variant
            print(
                f"[{NAME}] note: nnsight LanguageModel could not be built ({e!r}); skipping the batched-invokes variant",
                flush=True,
            )
        if lm is not None:

            def nnsight_invokes():
                hs = nnsight_clean(lm)
                res = []
                with lm.trace() as tracer:
                    for layer in range(n_layer):
                        for p in range(seq):
                            with tracer.invoke(corrupt):
                                lm.transformer.h[layer].output[:, p] = hs[layer][:, p]
                                res.append(logit_diff(lm.output.logits).save())
                return torch.stack(res).view(n_layer, seq)

            name = f"nnsight one trace, {n_patch} invokes"
            variants[name] = nnsight_invokes
            notes[name] = (
                f"nnsight 0.8.1 batching: `with LanguageModel(model, tokenizer).trace() as t:` and {n_patch} x "
                "`with t.invoke(corrupt):` (patch as in the loop): one forward of the stacked batch"
            )
    return variants, notes


def hook_loop(hf, clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: the clean block outputs by forward hooks, then one hooked full forward per (layer, position)."""
    blocks = hf.transformer.h
    caps: dict[int, torch.Tensor] = {}
    first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731  # a block returns a tensor or a tuple
    handles = [
        b.register_forward_hook(lambda m, a, o, i=i: caps.__setitem__(i, first(o))) for i, b in enumerate(blocks)
    ]
    hf(clean)
    for h in handles:
        h.remove()
    res = torch.empty(len(blocks), clean.shape[1], device=clean.device)
    for layer, block in enumerate(blocks):
        for p in range(clean.shape[1]):

            def patch_p(m, a, o, layer=layer, p=p):
                h = first(o).clone()
                h[:, p] = caps[layer][:, p]
                return (h, *o[1:]) if isinstance(o, tuple) else h

            handle = block.register_forward_hook(patch_p)
            res[layer, p] = logit_diff(hf(corrupt).logits)
            handle.remove()
    return res


def make_skip_variants(hf, clean: torch.Tensor, corrupt: torch.Tensor) -> tuple[dict[str, Callable], dict[str, str]]:
    import tdfunc

    state = tdfunc.state(hf)
    metric = lambda out: logit_diff(out.logits)  # noqa: E731
    sweep = tdfunc.latent.patching_sweep
    args = (hf, state, (clean,), (corrupt,), "transformer.h.*", metric)
    n = hf.config.n_layer * clean.shape[1]
    variants = {
        "tdfunc reuse_prefix + logits_to_keep=1": lambda: sweep(*args, reuse_prefix=True, kwargs={"logits_to_keep": 1}),
        "tdfunc reuse_prefix": lambda: sweep(*args, reuse_prefix=True),
        "tdfunc patching_sweep (one call)": lambda: sweep(*args),
        "PyTorch forward-hook loop": lambda: hook_loop(hf, clean, corrupt),
    }
    notes = {
        "tdfunc reuse_prefix + logits_to_keep=1": "reference: `patching_sweep(..., reuse_prefix=True, "
        "kwargs={'logits_to_keep': 1})`: suffixes on the corrupted KV cache, LM head at the last position",
        "tdfunc reuse_prefix": "`patching_sweep(..., reuse_prefix=True)`: suffixes, full logits",
        "tdfunc patching_sweep (one call)": "`patching_sweep(...)`: one vmap per site, a full forward per patch",
        "PyTorch forward-hook loop": f"clean outputs by hooks, then {n} x (`register_forward_hook` patch, "
        "full forward)",
    }
    return variants, notes


def run_skip(b: Bench, device: str, quick: bool) -> None:
    cfg = SKIP_QUICK if quick else SKIP
    hf = gpt2(cfg, device=device)
    clean, corrupt = prompts(cfg, device)
    with torch.no_grad():
        variants, notes = make_skip_variants(hf, clean, corrupt)
        results = {k: f() for k, f in variants.items()}
        scale = float(results["PyTorch forward-hook loop"].abs().max())
        b.check_equal(results, atol=1e-4 * scale, rtol=1e-4)
        print(f"[{NAME}] skip case: all {len(results)} variants agree (scale {scale:.3g})", flush=True)
        b.time(
            f"GPT-2 {cfg['n_layer']} layers d {cfg['n_embd']} vocab {cfg['vocab']}, B={cfg['batch']} "
            f"T={cfg['seq_len']}: {cfg['n_layer'] * cfg['seq_len']} patches, sweeps that skip work (no_grad)",
            variants,
            reference="tdfunc reuse_prefix + logits_to_keep=1",
            also_vs=["PyTorch forward-hook loop", "tdfunc patching_sweep (one call)"],
            params=cfg,
            notes=notes,
            number=1,
        )


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    cfg = QUICK if quick else FULL
    b = Bench(
        NAME,
        device=device,
        quick=quick,
        rounds=3,
        warmup=0,
        quick_rounds=2,
        quick_warmup=0,
        max_seconds_per_case=150.0,
        quick_max_seconds_per_case=4.0,
    )  # the correctness call warms every variant
    hf = gpt2(cfg, device=device)
    clean, corrupt = prompts(cfg, device)
    with torch.no_grad():
        variants, notes = make_variants(hf, clean, corrupt, cfg["chunk_size"])
        results = {k: f() for k, f in variants.items()}
        b.check_equal(results, atol=1e-4, rtol=1e-4)
        span = results["tdfunc patching_sweep"]
        print(
            f"[{NAME}] {tuple(span.shape)} matrix, metric from {float(span.min()):.3f} to {float(span.max()):.3f}; "
            f"all {len(results)} variants agree",
            flush=True,
        )
        loops = [k for k in variants if "loop" in k or "invokes" in k]
        b.time(
            f"GPT-2 {cfg['n_layer']} layers d {cfg['n_embd']}, B={cfg['batch']} T={cfg['seq_len']}: "
            f"{cfg['n_layer']} block outputs x {cfg['seq_len']} positions = {cfg['n_layer'] * cfg['seq_len']} patches (no_grad)",
            variants,
            reference="tdfunc patching_sweep",
            also_vs=loops,
            params=cfg,
            notes=notes,
            number=1,
        )
    run_skip(b, device, quick)
    return b.rows


if __name__ == "__main__":
    from bench.run import main

    raise SystemExit(main(["--only", NAME]))
