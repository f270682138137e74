"""Occlusion on ``SmallCNN`` (3x32x32 input): tdfunc's one vmapped call vs captum's loop.

``bench._models.SmallCNN`` (three 3x3 conv layers + ReLU + 2x2 max-pool, linear head, 10
classes), batch 8 of standard-normal images, one target class (3), window ``(3, 4, 4)``, stride
``(3, 2, 2)``: 1 x 15 x 15 = 225 windows per image, zero baseline. All variants are asserted
equal (``atol = 1e-5 x max|A|``, ``rtol = 1e-4``) before timing.

Variants (reference: ``captum (ppe=1)``):

- ``tdfunc``: ``tdfunc.occlusion(lambda t: cnn(t['x'])[..., 3], td, sliding_window_shapes=(3, 4,
  4), strides=(3, 2, 2))``: all 225 occluded batches stacked and run by one ``vmap``-ed call.
- ``tdfunc chunk_size=64``: the same, 64 windows per forward (4 forwards).
- ``captum (ppe=1)``: captum 0.9.0 ``Occlusion(cnn).attribute(x, sliding_window_shapes=(3, 4, 4),
  strides=(3, 2, 2), target=3)`` with its default ``perturbations_per_eval=1`` (225 forwards of
  batch 8).
- ``captum (ppe=64)``: the same with ``perturbations_per_eval=64`` (4 forwards of up to batch 512).
- ``tdfunc under no_grad``: ``tdfunc`` inside ``torch.no_grad()`` (captum's forwards run under
  ``no_grad``; tdfunc's, called outside it, record an autograd graph for the parameters).
- ``forward x 226 (one batch)``: the floor: one forward of the 226 x 8 stacked inputs (no masking).

Run: ``python -m bench.run --only occlusion --threads 1``.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from bench._models import images, small_cnn
from bench.bench_ig import check_maps, no_grad
from bench.harness import Bench

NAME = "occlusion"
TARGET = 3
WINDOW = (3, 4, 4)
STRIDE = (3, 2, 2)
FULL = {"batch": 8}
QUICK = {"batch": 8}


def captum_occ(cnn, x, ppe):
    from captum.attr import Occlusion

    occ = Occlusion(cnn)

    def call():
        return occ.attribute(
            x, sliding_window_shapes=WINDOW, strides=STRIDE, target=TARGET, perturbations_per_eval=ppe
        ).detach()

    return call


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import tdfunc

    cfg = QUICK if quick else FULL
    b = Bench(
        NAME,
        device=device,
        quick=quick,
        rounds=30,
        warmup=2,
        quick_rounds=3,
        quick_warmup=1,
        max_seconds_per_case=60.0,
        quick_max_seconds_per_case=3.0,
    )
    cnn = small_cnn().to(device)
    x = images(cfg["batch"]).to(device)
    td = TensorDict(x=x, batch_size=[cfg["batch"]])
    f = lambda t: cnn(t["x"])[..., TARGET]  # noqa: E731
    occ = lambda **kw: tdfunc.occlusion(f, td, sliding_window_shapes=WINDOW, strides=STRIDE, **kw)["attr", "x"].detach()  # noqa: E731
    n_windows = 1 * 15 * 15
    stacked = x.repeat(n_windows + 1, 1, 1, 1)

    variants = {
        "captum (ppe=1)": captum_occ(cnn, x, 1),
        "captum (ppe=64)": captum_occ(cnn, x, 64),
        "tdfunc": lambda: occ(),
        "tdfunc chunk_size=64": lambda: occ(chunk_size=64),
        "tdfunc under no_grad": no_grad(lambda: occ()),
    }
    notes = {
        "captum (ppe=1)": "reference: captum 0.9.0 `Occlusion(cnn).attribute(x, (3,4,4), strides=(3,2,2), target=3)`, default `perturbations_per_eval=1`: 225 forwards of batch 8",
        "captum (ppe=64)": "the same with `perturbations_per_eval=64`: 4 forwards",
        "tdfunc": "`tdfunc.occlusion(lambda t: cnn(t['x'])[..., 3], td, sliding_window_shapes=(3,4,4), strides=(3,2,2))`: one vmapped forward of 225 x 8 inputs",
        "tdfunc chunk_size=64": "the same, `chunk_size=64` (4 vmapped forwards)",
        "tdfunc under no_grad": "`tdfunc` inside `torch.no_grad()` (captum runs its forwards under `no_grad` itself)",
        f"forward x {n_windows + 1} (one batch)": f"floor: `cnn(x.repeat({n_windows + 1}, 1, 1, 1))` under `no_grad` (no masking, no reduction)",
    }
    with torch.no_grad():
        check_maps(b, {k: fn() for k, fn in variants.items()})

    def floor():
        with torch.no_grad():
            return cnn(stacked)

    variants[f"forward x {n_windows + 1} (one batch)"] = floor
    threads = torch.get_num_threads()
    b.time(
        f"Occlusion, SmallCNN 3x32x32, batch {cfg['batch']}, window {WINDOW}, stride {STRIDE} "
        f"({n_windows} windows), target {TARGET} ({threads} thread{'s' if threads > 1 else ''})",
        variants,
        reference="captum (ppe=1)",
        also_vs=["captum (ppe=64)"],
        params={**cfg, "target": TARGET, "window": list(WINDOW), "stride": list(STRIDE), "n_windows": n_windows},
        notes=notes,
        number=1,
    )
    return b.rows


if __name__ == "__main__":
    from bench.run import main

    raise SystemExit(main(["--only", NAME]))
