"""Tiny models built in the tests (never downloaded)."""

from __future__ import annotations

import math

import torch
from torch import nn

import tdfunc


class MLP(nn.Module):
    def __init__(self, d_in=6, d_hidden=8, d_out=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.act2 = nn.Tanh()
        self.head = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.head(self.act2(self.fc2(self.act(self.fc1(x)))))


class CNN(nn.Module):
    """Conv + BatchNorm (eval) + in-place ReLU + pooling; the ReLU module is reused twice."""

    def __init__(self, c=4, n_cls=5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * c, n_cls)

    def forward(self, x):
        h = self.relu(self.bn(self.conv1(x)))
        h = self.relu(self.conv2(h))
        return self.fc(self.pool(h).flatten(-3))


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.scores = tdfunc.Tap()  # expose attention scores as a site

    def forward(self, x):
        *lead, t, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        split = lambda z: z.reshape(*lead, t, self.heads, d // self.heads).transpose(-2, -3)
        q, k, v = split(q), split(k), split(v)
        s = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        s = self.scores(s.masked_fill(mask, float("-inf")))
        z = (s.softmax(-1) @ v).transpose(-2, -3).reshape(*lead, t, d)
        return self.out(z)


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.resid = tdfunc.Tap()  # the residual stream after the block

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return self.resid(x + self.mlp(self.ln2(x)))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=17, d=16, heads=2, layers=2, t_max=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(t_max, d) * 0.1)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.unembed = nn.Linear(d, vocab, bias=False)

    def forward_embeds(self, h):
        h = h + self.pos[: h.shape[-2]]
        for b in self.blocks:
            h = b(h)
        return self.unembed(self.ln_f(h))

    def forward(self, x):
        # integer tokens, or float embeddings (to differentiate with respect to the input)
        return self.forward_embeds(x if x.is_floating_point() else self.embed(x))


class Recurrent(nn.Module):
    """One cell applied three times: a module called several times in one forward."""

    def __init__(self, d=5):
        super().__init__()
        self.cell = nn.Linear(d, d)
        self.act = nn.Tanh()

    def forward(self, x):
        for _ in range(3):
            x = self.act(self.cell(x))
        return x


def snapshot(module: nn.Module) -> dict:
    """Everything purity promises to keep: tensors (bitwise), flags, modes, hooks."""
    return {
        "tensors": {n: t.detach().clone() for n, t in module.state_dict(keep_vars=True).items()},
        "requires_grad": {n: p.requires_grad for n, p in module.named_parameters()},
        "training": {n: m.training for n, m in module.named_modules()},
        "ids": {n: id(t) for n, t in module.state_dict(keep_vars=True).items()},
        "hooks": hook_dicts(module),
    }


HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def hook_dicts(module: nn.Module) -> dict:
    """Every submodule's hook dicts as ordered (id, hook) lists: equal means the same hooks, same order."""
    return {n: {d: list(getattr(m, d).items()) for d in HOOK_DICTS} for n, m in module.named_modules()}


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a["requires_grad"] == b["requires_grad"]
    assert a["training"] == b["training"]
    assert a["ids"] == b["ids"]
    assert a["hooks"] == b["hooks"], "hooks left on (or taken off) the module"
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        x, y = a["tensors"][k], b["tensors"][k]
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), k
