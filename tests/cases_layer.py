"""Composition-table rows for layer attribution (grad_cam, layer_gradient_x_activation, layer IG).

Each row is a function of one example (returning a flat tensor) built on a float64 model: vmapped over examples, over
targets (one-hot target weights closed over by ``f``) and over parameters (double backward through
the map); sites are module outputs, ``:input`` ports, ``@k`` calls and a ``Tap``; layer IG also on integer token ids.
"""

from __future__ import annotations

import torch
from compose_case import B, Case
from models import CNN, MLP, TinyTransformer
from tensordict import TensorDict

import tdfunc


def cases() -> list[Case]:
    torch.manual_seed(0)
    dt = torch.float64
    rows = []

    cnn = CNN(c=2, n_cls=3).to(dt).eval()
    img = torch.randn(B, 1, 4, 4, dtype=dt)

    def grad_cam_k(x):  # every class; site = the second call of the (in-place) ReLU
        td = TensorDict({"x": x[None]}, batch_size=[1])
        return tdfunc.grad_cam(lambda t: cnn(t["x"]), td, cnn, "relu@1")["attr", "relu@1"].flatten()

    rows.append(Case("layer:grad-cam-K", cnn, grad_cam_k, (img,), (0,), (0,), "conv1", probe=img))

    mlp = MLP().to(dt)
    s_mlp = tdfunc.state(mlp)
    x6 = torch.randn(B, 6, dtype=dt)
    onehot = torch.eye(3, dtype=dt)  # B = 3 target weight vectors

    def gxa_targets(x, w):  # vmap over targets; empty td batch shape; an ':input' site
        td = TensorDict({"x": x}, batch_size=[])
        f = lambda t: tdfunc.functional_call(mlp, s_mlp, (t["x"],)) @ w
        return tdfunc.layer_gradient_x_activation(f, td, mlp, "fc2:input")["attr", "fc2:input"].flatten()

    rows.append(Case("layer:gxa-input-targets", mlp, gxa_targets, (x6[0], onehot), (None, 0), (0, 1), "fc1", probe=x6))

    def grad_cam_weights(x, weight):  # d(map)/d(parameters): double backward; vmap over ensembles
        state = s_mlp.copy().set(("fc2", "weight"), weight)  # not update(): it writes into s_mlp
        td = TensorDict({"x": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(mlp, state, (t["x"],))[:, 0]
        return tdfunc.grad_cam(f, td, mlp, "act2", attr_dim_summation=False)["attr", "act2"].flatten()

    w_fc2 = s_mlp["fc2", "weight"] + 0.1 * torch.randn(B, 8, 8, dtype=dt)
    rows.append(Case("layer:grad-cam-state", mlp, grad_cam_weights, (x6[0], w_fc2), (None, 0), (1,), "fc2", probe=x6))

    tt = TinyTransformer(vocab=3, d=4, heads=1, layers=1, t_max=3).to(dt)
    tt.blocks[0].ln1 = tt.blocks[0].ln2 = tt.ln_f = torch.nn.Identity()  # torch's LayerNorm has a wrong 3rd derivative
    emb = torch.randn(B, 2, 4, dtype=dt)
    base = 0.1 * torch.randn(B, 2, 4, dtype=dt)
    labels = torch.tensor([2, 0, 1])

    def lig_tap(h, b, label):  # a Tap site; f closes over a label and a baseline vmapped with h; delta
        td = TensorDict({"x": h[None], ("baseline", "x"): b[None]}, batch_size=[1])
        f = lambda t: tt(t["x"])[:, -1].gather(-1, label.view(1, 1))[:, 0]
        out = tdfunc.layer_integrated_gradients(f, td, tt, "blocks.0.resid", n_steps=2, return_convergence_delta=True)
        return torch.cat([out["attr", "blocks.0.resid"].flatten(), out["convergence_delta"].flatten()])

    rows.append(
        Case("layer:ig-tap-label", tt, lig_tap, (emb, base, labels), (0, 0, 0), (0, 1), "blocks.0.mlp", probe=emb)
    )

    s_tt = tdfunc.state(tt)
    ids = torch.tensor([[1, 2], [2, 0], [1, 1]])
    pad_ids = torch.tensor([[0, 0], [0, 0], [2, 2]])  # the last example: a baseline of another token

    def lig_token_ids(i, b, table):  # integer ids and their baseline ids vmapped; d(map)/d(embedding table)
        state = s_tt.copy().set(("embed", "weight"), table)
        td = TensorDict({"ids": i[None], ("baseline", "ids"): b[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(tt, state, (t["ids"],))[:, -1]  # every next-token logit
        out = tdfunc.layer_integrated_gradients(f, td, tt, "embed", n_steps=2, return_convergence_delta=True)
        return torch.cat([out["attr", "embed"].flatten(), out["convergence_delta"].flatten()])

    rows.append(
        Case(
            "layer:ig-token-ids",
            tt,
            lig_token_ids,
            (ids, pad_ids, s_tt["embed", "weight"].clone()),
            (0, 0, None),
            (2,),
            "blocks.0.mlp",
            probe=ids,
        )
    )

    def lig_chunks(x, w):  # vmap over targets, two path chunks, riemann rule
        td = TensorDict({"x": x[None]}, batch_size=[1])
        f = lambda t: mlp(t["x"]) @ w
        out = tdfunc.layer_integrated_gradients(f, td, mlp, "act", n_steps=3, method="riemann_right", chunk_size=2)
        return out["attr", "act"].flatten()

    rows.append(Case("layer:ig-chunks-targets", mlp, lig_chunks, (x6[1], onehot), (None, 0), (0, 1), "head", probe=x6))

    base6 = 0.3 * torch.randn(B, 6, dtype=dt)

    def conductance_k(x, b):  # every class; input and baseline vmapped; convergence delta appended
        td = TensorDict({"x": x[None], ("baseline", "x"): b[None]}, batch_size=[1])
        out = tdfunc.layer_conductance(
            lambda t: tdfunc.functional_call(mlp, s_mlp, (t["x"],)),
            td,
            mlp,
            "act",
            n_steps=4,
            return_convergence_delta=True,
        )
        return torch.cat([out["attr", "act"].flatten(), out["convergence_delta"].flatten()])

    rows.append(Case("layer:conductance-K", mlp, conductance_k, (x6, base6), (0, 0), (0, 1), "fc1", probe=x6))

    def influence_weights(x, weight):  # one target per example; d(map)/d(fc2 weight)
        state = s_mlp.copy().set(("fc2", "weight"), weight)
        td = TensorDict({"x": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(mlp, state, (t["x"],))[:, 1]
        return tdfunc.internal_influence(f, td, mlp, "fc2:input", n_steps=3, method="riemann_middle")[
            "attr", "fc2:input"
        ][0]

    rows.append(
        Case(
            "layer:internal-influence-weights",
            mlp,
            influence_weights,
            (x6, s_mlp["fc2", "weight"].clone()),
            (0, None),
            (0, 1),
            "fc2",
            probe=x6,
        )
    )

    def lig_joint(x, b, w):  # two sites on one path (an output and an ':input'), every class; d(maps)/d(fc2 weight)
        state = s_mlp.copy().set(("fc2", "weight"), w)
        td = TensorDict({"x": x[None], ("baseline", "x"): b[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(mlp, state, (t["x"],))
        sites = ["act", "head:input"]
        out = tdfunc.layer_integrated_gradients(f, td, mlp, sites, n_steps=4, return_convergence_delta=True)
        gxa = tdfunc.layer_gradient_x_activation(f, td, mlp, sites)
        parts = [out["attr", s].flatten() for s in sites] + [gxa["attr", s].flatten() for s in sites]
        return torch.cat([*parts, out["convergence_delta"].flatten()])

    rows.append(
        Case(
            "layer:ig-gxa-joint-sites",
            mlp,
            lig_joint,
            (x6, base6, s_mlp["fc2", "weight"].clone()),
            (0, 0, None),
            (0, 2),
            "fc2",
            probe=x6,
        )
    )
    return rows
