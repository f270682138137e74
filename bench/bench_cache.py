"""Caching every block output of a GPT-2 (transformers, from a config): tdfunc vs tdhook, TransformerLens, nnsight.

Model: ``transformers.GPT2LMHeadModel`` built from ``GPT2Config`` (6 layers, d 256, 4 heads, vocab
4096, ``attn_implementation="eager"``, eval, seed 0), random token ids of length 64, batch 1 and 8,
everything under ``torch.no_grad()``. The same weights go into every library: TransformerLens gets a
``HookedTransformerConfig`` equivalent and the HF weights through its own
``convert_gpt2_weights`` (its logits are asserted equal to HF's, atol 1e-4); nnsight and tdhook
wrap (a copy of) the HF model itself.

Every variant returns the logits and the 6 block outputs (the residual stream after each block).
Before any timing they are asserted equal to HF's own ``output_hidden_states`` (entries 1..6; HF's
last entry is taken after the final LayerNorm, so the last block output is compared through
``ln_f``), atol/rtol 1e-4.

Variants (reference: ``plain HF forward``, the floor; goal: capture within 1.1x of it):

- ``plain HF forward``: ``model(x)``, nothing captured.
- ``HF output_hidden_states``: ``model(x, output_hidden_states=True)`` (transformers' own way).
- ``torch.func.functional_call``: ``torch.func.functional_call(model, params, (x,))``, no capture:
  what substituting a state (76 tensors) costs by itself.
- ``tdfunc``: ``tdfunc.functional_call(model, state, (x,), capture=["transformer.h.*"])`` with
  ``state = tdfunc.state(model)``; ``tdfunc, state=None``: the same on the module's own parameters.
- ``tdhook ActivationCaching``: tdhook 0.3.0, ``ActivationCaching(r"m\\.transformer\\.h\\.\\d+$")
  .prepare(wrapper)`` entered per call (the wrapper returns ``.logits``: tdhook needs a tensor out).
- ``TransformerLens run_with_cache``: TL 3.9 ``HookedTransformer.run_with_cache(x,
  names_filter=<hook_resid_post>)``; ``TransformerLens plain forward`` is TL's own model without a
  cache, to separate TL's model speed from its caching cost.
- ``nnsight trace``: nnsight 0.8.1, ``with NNsight(model).trace(x):`` saving
  ``transformer.h[i].output`` for every block and the logits.

Peers are imported lazily; a missing one is skipped with a printed note
(``pip install -r requirements-bench.txt``). Each library gets its own copy of the model (same
weights), so persistent tdfunc sites or nnsight's wrapping never touch the floor's copy.

Run: ``python -m bench.run --only cache --threads 1``. ``--quick`` uses a 2-layer d 64 model, T 16.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from collections.abc import Callable
from typing import Any

import torch

from bench.harness import Bench

NAME = "cache"
FULL = {"n_layer": 6, "n_embd": 256, "n_head": 4, "vocab": 4096, "seq_len": 64, "batches": (1, 8)}
QUICK = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab": 256, "seq_len": 16, "batches": (2,)}
INSTALL_HINT = "pip install -r requirements-bench.txt"
SITE = "transformer.h.*"
ORDER = (
    "plain HF forward",
    "torch.func.functional_call",
    "HF output_hidden_states",
    "tdfunc",
    "tdfunc, state=None",
    "tdhook ActivationCaching",
    "TransformerLens plain forward",
    "TransformerLens run_with_cache",
    "nnsight trace",
)


# --------------------------------------------------------------------------- shared with bench_patching


def peer(module: str, bench: str, what: str) -> Any | None:
    """Import a peer library, or print a note and return None when it is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except ImportError as e:
        print(f"[{bench}] note: {module} is not installed ({e}); skipping {what} ({INSTALL_HINT})", flush=True)
        return None


