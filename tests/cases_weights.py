"""Composition-table rows for weight interventions (see test_compose.py).

vmap runs over stacked masks, alphas, stacked task vectors and stacked adapter parameters; grad
(incl. double backward) is taken w.r.t. inputs, soft masks, alphas and adapter parameters.
"""

from __future__ import annotations

import torch
from compose_case import B, Case
from models import MLP
from tensordict import TensorDict
from torch.func import vmap

import tdfunc


def cases() -> list[Case]:
    torch.manual_seed(0)
    dt = torch.float64
    mlp = MLP().to(dt)
    s = tdfunc.state(mlp)
    x6 = torch.randn(B, 6, dtype=dt)
    call = lambda state, x: tdfunc.functional_call(mlp, state, (x,)).flatten()
    rows = []

    # masks from prune_masks at three sparsity levels, as float (soft) masks: vmap over masks, grad w.r.t. them
    masks = tdfunc.weights.prune_masks(
        s, tdfunc.weights.magnitude_scores(s), amount=[0.2, 0.5, 0.8], include="fc*.weight"
    )

    def masked(m1, scores, x):  # selection under vmap (per-example scores) + soft masks (grad w.r.t. them)
        hard = tdfunc.weights.prune_masks(s, TensorDict({("fc2", "weight"): scores}), amount=0.5, include="fc2.weight")
        structured = tdfunc.weights.prune_masks(
            s,
            TensorDict({("fc1", "weight"): scores[:, :6]}),
            amount=0.5,
            scope="module",
            structured_dim=0,
            include="fc1.weight",
        )
        state = tdfunc.weights.apply_masks(tdfunc.weights.apply_masks(s, hard), structured)
        return call(tdfunc.weights.apply_masks(state, TensorDict({("fc1", "weight"): m1})), x)

    soft = masks["fc1", "weight"].to(dt) * (0.5 + torch.rand(masks["fc1", "weight"].shape, dtype=dt))
    rows.append(
        Case(
            "weights:prune-apply-masks",
            mlp,
            masked,
            (soft, torch.randn(B, 8, 8, dtype=dt), x6),
            (0, 0, 0),
            (0, 2),
            "fc1",
            probe=x6,
        )
    )

    tv = tdfunc.weights.task_vector(tdfunc.state(MLP().to(dt)), s)

    def ties(w1, lam, x):  # a stack of two task vectors per example; grad w.r.t. one of them, lambda_ and alpha
        tvs = torch.stack([tv, _with(tv, w1)])
        merged = tdfunc.weights.ties_merge(tvs, density=0.5, lambda_=lam)
        return call(tdfunc.weights.apply_task_vector(s, merged, lam), x)  # alpha = lambda too

    rows.append(
        Case(
            "weights:ties-merge",
            mlp,
            ties,
            (torch.randn(B, 8, 6, dtype=dt), torch.tensor([0.5, 1.0, 2.0], dtype=dt), x6),
            (0, 0, None),
            (0, 1, 2),
            "fc1",
            probe=x6,
        )
    )

    def path(w, x):  # the loss along an interpolation path, vmapped inside; grad w.r.t. an endpoint weight
        sb = _with(s, w)
        states = tdfunc.weights.interpolate(s, sb, torch.linspace(0, 1, 4, dtype=dt))
        return vmap(lambda st: call(st, x).square().mean())(states)

    rows.append(
        Case(
            "weights:interpolate",
            mlp,
            path,
            (s["fc1", "weight"] + 0.1 * torch.randn(B, 8, 6, dtype=dt), x6),
            (0, 0),
            (0, 1),
            "fc1",
            probe=x6,
        )
    )

    def sweep(x):
        out = tdfunc.weights.task_vector_sweep(
            mlp,
            s,
            tv,
            [0.0, 0.5, 1.0],
            lambda st: -call(st, x).square().sum(),
            constraint=lambda st: st["fc1", "weight"].abs().sum() > 0,
        )
        return torch.cat([out["metric"], out["best_alpha"][None]])

    rows.append(Case("weights:task-vector-sweep", mlp, sweep, (x6,), (0,), (0,), "act", probe=x6))

    def snip(x):
        scores = tdfunc.weights.snip_scores(lambda st: call(st, x).tanh().sum(), s)
        return scores["fc2", "weight"].flatten()

    rows.append(Case("weights:snip-scores", mlp, snip, (x6,), (0,), (0,), "fc2", probe=x6))

    sae = tdfunc.weights.sae_init(8, 12, dtype=dt, generator=torch.Generator().manual_seed(0))
    sae["b_enc"] = 0.1 * torch.ones(12, dtype=dt)  # most features active

    def sae_codes(x):  # encode / decode of captured activations, as a user's SAE training loss does
        acts = tdfunc.functional_call(mlp, s, (x,), capture="act")[1]["act"]
        codes = tdfunc.weights.sae_encode(sae, acts)
        return torch.cat([codes.flatten(), (tdfunc.weights.sae_decode(sae, codes) - acts).flatten()])

    rows.append(Case("weights:sae-encode-decode", mlp, sae_codes, (x6,), (0,), (0,), "act", probe=x6))

    tc = tdfunc.weights.transcoder_init(8, 10, 8, dtype=dt, generator=torch.Generator().manual_seed(1))
    tc["b_enc"] = 0.1 * torch.ones(10, dtype=dt)

    def adapters(w_enc, w_dec, x):  # vmap over stacked SAE / transcoder weights, grad w.r.t. them
        st, tt = sae.copy(), tc.copy()
        st["W_enc"], tt["W_dec"] = w_enc, w_dec
        edits = {"act": tdfunc.weights.sae_edit(st), "fc2": tdfunc.weights.transcoder_edit(tt, "fc2:input")}
        return tdfunc.functional_call(mlp, s, (x,), edits=edits).flatten()

    rows.append(
        Case(
            "weights:sae+transcoder-edit",
            mlp,
            adapters,
            (
                sae["W_enc"] + 0.1 * torch.randn(B, 8, 12, dtype=dt),
                tc["W_dec"] + 0.1 * torch.randn(B, 10, 8, dtype=dt),
                x6,
            ),
            (0, 0, 0),
            (0, 1, 2),
            "head",
            probe=x6,
        )
    )

    lora = tdfunc.weights.lora_init(s, ["fc1", "head"], rank=2, generator=torch.Generator().manual_seed(2))

    def lora_call(b, scale, x):  # vmap over stacked B factors and scales, grad w.r.t. B and the scale
        st = lora.copy()
        st["fc1", "weight", "B"] = b
        return call(tdfunc.weights.apply_lora(s, st, scale), x)

    rows.append(
        Case(
            "weights:lora",
            mlp,
            lora_call,
            (torch.randn(B, 8, 2, dtype=dt), torch.tensor([0.5, 1.0, 2.0], dtype=dt), x6),
            (0, 0, 0),
            (0, 1, 2),
            "fc1",
            probe=x6,
        )
    )
    return rows


def _with(td: TensorDict, w: torch.Tensor) -> TensorDict:
    out = td.copy()
    out["fc1", "weight"] = w
    return out
