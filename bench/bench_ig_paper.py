"""The tdhook paper's integrated-gradients task: a deep ReLU MLP, targets 4 and 7.

tdhook's benchmark (``scripts/bench/tasks/integrated_gradients`` in Xmaster6y/tdhook): an MLP of
10 ``Linear(1000, 1000)`` layers, each followed by ReLU (also the last), input ``randn(batch,
1000)``, zero baseline, ``n_steps=50`` Gauss–Legendre, ``multiply_by_inputs=True``, targets: output
units 4 and 7. Here each target gets its own map (``(batch, 2, 1000)``); all variants are
asserted equal before timing.

**Scaled down:** the paper uses batch 1000. One IG call then pushes 50,000 rows through ten
1000x1000 layers (1 TFLOP forward); on the 2-core CI machine that is about a minute per call and
variant, so this benchmark uses **batch 16** (``--quick``: batch 4, ``n_steps=8``). The work is
dense GEMMs either way (800 rows per layer here), so the ratios carry over; only the absolute
times scale (~linearly in the batch).

Variants: ``floor (torch.func)`` (reference; path folded into one batch, one vjp, one
``vjp_fn`` call per target), ``tdfunc`` (``f = lambda t: mlp(t['x'])[..., [4, 7]]``, one
forward + 2 vjps), ``captum (2 calls)`` and ``tdhook (2 calls)`` (one call per target; tdhook
with ``multiply_by_inputs=True``), and tdfunc under ``torch.no_grad()``. 5 interleaved rounds.

Run: ``python -m bench.run --only ig_paper --threads 1``.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import nn

from bench.bench_ig import METHOD, captum_ig, check_maps, floor_ig, no_grad, tdhook_ig
from bench.harness import Bench

NAME = "ig_paper"
TARGETS = (4, 7)
FULL = {"batch": 16, "n_steps": 50, "width": 1000, "height": 10}
QUICK = {"batch": 4, "n_steps": 8, "width": 1000, "height": 10}
PAPER_BATCH = 1000


class ReluMLP(nn.Module):
    """tdhook's benchmark MLP: ``height`` x (Linear(width, width), ReLU)."""

    def __init__(self, height: int = 10, width: int = 1000):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(height))
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.activation(layer(x))
        return x


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import tdfunc

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
        quick_max_seconds_per_case=3.0,
    )
    torch.manual_seed(42)
    mlp = ReluMLP(cfg["height"], cfg["width"]).eval().to(device)
    x = torch.randn(cfg["batch"], cfg["width"], device=device)
    n, targets = cfg["n_steps"], list(TARGETS)
    td = TensorDict(x=x, batch_size=[cfg["batch"]])
    f = lambda t: mlp(t["x"])[..., targets]  # noqa: E731
    ig = lambda **kw: tdfunc.integrated_gradients(f, td, n_steps=n, method=METHOD, **kw)["attr", "x"].detach()  # noqa: E731

    variants = {
        "floor (torch.func)": lambda: floor_ig(mlp, x, targets, n).detach(),
        "tdfunc": lambda: ig(),
        "captum (2 calls)": captum_ig(mlp, x, targets, n),
        "tdhook (2 calls)": tdhook_ig(mlp, x, targets, n),
        "tdfunc under no_grad": no_grad(lambda: ig()),
    }
    notes = {
        "floor (torch.func)": f"reference: {n} scaled copies folded into one batch, one `torch.func.vjp`, one `vjp_fn` call per target",
        "tdfunc": "`tdfunc.integrated_gradients(lambda t: mlp(t['x'])[..., [4, 7]], td)`: one path forward + 2 vjps",
        "captum (2 calls)": "captum 0.9.0 `IntegratedGradients(mlp).attribute(x, target=k)`, k = 4, 7",
        "tdhook (2 calls)": "tdhook 0.3.0 `IntegratedGradients(multiply_by_inputs=True, init_attr_targets=<unit k>)`, k = 4, 7",
        "tdfunc under no_grad": "tdfunc inside `torch.no_grad()`",
    }
    check_maps(b, {k: fn() for k, fn in variants.items()})
    b.time(
        f"ReLU MLP 10x1000, batch {cfg['batch']} (paper: {PAPER_BATCH}), targets 4 & 7, n_steps={n} "
        f"({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})",
        variants,
        reference="floor (torch.func)",
        also_vs=["captum (2 calls)", "tdhook (2 calls)"],
        params={**cfg, "targets": targets, "method": METHOD, "paper_batch": PAPER_BATCH},
        notes=notes,
        number=1,
    )
    return b.rows


if __name__ == "__main__":
    from bench.run import main

    raise SystemExit(main(["--only", NAME]))
