"""Per-class integrated-gradients maps on a small CNN: tdfunc vs captum, tdhook and a torch.func floor.

Task: every class's IG map for a batch of images — ``bench._models.SmallCNN`` (3 conv layers
8/16/32 channels, ReLU + 2x2 max-pool, linear head; input 3x32x32, 10 classes), eval mode, batch
16, ``n_steps=50``, ``method="gausslegendre"``, zero baseline, ``multiply_by_inputs=True``. Every
variant returns the ``(16, 10, 3, 32, 32)`` tensor of maps; all are asserted equal (rtol 1e-4,
atol 1e-5 x the largest |attr|) before any timing.

Variants:

- ``floor (torch.func)`` — the reference: the hand-written minimum — the 50 scaled copies of the
  batch folded into one batch of 800, one ``torch.func.vjp`` over the path, then 10 ``vjp_fn``
  calls with one-hot cotangents and a weighted sum over the path.
- ``tdfunc`` — ``tdfunc.integrated_gradients(lambda t: cnn(t['x']), td)`` (vmap over the path;
  one forward, K vector-Jacobian products); ``strategy='fold'``; ``chunk_size=10``.
- ``captum`` — captum 0.9.0, one ``IntegratedGradients.attribute(x, target=k)`` per class (10
  calls: 10 forwards and 10 backwards over the path).
- ``tdhook`` — tdhook 0.3.0, ``IntegratedGradients(multiply_by_inputs=True, init_attr_targets=
  <select class k>)``, one call per class (contexts built once, entered per call). tdhook's
  default is ``multiply_by_inputs=False``; it is set to True here.
- ``... under no_grad`` — the floor / tdfunc inside ``torch.no_grad()``: torch.func transforms
  ignore the outer no_grad for their own gradients, but the outer autograd then records nothing
  (no graph kept for a double backward through the attribution). Shows what that recording costs.

The goal (issue): tdfunc within 1.1x of the floor on the CPU.

Each variant is timed 5 times, interleaved (one call lasts seconds; the whole benchmark must stay
within a few minutes on 2 shared cores). With ``TDFUNC_BENCH_IG_ALSO_THREADS=2`` a second case
times the floor, tdfunc, fold, captum and tdhook with 2 torch threads.

Run: ``python -m bench.run --only ig --threads 1``. ``--quick`` uses batch 2 and ``n_steps=8``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from tensordict import TensorDict
from torch.func import vjp

from bench._models import images, small_cnn
from bench.harness import Bench

NAME = "ig"
N_CLASSES = 10
FULL = {"batch": 16, "n_steps": 50, "chunk_size": 10}
QUICK = {"batch": 2, "n_steps": 8, "chunk_size": 4}
METHOD = "gausslegendre"
EXTRA_THREADS_ENV = "TDFUNC_BENCH_IG_ALSO_THREADS"  # e.g. 2: also time floor/tdfunc/captum/tdhook with 2 threads


# --------------------------------------------------------------------------- shared by bench_ig_paper / _memory


def gl_nodes(n_steps: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss–Legendre nodes and weights on [0, 1] (numpy's leggauss, as captum does)."""
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(n_steps)
    return torch.tensor((nodes + 1) / 2, dtype=dtype), torch.tensor(weights / 2, dtype=dtype)


def floor_ig(model: Callable, x: torch.Tensor, targets: Sequence[int], n_steps: int) -> torch.Tensor:
    """Hand-written IG floor: path folded into one batch, one vjp, one vjp_fn call per target.

    Zero baseline; returns ``(B, len(targets), *x.shape[1:])``.
    """
    b = x.shape[0]
    alphas, weights = gl_nodes(n_steps, x.dtype)
    shape = (n_steps, *([1] * x.dim()))
    xs = (alphas.view(shape) * x).reshape(n_steps * b, *x.shape[1:])
    y, pull = vjp(model, xs)
    w = weights.view(shape)
    maps = []
    for k in targets:
        cot = torch.zeros_like(y)
        cot[:, k] = 1
        g = pull(cot)[0].view(n_steps, *x.shape)
        maps.append((g * w).sum(0))
    return torch.stack(maps, 1) * x.unsqueeze(1)


def captum_ig(model, x: torch.Tensor, targets: Sequence[int], n_steps: int) -> Callable[[], torch.Tensor]:
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(model, multiply_by_inputs=True)
    base = torch.zeros_like(x)

    def call():
        maps = [ig.attribute(x, baselines=base, target=k, n_steps=n_steps, method=METHOD) for k in targets]
        return torch.stack(maps, 1).detach()

    return call


def tdhook_ig(model, x: torch.Tensor, targets: Sequence[int], n_steps: int) -> Callable[[], torch.Tensor]:
    from tdhook.attribution.integrated_gradients import IntegratedGradients

    def select(k):
        # outputs have batch (B, n_steps): pick class k of every path point
        return lambda out, _extra: TensorDict(output=out["output"][..., k], batch_size=out.batch_size)

    contexts = [
        IntegratedGradients(
            multiply_by_inputs=True, method=METHOD, n_steps=n_steps, init_attr_targets=select(k)
        ).prepare(model)
        for k in targets
    ]
    inp = TensorDict({"input": x, ("baseline", "input"): torch.zeros_like(x)}, batch_size=[x.shape[0]])

    def call():
        maps = []
        for ctx in contexts:
            with ctx as hooked:
                maps.append(hooked(inp.clone(False))["attr", "input"])
        return torch.stack(maps, 1).detach()

    return call


