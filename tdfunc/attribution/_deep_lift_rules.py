"""DeepLift's rescale rule: the activation modules it covers, the modules it refuses, and the rewrite itself."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._errors import TdfuncTypeError, here, shape_str
from .._rewrite import Rewrite, main_output
from ._common import AttributionError

__all__ = ["REFUSED", "RESCALED"]

#: elementwise activations: the rescale rule applies to each (captum: ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus)
RESCALED: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.Threshold,
    nn.Softshrink,
    nn.Hardshrink,
)
#: nonlinear modules the rescale rule does not cover: refused when f reaches them
REFUSED: tuple[type[nn.Module], ...] = (
    nn.Softmax,
    nn.Softmin,
    nn.LogSoftmax,
    nn.Softmax2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.FractionalMaxPool2d,
    nn.FractionalMaxPool3d,
    nn.LPPool1d,
    nn.LPPool2d,
    nn.MultiheadAttention,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.Bilinear,
    nn.GLU,
    nn.RReLU,
    nn.RNNBase,
    nn.RNNCellBase,
    nn.CosineSimilarity,
    nn.PairwiseDistance,
)


def _module_sites(module: nn.Module) -> tuple[list[str], dict[str, str]]:
    """The names of ``module``'s elementwise activations, and its refused modules (name -> why)."""
    if not isinstance(module, nn.Module):
        raise TdfuncTypeError(f"expected an nn.Module as the module, got {type(module).__name__} ({module!r:.60}).")
    if isinstance(module, RESCALED + REFUSED):
        raise AttributionError(
            f"module is itself an {type(module).__name__}; pass the model that calls it ({here()} rewrites the "
            "activation modules inside module)."
        )
    rescaled, refused = [], {}
    for name, m in module.named_modules():
        if isinstance(m, RESCALED):
            rescaled.append(name)
        elif isinstance(m, REFUSED):
            refused[name] = "the rescale rule covers elementwise activations only"
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            refused[name] = "batch statistics would mix the inputs with their baselines (put it in eval())"
    return rescaled, refused


def _refuse(name: str, why: str) -> Callable:
    def refuse(module, args, kwargs, out):
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and not module.training
            and module.running_mean is not None
        ):
            return out  # eval-mode BatchNorm is affine: its plain gradient is DeepLift's multiplier
        raise AttributionError(
            f"f reached the {type(module).__name__} module {name!r}, which DeepLift cannot handle here: {why}. "
            "Return what comes before it from f (e.g. logits instead of softmax probabilities), or use "
            "tdfunc.integrated_gradients, which needs no rule per module."
        )

    return refuse


class _Rescale(Rewrite):
    """The rescale rule at one activation: ``y`` becomes ``y0 + m (x - x0)`` where the input moved, ``m`` the
    multiplier ``(y - y') / (x - x')`` of the pair (input row, baseline row), ``x0, y0`` the recorded values."""

    def __init__(self, name: str, stash: dict, rows: int, eps: float, one_pass: bool):
        self.name, self.stash, self.rows, self.eps, self.one_pass = name, stash, rows, eps, one_pass

    def record(self, module, args, kwargs, out):
        x, y = self.stash[self.name], main_output(out)
        if self.one_pass:  # recorded and rewritten in one forward: constants to everything (as _rewrite detaches)
            x = x.detach()
        if x.shape != y.shape or x.dim() == 0 or x.shape[0] != 2 * self.rows:
            raise AttributionError(
                f"the {type(module).__name__} module {self.name!r} got an input of shape "
                f"{shape_str(x.shape)} (output {shape_str(y.shape)}); DeepLift runs f once on the inputs and their "
                f"baselines stacked along the first batch dim ({self.rows} rows, then {self.rows}) and pairs them at "
                f"every activation by that dim, so its first dim must be {2 * self.rows}. Modules that put another dim "
                "first (sequence-first layers) or reshape the batch are not supported."
            )
        dx = x[: self.rows] - x[self.rows :]
        dy = y[: self.rows] - y[self.rows :]
        moved = dx.abs() >= self.eps
        m = dy / torch.where(moved, dx, torch.ones_like(dx))  # no 0/0: its gradient would be nan
        return torch.cat([moved, moved]), torch.cat([m, m]), x, y.clone()

    def rewrite(self, module, args, kwargs, out, constants):
        moved, m, x0, y0 = constants
        return torch.where(moved, y0 + m * (self.stash[self.name] - x0), main_output(out))


def _stashing(stash: dict, name: str) -> Callable:
    def keep(v: torch.Tensor) -> torch.Tensor:
        stash[name] = v.clone()  # a copy: an in-place activation overwrites its input
        return v

    return keep
