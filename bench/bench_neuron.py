"""Neuron methods: neuron conductance and neuron feature ablation, tdfunc vs captum, side by side.

Model: ``bench.bench_deep_lift``'s ``AvgPoolCNN`` (``SmallCNN``'s three 3x3 conv layers + ReLU, average pools,
linear head, 10 classes); batch 8 of standard-normal 3x32x32 images, target class 3, neurons of ``act2`` (the
second ReLU's output, 16x16x16).  All variants of a case are asserted equal (``atol = 1e-5 x max|A|``,
``rtol = 1e-4``) before timing.

Cases (reference: the captum call):

- ``NeuronConductance``, one neuron: ``tdfunc.neuron_conductance(f, td, cnn, "act2", (3, 4, 4), n_steps=50)``
  (one vmapped forward over the path, the site's gradient and the input gradient through the neuron as two
  vector-Jacobian products of it) vs ``captum.attr.NeuronConductance(cnn, cnn.act2).attribute(x, (3, 4, 4),
  target=3, n_steps=50, method="gausslegendre")``.
- ``NeuronConductance``, 8 neurons: tdfunc's list selector (one forward over the path, 1 + 8 products) vs
  8 captum calls.
- ``NeuronFeatureAblation``, 4x4 patches (64 features per image): ``tdfunc.feature_ablation(tdfunc.neuron(f,
  cnn, "act2", (3, 4, 4)), td, feature_mask=m)`` (every ablated input in one vmapped call) vs
  ``captum.attr.NeuronFeatureAblation(cnn, cnn.act2).attribute(x, (3, 4, 4), feature_mask=m)`` with its default
  ``perturbations_per_eval=1`` and with ``perturbations_per_eval=64``.

Run: ``python -m bench.run --only neuron --threads 1``.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from bench._models import images
from bench.bench_deep_lift import avgpool_cnn
from bench.bench_ig import check_maps
from bench.harness import Bench

NAME = "neuron"
TARGET = 3
UNIT = (3, 4, 4)
FULL = {"batch": 8, "n_steps": 50, "n_units": 8}
QUICK = {"batch": 2, "n_steps": 8, "n_units": 2}


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import captum.attr as ca

    import tdfunc

    cfg = QUICK if quick else FULL
    b = Bench(
        NAME,
        device=device,
        quick=quick,
        rounds=10,
        warmup=1,
        quick_rounds=2,
        quick_warmup=1,
        max_seconds_per_case=60.0,
        quick_max_seconds_per_case=3.0,
    )
    cnn = avgpool_cnn().to(device)
    for p in cnn.parameters():
        p.requires_grad_(False)  # captum's convention; tdfunc records no graph for the weights then
    n, steps = cfg["batch"], cfg["n_steps"]
    x = images(n).to(device)
    td = TensorDict(x=x, batch_size=[n])
    f1 = lambda t: cnn(t["x"])[..., TARGET]  # noqa: E731
    fx = lambda t: cnn(t["x"])  # noqa: E731
    threads = torch.get_num_threads()
    tag = f"AvgPoolCNN 3x32x32, batch {n}, target {TARGET} ({threads} thread{'s' if threads > 1 else ''})"

    def case(title, variants, notes, reference, **params):
        check_maps(b, {k: fn() for k, fn in variants.items()})
        b.time(f"{title}, {tag}", variants, reference=reference, params={**cfg, **params}, notes=notes)

    nc = ca.NeuronConductance(cnn, cnn.act2)
    case(
        f"NeuronConductance, one neuron, n_steps {steps}",
        {
            "captum NeuronConductance": lambda: nc.attribute(
                x, UNIT, target=TARGET, n_steps=steps, method="gausslegendre"
            ).detach(),
            "tdfunc.neuron_conductance": lambda: tdfunc.neuron_conductance(f1, td, cnn, "act2", UNIT, n_steps=steps)[
                "attr", "x"
            ],
        },
        {
            "captum NeuronConductance": "reference: `NeuronConductance(cnn, cnn.act2).attribute(x, (3, 4, 4), target=3)` (hooks; the path folded into the batch)",
            "tdfunc.neuron_conductance": "one vmapped forward over the path + 2 vjps (site gradient, input gradient through the neuron) + a capture forward",
        },
        "captum NeuronConductance",
    )

    units = [(c, 4 + c % 3, 4) for c in range(cfg["n_units"])]
    k = len(units)
    case(
        f"NeuronConductance, {k} neurons, n_steps {steps}",
        {
            f"captum NeuronConductance x {k}": lambda: torch.stack(
                [nc.attribute(x, u, target=TARGET, n_steps=steps, method="gausslegendre").detach() for u in units], 1
            ),
            f"tdfunc.neuron_conductance ({k} neurons)": lambda: tdfunc.neuron_conductance(
                f1, td, cnn, "act2", units, n_steps=steps
            )["attr", "x"],
        },
        {
            f"captum NeuronConductance x {k}": f"reference: {k} `attribute` calls, one per neuron",
            f"tdfunc.neuron_conductance ({k} neurons)": f"one call with a list of {k} selectors: one forward over the path + 1 + {k} vjps",
        },
        f"captum NeuronConductance x {k}",
    )

    mask = (torch.arange(32, device=device) // 4).view(32, 1) * 8 + (torch.arange(32, device=device) // 4).view(1, 32)
    mask = mask.expand(3, 32, 32)  # 64 patches of 4x4, shared by the channels
    na = ca.NeuronFeatureAblation(cnn, cnn.act2)
    g = tdfunc.neuron(fx, cnn, "act2", UNIT)
    case(
        "NeuronFeatureAblation, 64 patches of 4x4",
        {
            "captum NeuronFeatureAblation": lambda: na.attribute(x, UNIT, feature_mask=mask[None]).detach(),
            "captum NeuronFeatureAblation, perturbations_per_eval=64": lambda: na.attribute(
                x, UNIT, feature_mask=mask[None], perturbations_per_eval=64
            ).detach(),
            "tdfunc.feature_ablation(tdfunc.neuron(...))": lambda: tdfunc.feature_ablation(g, td, feature_mask=mask)[
                "attr", "x"
            ],
        },
        {
            "captum NeuronFeatureAblation": "reference: `NeuronFeatureAblation(cnn, cnn.act2).attribute(x, (3, 4, 4), feature_mask=m)` (a loop over the 64 features)",
            "captum NeuronFeatureAblation, perturbations_per_eval=64": "captum with every ablated input in one batch",
            "tdfunc.feature_ablation(tdfunc.neuron(...))": "every ablated input in one vmapped call of the neuron's f",
        },
        "captum NeuronFeatureAblation",
    )
    return b.rows


if __name__ == "__main__":
    from bench.run import main

    raise SystemExit(main(["--only", NAME]))
