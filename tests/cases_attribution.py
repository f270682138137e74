"""Composition-table rows for the gradient attribution methods (saliency, input x gradient, IG).

Each row is a function of one example (returning a flat tensor) built on ``tdfunc.<method>`` with a float64 model:
vmapped over examples (inputs, baselines, labels), over targets (a batch of one-hot target
weights ``w`` closed over by ``f``), and over parameters (double backward through the map).
"""

from __future__ import annotations

import torch
from compose_case import B, Case
from models import MLP
from tensordict import TensorDict

import tdfunc


def cases() -> list[Case]:
    torch.manual_seed(0)
    dt = torch.float64
    mlp = MLP().to(dt)
    s_mlp = tdfunc.state(mlp)
    net = lambda x: tdfunc.functional_call(mlp, s_mlp, (x,))
    x6 = torch.randn(B, 6, dtype=dt)
    labels = torch.tensor([2, 0, 1])
    onehot = torch.eye(3, dtype=dt)  # B = 3 target weight vectors
    rows = []

    def saliency_k(x):  # every class, a td with an empty batch shape
        td = TensorDict({"x": x}, batch_size=[])
        return tdfunc.saliency(lambda t: net(t["x"]), td, abs=False)["attr", "x"].flatten()

    rows.append(Case("attr:saliency-K", mlp, saliency_k, (x6,), (0,), (0,), "fc1", probe=x6))

    def saliency_label(x, label):  # one target per example, picked by a label vmapped with x
        td = TensorDict({"x": x[None]}, batch_size=[1])
        out = tdfunc.saliency(lambda t: net(t["x"]).gather(-1, label.view(1, 1))[:, 0], td)
        return out["attr", "x"][0]

    rows.append(Case("attr:saliency-label", mlp, saliency_label, (x6, labels), (0, 0), (0,), "fc2", probe=x6))

    def ixg_targets(x, w):  # vmap over targets: f closes over a one-hot target weight vector
        td = TensorDict({"x": x[None]}, batch_size=[1])
        return tdfunc.input_x_gradient(lambda t: net(t["x"]) @ w, td)["attr", "x"][0]

    rows.append(
        Case("attr:input-x-gradient-targets", mlp, ixg_targets, (x6[0], onehot), (None, 0), (0, 1), "head", probe=x6)
    )

    def ig_gl_k(x, base):  # every class, a baseline vmapped with the input, convergence delta
        td = TensorDict({"x": x[None], ("baseline", "x"): base[None]}, batch_size=[1])
        out = tdfunc.integrated_gradients(lambda t: net(t["x"]), td, n_steps=3, return_convergence_delta=True)
        return torch.cat([out["attr", "x"].flatten(), out["convergence_delta"].flatten()])

    base6 = 0.1 * torch.randn(B, 6, dtype=dt)
    rows.append(Case("attr:ig-gausslegendre-K", mlp, ig_gl_k, (x6, base6), (0, 0), (0, 1), "fc1", probe=x6))

    def ig_trapezoid_fold(x):  # single target, path folded into the batch, two chunks
        td = TensorDict({"x": x[None]}, batch_size=[1])
        out = tdfunc.integrated_gradients(
            lambda t: net(t["x"])[:, 1], td, n_steps=3, method="riemann_trapezoid", strategy="fold", chunk_size=2
        )
        return out["attr", "x"][0]

    rows.append(Case("attr:ig-trapezoid-fold", mlp, ig_trapezoid_fold, (x6,), (0,), (0,), "act", probe=x6))

    def ig_left_targets(x, w):  # vmap over targets
        td = TensorDict({"x": x[None]}, batch_size=[1])
        f = lambda t: net(t["x"]) @ w
        return tdfunc.integrated_gradients(f, td, n_steps=2, method="riemann_left", chunk_size=1)["attr", "x"][0]

    rows.append(
        Case("attr:ig-riemann-left-targets", mlp, ig_left_targets, (x6[1], onehot), (None, 0), (1,), "fc2", probe=x6)
    )

    w_fc1 = s_mlp["fc1", "weight"]

    def ig_weights(x, weight):  # d(attribution)/d(parameters): double backward; vmap over ensembles
        state = TensorDict({("fc1", "weight"): weight})  # a partial state (update() would write into s_mlp)
        td = TensorDict({"x": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(mlp, state, (t["x"],))[:, 0]
        out = tdfunc.integrated_gradients(f, td, n_steps=2, method="riemann_middle", multiply_by_inputs=False)
        return out["attr", "x"][0]

    weights = w_fc1 + 0.1 * torch.randn(B, *w_fc1.shape, dtype=dt)
    rows.append(
        Case("attr:ig-riemann-middle-weights", mlp, ig_weights, (x6[2], weights), (None, 0), (1,), "fc1", probe=x6)
    )
    return rows
