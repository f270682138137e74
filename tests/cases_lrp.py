"""Composition-table rows for tdfunc.lrp (rules as two-pass rewrites of Linear / Conv2d outputs)."""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import nn

import tdfunc
from compose_case import B, Case


class _ReluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(5, 6), nn.ReLU()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.act1(self.fc1(x)))


class _ReluCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(-3))


def cases() -> list[Case]:
    torch.manual_seed(0)
    dt = torch.float64
    mlp = _ReluMLP().to(dt)
    s_mlp = tdfunc.state(mlp)
    x5 = torch.randn(B, 5, dtype=dt)
    onehot = torch.eye(3, dtype=dt)
    rows = []

    def mlp_weights(x, weight):  # every class; d(relevance)/d(weights): the two-pass rewrite
        s = s_mlp.update({("fc1", "weight"): weight}, inplace=False)
        td = TensorDict({"x": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(mlp, s, (t["x"],))
        return tdfunc.lrp(f, td, mlp, composite="epsilon", rules={"fc1": tdfunc.lrp_gamma(0.25)})["attr", "x"][0].flatten()

    rows.append(Case("lrp:mlp-K-weights", mlp, mlp_weights, (x5, s_mlp["fc1", "weight"].clone()), (0, None), (0, 1), "fc1", probe=x5))

    def mlp_targets(x, w):  # vmap over targets: a one-hot target weight vector
        td = TensorDict({"x": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(mlp, s_mlp, (t["x"],)) @ w
        return tdfunc.lrp(f, td, mlp, rules={nn.Linear: tdfunc.lrp_alpha_beta(2, 1)})["attr", "x"][0].flatten()

    rows.append(Case("lrp:mlp-targets-alpha_beta", mlp, mlp_targets, (x5[0], onehot), (None, 0), (0,), "head", probe=x5))

    cnn = _ReluCNN().to(dt)
    s_cnn = tdfunc.state(cnn)
    img = torch.randn(B, 1, 3, 3, dtype=dt)

    def cnn_plus(x, weight):  # z+ on the conv, ε on the dense layer (epsilon_plus), every class
        s = s_cnn.update({("conv", "weight"): weight}, inplace=False)
        td = TensorDict({"img": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(cnn, s, (t["img"],))
        return tdfunc.lrp(f, td, cnn, composite="epsilon_plus")["attr", "img"][0].flatten()

    rows.append(Case("lrp:cnn-epsilon_plus-weights", cnn, cnn_plus, (img, s_cnn["conv", "weight"].clone()), (0, None), (0, 1), "conv", probe=img))
    return rows
