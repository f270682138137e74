"""Guided backpropagation, deconvolution (pure rewrites of every ``nn.ReLU`` module's backward) and guided Grad-CAM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase
from torch import nn

from .._call import _intervene as intervene
from .._errors import TdfuncError, TdfuncTypeError, here, public, shape_str
from .._rewrite import Rewrite, main_output, record_then_rewrite
from .._types import InKeys
from ._common import AttributionError, _show, input_gradients, prepare, result

__all__ = ["deconvolution", "guided_backprop", "guided_grad_cam"]

#: torch.nn.functional.interpolate's modes, for guided_grad_cam
InterpolateMode = Literal["nearest", "linear", "bilinear", "bicubic", "trilinear", "area", "nearest-exact"]


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


class _Deconv(torch.autograd.Function):
    """``_Deconv(u) = u`` in value; backward passes ``relu(g)`` (no forward mask), written with differentiable ops."""

    generate_vmap_rule = True

    @staticmethod
    def forward(u: torch.Tensor) -> torch.Tensor:
        return u.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g.clamp(min=0)


class _Deconvolved(Rewrite):
    """A ReLU output becomes ``v + deconv(x - x0)``: ``x`` the ReLU's input (kept before an in-place ReLU
    overwrites it), ``v, x0`` its output and input recorded in the first forward; the gradient reaches ``x``
    as ``relu(g)``, bypassing the ReLU's own mask."""

    def __init__(self, name: str, stash: dict, one_pass: bool):
        self.name, self.stash, self.one_pass = name, stash, one_pass

    def record(self, module, args, kwargs, out):
        x = self.stash[self.name]
        return (x.detach() if self.one_pass else x), main_output(out).clone()

    def rewrite(self, module, args, kwargs, out, constants):
        x0, v = constants
        return v + _Deconv.apply(self.stash[self.name] - x0)


def _stashing(stash: dict, name: str) -> Callable:
    def keep(v: torch.Tensor) -> torch.Tensor:
        stash[name] = v.clone()  # a copy: an in-place ReLU overwrites its input
        return v

    return keep


def relu_sites(module: nn.Module, verb: str = "guide") -> list[str]:
    """Names of the ``nn.ReLU`` submodules of ``module`` (a shared module once); ``verb`` says what the method
    does to their backward (``"guide"``, or ``"rewrite"`` for deconvolution)."""
    if not isinstance(module, nn.Module):
        raise TdfuncTypeError(f"expected an nn.Module as the module, got {type(module).__name__} ({module!r:.60}).")
    names = [name for name, m in module.named_modules() if isinstance(m, nn.ReLU)]
    if not names:
        raise AttributionError(
            f"module {type(module).__name__} has no nn.ReLU submodule, so there is no ReLU backward to "
            f"{verb}. ReLUs applied as functions inside forward "
            "(F.relu, torch.relu, .relu()) are not modules and "
            "cannot be rewritten (captum's GuidedBackprop has the same limit): make them nn.ReLU modules, or "
            "use tdfunc.saliency(f, td, abs=False) for the plain gradient."
        )
    if names == [""]:
        raise AttributionError(
            f"module is itself an nn.ReLU; pass the model that calls it ({here()[7:]} rewrites the "
            "nn.ReLU submodules of module)."
        )
    return [n for n in names if n]


@public("tdfunc.guided_backprop")
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
    sites = relu_sites(module)
    p = prepare(td, in_keys, baselines=False, f=f)
    # First forward, outside the vjp: every ReLU output v as a function of the outer variables only (under no_grad,
    # where nothing can differentiate the map, v is recorded in the same forward). Non-strict: an nn.ReLU of module
    # that f does not run is simply not rewritten (as in captum).
    guided = record_then_rewrite(f, module, dict.fromkeys(sites, _Guided()), (td,))
    # second forward: each ReLU output becomes v + guide(out - v)
    grads, _ = input_gradients(guided, td, p)
    return result(td.batch_size, grads, warn=True)


@public("tdfunc.deconvolution")
def deconvolution(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    module: nn.Module,
    *,
    in_keys: InKeys | None = None,
) -> TensorDict:
    """Deconvolution (Zeiler & Fergus, 2014): the gradient with every ReLU's backward replaced by a ReLU of
    the incoming gradient.

    .. math::  \\text{at each ReLU } y = \\max(x, 0):\\ \\ g_x = \\max(g_y, 0)

    (the forward mask ``[x > 0]`` of the plain and guided gradients is dropped).  As captum's
    ``Deconvolution``: only ``nn.ReLU`` modules change; every other layer and the forward values are
    untouched.  A pure rewrite recorded in a first forward, as :func:`tdfunc.guided_backprop`: no
    backward hooks, so it works under ``vmap``, and the map's double backward is exact.

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)``; it calls
            ``module``, must run its ``nn.ReLU`` modules and be deterministic (it runs twice).
        td: the inputs with a batch shape.
        module: the model whose ``nn.ReLU`` modules are rewritten (``F.relu`` calls keep their gradient,
            as in captum).  In-place ReLUs are fine.
        in_keys: entries to attribute; default every floating-point entry outside ``"baseline"``.

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) + feature shape`` (signed).

    Raises:
        AttributionError: ``module`` has no ``nn.ReLU``; unknown key, non-float input, ``f`` output of
            the wrong shape.  NotReachedError: ``f`` ran the ReLUs differently in its two forwards.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> tdfunc.deconvolution(lambda t: net(t["x"]), td, net)["attr", "x"].shape   # every class
        torch.Size([5, 4, 3])

    References:
        Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014.

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward: exact),
    ``torch.compile(fullgraph=True)`` (after :func:`tdfunc.install_sites`).
    """
    sites = relu_sites(module, "rewrite")
    p = prepare(td, in_keys, baselines=False, f=f)
    stash: dict = {}
    stashing = intervene(f, module, edits={f"{s}:input": _stashing(stash, s) for s in sites}, strict=False)
    one_pass = not torch.is_grad_enabled()  # record_then_rewrite's choice: one forward under no_grad
    rewritten = record_then_rewrite(stashing, module, {s: _Deconvolved(s, stash, one_pass) for s in sites}, (td,))
    grads, _ = input_gradients(rewritten, td, p)
    return result(td.batch_size, grads, warn=True)


