"""LRP ε-plus on the tdhook paper's deep ReLU MLP: tdfunc vs zennit 0.5.1 vs tdhook 0.3.0.

Model: ``bench.bench_ig_paper.ReluMLP`` (10 x ``Linear(1000, 1000)`` + ReLU, also after the last
layer), input ``randn(batch, 1000)``, one target class (unit 4). The output relevance is
``f_4(x)`` (zennit's ``attr_output = output * one-hot``). The ε-plus composite puts z⁺ on
``nn.Conv2d`` and ε (1e-6) on ``nn.Linear``; this model has only linear layers, so every layer
gets ε and the ReLUs pass relevance through. All variants are asserted equal (``atol = 1e-4 x
max|R|``, ``rtol = 1e-4``: float32 keeps each ~3e-4 x max|R| from the float64 relevance) before timing.

**Batch:** the paper uses 1000; this benchmark uses **batch 512** (``--quick``: 32) so one call
of the slowest variant stays within ~1-3 s on the 2-core CI machine with one thread. The work is
dense 1000x1000 GEMMs at every size, so the ratios carry over; absolute times scale ~linearly.

Variants (reference: ``zennit``):

- ``tdfunc``: ``tdfunc.lrp(lambda t: mlp(t['x'])[..., 4], td, mlp, composite='epsilon_plus')``:
  by design two forwards (the first records ``z`` and the ratios, the second applies the
  value-preserving rewrite) and one vjp, so the relevance is exactly differentiable.
- ``tdfunc under no_grad``: the same inside ``torch.no_grad()``, where nothing can differentiate
  the result: one forward (the constants detached from it) and one vjp, as zennit and tdhook.
- ``zennit``: ``zennit.attribution.Gradient(mlp, EpsilonPlus())`` entered per call (hooks
  registered and removed each call), ``attr_output = output * one-hot``.
- ``tdhook``: ``LRP(rule_mapper=EpsilonPlus(), init_attr_targets=<unit 4>, init_attr_grads=
  <target value>)``, ``prepare(mlp)`` once, its context entered per call.
- ``floor: x * grad``: one forward + one backward of the plain model, ``x * ∂f_4/∂x`` (for ε = 0
  and no bias this *is* LRP-0; a lower bound for any single-backward LRP).
- ``forward (no_grad)``: one plain forward, for scale.

Run: ``python -m bench.run --only lrp --threads 1``.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch
from tensordict import TensorDict

from bench.bench_ig import no_grad
from bench.bench_ig_paper import ReluMLP
from bench.harness import Bench

NAME = "lrp"
TARGET = 4
FULL = {"batch": 512, "width": 1000, "height": 10}
QUICK = {"batch": 32, "width": 1000, "height": 10}
PAPER_BATCH = 1000


def import_zennit():
    """Import zennit 0.5.1 (installed ``--no-deps``) behind a stub ``torchvision`` (as tests/test_lrp.py)."""
    root = Path(tempfile.mkdtemp(prefix="tdfunc-bench-stub-"))
    tv = root / "torchvision"
    (tv / "models").mkdir(parents=True)
    (tv / "ops").mkdir()
    (tv / "__init__.py").write_text("")
    (tv / "models" / "__init__.py").write_text("")
    (tv / "models" / "resnet.py").write_text("class BasicBlock: pass\nclass Bottleneck: pass\n")
    (tv / "ops" / "__init__.py").write_text("class FrozenBatchNorm2d: pass\n")
    had = "torchvision" in sys.modules
    sys.path.insert(0, str(root))
    try:
        import zennit
        import zennit.attribution
        import zennit.composites
    finally:
        sys.path.remove(str(root))
        if not had:
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                del sys.modules[name]
    return zennit


def zennit_lrp(mlp, x, target):
    z = import_zennit()

    def call():
        with z.attribution.Gradient(model=mlp, composite=z.composites.EpsilonPlus()) as attributor:
            _, rel = attributor(x, lambda o: o * (torch.arange(o.shape[-1], device=o.device) == target).to(o.dtype))
        return rel.detach()

    return call


def tdhook_lrp(mlp, x, target):
    from tdhook.attribution.lrp import LRP
    from tdhook.attribution.lrp_helpers.rules import EpsilonPlus

    def select(out, _extra):
        return TensorDict(output=out["output"][..., target], batch_size=out.batch_size)

    ctx = LRP(
        rule_mapper=EpsilonPlus(),
        init_attr_targets=select,
        init_attr_grads=lambda targets, _extra: targets.detach(),  # output relevance f_k(x), as zennit / tdfunc
        skip_modules=LRP.default_skip,
    ).prepare(mlp)
    inp = TensorDict(input=x, batch_size=[x.shape[0]])

    def call():
        with ctx as hooked:
            return hooked(inp.clone(False))["attr", "input"].detach()

    return call


def floor_grad(mlp, x, target):
    def call():
        xi = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(mlp(xi)[..., target].sum(), xi)
        return (xi * g).detach()

    return call


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import tdfunc

    cfg = QUICK if quick else FULL
    b = Bench(
        NAME,
        device=device,
        quick=quick,
        rounds=10,
        warmup=1,
        quick_rounds=3,
        quick_warmup=1,
        max_seconds_per_case=60.0,
        quick_max_seconds_per_case=3.0,
    )
    torch.manual_seed(42)
    mlp = ReluMLP(cfg["height"], cfg["width"]).eval().to(device)
    x = torch.randn(cfg["batch"], cfg["width"], device=device)
    td = TensorDict(x=x, batch_size=[cfg["batch"]])
    f = lambda t: mlp(t["x"])[..., TARGET]  # noqa: E731
    lrp = lambda: tdfunc.lrp(f, td, mlp, composite="epsilon_plus")["attr", "x"].detach()  # noqa: E731
    # zennit / tdhook / plain baselines on copies tdfunc never touched (same weights)
    m_z, m_h, m_p = (copy.deepcopy(mlp) for _ in range(3))

    variants = {
        "zennit": zennit_lrp(m_z, x, TARGET),
        "tdfunc": lrp,
        "tdfunc under no_grad": no_grad(lrp),
        "tdhook": tdhook_lrp(m_h, x, TARGET),
        "floor: x * grad": floor_grad(m_p, x, TARGET),
    }
    notes = {
        "zennit": "reference: zennit 0.5.1 `Gradient(mlp, EpsilonPlus())` per call, `attr_output = output * one-hot(4)`",
        "tdfunc": "`tdfunc.lrp(lambda t: mlp(t['x'])[..., 4], td, mlp, composite='epsilon_plus')`: 2 forwards + 1 vjp",
        "tdfunc under no_grad": "tdfunc inside `torch.no_grad()`: nothing can differentiate the result, so 1 forward + 1 vjp (the constants detached from the same forward)",
        "tdhook": "tdhook 0.3.0 `LRP(rule_mapper=EpsilonPlus(), init_attr_targets=<unit 4>, init_attr_grads=<its value>)`",
        "floor: x * grad": "plain model, 1 forward + 1 backward, `x * ∂f_4/∂x` (not LRP-ε; a lower bound)",
        "forward (no_grad)": "one plain forward under `torch.no_grad()`",
    }
    outs = {k: fn() for k, fn in variants.items() if not k.startswith("floor")}
    # float32 through 10 layers of width 1000: every variant is ~3e-4 x max|R| from the float64 relevance, and
    # orders of summation differ (zennit and two-pass tdfunc agree to 5e-11, the one-pass path under no_grad is
    # 3.8e-9 from them, as close to float64 as they are), so maps are equal to 1e-4 x max|R|
    scale = max(float(v.abs().max()) for v in outs.values())
    b.check_equal(outs, atol=1e-4 * scale, rtol=1e-4)
    fwd = m_p

    def forward():
        with torch.no_grad():
            return fwd(x)

    variants["forward (no_grad)"] = forward
    threads = torch.get_num_threads()
    b.time(
        f"LRP ε-plus, ReLU MLP 10x1000, batch {cfg['batch']} (paper: {PAPER_BATCH}), target {TARGET} "
        f"({threads} thread{'s' if threads > 1 else ''})",
        variants,
        reference="zennit",
        also_vs=["tdhook", "floor: x * grad"],
        params={**cfg, "target": TARGET, "composite": "epsilon_plus", "paper_batch": PAPER_BATCH},
        notes=notes,
        number=1,
    )
    return b.rows


if __name__ == "__main__":
    from bench.run import main

    raise SystemExit(main(["--only", NAME]))
