"""Composition-table rows for DeepLift and DeepLiftShap (the rescale rule as a recorded rewrite) and GradientShap.

``f`` sees the inputs and their baselines stacked along the batch dim, so per-example data (a label) is
put in the td, not closed over.
"""

from __future__ import annotations

import torch
from compose_case import B, Case
from models import CNN, MLP
from tensordict import TensorDict

import tdfunc


def cases() -> list[Case]:
    torch.manual_seed(0)
    dt = torch.float64
    mlp = MLP().to(dt)
    s_mlp = tdfunc.state(mlp)
    x6 = torch.randn(B, 6, dtype=dt)
    base6 = 0.3 * torch.randn(B, 6, dtype=dt)
    labels = torch.tensor([2, 0, 1])
    rows = []

    def dl_k_baseline(x, base):  # every class; input and baseline vmapped; the gap to completeness appended
        td = TensorDict({"x": x[None], ("baseline", "x"): base[None]}, batch_size=[1])
        out = tdfunc.deep_lift(
            lambda t: tdfunc.functional_call(mlp, s_mlp, (t["x"],)), td, mlp, return_convergence_delta=True
        )
        return torch.cat([out["attr", "x"].flatten(), out["convergence_delta"].flatten()])

    rows.append(Case("deeplift:mlp-K-baseline", mlp, dl_k_baseline, (x6, base6), (0, 0), (0, 1), "fc1", probe=x6))

    def dl_label_weights(x, label, weight):  # one target per example from a label in td; d(map)/d(weight)
        state = s_mlp.update({("fc2", "weight"): weight}, inplace=False)
        td = TensorDict({"x": x[None], "label": label.view(1, 1)}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(mlp, state, (t["x"],)).gather(-1, t["label"])[:, 0]
        return tdfunc.deep_lift(f, td, mlp)["attr", "x"][0]

    rows.append(
        Case(
            "deeplift:mlp-label-weights",
            mlp,
            dl_label_weights,
            (x6, labels, s_mlp["fc2", "weight"].clone()),
            (0, 0, None),
            (0, 2),
            "fc2",
            probe=x6,
        )
    )

    def dl_reveal_cancel(x, base, weight):  # the reveal-cancel rule: every class, baseline vmapped; d(map)/d(weight)
        state = s_mlp.update({("fc2", "weight"): weight}, inplace=False)
        td = TensorDict({"x": x[None], ("baseline", "x"): base[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(mlp, state, (t["x"],))
        out = tdfunc.deep_lift(f, td, mlp, rule="reveal_cancel", return_convergence_delta=True)
        return torch.cat([out["attr", "x"].flatten(), out["convergence_delta"].flatten()])

    rows.append(
        Case(
            "deeplift:reveal-cancel-K-weights",
            mlp,
            dl_reveal_cancel,
            (x6, base6, s_mlp["fc2", "weight"].clone()),
            (0, 0, None),
            (0, 2),
            "fc2",
            probe=x6,
        )
    )

    cnn = CNN(c=2, n_cls=3).to(dt).eval()
    s_cnn = tdfunc.state(cnn)
    img = torch.randn(B, 1, 4, 4, dtype=dt)

    def dl_cnn(x):  # conv + eval BatchNorm + in-place ReLU called twice + average pooling, every class
        td = TensorDict({"img": x[None]}, batch_size=[1])
        return tdfunc.deep_lift(lambda t: tdfunc.functional_call(cnn, s_cnn, (t["img"],)), td, cnn)[
            "attr", "img"
        ].flatten()

    rows.append(Case("deeplift:cnn-K", cnn, dl_cnn, (img,), (0,), (0,), "conv2", probe=img))

    refs = torch.randn(4, 6, dtype=dt)

    def dls_refs(x, r):  # a distribution of 4 baselines, shared by the examples (not vmapped), differentiated
        td = TensorDict({"x": x[None]}, batch_size=[1])
        out = tdfunc.deep_lift_shap(
            lambda t: tdfunc.functional_call(mlp, s_mlp, (t["x"],)), td, mlp, TensorDict({"x": r}, batch_size=[4])
        )
        return out["attr", "x"].flatten()

    rows.append(Case("deepliftshap:mlp-K", mlp, dls_refs, (x6, refs), (0, None), (0, 1), "fc1", probe=x6))

    def ldl_site(x, base, weight):  # layer DeepLift at an activation's input, every class; d(map)/d(weight)
        state = s_mlp.update({("fc1", "weight"): weight}, inplace=False)
        td = TensorDict({"x": x[None], ("baseline", "x"): base[None]}, batch_size=[1])
        out = tdfunc.layer_deep_lift(
            lambda t: tdfunc.functional_call(mlp, state, (t["x"],)),
            td,
            mlp,
            "act2:input",
            return_convergence_delta=True,
        )
        return torch.cat([out["attr", "act2:input"].flatten(), out["convergence_delta"].flatten()])

    rows.append(
        Case(
            "deeplift:layer-input-K-weights",
            mlp,
            ldl_site,
            (x6, base6, s_mlp["fc1", "weight"].clone()),
            (0, 0, None),
            (0, 2),
            "fc2",
            probe=x6,
        )
    )

    S = 3
    eps = torch.randn(B, S, 1, 6, dtype=dt)  # samples drawn outside (see cases_noise_guided.py), vmapped with x
    alphas = torch.rand(B, S, 1, dtype=dt)
    index = torch.randint(4, (B, S, 1))

    def gshap(x, r, e, a, i):  # every class; noise, path positions and baseline draws passed in as data
        td = TensorDict({"x": x[None]}, batch_size=[1])
        out = tdfunc.gradient_shap(
            lambda t: tdfunc.functional_call(mlp, s_mlp, (t["x"],)),
            td,
            TensorDict({"x": r}, batch_size=[4]),
            n_samples=S,
            stdevs=0.3,
            noise=e,
            alphas=a,
            baseline_index=i,
            chunk_size=2,
        )
        return out["attr", "x"].flatten()

    rows.append(
        Case(
            "gradientshap:mlp-K",
            mlp,
            gshap,
            (x6, refs, eps, alphas, index),
            (0, None, 0, 0, 0),
            (0, 1, 3),
            "fc2",
            probe=x6,
        )
    )

    def layer_gshap(x, r, e, a, i):  # layer GradientShap at an activation, every class, pre-drawn samples
        td = TensorDict({"x": x[None]}, batch_size=[1])
        out = tdfunc.layer_gradient_shap(
            lambda t: tdfunc.functional_call(mlp, s_mlp, (t["x"],)),
            td,
            mlp,
            "act",
            TensorDict({"x": r}, batch_size=[4]),
            n_samples=S,
            stdevs=0.3,
            noise=e,
            alphas=a,
            baseline_index=i,
        )
        return out["attr", "act"].flatten()

    rows.append(
        Case(
            "gradientshap:layer-K",
            mlp,
            layer_gshap,
            (x6, refs, eps, alphas, index),
            (0, None, 0, 0, 0),
            (0, 1, 3),
            "fc2",
            probe=x6,
        )
    )
    return rows
