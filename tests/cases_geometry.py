"""Composition-table rows for representation geometry (see test_compose.py).

Each row maps a point cloud of model inputs through a tiny Linear(+Tanh) model and measures the
geometry of its representations; vmap runs over a batch of point clouds, grad is w.r.t. the inputs.
"""

from __future__ import annotations

import math

import torch
from compose_case import B, Case

import tdfunc


def cases() -> list[Case]:
    torch.manual_seed(0)
    dt = torch.float64
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh()).to(dt)
    s = tdfunc.state(net)
    clouds = torch.randn(B, 12, 4, dtype=dt)  # B point clouds of 12 inputs

    def reps(pts):
        out, caps = tdfunc.functional_call(net, s, (pts,), capture=["0"])
        return caps["0"], out

    def cka_rows(pts):  # both kernels, biased and debiased, as a (2, 1) matrix each
        lin, act = reps(pts)
        stack = torch.stack([lin, act])
        return torch.cat(
            [
                tdfunc.latent.cka(stack, pts[None]).flatten(),
                tdfunc.latent.cka(stack, pts, kernel="rbf").flatten(),
                tdfunc.latent.cka(act, lin, debiased=True)[None],
                tdfunc.latent.information_imbalance(stack, pts).flatten(),
            ]
        )

    def dims(pts):
        lin, act = reps(pts)
        return torch.stack(
            [tdfunc.latent.twonn_dimension(act, discard_fraction=0.2), tdfunc.latent.mle_dimension(lin, k=4)]
        )

    def tdhook_options(pts):  # local kNN dimension, TwoNN's regression points, Minkowski p, integer promotion
        lin, act = reps(pts)
        d, lx, ly = tdfunc.latent.twonn_dimension(act, discard_fraction=0.0, return_xy=True)
        codes = (pts * 2).round().long()  # integer inputs are promoted (no gradient through them)
        return torch.cat(
            [
                tdfunc.latent.local_knn_dimension(lin, k=2, per_point=True),
                d[None],
                lx,
                ly,
                tdfunc.latent.information_imbalance(act, pts, p=1.0)[None],
                tdfunc.latent.information_imbalance(lin, codes, p=math.inf)[None],
                tdfunc.latent.cka(act, codes)[None],
            ]
        )

    probe = clouds[0]
    return [
        Case("latent:dimension-tdhook-options", net, tdhook_options, (clouds,), (0,), (0,), "0", probe=probe),
        Case("latent:cka+imbalance", net, cka_rows, (clouds,), (0,), (0,), "0", probe=probe),
        Case("latent:dimension", net, dims, (clouds,), (0,), (0,), "0", probe=probe),
    ]
