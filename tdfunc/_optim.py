"""One pure Adam (Kingma & Ba), optax-style: ``state = adam_init(params)``, ``step, state = adam_update(...)``.

Shared by :func:`tdfunc.activation_maximisation` (ascent on the inputs) and the probe fits of
``tdfunc.latent`` (descent on the probe parameters).  Parameters, gradients and moments are mappings
key -> tensor (dicts, or TensorDicts' items); nothing is written in place, so the loop runs under
``vmap`` and ``grad``.  The step is ``torch.optim.Adam``'s to the last rounding:

.. math::
    m_t = \\beta_1 m_{t-1} + (1 - \\beta_1) g_t, \\quad v_t = \\beta_2 v_{t-1} + (1 - \\beta_2) g_t^2, \\quad
    \\Delta_t = \\frac{\\eta}{1 - \\beta_1^t} \\, \\frac{m_t}{\\sqrt{v_t} / \\sqrt{1 - \\beta_2^t} + \\epsilon}

Descent is ``params - step``, ascent ``params + step``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

__all__ = ["AdamState", "adam_init", "adam_update"]


class AdamState(NamedTuple):
    m: dict  # first moments, key -> tensor
    v: dict  # second moments
    t: int  # steps taken


def adam_init(params: Mapping[Any, torch.Tensor]) -> AdamState:
    """Zero moments shaped like ``params``."""
    return AdamState(
        {k: torch.zeros_like(p) for k, p in params.items()}, {k: torch.zeros_like(p) for k, p in params.items()}, 0
    )


def adam_update(
    grads: Mapping[Any, torch.Tensor],
    state: AdamState,
    *,
    lr: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> tuple[dict, AdamState]:
    """The Adam step ``Delta_t`` per key (add it to ascend, subtract it to descend) and the new state."""
    t = state.t + 1
    m = {k: b1 * state.m[k] + (1 - b1) * g for k, g in grads.items()}
    v = {k: b2 * state.v[k] + (1 - b2) * g.square() for k, g in grads.items()}
    c1, c2 = lr / (1 - b1**t), math.sqrt(1 - b2**t)
    return {k: c1 * m[k] / (v[k].sqrt() / c2 + eps) for k in grads}, AdamState(m, v, t)