def no_grad(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def call():
        with torch.no_grad():
            return fn()

    return call


def check_maps(b: Bench, outs: dict) -> float:
    scale = max(float(v.abs().max()) for v in outs.values())
    return b.check_equal(outs, atol=1e-5 * scale, rtol=1e-4)


# --------------------------------------------------------------------------- this benchmark


def make_variants(cnn, x: torch.Tensor, n_steps: int, chunk_size: int, *, full_set: bool = True):
    import tdfunc

    td = TensorDict(x=x, batch_size=[x.shape[0]])
    classes = list(range(N_CLASSES))
    f = lambda t: cnn(t["x"])  # noqa: E731
    state = tdfunc.state(cnn)  # detached: no outer autograd graph, as idiomatic tdfunc code runs
    ig = lambda **kw: tdfunc.integrated_gradients(f, td, n_steps=n_steps, method=METHOD, **kw)["attr", "x"].detach()  # noqa: E731

    variants = {
        "floor (torch.func)": lambda: floor_ig(cnn, x, classes, n_steps).detach(),
        "tdfunc": lambda: ig(),
        "tdfunc strategy='fold'": lambda: ig(strategy="fold"),
        "tdfunc, functional_call over tdfunc.state": lambda: tdfunc.integrated_gradients(
            lambda t: tdfunc.functional_call(cnn, state, (t["x"],)), td, n_steps=n_steps, method=METHOD
        )["attr", "x"],
        f"tdfunc chunk_size={chunk_size}": lambda: ig(chunk_size=chunk_size),
        "captum (10 calls)": captum_ig(cnn, x, classes, n_steps),
        "tdhook (10 calls)": tdhook_ig(cnn, x, classes, n_steps),
        "floor under no_grad": no_grad(lambda: floor_ig(cnn, x, classes, n_steps)),
        "tdfunc under no_grad": no_grad(lambda: ig()),
    }
    if not full_set:
        for k in (f"tdfunc chunk_size={chunk_size}", "floor under no_grad", "tdfunc under no_grad"):
            variants.pop(k)
    notes = {
        "floor (torch.func)": f"reference: {n_steps} scaled copies folded into one batch, one `torch.func.vjp`, 10 `vjp_fn` calls (one-hot cotangents), weighted sum",
        "tdfunc": "`tdfunc.integrated_gradients(lambda t: cnn(t['x']), td)` (vmap over the path, one forward + 10 vjps)",
        "tdfunc strategy='fold'": "path folded into the batch dim instead of vmap",
        f"tdfunc chunk_size={chunk_size}": f"{n_steps // chunk_size} forwards of {chunk_size} path points",
        "captum (10 calls)": "captum 0.9.0 `IntegratedGradients(cnn).attribute(x, target=k)` for k in 0..9",
        "tdhook (10 calls)": "tdhook 0.3.0 `IntegratedGradients(multiply_by_inputs=True, init_attr_targets=<class k>)`, one call per class",
        "floor under no_grad": "the floor inside `torch.no_grad()` (outer autograd records nothing)",
        "tdfunc under no_grad": "tdfunc inside `torch.no_grad()`",
        "tdfunc, functional_call over tdfunc.state": "`f = lambda t: tdfunc.functional_call(cnn, tdfunc.state(cnn), (t['x'],))`: the idiomatic form; the detached state records no outer graph",
    }
    return variants, {k: v for k, v in notes.items() if k in variants}


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    cfg = QUICK if quick else FULL
    b = Bench(
        NAME,
        device=device,
        quick=quick,
        rounds=5,
        warmup=0,
        quick_rounds=2,
        quick_warmup=0,  # the correctness call warms every variant
        max_seconds_per_case=60.0,
        quick_max_seconds_per_case=4.0,
    )
    cnn = small_cnn(seed=0).to(device)
    x = images(cfg["batch"]).to(device)
    threads0 = torch.get_num_threads()
    cases = [(threads0, True)]
    extra = os.environ.get(EXTRA_THREADS_ENV)
    if extra and not quick and int(extra) != threads0:
        cases.append((int(extra), False))  # a second thread count, fewer variants (time budget)
    try:
        for threads, full_set in cases:
            torch.set_num_threads(threads)
            variants, notes = make_variants(cnn, x, cfg["n_steps"], cfg["chunk_size"], full_set=full_set)
            check_maps(b, {k: f() for k, f in variants.items()})
            b.time(
                f"SmallCNN B={cfg['batch']}, 10 classes, n_steps={cfg['n_steps']} ({threads} thread{'s' if threads > 1 else ''})",
                variants,
                reference="floor (torch.func)",
                also_vs=["captum (10 calls)", "tdhook (10 calls)"],
                params={**cfg, "classes": N_CLASSES, "method": METHOD, "threads": threads, "channels": (8, 16, 32)},
                notes=notes if full_set else None,
                number=1,
            )
    finally:
        torch.set_num_threads(threads0)
    return b.rows


if __name__ == "__main__":
    from bench.run import main

    raise SystemExit(main(["--only", NAME]))
