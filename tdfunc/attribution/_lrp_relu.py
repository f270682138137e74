"""LRP rules for ReLU modules: zennit's ReLUDeconvNet and ReLUBetaSmooth (its DeconvNet / BetaSmooth composites)."""

from __future__ import annotations

import torch
from torch import nn

from .._errors import public
from .._rewrite import main_output
from ._common import AttributionError
from ._guided import _Deconv  # deconvnet: the identity whose backward is relu(g)
from ._lrp_rules import Rule, _first_input, check_float

__all__ = ["deconvnet", "beta_smooth"]


def _relu_inplace(rule: Rule, name: str, module: nn.Module) -> str | None:  # deconvnet, beta_smooth
    if getattr(module, "inplace", False):
        return (
            f"{rule!r} at {name!r} needs the input of nn.ReLU(inplace=True), which the module overwrites; build it "
            "with inplace=False (tdfunc.deconvolution handles in-place ReLUs)."
        )
    return None


class _DeconvNet(Rule):  # deconvnet
    modules, targets, _public = (nn.ReLU,), "nn.ReLU", "deconvnet"

    def check(self, name, module):
        return _relu_inplace(self, name, module)

    def record(self, module, args, kwargs, out):
        return _first_input(args, kwargs), main_output(out).clone()

    def rewrite(self, module, args, kwargs, out, constants):
        x0, v = constants  # v + deconv(x - x0): value v, the gradient reaches x as relu(g)
        return v + _Deconv.apply(_first_input(args, kwargs) - x0)


class _BetaSmooth(Rule):  # beta_smooth
    modules, targets, _public = (nn.ReLU,), "nn.ReLU", "beta_smooth"

    def __init__(self, beta: float):
        self.beta = beta

    def check(self, name, module):
        return _relu_inplace(self, name, module)

    def record(self, module, args, kwargs, out):
        x = _first_input(args, kwargs)
        s = torch.sigmoid(self.beta * x)  # softplus_beta'(x)
        return main_output(out).clone(), s, s * x

    def rewrite(self, module, args, kwargs, out, constants):
        v, s, sx = constants  # v - S + s ⊙ x: value v, Jacobian diag(sigmoid(beta x))
        return v - sx + s * _first_input(args, kwargs)


@public("tdfunc.lrp_rules.deconvnet")
def deconvnet() -> Rule:
    """zennit's ``ReLUDeconvNet`` (DeconvNet, Zeiler & Fergus 2014): a ReLU's backward passes ``max(g, 0)``.

    .. math::  y = \\max(x, 0):\\qquad g_x = \\max(g_y, 0)

    The forward mask ``[x > 0]`` of the plain gradient is dropped.  The rule of the composite
    ``"deconvnet"`` (zennit's ``DeconvNet``), which leaves every other module on its plain gradient;
    ``tdfunc.lrp`` returns ``x ⊙`` that modified gradient (zennit's ``Gradient`` attributor returns the
    gradient itself, as :func:`tdfunc.deconvolution` does).  Written as a rewrite ``v + d(x - x₀)`` with
    ``v``, ``x₀`` the ReLU's output and input recorded in the first forward and ``d`` the identity whose
    backward is ``max(g, 0)``: the value is unchanged and outer derivatives see ``v`` and ``x₀`` as functions
    of the weights.

    Returns:
        A :class:`Rule` for ``nn.ReLU``.

    Raises:
        AttributionError (from :func:`tdfunc.lrp`): an ``nn.ReLU(inplace=True)`` (its input is overwritten).

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> a = tdfunc.lrp(lambda t: net(t["x"]), td, net, composite="deconvnet")["attr", "x"]
        >>> b = tdfunc.deconvolution(lambda t: net(t["x"]), td, net)["attr", "x"]
        >>> torch.allclose(a, td["x"][:, None] * b)             # x ⊙ the deconvnet gradient
        True

    References:
        Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014.

    Composes with: ``vmap``, ``grad`` (double backward), ``torch.compile(fullgraph=True)``.
    """
    return _DeconvNet()


@public("tdfunc.lrp_rules.beta_smooth")
def beta_smooth(beta: float = 10.0) -> Rule:
    """zennit's ``ReLUBetaSmooth`` (Dombrowski et al. 2019): a ReLU's gradient becomes softplus_β's.

    .. math::  y = \\max(x, 0):\\qquad g_x = \\sigma(\\beta x)\\, g_y

    (``σ(βx)`` is the derivative of ``softplus_β(x) = log(1 + e^{βx}) / β``): a smooth surrogate gradient,
    e.g. for meaningful second derivatives through ReLU networks.  The rule of the composite
    ``"beta_smooth"`` (zennit's ``BetaSmooth``, ``β = 10``), which leaves every other module on its plain
    gradient; for another β give ``rules={nn.ReLU: tdfunc.lrp_rules.beta_smooth(β)}``.  Written as
    ``v − S + s ⊙ x`` with ``s = σ(βx)`` and ``S = s ⊙ x`` recorded in the first forward.

    Args:
        beta: β of the softplus whose gradient replaces the ReLU's (zennit's ``beta_smooth``; > 0).

    Returns:
        A :class:`Rule` for ``nn.ReLU``.

    Raises:
        TypeError: ``beta`` is not a number.  AttributionError: ``beta`` not finite or not > 0; (from
        :func:`tdfunc.lrp`) an ``nn.ReLU(inplace=True)``.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> r = tdfunc.lrp(lambda t: net(t["x"])[:, 0], td, net, composite="beta_smooth")["attr", "x"]
        >>> s = torch.sigmoid(10.0 * net[0](td["x"]))           # softplus_10' at the ReLU's input
        >>> torch.allclose(r, td["x"] * ((s * net[2].weight[0]) @ net[0].weight))
        True

    References:
        Dombrowski, Alber, Anders, Ackermann, Müller, Kessel. Explanations can be manipulated and geometry
        is to blame. NeurIPS 2019.

    Composes with: ``vmap``, ``grad`` (double backward, exact: ``s`` is a function of the weights in
    outer derivatives), ``torch.compile(fullgraph=True)``.
    """
    beta = check_float("beta", beta)
    if beta == 0:
        raise AttributionError(
            "tdfunc.lrp_rules.beta_smooth: beta must be > 0, got 0.0 (sigmoid(0 * x) = 1/2 everywhere); "
            "zennit's default is 10."
        )
    return _BetaSmooth(beta)


__all__ += ["deconvnet", "beta_smooth"]
