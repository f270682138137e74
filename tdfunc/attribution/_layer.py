"""Layer attribution at any site: Grad-CAM and layer gradient x activation, and the helpers every layer method uses.

The gradient at a site comes from an additive zero delta there (``value + d``, differentiated with
respect to ``d`` at ``d = 0``), never from a backward hook, so every method composes with
``vmap`` / ``grad`` / ``torch.compile``.  ``f`` is opaque (it calls the model somewhere): a first
forward captures the site's value (its shape sizes the delta, its value is the activation), then
one forward with the delta and one vector-Jacobian product per target give every target's
gradient.  Cost: two forwards + K backward passes for K per-class maps (captum: K forwards + K
backward passes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from .. import _runtime
from .._checks import check_callable, type_error
from .._edits import delta
from .._errors import TdfuncTypeError, here, public, shape_str
from .._finite import check_finite, warn_nonfinite
from .._plan import make_plan
from .._sites import ALL_CALLS, parse_site
from ._common import (
    NONFINITE_FIX,
    AttributionError,
    _norm,
    _show,
    check_output,
    grads_per_target,
    move_target_dim,
    per_target,
)

__all__ = ["grad_cam", "layer_gradient_x_activation"]


def _check(td: object, module: object, site: object) -> None:
    if not isinstance(module, nn.Module):
        raise TdfuncTypeError(
            f"module must be the nn.Module whose site is attributed, got {type(module).__name__} "
            f"({module!r:.60}); pass the model itself, e.g. {here()}(f, td, model, 'layer1')."
        )
    if not isinstance(td, TensorDictBase):
        raise TdfuncTypeError(
            f"td must be a TensorDict holding the inputs, got {type(td).__name__} ({td!r:.60}); "
            "e.g. TensorDict({'x': x}, batch_size=[len(x)])."
        )
    spec = parse_site(site)
    if spec.is_glob or spec.call == ALL_CALLS:
        raise AttributionError(
            f"site {site!r} names several values; attribute one site at a time "
            "(no globs; '@k' for the k-th call of a module that runs several times)."
        )


def _check_sites(td: object, module: object, site: object) -> list[str]:
    """``site`` as a list of site strings: one site (checked by :func:`_check`), or a non-empty list / tuple of
    distinct sites attributed jointly (captum's list of layers)."""
    if not isinstance(site, (list, tuple)):
        _check(td, module, site)
        return [site]  # type: ignore[list-item]  # _check refused every other type
    if not site or not all(isinstance(s, str) for s in site):
        raise type_error(AttributionError)(
            f"site must be a site string or a non-empty list of site strings, got {site!r:.80}; "
            "e.g. 'layer1' or ['emb.word', 'emb.pos']."
        )
    repeated = sorted({s for s in site if site.count(s) > 1})
    if repeated:
        raise AttributionError(f"the sites {list(site)!r:.120} name {repeated!r} more than once; list each site once.")
    for s in site:
        _check(td, module, s)
    return list(site)


def _run(f: Callable, module: nn.Module, td: TensorDictBase, edits: dict | None, capture: list | None):
    """``f(td)`` with ``edits`` / ``capture`` at sites of ``module`` (intervene, errors naming ``fn``)."""
    out, caps = _runtime.run_plan(make_plan(module, edits, capture), f, td)
    return out if capture is None else (out, caps)


def _activation(f: Callable, module: nn.Module, td: TensorDictBase, site: str):
    """One forward: ``(f(td), value at site)``; the value must be batch-first."""
    y, (a,) = _activations(f, module, td, [site])
    return y, a


def _activations(f: Callable, module: nn.Module, td: TensorDictBase, sites: list[str]):
    """One forward: ``(f(td), [value at each site])``; every value must be batch-first."""
    y, caps = _run(f, module, td, None, sites)
    check_output(y, td.batch_size)
    return y, [_batch_first(caps[site], td.batch_size, site) for site in sites]


def _batch_first(a: object, batch: torch.Size, site: str) -> torch.Tensor:
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        what = f"dtype {a.dtype}" if isinstance(a, torch.Tensor) else f"a value of type {type(a).__name__}"
        raise AttributionError(
            f"site {site!r} holds {what}; layer attribution needs a floating-point tensor there. "
            "Attribute another site (e.g. ':output.N' for one element of a tuple output)."
        )
    if tuple(a.shape[: len(batch)]) != tuple(batch):
        raise AttributionError(
            f"the value at site {site!r} has shape {shape_str(a.shape)}, which does not start with td's "
            f"batch shape {shape_str(batch)}; the site must hold one activation per example, batch dims first. "
            "Give td the batch shape the model sees, or attribute another site."
        )
    return a


def _site_gradient(f: Callable, td: TensorDictBase, module: nn.Module, site: str, channels: bool = False):
    """(activation, gradient of every target at the site, K): two forwards + K vjps."""
    _check(td, module, site)
    acts, grads, k = _sites_gradient(f, td, module, [site], channels)
    return acts[0], grads[0], k


def _sites_gradient(f: Callable, td: TensorDictBase, module: nn.Module, sites: list, channels: bool = False):
    """([activation], [gradient of every target at each site], K) for checked sites: two forwards + K vjps (a zero
    delta at every site: each site's gradient is its full gradient, through the other sites too)."""
    check_callable("f", f, AttributionError, expected="f(td) -> Tensor")
    for key in td.keys(include_nested=True, leaves_only=True):  # f may read any entry: every float one is an input
        if td.get(key).is_floating_point():
            check_finite(f"input {_show(_norm(key))}", td.get(key), AttributionError, NONFINITE_FIX)
    _, acts = _activations(f, module, td, sites)
    for site, act in zip(sites, acts):
        if channels and act.dim() <= len(td.batch_size):
            raise AttributionError(
                f"the value at site {site!r} has shape {shape_str(act.shape)}, with no channel dim after td's "
                f"batch shape {shape_str(td.batch_size)}; Grad-CAM needs batch + (C, *spatial). Attribute another "
                "site."
            )
    names = [f"d{i}" for i in range(len(sites))]
    g = lambda xs: _run(f, module, td, {s: delta(xs[n]) for s, n in zip(sites, names)}, None)  # noqa: E731
    _, grads, k = grads_per_target(g, {n: torch.zeros_like(a) for n, a in zip(names, acts)}, 0, td.batch_size)
    return acts, [grads[n] for n in names], k


def _out(
    td: TensorDictBase, site: str, value: torch.Tensor, extra: dict | None = None, *, warn: bool = False
) -> TensorDict:
    return _outs(td, {site: value}, extra, warn=warn)


def _outs(td: TensorDictBase, values: dict, extra: dict | None = None, *, warn: bool = False) -> TensorDict:
    """The result: ``("attr", site)`` for each site -> value, and the ``extra`` entries."""
    out = TensorDict({}, batch_size=td.batch_size)
    for site, value in values.items():
        if warn:
            warn_nonfinite(repr(("attr", site)), value)
        out.set(("attr", site), value)
    for k, v in (extra or {}).items():
        out.set(k, v)
    return out


@public("tdfunc.grad_cam")
def grad_cam(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    module: nn.Module,
    site: str,
    *,
    relu_attributions: bool = False,
    attr_dim_summation: bool = True,
) -> TensorDict:
    """Grad-CAM at any site (Selvaraju et al., 2017), captum's ``LayerGradCam``.

    With ``A`` the site's value of one example, channels on its first dim ``c`` and the rest
    spatial (``u``):

    .. math::  w_{k,c} = \\frac{1}{|u|}\\sum_u \\frac{\\partial f_k}{\\partial A_{c,u}}, \\qquad
               \\mathrm{CAM}_{k,u} = \\sum_c w_{k,c} A_{c,u}\\ \\ (\\text{then ReLU if asked})

    A site with one dim per example (``(B, C)``) uses the gradient itself as weights.

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)`` (every class
            at once); it calls ``module`` somewhere (directly or through ``tdfunc.functional_call``).
        td: the inputs, passed to ``f`` as they are.
        module: the model whose site is attributed.
        site: a site of ``module``: ``"layer4"``, ``"layer4:input"``, a :class:`tdfunc.Tap`,
            ``"relu@1"``.  Its value must be batch-first: ``td.batch_size + (C, *spatial)``.
        relu_attributions: ReLU on the map (the original Grad-CAM; captum's default False).
        attr_dim_summation: sum over channels, keeping a size-1 channel dim (captum's default);
            False returns ``w * A`` per channel.

    Returns:
        TensorDict with ``("attr", site)`` (the site string is one key) of shape
        ``batch (+ K) + (1, *spatial)`` (``(C, *spatial)`` without summation).

    Raises:
        SiteError: unknown or malformed site.  NotReachedError: ``f`` never reaches the site, or
        reaches it several times (use ``"@k"``).  AttributionError: ``f``'s output shape, a site
        value that is not batch-first.  TypeError: ``module`` is not an ``nn.Module``.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(),
        ...                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> td = TensorDict({"x": torch.randn(2, 1, 8, 8)}, batch_size=[2])
        >>> out = tdfunc.grad_cam(lambda t: net(t["x"]), td, net, "1")  # 3 classes, one forward
        >>> out["attr", "1"].shape
        torch.Size([2, 3, 1, 6, 6])

    References:
        Selvaraju et al. Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
        Localization. ICCV 2017.

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward),
    ``torch.compile(fullgraph=True)`` after ``tdfunc.install_sites(module, site)``.
    """
    act, grad, k = _site_gradient(f, td, module, site, channels=True)
    nb = len(td.batch_size)
    c = nb + (k is not None)  # the channel dim of the (K,) + act-shaped gradient
    spatial = tuple(range(c + 1, grad.dim()))
    weights = grad.mean(spatial, keepdim=True) if spatial else grad
    cam = weights * act
    if attr_dim_summation:
        cam = cam.sum(c, keepdim=True)
    if relu_attributions:
        cam = torch.relu(cam)
    return _out(td, site, move_target_dim(cam, k, nb), warn=True)


@public("tdfunc.layer_gradient_x_activation")
def layer_gradient_x_activation(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    module: nn.Module,
    site: str | Sequence[str],
    *,
    multiply_by_inputs: bool = True,
) -> TensorDict:
    """Gradient times activation at any site, captum's ``LayerGradientXActivation``.

    .. math::  A_{b,k} = a_b \\odot \\frac{\\partial f_k(x)_b}{\\partial a_b}, \\qquad a = \\text{the site's value}

    Args:
        f, td, module: as in :func:`tdfunc.grad_cam`.
        site: a site as in :func:`tdfunc.grad_cam` (any batch-first value), or a list of distinct sites, all
            from the same two forwards (captum's list of layers; each site's gradient is its full gradient).
        multiply_by_inputs: multiply by the activation (captum's default); False returns the
            gradient at the site alone.

    Returns:
        TensorDict with ``("attr", site)`` of shape ``batch (+ K) + the site's per-example shape`` for each
        site.

    Raises:
        As :func:`tdfunc.grad_cam`.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> td = TensorDict({"x": torch.randn(4, 3)}, batch_size=[4])
        >>> out = tdfunc.layer_gradient_x_activation(lambda t: net(t["x"]), td, net, "1", multiply_by_inputs=False)
        >>> torch.allclose(out["attr", "1"][:, :, 0], net[2].weight[:, 0].expand(4, 2))  # d logit / d hidden
        True

    References:
        Shrikumar, Greenside, Shcherbina, Kundaje. Not Just a Black Box. arXiv:1605.01713, 2016.

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward),
    ``torch.compile(fullgraph=True)`` after ``tdfunc.install_sites(module, site)``.
    """
    sites = _check_sites(td, module, site)
    acts, grads, k = _sites_gradient(f, td, module, sites)
    nb = len(td.batch_size)
    out = {}
    for s, act, grad in zip(sites, acts, grads):
        grad = move_target_dim(grad, k, nb)
        out[s] = grad * per_target(act, k, nb) if multiply_by_inputs else grad
    return _outs(td, out, warn=True)
