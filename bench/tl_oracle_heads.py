"""TransformerLens 3.9 as an oracle for tdfunc's per-head views and head patching, on the same GPT-2 weights.

TransformerLens is not installed in the project's ``.venv`` (its pins do not fit there); it lives in its own
environment, built once::

    python3.11 -m venv bench/.venv-tl
    bench/.venv-tl/bin/pip install torch==2.13.0 "transformer_lens==3.9.*" transformers==5.23.0 tensordict einops tqdm
    PYTHONPATH=. bench/.venv-tl/bin/python -m bench.tl_oracle_heads

Model: ``bench.bench_cache.gpt2`` (transformers GPT-2 from a config: 4 layers, d 128, 4 heads, eager attention,
float32), converted to a ``HookedTransformer`` with ``convert_gpt2_weights`` (no LayerNorm folding, so every
activation is comparable). Compared, every layer:

- ``hook_z`` (B, T, H, Dh)   = ``unit_view`` of ``transformer.h.l.attn.c_proj:input`` with ``"b t (h d) -> b t h d"``;
- ``hook_q`` / ``hook_k`` / ``hook_v`` = ``unit_view`` of ``transformer.h.l.attn.c_attn`` with
  ``"b t (s h d) -> s b t h d"`` (s = 3, unit ``h``), slices 0 / 1 / 2;
- ``hook_pattern`` (B, H, T, T) = ``transformer.h.l.attn:output.1`` (GPT-2's eager attention returns its weights);
- the head-patching matrix: TL's loop (``run_with_hooks`` on ``hook_z`` overwriting head h with the clean run's)
  = ``patching_sweep(..., "transformer.h.*.attn.c_proj:input", metric, over="heads")``; and both timed.

Prints the largest absolute difference of each and the timing; exits non-zero when a difference exceeds 1e-4.
"""

from __future__ import annotations

import sys
import time

import torch


def main() -> int:
    import transformer_lens as tl
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    import tdfunc
    from bench.bench_cache import gpt2

    torch.set_num_threads(1)
    cfg = {"n_layer": 4, "n_embd": 128, "n_head": 4, "vocab": 512, "seq_len": 12}
    hf = gpt2(cfg)
    c = hf.config
    tcfg = tl.HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        d_head=c.n_embd // c.n_head,
        n_heads=c.n_head,
        d_mlp=4 * c.n_embd,
        n_ctx=c.n_positions,
        d_vocab=c.vocab_size,
        act_fn=c.activation_function,
        normalization_type="LN",
        eps=c.layer_norm_epsilon,
        default_prepend_bos=False,
    )
    model = tl.HookedTransformer(tcfg)
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf, tcfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.eval()
    g = torch.Generator().manual_seed(1)
    clean, corrupt = (torch.randint(0, cfg["vocab"], (2, cfg["seq_len"]), generator=g) for _ in range(2))
    h = cfg["n_head"]
    heads = tdfunc.latent.units("b t (h d) -> b t h d", h=h)
    qkv = tdfunc.latent.units("b t (s h d) -> s b t h d", unit="h", s=3, h=h)
    worst: dict[str, float] = {}

    def diff(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        assert a.shape == b.shape, (name, a.shape, b.shape)
        worst[name] = max(worst.get(name, 0.0), float((a - b).abs().max()))

    with torch.no_grad():
        logits_tl, cache = model.run_with_cache(clean)
        sites = [f"transformer.h.{i}.attn.{s}" for i in range(c.n_layer) for s in ("c_proj:input", "c_attn")]
        sites += [f"transformer.h.{i}.attn:output.1" for i in range(c.n_layer)]
        out, caps = tdfunc.functional_call(hf, None, (clean,), capture=sites)
        diff("logits", out.logits, logits_tl)
        for i in range(c.n_layer):
            diff(
                "hook_z",
                tdfunc.latent.unit_view(caps[f"transformer.h.{i}.attn.c_proj:input"], heads),
                cache[f"blocks.{i}.attn.hook_z"],
            )
            q, k, v = tdfunc.latent.unit_view(caps[f"transformer.h.{i}.attn.c_attn"], qkv)
            for name, ours in (("hook_q", q), ("hook_k", k), ("hook_v", v)):
                diff(name, ours, cache[f"blocks.{i}.attn.{name}"])
            diff("hook_pattern", caps[f"transformer.h.{i}.attn:output.1"], cache[f"blocks.{i}.attn.hook_pattern"])

        def metric_tl(logits: torch.Tensor) -> torch.Tensor:
            return (logits[:, -1, 11] - logits[:, -1, 22]).mean()

        def tl_loop() -> torch.Tensor:
            _, cc = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_z"))
            res = torch.empty(c.n_layer, h)
            for layer in range(c.n_layer):
                name = f"blocks.{layer}.attn.hook_z"
                for head in range(h):

                    def hook(z, hook, head=head, name=name):
                        z[:, :, head] = cc[name][:, :, head]
                        return z

                    res[layer, head] = metric_tl(model.run_with_hooks(corrupt, fwd_hooks=[(name, hook)]))
            return res

        def ours() -> torch.Tensor:
            return tdfunc.latent.patching_sweep(
                hf,
                None,
                (clean,),
                (corrupt,),
                "transformer.h.*.attn.c_proj:input",
                lambda o: metric_tl(o.logits),
                over="heads",
            )

        diff("head patching matrix", ours(), tl_loop())
        times = {}
        for name, f in (("TransformerLens loop", tl_loop), ("tdfunc patching_sweep over='heads'", ours)) * 3:
            t0 = time.perf_counter()
            f()
            times.setdefault(name, []).append(time.perf_counter() - t0)
    for name, d in worst.items():
        print(f"{name:>22}: max |tdfunc - TransformerLens| = {d:.2e}")
    med = {k: sorted(v)[1] for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>36}: median {v * 1e3:.1f} ms (3 interleaved runs, 1 thread)")
    ratio = med["TransformerLens loop"] / med["tdfunc patching_sweep over='heads'"]
    print(f"head sweep, {c.n_layer} layers x {h} heads: TransformerLens loop / tdfunc = {ratio:.2f}x")
    return 0 if max(worst.values()) < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
