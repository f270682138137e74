"""Composition-table rows for patching and steering (see test_compose.py).

A tiny float64 Linear-Tanh-Linear model on (1, T=3, 4) sequences: ``patch`` with a vmapped clean
value at two positions, ``path_patch`` of vmapped clean and corrupted inputs, a ``patching_sweep`` (an inner vmap) over a vmapped corrupted input, ``steer``
with a vmapped scale and with a differentiated vector (every position, and the last one only), and
``steering_vector`` of the captured hidden layer of vmapped paired inputs; a (4 -> 6 -> 6 -> 3) net whose
hidden layers are seen as 3 heads of 2 (``units``): a head patched with ``unit_edit`` and a per-head
``unit_view`` capture, a ``patching_sweep`` over those heads, ``attribution_patching`` over positions
and heads, and with GradDrop.
"""

from __future__ import annotations

import torch
from compose_case import B, Case

import tdfunc


def cases() -> list[Case]:
    torch.manual_seed(0)
    dt = torch.float64
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dt)
    s = tdfunc.state(net)
    x = torch.randn(B, 1, 3, 4, dtype=dt)
    clean = torch.randn(B, 1, 3, 5, dtype=dt)
    v = torch.randn(5, dtype=dt)

    def patch_clean(x, c):
        return tdfunc.latent.patch(net, s, (x,), {"1": c}, "1", positions=[0, 2]).flatten()

    def sweep(x, x_clean):
        return tdfunc.latent.patching_sweep(net, s, (x_clean,), (x,), ["0", "1"], lambda y: y[0, -1, 0]).flatten()

    def path(x, x_clean):
        return tdfunc.latent.path_patch(net, s, (x_clean,), (x,), "0", "1", positions=[1]).flatten()

    def steer_scale(x, scale):
        return tdfunc.functional_call(net, s, (x,), edits=tdfunc.latent.steer({"1": v}, scale)).flatten()

    def steer_vector(x, u):
        last = tdfunc.functional_call(net, s, (x,), edits=tdfunc.latent.steer({"1": u}, 0.5, positions=-1))
        return torch.cat(
            [tdfunc.functional_call(net, s, (x,), edits=tdfunc.latent.steer({"1": u})).flatten(), last.flatten()]
        )

    def vector(x_pos, x_neg):  # the hidden layer of paired inputs, then their mean difference
        pos, neg = (tdfunc.functional_call(net, s, (z,), capture=["1"])[1]["1"] for z in (x_pos, x_neg))
        return torch.cat(
            [tdfunc.latent.steering_vector(pos, neg), tdfunc.latent.steering_vector(pos, neg, pooled=False).flatten()]
        )

    # units: the hidden layer of a (4 -> 6 -> 3) net seen as 3 "heads" of 2 (unit_view / unit_edit / sweeps / AtP)
    hnet = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).to(dt)
    hs = tdfunc.state(hnet)
    heads = tdfunc.latent.units("b t (h d) -> b t h d", h=3)
    hclean = torch.randn(B, 1, 3, 3, 2, dtype=dt)

    def unit_patch(x, c):  # head 1 of "1" from a vmapped clean view; the per-head capture of "3"
        y, caps = tdfunc.functional_call(
            hnet, hs, (x,), edits={"1": tdfunc.latent.unit_edit(heads, c, index=1)}, capture=["3"]
        )
        return torch.cat([y.flatten(), tdfunc.latent.unit_view(caps, heads)["3"].flatten()])

    def sweep_units(x, x_clean):
        return tdfunc.latent.patching_sweep(
            hnet, hs, (x_clean,), (x,), ["1", "3"], lambda y: y[0, -1, 0], over=heads
        ).flatten()

    def atp(x, x_clean):  # attribution_patching over positions and over heads
        m = lambda y: y[0, -1, 0]  # noqa: E731
        return torch.cat(
            [
                tdfunc.latent.attribution_patching(hnet, hs, (x_clean,), (x,), ["1", "3"], m).flatten(),
                tdfunc.latent.attribution_patching(hnet, hs, (x_clean,), (x,), "1", m, over=heads).flatten(),
            ]
        )

    def atp_graddrop(x, x_clean):
        return tdfunc.latent.attribution_patching(
            hnet, hs, (x_clean,), (x,), ["0", "2"], lambda y: y[0, -1, 0], grad_drop=["1", "3"]
        ).flatten()

    return [
        Case("latent:unit-edit-view", hnet, unit_patch, (x, hclean), (0, 0), (0, 1), "0", probe=x[0]),
        Case("latent:patching-sweep-units", hnet, sweep_units, (x, x.flip(0)), (0, 0), (0, 1), "0", probe=x[0]),
        Case("latent:attribution-patching", hnet, atp, (x, x.flip(0)), (0, 0), (0, 1), "0", probe=x[0]),
        Case(
            "latent:attribution-patching-graddrop", hnet, atp_graddrop, (x, x.flip(0)), (0, 0), (0, 1), "0", probe=x[0]
        ),
        Case("latent:patch-vmapped-clean", net, patch_clean, (x, clean), (0, 0), (0, 1), "0", probe=x[0]),
        Case("latent:patching-sweep", net, sweep, (x, x[0]), (0, None), (0, 1), "0", probe=x[0]),
        Case("latent:path-patch", net, path, (x, x.flip(0)), (0, 0), (0, 1), "0", probe=x[0]),
        Case(
            "latent:steer-scale",
            net,
            steer_scale,
            (x, torch.linspace(-1, 1, B, dtype=dt)),
            (0, 0),
            (0, 1),
            "0",
            probe=x[0],
        ),
        Case(
            "latent:steer-grad-vector",
            net,
            steer_vector,
            (x, torch.randn(B, 5, dtype=dt)),
            (0, 0),
            (0, 1),
            "0",
            probe=x[0],
        ),
        Case(
            "latent:steering-vector",
            net,
            vector,
            (torch.randn(B, 4, 3, 4, dtype=dt), torch.randn(B, 4, 3, 4, dtype=dt)),
            (0, 0),
            (0, 1),
            "0",
            probe=x[0],
        ),
    ]
