"""LIME, feature permutation and layer feature ablation on ``SmallCNN``: tdfunc's vmapped calls vs captum.

``bench._models.SmallCNN`` (3x32x32 input, 10 classes), standard-normal images, target class 3. Every
pair is asserted equal (``atol = 1e-5 x max|A|``, ``rtol = 1e-4``; LIME's lasso: ``1e-3 x max|A|``, the
solvers' tolerances) before timing, on the same random draws:

- LIME (batch 4, 16 features = 8x8 patches over the channels, 100 samples, captum's defaults: lasso
  ``alpha=0.01``, cosine kernel of width 1): captum 0.9.0 ``Lime(cnn, perturb_func=<our samples>)``
  (one model per example, sklearn's ``Lasso``; 100 forwards of batch 1 per example) vs
  ``tdfunc.lime(..., samples=z)`` (one vmapped forward of the 100 x 4 perturbed images, one batched
  FISTA fit).
- Feature permutation (batch 16, the same 16 patches): captum ``FeaturePermutation(cnn,
  perm_func=<our permutations>)`` (16 forwards) vs ``tdfunc.feature_permutation(...,
  permutations=...)`` (one vmapped forward).
- Layer feature ablation (batch 8, site ``conv2``: its 16 channels as features, zero baseline): captum
  ``LayerFeatureAblation(cnn, cnn.conv2).attribute(x, target=3, layer_mask=...)`` (16 forwards) vs
  ``tdfunc.layer_feature_ablation(..., feature_mask=...)`` (one vmapped forward with the ablated values
  substituted at the site).

Run: ``python -m bench.run --only perturb_methods --threads 1``.
"""

from __future__ import annotations

import warnings

import torch
from tensordict import TensorDict

from bench._models import images, small_cnn
from bench.bench_ig import check_maps, no_grad
from bench.harness import Bench

NAME = "perturb_methods"
TARGET = 3
N_SAMPLES = 100


def _patches() -> torch.Tensor:
    """(1, 32, 32) ids of 8x8 patches, shared by the 3 channels: 16 features."""
    r = torch.arange(32) // 8
    return (r[:, None] * 4 + r[None, :])[None]


