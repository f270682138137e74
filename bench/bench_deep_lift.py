"""DeepLift, DeepLiftShap, GradientShap, Deconvolution and GuidedGradCam: tdfunc vs captum, side by side.

Model: ``bench._models.SmallCNN``'s weights (three 3x3 conv layers + ReLU, linear head, 10 classes) with
one ``nn.ReLU`` per layer (captum's DeepLift refuses a reused module) and its 2x2 max-pools replaced by
2x2 average pools (``nn.AvgPool2d``): DeepLift's rescale rule covers elementwise activations, and tdfunc
refuses a max pool rather than apply captum's special rule.
Batch 8 of standard-normal 3x32x32 images, target class 3; all variants of a case are asserted
equal (``atol = 1e-5 x max|A|``, ``rtol = 1e-4``) before timing.

Cases (reference: the captum call):

- ``deep_lift``: ``tdfunc.deep_lift`` (inputs and zero baselines in one 2B-row forward, recorded
  multipliers) vs ``captum.attr.DeepLift(cnn).attribute(x, 0 * x, target=3)``; and all 10 classes
  (tdfunc: one call, f returns every logit; captum: 10 calls).
- ``deep_lift_shap``: 4 baselines; ``tdfunc.deep_lift_shap`` vs ``captum.attr.DeepLiftShap``.
- ``gradient_shap``: 16 samples, 4 baselines, ``stdevs=0.1``; captum's draws (numpy / torch,
  seeded before every call) replayed into tdfunc as ``noise`` / ``alphas`` / ``baseline_index``.
- ``deconvolution`` and ``guided_grad_cam`` (at ``conv3``): vs ``captum.attr.Deconvolution`` /
  ``GuidedGradCam``.

Run: ``python -m bench.run --only deep_lift --threads 1``.
"""

from __future__ import annotations

import numpy as np
import torch
from tensordict import TensorDict
from torch import nn

from bench._models import images, small_cnn
from bench.bench_ig import check_maps, no_grad
from bench.harness import Bench

NAME = "deep_lift"
TARGET = 3
FULL = {"batch": 8, "n_baselines": 4, "gs_samples": 16}
QUICK = {"batch": 4, "n_baselines": 2, "gs_samples": 4}


class AvgPoolCNN(nn.Module):
    """``SmallCNN``'s layers and weights with one ReLU module per layer (captum's DeepLift refuses a reused
    module) and 2x2 average pools instead of max pools."""

    def __init__(self):
        super().__init__()
        src = small_cnn()
        self.conv1, self.conv2, self.conv3, self.head = src.conv1, src.conv2, src.conv3, src.head
        self.act1, self.act2, self.act3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act1(self.conv1(x)))
        x = self.pool(self.act2(self.conv2(x)))
        x = self.pool(self.act3(self.conv3(x)))
        return self.head(x.flatten(1))