def gpt2(cfg: dict, seed: int = 0, device: str = "cpu"):
    """A deterministic transformers GPT-2 from a config: eager attention, eval mode, float32."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=cfg["n_layer"],
        n_embd=cfg["n_embd"],
        n_head=cfg["n_head"],
        vocab_size=cfg["vocab"],
        n_positions=max(128, cfg["seq_len"]),
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config).eval().to(device)


def gpt2_tokens(cfg: dict, batch: int, seed: int = 1, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg["vocab"], (batch, cfg["seq_len"]), generator=g).to(device)


def transformer_lens_copy(hf, bench: str):
    """TransformerLens 3.x ``HookedTransformer`` with ``hf``'s weights (no LayerNorm folding), or None."""
    tl = peer("transformer_lens", bench, "the TransformerLens variants")
    if tl is None:
        return None
    if not hasattr(tl, "HookedTransformer"):
        print(
            f"[{bench}] note: transformer_lens {getattr(tl, '__version__', '?')} has no HookedTransformer "
            f"(removed in 4.x); skipping the TransformerLens variants ({INSTALL_HINT} pins 3.9)",
            flush=True,
        )
        return None
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

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
        device=str(next(hf.parameters()).device),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tl.HookedTransformer(tcfg)
        model.load_and_process_state_dict(
            convert_gpt2_weights(hf, tcfg),
            fold_ln=False,
            center_writing_weights=False,
            center_unembed=False,
            fold_value_biases=False,
            refactor_factored_attn_matrices=False,
        )
    return model.eval()


def nnsight_wrap(hf, bench: str):
    """``nnsight.NNsight`` around a copy of ``hf``, or None."""
    nnsight = peer("nnsight", bench, "the nnsight variants")
    return None if nnsight is None else nnsight.NNsight(copy.deepcopy(hf))


