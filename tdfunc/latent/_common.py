"""What the latent family's modules share: its error classes and the position masks of patching and steering."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._errors import TdfuncError

__all__ = ["LatentError", "PatchError", "check_input_ids", "position_mask"]


class LatentError(TdfuncError, ValueError):
    """Bad input to a latent-space method (caching, patching, steering, probes, geometry)."""


class PatchError(LatentError):
    """Bad input to a patching or steering function (sites, positions, metric, activations)."""


def position_mask(site: str, positions: Any, value: torch.Tensor) -> torch.Tensor:
    """Boolean mask of shape (T, 1, ..., 1) selecting ``positions`` along dim 1 of ``value``."""
    if value.dim() < 2:
        raise PatchError(
            f"positions index dim 1, but site {site!r} has shape {tuple(value.shape)}; "
            "pass positions=None to patch the whole site, or a patch_fn."
        )
    t = value.shape[1]
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if positions.shape != (t,):
            raise PatchError(
                f"the boolean positions mask has shape {tuple(positions.shape)} but site "
                f"{site!r} has {t} positions along dim 1; give a mask of shape ({t},)."
            )
        mask = positions.to(value.device)
    else:
        if isinstance(positions, torch.Tensor) and not positions.dtype.is_floating_point and positions.dim() <= 1:
            idx = positions.reshape(-1).tolist()
        elif isinstance(positions, int) and not isinstance(positions, bool):
            idx = [positions]
        elif isinstance(positions, Sequence) and all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
            idx = list(positions)
        else:
            raise PatchError(
                f"positions must be None, an int, a list of ints, an integer tensor or a boolean "
                f"mask of shape (T,), got {positions!r}."
            )
        for p in idx:
            if not -t <= p < t:
                raise PatchError(
                    f"position {p} is out of range for site {site!r} with {t} positions along "
                    f"dim 1; give positions in [{-t}, {t})."
                )
        mask = torch.zeros(t, dtype=torch.bool, device=value.device)
        if idx:
            mask[torch.tensor(idx, device=value.device) % t] = True
    return mask.reshape(t, *([1] * (value.dim() - 2)))


def check_input_ids(input_ids: Any) -> None:
    """``input_ids`` must be a 2-D non-float tensor of tokens ``(B, T)`` (``generate`` and ``generate_greedy``)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        got = (
            f"shape {tuple(input_ids.shape)} dtype {input_ids.dtype}"
            if isinstance(input_ids, torch.Tensor)
            else type(input_ids).__name__
        )
        raise PatchError(f"input_ids must be a 2-D integer tensor (B, T) of tokens, got {got}.")
