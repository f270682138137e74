"""What patching and the patching sweep share: the checks of sites, captures and the two runs' inputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from tensordict import TensorDictBase

from .._finite import check_finite
from .._match import site_match
from ._common import PatchError

__all__ = ["MODULE_FIX"]

MODULE_FIX = "; pass the model itself (the nn.Module to run)"


# ---------------------------------------------------------------------------------------------- checks


def _as_list(sites: Any) -> list[str]:
    sites = [sites] if isinstance(sites, str) else sites
    if not isinstance(sites, (list, tuple)) or not sites or not all(isinstance(s, str) for s in sites):
        raise PatchError(
            f"sites must be a site string or a non-empty list of them, got {sites!r}; "
            "pass e.g. 'blocks.*' or ['blocks.0', 'blocks.1.attn']."
        )
    return list(sites)


def _match(sites: Any, captures: Any) -> list[str]:
    """Concrete capture keys matched by ``sites`` (globs expanded in the captures' order)."""
    if not isinstance(captures, (Mapping, TensorDictBase)):
        raise PatchError(
            f"clean_captures must be the TensorDict of captures of the clean run, got "
            f"{type(captures).__name__}; use functional_call(..., capture=sites)[1]."
        )
    keys = [k for k in captures.keys() if isinstance(k, str)]
    out: list[str] = []
    for site in _as_list(sites):
        hits = [site] if site in keys else [k for k in keys if site_match(site, k)]
        if not hits:
            raise PatchError(
                f"site {site!r} matches no entry of clean_captures (entries {keys}); capture "
                f"it in the clean run: functional_call(..., capture=[{site!r}])."
            )
        for k in hits:
            if k.endswith("@*"):
                raise PatchError(
                    f"site {k!r} stacks every call of its module and cannot be patched; "
                    f"capture and patch one call with '@k' (e.g. {k[:-1] + '0'!r})."
                )
            if k not in out:
                out.append(k)
    return out


def _tensors(args: Any) -> list:
    return [args] if isinstance(args, torch.Tensor) else list(args) if isinstance(args, (tuple, list)) else []


def _check_runs(clean_args: Any, corrupted_args: Any) -> None:
    """Finite float inputs; with ``clean_args``, the two runs' tensors of equal shapes."""
    runs = (
        (("clean_args", clean_args), ("corrupted_args", corrupted_args))
        if clean_args is not None
        else (("corrupted_args", corrupted_args),)
    )
    for name, args in runs:
        for i, t in enumerate(_tensors(args)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                check_finite(f"{name}[{i}]", t, PatchError, "replace them (e.g. torch.nan_to_num) before patching")
    if clean_args is None:
        return
    shapes = [
        [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in _tensors(a)]
        for a in (clean_args, corrupted_args)
    ]
    if shapes[0] != shapes[1]:
        raise PatchError(
            f"clean_args and corrupted_args must have the same shapes (one run's values are patched "
            f"into the other), got {shapes[0]} and {shapes[1]}; pad or truncate the inputs to one shape."
        )


def _checked_clean(site: str, c: torch.Tensor, v: torch.Tensor) -> None:
    try:
        ok = torch.broadcast_shapes(c.shape, v.shape) == v.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise PatchError(
            f"the clean value at site {site!r} has shape {tuple(c.shape)} but the corrupted run's "
            f"value there has shape {tuple(v.shape)}; capture the clean run with inputs of the corrupted "
            "run's shape."
        )