def _cycle(rows):
    """A captum perturbation function handing out ``rows`` in turn (again from the first after the last)."""
    state = {"i": 0}

    def take(*args, **kwargs):
        row = rows[state["i"] % len(rows)]
        state["i"] += 1
        return row

    return take


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    from captum._utils.models.linear_model import SkLearnLasso
    from captum.attr import FeaturePermutation, LayerFeatureAblation, Lime

    import tdfunc
    from tdfunc.attribution._feature_permutation import _draw_permutations
    from tdfunc.attribution._lime import _draw_samples

    b = Bench(
        NAME,
        device=device,
        quick=quick,
        rounds=15,
        warmup=1,
        quick_rounds=2,
        quick_warmup=1,
        max_seconds_per_case=60.0,
        quick_max_seconds_per_case=3.0,
    )
    cnn = small_cnn().to(device)
    mask = _patches().to(device)
    f = lambda t: cnn(t["x"])[..., TARGET]  # noqa: E731
    threads = torch.get_num_threads()
    th = f"{threads} thread{'s' if threads > 1 else ''}"

    # ---------------------------------------------------------------- LIME
    x = images(4).to(device)
    td = TensorDict(x=x, batch_size=[4])
    z = _draw_samples(N_SAMPLES, 16, torch.Generator().manual_seed(0)).to(device)

    def captum_lime():
        lime = Lime(cnn, interpretable_model=SkLearnLasso(alpha=0.01), perturb_func=_cycle([r[None].long() for r in z]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return lime.attribute(x, target=TARGET, feature_mask=mask[None], n_samples=N_SAMPLES).detach()

    td_lime = lambda: tdfunc.lime(f, td, feature_mask=mask, n_samples=N_SAMPLES, samples=z)["attr", "x"].detach()  # noqa: E731
    variants = {"captum Lime": captum_lime, "tdfunc.lime": td_lime, "tdfunc.lime under no_grad": no_grad(td_lime)}
    with torch.no_grad():
        outs = {k: fn() for k, fn in variants.items()}
    scale = max(float(v.abs().max()) for v in outs.values())
    b.check_equal(outs, atol=1e-3 * scale, rtol=1e-3)
    b.time(
        f"LIME, SmallCNN 3x32x32, batch 4, 16 patch features, {N_SAMPLES} samples, lasso alpha=0.01, target {TARGET} ({th})",
        variants,
        reference="captum Lime",
        params={"batch": 4, "n_features": 16, "n_samples": N_SAMPLES},
        number=1,
        notes={
            "captum Lime": "reference: captum 0.9.0 `Lime(cnn, SkLearnLasso(alpha=0.01))` given our samples: one sklearn fit and 100 forwards per example",
            "tdfunc.lime": "`tdfunc.lime(f, td, feature_mask=patches, samples=z)`: one vmapped forward of 100 x 4 images, one batched FISTA lasso fit",
            "tdfunc.lime under no_grad": "the same inside `torch.no_grad()`",
        },
    )

    # ---------------------------------------------------------------- feature permutation
    x = images(16).to(device)
    td = TensorDict(x=x, batch_size=[16])
    perms = _draw_permutations(16, 16, torch.Generator().manual_seed(0)).to(device)

    def captum_perm():
        take = _cycle(list(perms))
        fp = FeaturePermutation(cnn, perm_func=lambda v, m: v[take()] * m.to(v.dtype) + v * (~m).to(v.dtype))
        return fp.attribute(x, target=TARGET, feature_mask=mask[None]).detach()

    td_perm = lambda: tdfunc.feature_permutation(f, td, feature_mask=mask, permutations=perms)["attr", "x"].detach()  # noqa: E731
    variants = {
        "captum FeaturePermutation": captum_perm,
        "tdfunc.feature_permutation": td_perm,
        "tdfunc.feature_permutation under no_grad": no_grad(td_perm),
    }
    with torch.no_grad():
        check_maps(b, {k: fn() for k, fn in variants.items()})
    b.time(
        f"Feature permutation, SmallCNN 3x32x32, batch 16, 16 patch features, target {TARGET} ({th})",
        variants,
        reference="captum FeaturePermutation",
        params={"batch": 16, "n_features": 16},
        number=1,
        notes={
            "captum FeaturePermutation": "reference: captum 0.9.0 `FeaturePermutation(cnn)` with our permutations: 16 forwards of batch 16",
            "tdfunc.feature_permutation": "one vmapped forward of 16 x 16 images",
            "tdfunc.feature_permutation under no_grad": "the same inside `torch.no_grad()`",
        },
    )

    # ---------------------------------------------------------------- layer feature ablation
    x = images(8).to(device)
    td = TensorDict(x=x, batch_size=[8])
    channels = torch.arange(16, device=device).view(1, 16, 1, 1)
    lfa = LayerFeatureAblation(cnn, cnn.conv2)
    captum_lfa = lambda: lfa.attribute(x, target=TARGET, layer_mask=channels).detach()  # noqa: E731
    td_lfa = lambda: tdfunc.layer_feature_ablation(f, td, cnn, "conv2", feature_mask=channels)["attr", "conv2"].detach()  # noqa: E731
    variants = {
        "captum LayerFeatureAblation": captum_lfa,
        "tdfunc.layer_feature_ablation": td_lfa,
        "tdfunc.layer_feature_ablation under no_grad": no_grad(td_lfa),
    }
    with torch.no_grad():
        check_maps(b, {k: fn() for k, fn in variants.items()})
    b.time(
        f"Layer feature ablation, SmallCNN, site conv2 (16 channels as features), batch 8, target {TARGET} ({th})",
        variants,
        reference="captum LayerFeatureAblation",
        params={"batch": 8, "n_features": 16},
        number=1,
        notes={
            "captum LayerFeatureAblation": "reference: captum 0.9.0 `LayerFeatureAblation(cnn, cnn.conv2)` with a channel mask: 16 forwards of batch 8",
            "tdfunc.layer_feature_ablation": "one vmapped forward of 16 x 8 images with the ablated values substituted at `conv2`",
            "tdfunc.layer_feature_ablation under no_grad": "the same inside `torch.no_grad()`",
        },
    )
    return b.rows


if __name__ == "__main__":
    from bench.run import main

    raise SystemExit(main(["--only", NAME]))
