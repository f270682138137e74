"""What every plot shares: the error class, input conversion, the colour scale, figure creation, upsampling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar, cast

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from tensordict import TensorDictBase

from .._errors import TdfuncError, TdfuncTypeError, public, shape_str, suggest
from .._types import Sign, UpsampleMode

__all__ = ["PlotError", "normalize_attribution", "upsample"]

SIGNS: tuple[Sign, ...] = ("all", "positive", "negative", "absolute_value")
#: the default colour map of each sign: diverging (red = positive) for "all", one-sided otherwise
CMAPS: dict[str, str] = {"all": "RdBu_r", "positive": "Reds", "negative": "Blues_r", "absolute_value": "Purples"}
UPSAMPLE_MODES: tuple[UpsampleMode, ...] = ("bilinear", "nearest", "bicubic", "area")


_S = TypeVar("_S", bound=str)


class PlotError(TdfuncError, ValueError):
    """A value given to a ``tdfunc.plot`` function cannot be drawn (shape, length, unknown option)."""


def tensor(name: str, x: object) -> torch.Tensor:
    """``x`` (a tensor on any device and dtype, or a NumPy array) as a detached float64 CPU tensor."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TdfuncTypeError(f"{name} is a {type(x).__name__}; give a torch.Tensor (any device and dtype).")
    if x.is_complex():
        raise TdfuncTypeError(f"{name} is complex ({x.dtype}); give a real tensor (e.g. x.abs() or x.real).")
    return x.detach().to(device="cpu", dtype=torch.float64)


def values(name: str, x: object) -> torch.Tensor:
    """A tensor, array or sequence of numbers as a detached float64 CPU tensor (for curves)."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return tensor(name, x)
    if isinstance(x, Sequence) and not isinstance(x, str):
        try:
            return torch.tensor(x, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TdfuncTypeError(f"{name} is a {type(x).__name__}; give a torch.Tensor or a sequence of numbers.")


def attr_entry(name: str, x: object, key: object) -> torch.Tensor:
    """A tensor, or the ``("attr", key)`` entry of a tdfunc attribution result."""
    if not isinstance(x, TensorDictBase):
        if key is not None:
            raise TdfuncTypeError(
                f"key={key!r} is only for a TensorDict result, but {name} is a {type(x).__name__}; drop key=."
            )
        return tensor(name, x)
    found = {
        k[1] if len(k) == 2 else k[1:]: k
        for k in x.keys(include_nested=True, leaves_only=True)
        if isinstance(k, tuple) and k[0] == "attr"
    }
    if not found:
        raise PlotError(
            f"{name} holds no ('attr', key) entry (keys: {sorted(map(str, x.keys()))}); "
            "give the result of a tdfunc attribution method or a tensor."
        )
    if key is None:
        if len(found) > 1:
            raise PlotError(f"{name} holds attributions for {list(found)}; pick one with key=.")
        key = next(iter(found))
    if key not in found:
        names = [str(k) for k in found]
        raise PlotError(
            f"key={key!r} is not in {name} (it holds attributions for {list(found)}).{suggest(str(key), names)}"
        )
    return tensor(name, x.get(found[key]))


def choice(name: str, value: object, options: Sequence[_S]) -> _S:
    if not isinstance(value, str):
        raise TdfuncTypeError(f"{name} is a {type(value).__name__}; give one of {', '.join(map(repr, options))}.")
    if value not in options:
        raise PlotError(
            f"unknown {name} {value!r}; give one of {', '.join(map(repr, options))}.{suggest(value, options)}"
        )
    return cast(_S, value)


def check_outlier_perc(outlier_perc: object) -> float:
    if isinstance(outlier_perc, bool) or not isinstance(outlier_perc, (int, float)):
        raise TdfuncTypeError(f"outlier_perc is a {type(outlier_perc).__name__}; give a number in [0, 100).")
    if not 0 <= outlier_perc < 100:
        raise PlotError(
            f"outlier_perc={outlier_perc!r} is outside [0, 100); give the percentage of the total "
            "|attribution| to saturate (0: scale to the largest value)."
        )
    return float(outlier_perc)


def labels(name: str, given: object, n: int, what: str) -> list[str] | None:
    """Tick or title labels: None, or a sequence of ``n`` things shown with ``str``."""
    if given is None:
        return None
    if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
        raise TdfuncTypeError(f"{name} is a {type(given).__name__}; give a list of {n} strings (one per {what}).")
    if len(given) != n:
        raise PlotError(f"{name} has {len(given)} labels but there are {n} {what}s; give one label per {what}.")
    return [str(g) for g in given]


def sign_transform(x: torch.Tensor, sign: str) -> torch.Tensor:
    """The part of ``x`` a sign shows: all of it, its positive or negative part, or its magnitude."""
    if sign == "positive":
        return x.clamp_min(0)
    if sign == "negative":
        return x.clamp_max(0)
    if sign == "absolute_value":
        return x.abs()
    return x


def threshold(magnitude: torch.Tensor, outlier_perc: float) -> float:
    """The smallest value whose cumulative sum (sorted ascending) reaches ``100 - outlier_perc`` % of the total.

    So the largest values that make up ``outlier_perc`` % of the total saturate the colour scale; 0 gives
    the maximum. This is captum's ``_cumulative_sum_threshold``.
    """
    s = magnitude.flatten().sort().values
    if s.numel() == 0:
        return 0.0
    c = s.cumsum(0)
    i = int(torch.searchsorted(c, c[-1] * 0.01 * (100.0 - outlier_perc)))  # first index with c >= target
    return float(s[min(i, s.numel() - 1)])


def scale(x: torch.Tensor, sign: str, outlier_perc: float) -> tuple[torch.Tensor, float]:
    """``(shown values, limit)``: the sign's part of ``x`` and the magnitude that saturates the colours (> 0)."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise PlotError(
            f"the attribution has {bad} non-finite values (nan or inf); replace them first, "
            "e.g. with torch.nan_to_num(attr)."
        )
    shown = sign_transform(x, sign)
    lim = threshold(shown.abs(), outlier_perc)
    return shown, (lim if lim > 0 else 1.0)


