"""Small models used by the benchmarks.

``TinyGPT`` is a pre-LN GPT-style decoder (token + learned position embedding,
``n_layers`` blocks of causal self-attention and a GELU MLP, final LayerNorm,
untied LM head). Module paths follow the usual naming so that benchmark sites
read naturally::

    tok_emb, pos_emb
    blocks.{i}            # one Block; returns the residual stream
    blocks.{i}.ln1, blocks.{i}.attn, blocks.{i}.attn.qkv, blocks.{i}.attn.proj
    blocks.{i}.ln2, blocks.{i}.mlp, blocks.{i}.mlp.fc, blocks.{i}.mlp.act, blocks.{i}.mlp.proj
    ln_f, lm_head
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 512
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 32
    mlp_ratio: int = 4


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        assert d_model % n_heads == 0
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, t, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(x).split(d, dim=-1)
        q = q.reshape(*lead, t, h, d // h).transpose(-3, -2)
        k = k.reshape(*lead, t, h, d // h).transpose(-3, -2)
        v = v.reshape(*lead, t, h, d // h).transpose(-3, -2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(-3, -2).reshape(*lead, t, d)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio * cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class TinyGPT(nn.Module):
    def __init__(self, cfg: GPTConfig = GPTConfig()):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.register_buffer("pos", torch.arange(cfg.seq_len), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[-1]
        x = self.tok_emb(idx) + self.pos_emb(self.pos[:t])
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def tiny_gpt(seed: int = 0, **overrides) -> TinyGPT:
    """A deterministic ``TinyGPT`` in eval mode (default config: vocab 512, d 128, 4 layers, 4 heads, T 32)."""
    torch.manual_seed(seed)
    return TinyGPT(GPTConfig(**overrides)).eval()


def tokens(batch: int, cfg: GPTConfig = GPTConfig(), seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab, (batch, cfg.seq_len), generator=g)


class SmallCNN(nn.Module):
    """Three 3x3 conv layers (ReLU, 2x2 max-pool after each) and a linear head.

    Input ``(B, 3, 32, 32)``, output ``(B, n_classes)`` logits. Module names: ``conv1``,
    ``conv2``, ``conv3`` (each an ``nn.Conv2d``), ``act``, ``pool``, ``head``.
    """

    def __init__(self, channels: tuple[int, int, int] = (8, 16, 32), n_classes: int = 10):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(c3 * 4 * 4, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        x = self.pool(self.act(self.conv3(x)))
        return self.head(x.flatten(-3))


def small_cnn(seed: int = 0, **overrides) -> SmallCNN:
    """A deterministic ``SmallCNN`` in eval mode (default channels 8/16/32, 10 classes, input 3x32x32)."""
    torch.manual_seed(seed)
    return SmallCNN(**overrides).eval()


def images(batch: int, seed: int = 1) -> torch.Tensor:
    """``(batch, 3, 32, 32)`` standard-normal images, deterministic."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g)
