"""Tap: an identity module that exposes a non-module tensor as a site."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["Tap"]


class Tap(nn.Module):
    """Identity module that names a tensor so tdfunc can capture or edit it.

    Put it in your own model code where a value is computed by plain tensor ops (attention scores,
    the residual stream), like TransformerLens' ``HookPoint``.  Outside a tdfunc call it returns its
    input unchanged; inside one its path (``"blocks.0.attn.scores"``) is a site like any other.

    Example:
        >>> import torch, tdfunc
        >>> class Attn(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.scores = tdfunc.Tap()
        ...     def forward(self, q, k):
        ...         return self.scores(q @ k.transpose(-1, -2)).softmax(-1)
        >>> q = torch.randn(2, 4, 8)
        >>> out, caps = tdfunc.functional_call(Attn(), None, (q, q), capture=["scores"])
        >>> caps["scores"].shape
        torch.Size([2, 4, 4])
    """

    def forward(self, x: Any) -> Any:
        return x
