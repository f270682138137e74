"""DeepLift's reveal-cancel rule (Shrikumar et al. 2017, §3.5.3) as a value-preserving rewrite.

At an activation ``y = σ(x)`` whose input is the output of a linear layer ``x = W u + b`` (``nn.Linear``,
``nn.Conv1d/2d/3d``), the change ``Δx`` splits into its positive and negative parts by the linear rule (§3.5.1):
``Δx⁺ = A⁺ Δu`` and ``Δx⁻ = A⁻ Δu`` with ``A⁺_ji = w_ji 1{w_ji Δu_i > 0}``, ``A⁻_ji = w_ji 1{w_ji Δu_i < 0}``
(``w_ji / 2`` in both where ``Δu_i = 0``).  The activation's change splits as

    Δy⁺ = ½ (σ(x' + Δx⁺) − σ(x')) + ½ (σ(x' + Δx⁻ + Δx⁺) − σ(x' + Δx⁻))
    Δy⁻ = ½ (σ(x' + Δx⁻) − σ(x')) + ½ (σ(x' + Δx⁺ + Δx⁻) − σ(x' + Δx⁺))

with multipliers ``m⁺ = Δy⁺ / Δx⁺``, ``m⁻ = Δy⁻ / Δx⁻``, so the block (linear layer, activation) has the
multiplier ``diag(m⁺) A⁺ + diag(m⁻) A⁻`` from ``u`` to ``y``: the rewrite makes that the Jacobian of the
activation's output with respect to the linear layer's input (the activation's own input then carries no
gradient through it), value unchanged.  Where ``|Δx⁺| < eps`` the multiplier is its limit
``½ (σ'(x') + σ'(x' + Δx⁻))`` (likewise for ``Δx⁻``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import shape_str
from .._rewrite import Rewrite, main_output
from ._common import AttributionError

__all__ = ["LINEAR", "RevealCancel", "reveal_cancel_edits"]

#: the linear layers whose output an activation under the reveal-cancel rule must take as its input
LINEAR: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def reveal_cancel_edits(module: nn.Module, activations: list[str], stash: dict) -> dict:
    """Edits that keep, per call, each linear layer's input (a copy) and output (the object itself: the pairing
    with the activation it feeds is by identity), and each activation's input (a copy and the object)."""
    edits: dict = {}
    for name, m in module.named_modules():
        if name and isinstance(m, LINEAR):
            edits[f"{name}:input"] = _keep(stash, ("u", name), copy=True)
            edits[name] = _keep(stash, ("out", name), copy=False)
    for name in activations:
        edits[f"{name}:input"] = _keep_both(stash, name)
    return edits


def _keep(stash: dict, key: tuple, copy: bool) -> Callable:
    def keep(v: torch.Tensor) -> torch.Tensor:
        stash[key] = v.clone() if copy else v
        return v

    return keep


def _keep_both(stash: dict, name: str) -> Callable:
    def keep(v: torch.Tensor) -> torch.Tensor:
        stash[("x", name)] = v.clone()  # a copy: an in-place activation overwrites its input
        stash[("in", name)] = v
        return v

    return keep


def _apply(lin: nn.Module, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The linear layer's map without its bias, with weight ``w``."""
    if isinstance(lin, nn.Linear):
        return F.linear(t, w)
    return lin._conv_forward(t, w, None)  # type: ignore[operator]  # ConvNd: its padding mode, stride, groups


def _split(lin: nn.Module, w: torch.Tensor, d: torch.Tensor, masks: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A⁺ d, A⁻ d)`` for the masks ``(Δu > 0, Δu < 0, Δu == 0)`` of the recorded change of the layer's input."""
    pos, neg, zero = masks
    ap = _apply(lin, d * pos, w.clamp(min=0)) + _apply(lin, d * neg, w.clamp(max=0)) + 0.5 * _apply(lin, d * zero, w)
    return ap, _apply(lin, d, w) - ap  # A⁺ + A⁻ = W


def _derivative(act: nn.Module, at: torch.Tensor) -> torch.Tensor:
    """``σ'(at)`` of an elementwise activation module."""
    return torch.func.jvp(lambda t: act(t.clone()), (at,), (torch.ones_like(at),))[1]


class RevealCancel(Rewrite):
    """The reveal-cancel rule at one activation fed by a linear layer (see the module docstring)."""

    def __init__(self, name: str, root: nn.Module, stash: dict, rows: int, eps: float, one_pass: bool):
        self.name, self.root, self.stash = name, root, stash
        self.rows, self.eps, self.one_pass = rows, eps, one_pass

    def _layer(self) -> str:
        x_in = self.stash[("in", self.name)]
        for key, v in self.stash.items():
            if key[0] == "out" and v is x_in:
                return key[1]
        raise AttributionError(
            f"rule='reveal_cancel' splits an activation's input change into positive and negative parts "
            f"by the linear layer that computes it, but the input of the activation {self.name!r} is not the output "
            "of an nn.Linear / nn.Conv1d / nn.Conv2d / nn.Conv3d module (something else is in between, or it is "
            "computed by a function). Use rule='rescale', or make the linear layer feed the activation directly."
        )

    def record(self, module, args, kwargs, out):
        layer = self._layer()
        lin = self.root.get_submodule(layer)
        u, x, y, w = self.stash[("u", layer)], self.stash[("x", self.name)], main_output(out), lin.weight
        if self.one_pass:  # recorded and rewritten in one forward: constants to everything (as _rewrite detaches)
            u, x, w = u.detach(), x.detach(), w.detach()
        b = self.rows
        if u.dim() == 0 or u.shape[0] != 2 * b or x.shape != y.shape:
            raise AttributionError(
                f"the {type(lin).__name__} module {layer!r} feeding the activation {self.name!r} got an "
                f"input of shape {shape_str(u.shape)}; DeepLift stacks the inputs and their baselines along the first "
                f"batch dim, so its first dim must be {2 * b}."
            )
        du = u[:b] - u[b:]
        masks = ((du > 0).to(du.dtype), (du < 0).to(du.dtype), (du == 0).to(du.dtype))
        dxp, dxn = _split(lin, w, du, masks)
        xb, yx, yb = x[b:], y[:b], y[b:]
        fp, fn_ = module(xb + dxp), module(xb + dxn)
        dyp = 0.5 * (fp - yb) + 0.5 * (yx - fn_)
        dyn = 0.5 * (fn_ - yb) + 0.5 * (yx - fp)
        okp, okn = dxp.abs() >= self.eps, dxn.abs() >= self.eps
        d0 = _derivative(module, xb)
        mp = torch.where(
            okp, dyp / torch.where(okp, dxp, torch.ones_like(dxp)), 0.5 * (d0 + _derivative(module, xb + dxn))
        )
        mn = torch.where(
            okn, dyn / torch.where(okn, dxn, torch.ones_like(dxn)), 0.5 * (d0 + _derivative(module, xb + dxp))
        )
        return layer, masks, mp, mn, u, yx.clone()

    def rewrite(self, module, args, kwargs, out, constants):
        layer, masks, mp, mn, u0, y0 = constants
        lin = self.root.get_submodule(layer)
        b = self.rows
        ap, an = _split(lin, lin.weight, (self.stash[("u", layer)] - u0)[:b], masks)
        o = main_output(out)
        return torch.cat([y0 + mp * ap + mn * an, o[b:]], 0)