@public("tdfunc.guided_grad_cam")
def guided_grad_cam(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    module: nn.Module,
    site: str,
    *,
    in_keys: InKeys | None = None,
    interpolate_mode: InterpolateMode = "nearest",
) -> TensorDict:
    """Guided Grad-CAM (Selvaraju et al., 2017): guided backpropagation times the Grad-CAM map of a
    layer, upsampled to the input (captum's ``GuidedGradCam``).

    .. math::  \\mathrm{GGC}_{b,k}(x) = \\frac{\\partial^{\\mathrm{G}} f_k}{\\partial x_b} \\odot
        \\mathrm{up}\\big(\\mathrm{relu}(\\mathrm{CAM}_{b,k})\\big)

    :func:`tdfunc.guided_backprop` on the inputs and :func:`tdfunc.grad_cam` (with
    ``relu_attributions=True``) at ``site``; the map (one channel) is resized to each input's spatial
    shape with ``torch.nn.functional.interpolate`` and broadcast over its channels.

    Args:
        f: as in :func:`tdfunc.guided_backprop`.
        td: the inputs with a batch shape; every attributed input must be ``batch + (C, *spatial)``
            with as many spatial dims as the site's value.
        module: the model (its ``nn.ReLU`` modules are guided; ``site`` is one of its sites).
        site: the layer of the Grad-CAM map, as in :func:`tdfunc.grad_cam` (``"layer4"``,
            ``"layer4:input"``, a ``Tap``, ``"relu@1"``).
        in_keys: entries to attribute; default every floating-point entry outside ``"baseline"``.
        interpolate_mode: ``torch.nn.functional.interpolate``'s mode (captum's default ``"nearest"``).

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) + feature shape``.

    Raises:
        AttributionError: an input with no spatial dims to upsample to (captum warns and returns an
            empty tensor); an unknown ``interpolate_mode``; and what :func:`tdfunc.guided_backprop` and
            :func:`tdfunc.grad_cam` raise.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(
        ...     torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(12, 2)
        ... )
        >>> td = TensorDict({"img": torch.randn(5, 1, 4, 4)}, batch_size=[5])
        >>> tdfunc.guided_grad_cam(lambda t: net(t["img"]), td, net, "1")["attr", "img"].shape
        torch.Size([5, 2, 1, 4, 4])

    References:
        Selvaraju et al. Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
        Localization. ICCV 2017.

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward),
    ``torch.compile(fullgraph=True)`` (after :func:`tdfunc.install_sites`).
    """
    from ._layer import grad_cam

    if interpolate_mode not in _MODES:
        raise AttributionError(
            f"unknown interpolate_mode {interpolate_mode!r}; choose one of {list(_MODES)} "
            "(torch.nn.functional.interpolate's modes)."
        )
    relu_sites(module)
    p = prepare(td, in_keys, baselines=False, f=f)
    nb = len(p.batch)
    try:
        guided = guided_backprop(f, td, module, in_keys=p.keys)
        cam = grad_cam(f, td, module, site, relu_attributions=True).get(("attr", site))
    except TdfuncError as e:  # the inner method's message, with the function the user called in front
        raise type(e)(f"{e}") from e
    attrs = {}
    for key in p.keys:
        gb = guided.get(("attr", *key))
        lead = gb.dim() - (p.x[key].dim() - nb)  # batch (+ K) dims
        spatial = p.x[key].shape[nb + 1 :]
        maps = cam.shape[lead + 1 :]
        if len(spatial) != len(maps) or len(spatial) == 0 or len(spatial) > 3:
            raise AttributionError(
                f"input {_show(key)} has feature shape {shape_str(p.x[key].shape[nb:])}, but the Grad-CAM map "
                f"at {site!r} has spatial shape {shape_str(maps)}; guided_grad_cam upsamples the map to each input's "
                "spatial dims (feature shape (C, *spatial), as many spatial dims as the map, 1 to 3). Attribute only "
                "such inputs (in_keys=[...]) or use tdfunc.guided_backprop for the others."
            )
        flat = cam.reshape(-1, 1, *maps)
        up = flat if tuple(maps) == tuple(spatial) else F.interpolate(flat, size=tuple(spatial), mode=interpolate_mode)
        attrs[key] = gb * up.reshape(*cam.shape[: lead + 1], *spatial)
    return result(td.batch_size, attrs, warn=True)


_MODES: tuple[InterpolateMode, ...] = ("nearest", "linear", "bilinear", "bicubic", "trilinear", "area", "nearest-exact")
