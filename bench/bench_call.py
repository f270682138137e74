"""Overhead of the core call on a small transformer.

Model: ``bench._models.TinyGPT`` (pre-LN GPT, vocab 512, d 128, 4 layers, 4 heads,
T 32), eval mode, everything under ``torch.no_grad()`` (the strictest setting
for overhead: no autograd work to hide it). Batch 1 and 32.

Every variant computes the same logits; this is asserted (and, for the
capture variants, that the captured block outputs are equal) before any
timing. Reference: ``torch.func.functional_call`` (goal: tdfunc within 5%).

Three model copies with the same weights are used: the baselines and the
hook-based peers run on a copy tdfunc never touched; tdfunc's calls run on a
second copy, where each call installs the sites it uses and removes them when
it returns (``plain, after tdfunc calls`` runs ``model(x)`` there: nothing is
left); the ``pinned`` variants run on a third copy whose sites were pinned
once with ``tdfunc.install_sites`` (``plain, tdfunc sites pinned`` shows what
those inert hooks cost a plain forward).

Run: ``python -m bench.run --only call`` (or ``python -m bench.bench_call``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from tensordict import TensorDict

from bench._models import tiny_gpt, tokens
from bench.harness import Bench

NAME = "call"
BATCHES = (1, 32)
BLOCK_PATTERN_TDHOOK = r"blocks\.\d+$"  # tdhook matches module names with a regex
N_LAYERS = 4


def _block_names(model) -> list[str]:
    return [f"blocks.{i}" for i in range(len(model.blocks))]


def make_variants(model, model_td, model_pin, x: torch.Tensor) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """Return (variants, capture_variants, notes).

    ``variants`` map name -> zero-arg callable returning logits (capture
    variants are wrapped to return logits only); ``capture_variants`` map name
    -> zero-arg callable returning (logits, {"blocks.i": tensor}).
    """
    from tdhook.latent import ActivationCaching
    from tdhook.session import HookSession
    from tdhook.targets import Target

    import tdfunc

    d = model.cfg.d_model
    names = _block_names(model)
    blocks = [(n, model.get_submodule(n)) for n in names]

    params = {k: v.detach() for k, v in model.named_parameters()}
    params.update({k: v for k, v in model.named_buffers()})
    fcall = torch.func.functional_call

    state = tdfunc.state(model_td)
    tdfunc.install_sites(model_pin, ["blocks.*", "blocks.1.mlp"])  # pinned: stay between calls
    state_pin = tdfunc.state(model_pin)
    zeros = torch.zeros(x.shape[0], x.shape[1], d, dtype=torch.float32, device=x.device)
    edit_fn = {"blocks.1.mlp": lambda v: v * 1.0}
    edit_delta = {"blocks.1.mlp": tdfunc.delta(zeros)}
    capture = ["blocks.*"]

    def tdfunc_capture():
        out, caps = tdfunc.functional_call(model_td, state, (x,), capture=capture)
        return out, {n: caps[n] for n in names}

    def tdfunc_capture_pinned():
        out, caps = tdfunc.functional_call(model_pin, state_pin, (x,), capture=capture)
        return out, {n: caps[n] for n in names}

    # --- hook-based peers: register per call, remove in finally (TransformerLens / nnsight / pyvene style)
    def hooks_capture():
        cache: dict[str, torch.Tensor] = {}
        handles = []
        try:
            for n, m in blocks:
                handles.append(m.register_forward_hook(lambda _m, _a, o, n=n: cache.__setitem__(n, o.detach())))
            out = model(x)
        finally:
            for h in handles:
                h.remove()
        return out, cache

    mlp1 = model.get_submodule("blocks.1.mlp")

    def hooks_edit():
        h = mlp1.register_forward_hook(lambda _m, _a, o: o * 1.0)
        try:
            return model(x)
        finally:
            h.remove()

    # --- tdhook 0.3.0: the two ways its docs/benchmarks capture activations
    caching = ActivationCaching(BLOCK_PATTERN_TDHOOK)

    def tdhook_caching():
        with caching.prepare(model) as hooked:
            td = hooked(TensorDict(input=x, batch_size=[x.shape[0]]))
        return td["output"], {n: td["cache", n] for n in names}

    targets = [Target(n, "activation", -1, tuple(range(d))) for n in names]

    def tdhook_session():
        with HookSession(model) as session:
            caps = [session.capture(t) for t in targets]
            out = model(x)
        return out, {n: c.values[-1] for n, c in zip(names, caps)}

    capture_variants = {
        "tdfunc capture blocks.*": tdfunc_capture,
        "tdfunc capture blocks.*, pinned": tdfunc_capture_pinned,
        "hooks capture (per call)": hooks_capture,
        "tdhook ActivationCaching": tdhook_caching,
        "tdhook HookSession.capture": tdhook_session,
    }
    variants = {
        "plain model(x)": lambda: model(x),
        "torch.func.functional_call": lambda: fcall(model, params, (x,)),
        "tdfunc 0 edits": lambda: tdfunc.functional_call(model_td, state, (x,)),
        "tdfunc 1 edit (fn)": lambda: tdfunc.functional_call(model_td, state, (x,), edits=edit_fn),
        "tdfunc 1 edit (delta 0)": lambda: tdfunc.functional_call(model_td, state, (x,), edits=edit_delta),
        "tdfunc 1 edit (fn), pinned": lambda: tdfunc.functional_call(model_pin, state_pin, (x,), edits=edit_fn),
        "hooks 1 edit (per call)": hooks_edit,
        **{k: f for k, f in capture_variants.items()},
        "plain, after tdfunc calls": lambda: model_td(x),
        "plain, tdfunc sites pinned": lambda: model_pin(x),
    }
    notes = {
        "torch.func.functional_call": "reference; params dict built once outside the loop",
        "tdfunc 0 edits": "`tdfunc.functional_call(model, state, (x,))`, state = `tdfunc.state(model)` built once",
        "tdfunc 1 edit (fn)": "edits={'blocks.1.mlp': lambda v: v * 1.0}",
        "tdfunc 1 edit (delta 0)": "edits={'blocks.1.mlp': tdfunc.delta(zeros)}",
        "tdfunc 1 edit (fn), pinned": "the same edit on a copy whose sites were pinned once with `tdfunc.install_sites`",
        "hooks 1 edit (per call)": "register_forward_hook on blocks.1.mlp returning o * 1.0, run, remove in finally",
        "tdfunc capture blocks.*": f"capture=['blocks.*'] ({N_LAYERS} block outputs), returns (logits, TensorDict); "
        "the call installs the 4 sites and removes them when it returns",
        "tdfunc capture blocks.*, pinned": "the same capture on a copy whose sites were pinned once with `tdfunc.install_sites`",
        "hooks capture (per call)": "register a forward hook per block, store o.detach(), run, remove in finally",
        "tdhook ActivationCaching": "tdhook 0.3.0: `with ActivationCaching(r'blocks\\.\\d+$').prepare(model) as h: h(TensorDict(input=x))`",
        "tdhook HookSession.capture": "tdhook 0.3.0: `with HookSession(model) as s: s.capture(Target('blocks.i', 'activation', -1, all 128 features))`",
        "plain, after tdfunc calls": "`model(x)` on tdfunc's copy after the tdfunc calls (they leave no hooks behind)",
        "plain, tdfunc sites pinned": "`model(x)` on the pinned copy: what the inert site hooks cost a plain forward",
    }
    return variants, capture_variants, notes


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    b = Bench(NAME, device=device, quick=quick, rounds=150, warmup=15, quick_rounds=3, quick_warmup=1)
    model = tiny_gpt(seed=0).to(device)
    model_td = copy.deepcopy(model)
    model_pin = copy.deepcopy(model)
    with torch.no_grad():
        for batch in BATCHES:
            x = tokens(batch).to(device)
            variants, capture_variants, notes = make_variants(model, model_td, model_pin, x)
            # correctness before timing: same logits everywhere, same captured block outputs
            outs = {k: (f()[0] if k in capture_variants else f()) for k, f in variants.items()}
            b.check_equal(outs, atol=1e-5, rtol=1e-5)
            b.check_equal({k: f()[1] for k, f in capture_variants.items()}, atol=1e-5, rtol=1e-5)
            b.time(
                f"TinyGPT B={batch} T=32 (no_grad)",
                variants,
                reference="torch.func.functional_call",
                also_vs=["plain model(x)"],
                params={"batch": batch, "seq_len": 32, "d_model": 128, "layers": N_LAYERS},
                notes=notes if batch == BATCHES[0] else None,
            )
    return b.rows


if __name__ == "__main__":
    from bench.run import main

    raise SystemExit(main(["--only", NAME]))
