"""A row of the composition table (see test_compose.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

#: batch size of every case's vmapped arguments
B = 3


@dataclass
class Case:
    name: str
    module: torch.nn.Module
    fn: Callable
    args: tuple  # batched: every arg with in_dims 0 has a leading dim of size B
    in_dims: tuple
    diff: tuple  # argnums to differentiate (float tensors)
    raise_site: str  # a site the forward reaches (for the raising purity check)
    backend: str = "aot_eager"
    probe: torch.Tensor = field(default=None)  # plain-call input for the purity check