def clim(sign: str, lim: float) -> tuple[float, float]:
    """The colour limits of a sign: symmetric about zero for "all", one-sided otherwise."""
    return {"all": (-lim, lim), "negative": (-lim, 0.0)}.get(sign, (0.0, lim))


@public("tdfunc.plot.normalize_attribution")
def normalize_attribution(attr: torch.Tensor, *, sign: Sign = "all", outlier_perc: float = 2.0) -> torch.Tensor:
    """The attribution scaled into [-1, 1] the way it is coloured (captum's ``_normalize_attr``).

    .. math::  \\hat a = \\mathrm{clip}\\big(s(a) / t,\\ -1,\\ 1\\big),
               \\quad t = \\min\\{v : \\textstyle\\sum_{u \\le v} |s(a)|_u \\ge (1 - p/100) \\sum |s(a)|\\}

    with ``s`` the sign's part of ``a`` (``a``, ``max(a, 0)``, ``min(a, 0)`` or ``|a|``) and ``p`` =
    ``outlier_perc``: the largest values making up ``p`` % of the total magnitude saturate. For
    ``sign="negative"`` the result is the magnitude in [0, 1], as captum's. An all-zero map stays zero.

    Args:
        attr: any shape, device and dtype (channels are not summed here).
        sign: ``"all"``, ``"positive"``, ``"negative"`` or ``"absolute_value"``.
        outlier_perc: percentage of the total magnitude to saturate, in [0, 100).

    Returns:
        Tensor of ``attr``'s shape, dtype and device, in [-1, 1].

    Raises:
        PlotError: unknown sign, outlier_perc outside [0, 100), non-finite values.
        TypeError: ``attr`` is not a tensor.

    Example:
        >>> import torch, tdfunc.plot
        >>> tdfunc.plot.normalize_attribution(torch.tensor([-2.0, 1.0, 4.0]), outlier_perc=0)
        tensor([-0.5000,  0.2500,  1.0000])
    """
    x = tensor("attr", attr)
    sign = choice("sign", sign, SIGNS)
    shown, lim = scale(x, sign, check_outlier_perc(outlier_perc))
    if sign == "negative":
        lim = -lim
    out = (shown / lim).clamp(-1, 1)
    if isinstance(attr, torch.Tensor) and attr.is_floating_point():
        return out.to(device=attr.device, dtype=attr.dtype)
    return out


@public("tdfunc.plot.upsample")
def upsample(x: torch.Tensor, size: int | tuple[int, int], *, mode: UpsampleMode = "bilinear") -> torch.Tensor:
    """Resize maps ``(..., h, w)`` to ``(..., H, W)`` (a Grad-CAM map to the input's size).

    Every leading dim is a separate map: the result equals ``torch.nn.functional.interpolate`` (and
    captum's ``LayerAttribution.interpolate``) on ``x.reshape(-1, 1, h, w)`` with the default
    ``align_corners``, reshaped back.

    Args:
        x: maps with at least 2 dims, any device and floating dtype (kept).
        size: ``(H, W)`` or one int for both.
        mode: ``"bilinear"``, ``"nearest"``, ``"bicubic"`` or ``"area"``.

    Returns:
        Tensor ``x.shape[:-2] + (H, W)`` on ``x``'s device, in ``x``'s dtype.

    Raises:
        PlotError: fewer than 2 dims, a bad size, unknown mode.  TypeError: ``x`` is not a floating tensor.

    Example:
        >>> import torch, tdfunc.plot
        >>> cam = torch.randn(2, 3, 1, 4, 4)  # tdfunc.grad_cam: batch x classes x 1 x h x w
        >>> tdfunc.plot.upsample(cam, (8, 8), mode="nearest").shape
        torch.Size([2, 3, 1, 8, 8])
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        what = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"
        raise TdfuncTypeError(f"x is {what}; give a floating-point torch.Tensor (e.g. x.float()).")
    if x.dim() < 2:
        raise PlotError(f"x has shape {shape_str(x.shape)}; give maps with at least 2 dims (..., h, w).")
    mode = choice("mode", mode, UPSAMPLE_MODES)
    hw = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, Sequence) else None
    if hw is None or len(hw) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in hw):
        raise PlotError(f"size={size!r}; give (H, W) as two positive ints, e.g. image.shape[-2:].")
    lead = x.shape[:-2]
    out = F.interpolate(x.reshape(-1, 1, *x.shape[-2:]), size=hw, mode=mode)
    return out.reshape(*lead, *hw)


def new_axes(ax: object, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """``(fig, ax)``: the given axes and its figure, or a new pyplot figure with constrained layout."""
    if ax is None:
        return plt.subplots(figsize=figsize, layout="constrained")
    from matplotlib.axes import Axes

    if not isinstance(ax, Axes):
        raise TdfuncTypeError(f"ax is a {type(ax).__name__}; give a matplotlib Axes (or None for a new figure).")
    return ax.figure, ax


def no_math(texts: Any) -> None:
    """Show ``$`` in tokens and names literally (no mathtext)."""
    for t in texts:
        t.set_parse_math(False)
