"""Guided backpropagation as a pure rewrite of every ``nn.ReLU`` module's backward pass."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from .._rewrite import Rewrite, record_then_rewrite
from .._types import InKeys
from ._common import AttributionError, grads_per_target, move_target_dim, prepare, result, with_inputs

__all__ = ["guided_backprop"]


class _Guide(torch.autograd.Function):
    """``_Guide(u, y) = u`` in value; backward passes ``relu(g)`` where ``y > 0`` (``y``: the ReLU's output).

    The backward is written with differentiable ops (no ``once_differentiable``), so the guided map
    can be differentiated again; see :func:`guided_backprop` for why the value path stays exact.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return u.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (y,) = ctx.saved_tensors
        return g.clamp(min=0) * (y > 0).to(g.dtype), None


class _Guided(Rewrite):
    """A ReLU output ``y`` becomes ``v + guide(y - v)``, ``v`` the output recorded in the first forward."""

    def record(self, module, args, kwargs, out):
        return out.clone()  # clone: a later in-place op must not rewrite it

    def rewrite(self, module, args, kwargs, out, v):
        return v + _Guide.apply(out - v, out)


def relu_sites(fn: str, module: nn.Module) -> list[str]:
    """Names of the ``nn.ReLU`` submodules of ``module`` (a shared module once)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module as the module, got {type(module).__name__} ({module!r:.60}).")
    names = [name for name, m in module.named_modules() if isinstance(m, nn.ReLU)]
    if not names:
        raise AttributionError(
            f"{fn}: module {type(module).__name__} has no nn.ReLU submodule, so there is no ReLU backward to "
            "guide. ReLUs applied as functions inside forward (F.relu, torch.relu, .relu()) are not modules and "
            "cannot be rewritten (captum's GuidedBackprop has the same limit): make them nn.ReLU modules, or "
            "use tdfunc.saliency(f, td, abs=False) for the plain gradient."
        )
    if names == [""]:
        raise AttributionError(
            f"{fn}: module is itself an nn.ReLU; pass the model that calls it (guided_backprop rewrites the "
            "nn.ReLU submodules of module)."
        )
    return [n for n in names if n]


def guided_backprop(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    module: nn.Module,
    *,
    in_keys: InKeys | None = None,
) -> TensorDict:
    """Guided backpropagation (Springenberg et al., 2015): the gradient with every ReLU's backward guided.

    .. math::  \\frac{\\partial^{\\mathrm{G}} f_k}{\\partial x}:\\quad
        \\text{at each ReLU } y = \\max(x, 0):\\ \\ g_x = \\max(g_y, 0) \\odot [x > 0]

    Only the backward of ``nn.ReLU`` modules changes (captum's ``GuidedBackprop``); every other
    layer, and the forward values, are untouched.  The rewrite is a :func:`tdfunc.rule` on every
    ``nn.ReLU`` submodule of ``module`` (found with ``named_modules()``; every call of a reused
    one) — no backward hooks, so it works under ``vmap``.  Every target's map comes from one
    guided forward and K vector-Jacobian products.

    Two forwards make the map differentiable *exactly* (attribution penalties in a loss): the
    first, outside the inner vector-Jacobian product, records each ReLU output ``v``; in the
    second, a ReLU output ``y`` becomes ``v + guide(y - v)`` where ``guide`` is the identity with
    backward ``relu(g)`` where ``y > 0``.  The inner product sees only ``guide`` (``v`` is a
    constant to it); outer derivatives see ``v``, the true ReLU output, while the ``guide`` term
    has value and outer derivative zero.  Rewriting the ReLU's backward in one forward would
    instead apply ``relu`` to second-order cotangents too (wrong double backward).  Under
    ``torch.no_grad()``, where nothing can differentiate the map, one forward does both (same values).

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)``; it calls
            ``module`` (directly or through :func:`tdfunc.functional_call`), must run every one of
            its ``nn.ReLU`` modules and be deterministic (it runs twice).
        td: the inputs with a batch shape.
        module: the model whose ``nn.ReLU`` modules are guided.  ``F.relu`` / ``torch.relu`` calls
            inside ``forward`` are not modules and keep their plain gradient (as in captum).
        in_keys: entries to attribute; default every floating-point entry outside ``"baseline"``.

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) + feature shape`` (signed).

    Raises:
        AttributionError: ``module`` has no ``nn.ReLU``; unknown key, non-float input, ``f`` output
            of the wrong shape.
        NotReachedError: ``f`` ran ``module``'s ``nn.ReLU`` modules differently in its two forwards
            (``f`` must be deterministic).  ReLU modules ``f`` never runs are left alone.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> out = tdfunc.guided_backprop(lambda t: net(t["x"]), td, net)   # every class, one call
        >>> out["attr", "x"].shape
        torch.Size([5, 4, 3])

    References:
        Springenberg, Dosovitskiy, Brox, Riedmiller. Striving for Simplicity: The All Convolutional
        Net. ICLR workshop 2015.

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward: exact, the
    ReLU masks being piecewise constant), ``torch.compile(fullgraph=True)`` (after
    :func:`tdfunc.install_sites`), except under a ``vmap`` inside the compiled region (e.g.
    ``smooth_grad`` over it): torch <= 2.13 cannot compile a vmapped ``autograd.Function``
    (pytorch/pytorch#129845).
    """
    fn = "tdfunc.guided_backprop"
    sites = relu_sites(fn, module)
    p = prepare(fn, td, in_keys, baselines=False, f=f)
    # First forward, outside the vjp: every ReLU output v as a function of the outer variables only (under no_grad,
    # where nothing can differentiate the map, v is recorded in the same forward). Non-strict: an nn.ReLU of module
    # that f does not run is simply not rewritten (as in captum).
    guided = record_then_rewrite(fn, f, module, dict.fromkeys(sites, _Guided()), (td,))
    # second forward: each ReLU output becomes v + guide(out - v)
    _, grads, k = grads_per_target(fn, lambda xs: guided(with_inputs(td, xs)), p.x, 0, p.batch)
    n = len(p.batch)
    return result(td.batch_size, {key: move_target_dim(g, k, n) for key, g in grads.items()}, fn=fn)