class Logits(torch.nn.Module):
    """``model(ids).logits``: tdhook wraps a module whose output is a tensor."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.m(ids).logits


# --------------------------------------------------------------------------- this benchmark


def make_variants(hf, x: torch.Tensor) -> tuple[dict[str, Callable], dict[str, Callable], dict[str, str]]:
    """(plain variants returning logits, capture variants returning (logits, [block outputs]), notes)."""
    import tdfunc

    n = hf.config.n_layer
    hf_td = copy.deepcopy(hf)
    state = tdfunc.state(hf_td)
    names = [f"transformer.h.{i}" for i in range(n)]

    def tdfunc_capture():
        out, caps = tdfunc.functional_call(hf_td, state, (x,), capture=[SITE])
        return out.logits, [caps[k] for k in names]

    def hf_hidden():
        out = hf(x, output_hidden_states=True)
        return out.logits, list(out.hidden_states[1:])

    def tdfunc_own_params():
        out, caps = tdfunc.functional_call(hf_td, None, (x,), capture=[SITE])
        return out.logits, [caps[k] for k in names]

    params = {k: v.detach() for k, v in hf.named_parameters()} | dict(hf.named_buffers())
    plain = {
        "plain HF forward": lambda: hf(x).logits,
        "torch.func.functional_call": lambda: torch.func.functional_call(hf, params, (x,)).logits,
    }
    capture = {"HF output_hidden_states": hf_hidden, "tdfunc": tdfunc_capture, "tdfunc, state=None": tdfunc_own_params}
    notes = {
        "plain HF forward": "reference (floor): `model(x)`, nothing captured",
        "HF output_hidden_states": "`model(x, output_hidden_states=True)` (its last entry is after `ln_f`)",
        "torch.func.functional_call": "`torch.func.functional_call(model, params, (x,))`, no capture: the cost of substituting a state",
        "tdfunc": f"`tdfunc.functional_call(model, state, (x,), capture=['{SITE}'])`, state = `tdfunc.state(model)` built once",
        "tdfunc, state=None": f"`tdfunc.functional_call(model, None, (x,), capture=['{SITE}'])`: the module's own parameters, no substitution",
    }

    if peer("tdhook", NAME, "the tdhook variant") is not None:
        from tdhook.latent import ActivationCaching
        from tensordict import TensorDict

        wrapped = Logits(copy.deepcopy(hf))
        caching = ActivationCaching(r"m\.transformer\.h\.\d+$")
        keys = [f"m.{k}" for k in names]

        def tdhook_capture():
            with caching.prepare(wrapped) as hooked:
                td = hooked(TensorDict(input=x, batch_size=[x.shape[0]]))
            return td["output"], [td["cache", k] for k in keys]

        capture["tdhook ActivationCaching"] = tdhook_capture
        notes["tdhook ActivationCaching"] = (
            "tdhook 0.3.0: `with ActivationCaching(r'm\\.transformer\\.h\\.\\d+$').prepare(Logits(model)) as h: "
            "h(TensorDict(input=x))`"
        )

    tl = transformer_lens_copy(hf, NAME)
    if tl is not None:
        resid = [f"blocks.{i}.hook_resid_post" for i in range(n)]
        wanted = set(resid)

        def tl_cache():
            logits, cache = tl.run_with_cache(x, names_filter=lambda name: name in wanted)
            return logits, [cache[k] for k in resid]

        plain["TransformerLens plain forward"] = lambda: tl(x)
        capture["TransformerLens run_with_cache"] = tl_cache
        notes["TransformerLens plain forward"] = (
            "TL 3.9 `HookedTransformer(cfg)` with the HF weights (`convert_gpt2_weights`), `tl(x)`: TL's own floor"
        )
        notes["TransformerLens run_with_cache"] = "`tl.run_with_cache(x, names_filter=<blocks.i.hook_resid_post>)`"

    nm = nnsight_wrap(hf, NAME)
    if nm is not None:

        def nnsight_capture():
            saved = []
            with nm.trace(x):
                for i in range(n):
                    saved.append(nm.transformer.h[i].output.save())
                logits = nm.output.logits.save()
            return logits, saved

        capture["nnsight trace"] = nnsight_capture
        notes["nnsight trace"] = (
            "nnsight 0.8.1: `with NNsight(model).trace(x):` `.save()` of `transformer.h[i].output` for every i and of the logits"
        )

    return plain, capture, notes


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    cfg = QUICK if quick else FULL
    b = Bench(
        NAME,
        device=device,
        quick=quick,
        rounds=60,
        warmup=5,
        quick_rounds=3,
        quick_warmup=1,
        max_seconds_per_case=50.0,
        quick_max_seconds_per_case=4.0,
    )
    hf = gpt2(cfg, device=device)
    with torch.no_grad():
        for batch in cfg["batches"]:
            x = gpt2_tokens(cfg, batch, device=device)
            plain, capture, notes = make_variants(hf, x)
            # correctness first: the logits everywhere, and every variant's block outputs = HF's hidden states
            ref = hf(x, output_hidden_states=True)
            b.check_equal({"HF": ref.logits, **{k: f() for k, f in plain.items()}}, atol=1e-4, rtol=1e-4)
            ln_f = hf.transformer.ln_f

            def as_hidden(result, hf_own=False):
                logits, blocks = result
                return logits, blocks if hf_own else [*blocks[:-1], ln_f(blocks[-1])]

            b.check_equal(
                {
                    "HF hidden_states": (ref.logits, list(ref.hidden_states[1:])),
                    **{k: as_hidden(f(), hf_own=k == "HF output_hidden_states") for k, f in capture.items()},
                },
                atol=1e-4,
                rtol=1e-4,
            )
            variants = {**plain, **capture}
            order = [k for k in ORDER if k in variants]
            b.time(
                f"GPT-2 {cfg['n_layer']} layers d {cfg['n_embd']}, B={batch} T={cfg['seq_len']}, cache every block output (no_grad)",
                {k: variants[k] for k in order},
                reference="plain HF forward",
                also_vs=["torch.func.functional_call"],
                params={**{k: v for k, v in cfg.items() if k != "batches"}, "batch": batch},
                notes=notes if batch == cfg["batches"][0] else None,
            )
    return b.rows


if __name__ == "__main__":
    from bench.run import main

    raise SystemExit(main(["--only", NAME]))