def avgpool_cnn():
    return AvgPoolCNN().eval()


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import captum.attr as ca

    import tdfunc

    cfg = QUICK if quick else FULL
    b = Bench(
        NAME,
        device=device,
        quick=quick,
        rounds=20,
        warmup=2,
        quick_rounds=3,
        quick_warmup=1,
        max_seconds_per_case=40.0,
        quick_max_seconds_per_case=3.0,
    )
    cnn = avgpool_cnn().to(device)
    for p in cnn.parameters():
        p.requires_grad_(False)  # captum's convention; tdfunc records no graph for the weights then
    n = cfg["batch"]
    x = images(n).to(device)
    refs = images(cfg["n_baselines"], seed=2).to(device)
    td = TensorDict(x=x, batch_size=[n])
    f1 = lambda t: cnn(t["x"])[..., TARGET]  # noqa: E731
    fk = lambda t: cnn(t["x"])  # noqa: E731
    threads = torch.get_num_threads()
    tag = f"SmallCNN (avg-pool) 3x32x32, batch {n}, target {TARGET} ({threads} thread{'s' if threads > 1 else ''})"

    def case(title, variants, notes, reference, number=1, **params):
        check_maps(b, {k: fn() for k, fn in variants.items()})
        b.time(f"{title}, {tag}", variants, reference=reference, params={**cfg, **params}, notes=notes, number=number)

    dl = ca.DeepLift(cnn)
    case(
        "DeepLift",
        {
            "captum DeepLift": lambda: dl.attribute(x, 0 * x, target=TARGET).detach(),
            "tdfunc.deep_lift": lambda: tdfunc.deep_lift(f1, td, cnn)["attr", "x"],
            "tdfunc.deep_lift under no_grad": no_grad(lambda: tdfunc.deep_lift(f1, td, cnn)["attr", "x"]),
        },
        {
            "captum DeepLift": "reference: `DeepLift(cnn).attribute(x, 0 * x, target=3)` (hooks; input and baseline in one 2B batch)",
            "tdfunc.deep_lift": "`tdfunc.deep_lift(f, td, cnn)`: a recording forward + a rewritten forward over 2B rows + 1 vjp",
            "tdfunc.deep_lift under no_grad": "the same inside `torch.no_grad()`: one forward records and rewrites",
        },
        "captum DeepLift",
    )

    case(
        "DeepLift, all 10 classes",
        {
            "captum DeepLift x 10 targets": lambda: torch.stack(
                [dl.attribute(x, 0 * x, target=k).detach() for k in range(10)], 1
            ),
            "tdfunc.deep_lift (K=10)": lambda: tdfunc.deep_lift(fk, td, cnn)["attr", "x"],
        },
        {
            "captum DeepLift x 10 targets": "reference: 10 `attribute` calls, one per class",
            "tdfunc.deep_lift (K=10)": "one call, f returns every logit: the same forwards + 10 vjps",
        },
        "captum DeepLift x 10 targets",
    )

    dls = ca.DeepLiftShap(cnn)
    rtd = TensorDict(x=refs, batch_size=[cfg["n_baselines"]])
    case(
        f"DeepLiftShap, {cfg['n_baselines']} baselines",
        {
            "captum DeepLiftShap": lambda: dls.attribute(x, refs, target=TARGET).detach(),
            "tdfunc.deep_lift_shap": lambda: tdfunc.deep_lift_shap(f1, td, cnn, rtd)["attr", "x"],
        },
        {
            "captum DeepLiftShap": "reference: `DeepLiftShap(cnn).attribute(x, refs, target=3)`",
            "tdfunc.deep_lift_shap": "`tdfunc.deep_lift_shap(f, td, cnn, refs)`: one 2NB-row rewritten forward",
        },
        "captum DeepLiftShap",
    )

    s, std = cfg["gs_samples"], 0.1
    gs = ca.GradientShap(cnn)

    def draws():  # captum's order: baseline indices (numpy), noise (torch, float32), alphas (numpy)
        np.random.seed(0)
        torch.manual_seed(0)
        idx = np.random.choice(len(refs), s * n)
        noise = torch.normal(0, torch.tensor(std).repeat(s * n, *x.shape[1:])).to(device)
        al = np.random.uniform(0, 1, s * n)
        to = lambda a: torch.as_tensor(a).reshape(n, s, *torch.as_tensor(a).shape[1:]).transpose(0, 1)  # noqa: E731
        return to(noise) / std, to(al).to(x), to(idx).to(device)

    eps, alphas, index = draws()

    def captum_gs():
        np.random.seed(0)
        torch.manual_seed(0)
        return gs.attribute(x, refs, n_samples=s, stdevs=std, target=TARGET).detach()

    case(
        f"GradientShap, {s} samples, {cfg['n_baselines']} baselines",
        {
            "captum GradientShap": captum_gs,
            "tdfunc.gradient_shap": lambda: tdfunc.gradient_shap(
                f1, td, rtd, n_samples=s, stdevs=std, noise=eps, alphas=alphas, baseline_index=index
            )["attr", "x"],
        },
        {
            "captum GradientShap": "reference: `GradientShap(cnn).attribute(x, refs, n_samples=16, stdevs=0.1, target=3)` (seeded)",
            "tdfunc.gradient_shap": "the same draws passed as noise / alphas / baseline_index; one vmapped forward over the samples",
        },
        "captum GradientShap",
    )

    dc = ca.Deconvolution(cnn)
    case(
        "Deconvolution",
        {
            "captum Deconvolution": lambda: dc.attribute(x, target=TARGET).detach(),
            "tdfunc.deconvolution": lambda: tdfunc.deconvolution(f1, td, cnn)["attr", "x"],
        },
        {
            "captum Deconvolution": "reference: `Deconvolution(cnn).attribute(x, target=3)` (backward hooks)",
            "tdfunc.deconvolution": "`tdfunc.deconvolution(f, td, cnn)`: recording forward + rewritten forward + 1 vjp",
        },
        "captum Deconvolution",
    )

    ggc = ca.GuidedGradCam(cnn, cnn.conv3)
    case(
        "GuidedGradCam at conv3",
        {
            "captum GuidedGradCam": lambda: ggc.attribute(x, target=TARGET).detach(),
            "tdfunc.guided_grad_cam": lambda: tdfunc.guided_grad_cam(f1, td, cnn, "conv3")["attr", "x"],
        },
        {
            "captum GuidedGradCam": "reference: `GuidedGradCam(cnn, cnn.conv3).attribute(x, target=3)`",
            "tdfunc.guided_grad_cam": "`tdfunc.guided_grad_cam(f, td, cnn, 'conv3')`",
        },
        "captum GuidedGradCam",
    )
    return b.rows


if __name__ == "__main__":
    from bench.run import main

    raise SystemExit(main(["--only", NAME]))
