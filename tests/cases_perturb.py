"""Composition-table rows for perturbation attribution (occlusion, feature ablation, Shapley sampling).

Each row is a function of one example (returning a flat tensor) on a float64 model: vmapped over
examples (inputs, baselines), over targets (one-hot target weights closed over by ``f``) and over
parameters; the attribution is differentiable in the input (``where(mask, baseline, x)``) and in
the parameters, so gradcheck / gradgradcheck run through the vmapped perturbation forward.
Shapley rows pass fixed ``permutations`` (a random draw is not allowed under ``vmap``'s default
randomness mode, nor a generator created inside a compiled region).
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
    rows = []

    cnn = CNN(c=2, n_cls=3).to(dt).eval()
    img = torch.randn(B, 1, 4, 4, dtype=dt)

    def occlusion_cnn_k(x):  # every class; 2x2 windows with stride (1, 1, 2): overlapping rows
        td = TensorDict({"x": x[None]}, batch_size=[1])
        out = tdfunc.occlusion(lambda t: cnn(t["x"]), td, sliding_window_shapes=(1, 2, 2), strides=(1, 1, 2))
        return out["attr", "x"].flatten()

    rows.append(Case("perturb:occlusion-cnn-K", cnn, occlusion_cnn_k, (img,), (0,), (0,), "conv1", probe=img))

    def occlusion_keep_window(x):  # keep_window (zennit's Occlusion): overlapping windows kept, the rest at 0
        td = TensorDict({"x": x[None]}, batch_size=[1])
        kw = dict(sliding_window_shapes=(1, 2, 2), strides=(1, 1, 2), keep_window=True)
        return tdfunc.occlusion(lambda t: cnn(t["x"]), td, **kw)["attr", "x"].flatten()

    rows.append(
        Case("perturb:occlusion-keep-window", cnn, occlusion_keep_window, (img,), (0,), (0,), "conv1", probe=img)
    )

    mlp = MLP().to(dt)
    s_mlp = tdfunc.state(mlp)
    net = lambda x: tdfunc.functional_call(mlp, s_mlp, (x,))
    x6 = torch.randn(B, 6, dtype=dt)
    base6 = 0.1 * torch.randn(B, 6, dtype=dt)
    onehot = torch.eye(3, dtype=dt)

    def occlusion_baseline(x, b):  # one target, a baseline vmapped with the input, empty batch shape
        td = TensorDict({"x": x, ("baseline", "x"): b}, batch_size=[])
        return tdfunc.occlusion(lambda t: net(t["x"])[1], td, sliding_window_shapes=(3,), strides=2)["attr", "x"]

    rows.append(
        Case("perturb:occlusion-baseline", mlp, occlusion_baseline, (x6, base6), (0, 0), (0, 1), "fc1", probe=x6)
    )

    def ablation_targets(x, w):  # vmap over targets; default mask (one feature per scalar), 2 chunks
        td = TensorDict({"x": x[None]}, batch_size=[1])
        return tdfunc.feature_ablation(lambda t: net(t["x"]) @ w, td, chunk_size=4)["attr", "x"][0]

    rows.append(
        Case(
            "perturb:feature-ablation-targets",
            mlp,
            ablation_targets,
            (x6[0], onehot),
            (None, 0),
            (0, 1),
            "act",
            probe=x6,
        )
    )

    w_fc1 = s_mlp["fc1", "weight"]

    def ablation_weights(x, weight):  # d(attribution)/d(parameters); vmap over ensembles
        state = TensorDict({("fc1", "weight"): weight})
        td = TensorDict({"x": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(mlp, state, (t["x"],))
        return tdfunc.feature_ablation(f, td)["attr", "x"].flatten()

    weights = w_fc1 + 0.1 * torch.randn(B, *w_fc1.shape, dtype=dt)
    rows.append(
        Case(
            "perturb:feature-ablation-weights",
            mlp,
            ablation_weights,
            (x6[2], weights),
            (None, 0),
            (1,),
            "fc2",
            probe=x6,
        )
    )

    perms = torch.stack([torch.randperm(6) for _ in range(2)])

    def shapley_k(x, b):  # every class, fixed permutations, a vmapped baseline, 3 chunks
        td = TensorDict({"x": x[None], ("baseline", "x"): b[None]}, batch_size=[1])
        out = tdfunc.shapley_value_sampling(lambda t: net(t["x"]), td, n_samples=2, permutations=perms, chunk_size=5)
        return out["attr", "x"].flatten()

    rows.append(Case("perturb:shapley-K", mlp, shapley_k, (x6, base6), (0, 0), (0, 1), "head", probe=x6))

    coalitions = torch.tensor([[1] * 6, [0] * 6, [1, 0, 1, 0, 1, 0], [0, 1, 1, 0, 0, 1], [1, 1, 0, 0, 1, 0]])

    def kernel_shap_k(x, b):  # every class, fixed coalitions, a vmapped baseline, 2 chunks
        td = TensorDict({"x": x[None], ("baseline", "x"): b[None]}, batch_size=[1])
        out = tdfunc.kernel_shap(lambda t: net(t["x"]), td, n_samples=5, coalitions=coalitions, chunk_size=3)
        return out["attr", "x"].flatten()

    rows.append(Case("perturb:kernel-shap-K", mlp, kernel_shap_k, (x6, base6), (0, 0), (0, 1), "head", probe=x6))

    def shared_baseline(x, b):  # baselines=(F,) shared by a batch of 2 (the same example twice); b vmapped
        td = TensorDict({"x": torch.stack([x, 2 * x])}, batch_size=[2])
        return tdfunc.feature_ablation(lambda t: net(t["x"]), td, baselines=b)["attr", "x"].flatten()

    rows.append(
        Case(
            "perturb:feature-ablation-shared-baseline",
            mlp,
            shared_baseline,
            (x6, base6),
            (0, 0),
            (0, 1),
            "head",
            probe=x6,
        )
    )
    emb = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Flatten(), torch.nn.Linear(12, 2)).to(dt)
    s_emb = tdfunc.state(emb)
    ids = torch.randint(1, 7, (B, 3))

    def token_ids_weights(i, weight):  # integer input (token ids): d(attribution)/d(embedding table); vmap over ids
        td = TensorDict({"ids": i[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(emb, TensorDict({("0", "weight"): weight}), (t["ids"],))
        return tdfunc.occlusion(f, td, in_keys="ids", sliding_window_shapes=(2,), baselines=0)["attr", "ids"].flatten()

    w_emb = s_emb["0", "weight"] + 0.1 * torch.randn(B, 7, 4, dtype=dt)
    samples = torch.tensor(
        [
            [1, 0, 1, 0, 1, 0],
            [0, 1, 1, 0, 0, 1],
            [1, 1, 0, 0, 1, 0],
            [0, 0, 1, 1, 1, 1],
            [1, 0, 0, 1, 0, 1],
            [0, 1, 0, 1, 1, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 1, 1],
        ]
    )

    def lime_k(x, b):  # every class, fixed samples, ridge fit (a shared baseline vmapped), 3 chunks
        td = TensorDict({"x": x[None]}, batch_size=[1])
        out = tdfunc.lime(
            lambda t: net(t["x"]),
            td,
            n_samples=8,
            samples=samples,
            interpretable_model="ridge",
            alpha=0.1,
            baselines=b,
            chunk_size=3,
        )
        return out["attr", "x"].flatten()

    rows.append(Case("perturb:lime-K", mlp, lime_k, (x6, base6), (0, 0), (0, 1), "head", probe=x6))

    def lime_lasso(x):  # the lasso fit (all max_iter steps under transforms), euclidean kernel
        td = TensorDict({"x": x[None]}, batch_size=[1])
        out = tdfunc.lime(
            lambda t: net(t["x"])[:, 0],
            td,
            n_samples=8,
            samples=samples,
            alpha=0.001,
            distance="euclidean",
            kernel_width=2.0,
            max_iter=40,
        )
        return out["attr", "x"].flatten()

    rows.append(Case("perturb:lime-lasso", mlp, lime_lasso, (x6,), (0,), (0,), "head", probe=x6))
    perms4 = torch.tensor([[1, 0, 3, 2], [2, 3, 0, 1], [3, 2, 1, 0], [1, 2, 3, 0], [0, 2, 1, 3], [3, 0, 1, 2]])

    def permutation_batch_loss(x, b):  # a batch of 4 built from x; f is the batch's loss (one value per batch)
        td = TensorDict({"x": torch.stack([x, 2 * x, -x, x + b])}, batch_size=[4])
        loss = lambda t: (net(t["x"]) ** 2).mean()
        return tdfunc.feature_permutation(loss, td, permutations=perms4, chunk_size=4)["attr", "x"].flatten()

    rows.append(
        Case(
            "perturb:feature-permutation-batch-loss",
            mlp,
            permutation_batch_loss,
            (x6, base6),
            (0, 0),
            (0, 1),
            "head",
            probe=x6,
        )
    )

    def permutation_k(x):  # every class per example
        td = TensorDict({"x": torch.stack([x, 0.5 * x, x.flip(0)])}, batch_size=[3])
        out = tdfunc.feature_permutation(lambda t: net(t["x"]), td, permutations=perms4[:, :3].argsort(1))
        return out["attr", "x"].flatten()

    rows.append(Case("perturb:feature-permutation-K", mlp, permutation_k, (x6,), (0,), (0,), "head", probe=x6))

    def layer_ablation_k(x, b):  # every class; ablate the hidden activation (site "act") to a vmapped baseline
        td = TensorDict({"x": x[None]}, batch_size=[1])
        out = tdfunc.layer_feature_ablation(
            lambda t: tdfunc.functional_call(mlp, s_mlp, (t["x"],)), td, mlp, "act", baselines=b[:1].sum(), chunk_size=5
        )
        return out["attr", "act"].flatten()

    rows.append(
        Case("perturb:layer-feature-ablation-K", mlp, layer_ablation_k, (x6, base6), (0, 0), (0, 1), "fc2", probe=x6)
    )

    def ig_shared_baseline(x, b):  # integrated_gradients with baselines=(1, F) shared by a batch of 2; b vmapped
        td = TensorDict({"x": torch.stack([x, -x])}, batch_size=[2])
        out = tdfunc.integrated_gradients(lambda t: net(t["x"]), td, baselines=b[None], n_steps=8)
        return out["attr", "x"].flatten()

    rows.append(
        Case("attribution:ig-shared-baseline", mlp, ig_shared_baseline, (x6, base6), (0, 0), (0, 1), "head", probe=x6)
    )
    rows.append(Case("perturb:occlusion-token-ids", emb, token_ids_weights, (ids, w_emb), (0, 0), (1,), "2", probe=ids))
    return rows
