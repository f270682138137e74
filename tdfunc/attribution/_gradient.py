"""Saliency and input x gradient."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDict, TensorDictBase

from .._errors import public
from .._types import InKeys
from ._common import input_gradients, per_target, prepare, result, tensor_output

__all__ = ["saliency", "input_x_gradient"]


def _gradients(f: Callable, td: TensorDictBase, in_keys):
    p = prepare(td, in_keys, baselines=False, f=f)
    f = tensor_output(f, p.batch)
    grads, k = input_gradients(f, td, p)
    return p, grads, k


@public("tdfunc.saliency")
def saliency(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    *,
    in_keys: InKeys | None = None,
    abs: bool = True,
) -> TensorDict:
    """Gradient of each target with respect to each attributed input (Simonyan et al., 2014).

    .. math::  A_{b,k}(x) = \\left|\\frac{\\partial f_k(x)_b}{\\partial x_b}\\right|

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)``.
        td: the inputs (and anything else ``f`` needs) with a batch shape.
        in_keys: entries to attribute; default every floating-point entry outside ``"baseline"``.
        abs: absolute value of the gradient (captum's default); ``False`` keeps the sign.

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) + feature shape``.

    Raises:
        AttributionError: unknown key, non-float input, ``f`` output of the wrong shape.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> lin = torch.nn.Linear(3, 2)
        >>> td = TensorDict({"x": torch.randn(4, 3)}, batch_size=[4])
        >>> out = tdfunc.saliency(lambda t: lin(t["x"]), td, abs=False)  # both classes, one forward
        >>> torch.allclose(out["attr", "x"], lin.weight.expand(4, 2, 3))
        True

    References:
        Simonyan, Vedaldi, Zisserman. Deep Inside Convolutional Networks. ICLR workshop 2014.

    Composes with: ``vmap``, ``grad`` (double backward), ``torch.compile(fullgraph=True)``.
    """
    _, grads, _ = _gradients(f, td, in_keys)
    return result(td.batch_size, {k: g.abs() if abs else g for k, g in grads.items()}, warn=True)


@public("tdfunc.input_x_gradient")
def input_x_gradient(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    *,
    in_keys: InKeys | None = None,
) -> TensorDict:
    """Input times gradient (Shrikumar et al., 2016).

    .. math::  A_{b,k}(x) = x_b \\odot \\frac{\\partial f_k(x)_b}{\\partial x_b}

    Same arguments and result as :func:`tdfunc.saliency` (without ``abs``).

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> lin = torch.nn.Linear(3, 1, bias=False)
        >>> td = TensorDict({"x": torch.randn(4, 3)}, batch_size=[4])
        >>> out = tdfunc.input_x_gradient(lambda t: lin(t["x"])[:, 0], td)
        >>> torch.allclose(out["attr", "x"].sum(-1), lin(td["x"])[:, 0])  # complete for linear f
        True

    References:
        Shrikumar, Greenside, Shcherbina, Kundaje. Not Just a Black Box. arXiv:1605.01713, 2016.

    Composes with: ``vmap``, ``grad`` (double backward), ``torch.compile(fullgraph=True)``.
    """
    p, grads, k = _gradients(f, td, in_keys)
    n = len(p.batch)
    return result(td.batch_size, {key: per_target(p.x[key], k, n) * g for key, g in grads.items()}, warn=True)
