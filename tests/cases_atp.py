"""Composition-table rows for AtP*'s QK fix (see test_compose.py), and the small attention model it runs on.

``Attn``: one causal attention layer written as transformers writes it (``q_proj`` / ``k_proj`` / ``v_proj`` /
``o_proj`` modules, grouped KV heads repeated, ``softmax(scale * q @ k^T + mask)`` and ``@ v`` as functions),
float64, on (1, T=4, 8) sequences; ``attribution_patching(..., qk_fix=True)`` over the query heads and the key
positions of vmapped clean / corrupted inputs.
"""

from __future__ import annotations

import torch
from compose_case import B, Case

import tdfunc


class Attn(torch.nn.Module):
    """Causal attention with ``heads`` query heads sharing ``kv`` key/value heads; an optional soft-cap."""

    def __init__(self, d: int = 8, heads: int = 4, kv: int = 2, cap: float | None = None) -> None:
        super().__init__()
        self.heads, self.kv, self.dh, self.cap = heads, kv, d // heads, cap
        self.q_proj = torch.nn.Linear(d, heads * self.dh)
        self.k_proj = torch.nn.Linear(d, kv * self.dh)
        self.v_proj = torch.nn.Linear(d, kv * self.dh)
        self.o_proj = torch.nn.Linear(heads * self.dh, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.dh).transpose(1, 2)
        k, v = (p(x).view(b, t, self.kv, self.dh).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        k, v = (z.repeat_interleave(self.heads // self.kv, dim=1) for z in (k, v))
        scores = torch.matmul(q, k.transpose(2, 3)) * self.dh**-0.5
        if self.cap is not None:
            scores = self.cap * torch.tanh(scores / self.cap)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = scores + torch.zeros(t, t, dtype=x.dtype, device=x.device).masked_fill(~causal, -1e9)
        a = torch.softmax(scores, dim=-1)
        return self.o_proj(torch.matmul(a, v).transpose(1, 2).reshape(b, t, -1))


class Net(torch.nn.Module):
    """An attention block between two linear maps (the sites are ``attn.q_proj``, ``attn.k_proj``, ...)."""

    def __init__(self, cap: float | None = None) -> None:
        super().__init__()
        self.inp, self.attn, self.out = torch.nn.Linear(3, 8), Attn(cap=cap), torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(torch.tanh(self.inp(x))))


def cases() -> list[Case]:
    torch.manual_seed(0)
    dt = torch.float64
    net = Net().to(dt)
    s = tdfunc.state(net)
    x = 2 * torch.randn(B, 1, 4, 3, dtype=dt)
    heads = tdfunc.latent.units("b t (h d) -> b t h d", h=4)

    def atp_qk_fix(x, x_clean):  # query heads, and key positions
        m = lambda y: y[0, -1, 0]  # noqa: E731
        atp = tdfunc.latent.attribution_patching
        return torch.cat(
            [
                atp(net, s, (x_clean,), (x,), "attn.q_proj", m, over=heads, qk_fix=True).flatten(),
                atp(net, s, (x_clean,), (x,), "attn.k_proj", m, qk_fix=True).flatten(),
            ]
        )

    return [
        Case("latent:attribution-patching-qk-fix", net, atp_qk_fix, (x, x.flip(0)), (0, 0), (0, 1), "inp", probe=x[0])
    ]
