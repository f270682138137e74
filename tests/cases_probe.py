"""Composition-table rows for probes (see test_compose.py).

Each row captures a tiny Linear(+Tanh) model's hidden layer and applies a probe to it; vmap runs
over inputs, grad is w.r.t. the inputs and the probe's parameters (passed as tensors and assembled
into the probe's TensorDict inside the case).
"""

from __future__ import annotations

import torch
from compose_case import B, Case
from tensordict import TensorDict

import tdfunc


def cases() -> list[Case]:
    torch.manual_seed(0)
    dt = torch.float64
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh()).to(dt)
    s = tdfunc.state(net)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 4, dtype=dt)
    clouds = torch.randn(B, 6, 4, dtype=dt)
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    lin = tdfunc.latent.probe_init("linear", 5, 3, generator=g, dtype=dt)
    low = tdfunc.latent.probe_init("low_rank_bilinear", (5, 4), 3, rank=2, generator=g, dtype=dt)

    def hidden(pts):
        _, caps = tdfunc.functional_call(net, s, (pts,), capture=["1"])
        return caps["1"]

    def linear(pt, w):
        return tdfunc.latent.probe_apply(TensorDict({"weight": w, "bias": lin["bias"]}, batch_size=[]), hidden(pt))

    def bilinear(pt, u, v):  # pairs (hidden, input), low rank, plus a quadratic full bilinear probe
        p = TensorDict({"u": u, "v": v, "bias": low["bias"]}, batch_size=[])
        full = TensorDict({"weight": u[:, :4] @ v.mT, "bias": low["bias"]}, batch_size=[])  # (3, 4, 4)
        h = hidden(pt)
        return torch.cat([tdfunc.latent.probe_apply(p, (h, pt)), tdfunc.latent.probe_apply(full, pt)])

    def means_loss(pts, m):  # mean-difference logits and probe_evaluate's loss on a cloud of 6 inputs
        p = TensorDict({"means": m}, batch_size=[])
        h = hidden(pts)
        return torch.cat(
            [tdfunc.latent.probe_apply(p, h).flatten(), tdfunc.latent.probe_evaluate(p, h, labels)["loss"][None]]
        )

    def means_normalized(pts, m):  # probe_fit(..., normalize=True)'s form: logits scaled by 1 / |mu_1 - mu_0|
        p = TensorDict({"means": m[:2], "scale": 1 / (m[1] - m[0]).norm()}, batch_size=[])
        return tdfunc.latent.probe_apply(p, hidden(pts)).flatten()

    zeros = TensorDict({"h": torch.zeros(6, 5, dtype=dt)}, batch_size=[6])
    md_state = tdfunc.latent.probe_stream_init("mean_difference", zeros, 3)
    lin_state = tdfunc.latent.probe_stream_init("linear", zeros, 3, generator=torch.Generator().manual_seed(1))

    def stream(pts, state, **kw):  # a cloud of 6 inputs streamed as two batches of 3
        h = hidden(pts)
        for part in (slice(0, 3), slice(3, 6)):
            state = tdfunc.latent.probe_stream_update(
                state, TensorDict({"h": h[part]}, batch_size=[3]), labels[part], **kw
            )
        return tdfunc.latent.probe_apply(tdfunc.latent.probe_stream_params(state)["h"], h).flatten()

    def stream_means(pts):  # streamed class sums and counts -> means -> logits
        return stream(pts, md_state)

    def stream_linear(pts, w):  # two minibatch Adam steps from weight w
        state = lin_state.clone()
        state.set(("params", "h", "weight"), w)
        return stream(pts, state, lr=0.1, weight_decay=0.01)

    w = lin["weight"].clone()
    return [
        Case("latent:probe-stream-means", net, stream_means, (clouds,), (0,), (0,), "0", probe=x),
        Case("latent:probe-stream-linear", net, stream_linear, (clouds, w), (0, None), (0, 1), "0", probe=x),
        Case("latent:probe-linear", net, linear, (x, w), (0, None), (0, 1), "0", probe=x),
        Case(
            "latent:probe-bilinear",
            net,
            bilinear,
            (x, low["u"].clone(), low["v"].clone()),
            (0, None, None),
            (0, 1, 2),
            "0",
            probe=x,
        ),
        Case(
            "latent:probe-means+loss",
            net,
            means_loss,
            (clouds, torch.randn(B, 3, 5, dtype=dt)),
            (0, 0),
            (0, 1),
            "0",
            probe=x,
        ),
        Case(
            "latent:probe-means-normalized",
            net,
            means_normalized,
            (clouds, torch.randn(B, 3, 5, dtype=dt)),
            (0, 0),
            (0, 1),
            "0",
            probe=x,
        ),
    ]
