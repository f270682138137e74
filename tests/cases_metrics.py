"""Composition-table rows for activation maximisation, infidelity and max-sensitivity (see test_compose.py).

Each row is one example's computation: the metrics get a deterministic ``perturb_fn`` built from a
per-example noise argument, so ``vmap`` over examples equals the loop (random draws under ``vmap``
follow its ``randomness`` rule instead).
"""

from __future__ import annotations

import torch
from compose_case import B, Case
from models import MLP
from tensordict import TensorDict

import tdfunc

S = 4  # perturbation samples per example


def cases() -> list[Case]:
    torch.manual_seed(0)
    dt = torch.float64
    mlp = MLP().to(dt)
    s_mlp = tdfunc.state(mlp)
    x6 = torch.randn(B, 6, dtype=dt)
    noise = 0.1 * torch.randn(B, S, 6, dtype=dt)
    logits = lambda t: tdfunc.functional_call(mlp, s_mlp, (t["x"],))  # K = 3 targets

    def one(x):
        return TensorDict({"x": x[None]}, batch_size=[1])

    def infidelity(x, attr, noise):  # grad w.r.t. the attribution tensor and the input
        td = one(x)
        attributions = TensorDict({("attr", "x"): attr[None]}, batch_size=[1])
        perturb = lambda tds, g: ({"x": noise[:, None]}, {"x": tds["x"] - noise[:, None]})
        out = tdfunc.infidelity(
            logits, td, attributions, perturb_fn=perturb, n_perturb_samples=S, normalize=True, chunk_size=3
        )
        return out.flatten()

    attr = torch.randn(B, 3, 6, dtype=dt)
    rows = [Case("metrics:infidelity", mlp, infidelity, (x6, attr, noise), (0, 0, 0), (0, 1), "fc1", probe=x6)]

    def sensitivity(x, noise):
        perturb = lambda tds, g: {"x": tds["x"] + noise[:, None]}
        out = tdfunc.sensitivity_max(
            tdfunc.saliency, logits, one(x), perturb_fn=perturb, n_perturb_samples=S, abs=False
        )
        return out.flatten()

    rows.append(Case("metrics:sensitivity-max", mlp, sensitivity, (x6, noise), (0, 0), (0,), "fc2", probe=x6))

    def unit(t):
        return tdfunc.functional_call(mlp, s_mlp, (t["x"],), capture=["act2"])[1]["act2"][:, 2]

    def maximise(x):  # differentiable through the unrolled ascent
        out = tdfunc.activation_maximisation(unit, one(x), steps=2, lr=0.1, l2=0.05, tv=0.05, clamp=(-5.0, 5.0))
        return torch.cat([out["x"].flatten(), out["objective"].flatten()])

    rows.append(Case("attr:activation-maximisation", mlp, maximise, (x6,), (0,), (0,), "act2", probe=x6))
    return rows
