"""Composition-table rows for tdfunc.neuron: the selected neuron(s) of a site as ``f`` for gradient methods."""

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
    x6 = torch.randn(B, 6, dtype=dt)
    rows = []

    def sal_k(x, w):  # K neurons (an index, a slice sum, a callable) in one call; d(map)/d(weight)
        state = s_mlp.update({("fc1", "weight"): w}, inplace=False)
        td = TensorDict({"x": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(mlp, state, (t["x"],))  # noqa: E731
        g = tdfunc.neuron(f, mlp, "act", [(1,), (slice(2, 5),)])
        h = tdfunc.neuron(f, mlp, "fc2:input", lambda v: (v * v).sum(-1))
        return torch.cat(
            [tdfunc.saliency(g, td, abs=False)["attr", "x"].flatten(), tdfunc.saliency(h, td)["attr", "x"].flatten()]
        )

    rows.append(
        Case("neuron:saliency-K", mlp, sal_k, (x6, s_mlp["fc1", "weight"].clone()), (0, None), (0, 1), "fc1", probe=x6)
    )

    def ig_one(x, base):  # integrated gradients of one neuron, baseline vmapped
        td = TensorDict({"x": x[None], ("baseline", "x"): base[None]}, batch_size=[1])
        g = tdfunc.neuron(lambda t: mlp(t["x"]), mlp, "act2", (3,))
        return tdfunc.integrated_gradients(g, td, n_steps=8)["attr", "x"].flatten()

    rows.append(Case("neuron:ig", mlp, ig_one, (x6, 0.3 * x6.flip(0)), (0, 0), (0, 1), "fc2", probe=x6))

    def dl_k(x):  # DeepLift of two neurons of act2's output (as the head's input: after act2's rewrite)
        td = TensorDict({"x": x[None]}, batch_size=[1])
        g = tdfunc.neuron(lambda t: tdfunc.functional_call(mlp, s_mlp, (t["x"],)), mlp, "head:input", [(0,), (5,)])
        return tdfunc.deep_lift(g, td, mlp)["attr", "x"].flatten()

    rows.append(Case("neuron:deeplift-K", mlp, dl_k, (x6,), (0,), (0,), "fc1", probe=x6))

    def cond(x, w):  # neuron conductance of two units for every target; d(map)/d(weight)
        state = s_mlp.update({("fc1", "weight"): w}, inplace=False)
        td = TensorDict({"x": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(mlp, state, (t["x"],))  # noqa: E731
        return tdfunc.neuron_conductance(f, td, mlp, "act", [(1,), (slice(2, 5),)], n_steps=6)["attr", "x"].flatten()

    rows.append(
        Case("neuron:conductance", mlp, cond, (x6, s_mlp["fc1", "weight"].clone()), (0, None), (0, 1), "fc1", probe=x6)
    )
    return rows
