"""Layer attribution at any site: Grad-CAM, layer gradient x activation, layer integrated gradients.

The gradient at a site comes from an additive zero delta there (``value + d``, differentiated with
respect to ``d`` at ``d = 0``), never from a backward hook, so every method composes with
``vmap`` / ``grad`` / ``torch.compile``.  ``f`` is opaque (it calls the model somewhere): a first
forward captures the site's value (its shape sizes the delta, its value is the activation), then
one forward with the delta and one vector-Jacobian product per target give every target's
gradient.  Cost: two forwards + K backward passes for K per-class maps (captum: K forwards + K
backward passes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torch.func import vmap

from .. import _runtime
from .._checks import check_callable, check_randomness, random_op_error
from .._edits import delta
from .._errors import shape_str
from .._finite import check_finite, warn_nonfinite
from .._sites import ALL_CALLS, parse_site
from .._types import IGMethod, InKeys
from ._common import (
    BASELINE,
    NONFINITE_FIX,
    AttributionError,
    Baselines,
    _norm,
    _show,
    _show_all,
    check_output,
    grads_per_target,
    move_target_dim,
    per_target,
    prepare,
    with_inputs,
)
from ._quadrature import check_path_options as _check_options
from ._quadrature import quadrature

__all__ = [
    "grad_cam",
    "internal_influence",
    "layer_conductance",
    "layer_gradient_x_activation",
    "layer_integrated_gradients",
]


def _check(fn: str, td: object, module: object, site: object) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"{fn}: module must be the nn.Module whose site is attributed, got {type(module).__name__} "
            f"({module!r:.60}); pass the model itself, e.g. {fn}(f, td, model, 'layer1')."
        )
    if not isinstance(td, TensorDictBase):
        raise TypeError(
            f"{fn}: td must be a TensorDict holding the inputs, got {type(td).__name__} ({td!r:.60}); "
            "e.g. TensorDict({'x': x}, batch_size=[len(x)])."
        )
    spec = parse_site(fn, site)
    if spec.is_glob or spec.call == ALL_CALLS:
        raise AttributionError(
            f"{fn}: site {site!r} names several values; attribute one site at a time "
            "(no globs; '@k' for the k-th call of a module that runs several times)."
        )


def _run(fn: str, f: Callable, module: nn.Module, td: TensorDictBase, edits: dict | None, capture: list | None):
    """``f(td)`` with ``edits`` / ``capture`` at sites of ``module`` (intervene, errors naming ``fn``)."""
    plan = _runtime.make_plan(fn, module, edits, capture)
    out, frame = _runtime.run_in_frame(plan, f, td)  # type: ignore[arg-type]  # a plan: module is given
    caps = _runtime.finish(frame)
    return out if capture is None else (out, caps)


def _activation(fn: str, f: Callable, module: nn.Module, td: TensorDictBase, site: str):
    """One forward: ``(f(td), value at site)``; the value must be batch-first."""
    y, caps = _run(fn, f, module, td, None, [site])
    check_output(fn, y, td.batch_size)
    a = caps[site]
    batch = td.batch_size
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        what = f"dtype {a.dtype}" if isinstance(a, torch.Tensor) else f"a value of type {type(a).__name__}"
        raise AttributionError(
            f"{fn}: site {site!r} holds {what}; layer attribution needs a floating-point tensor there. "
            "Attribute another site (e.g. ':output.N' for one element of a tuple output)."
        )
    if tuple(a.shape[: len(batch)]) != tuple(batch):
        raise AttributionError(
            f"{fn}: the value at site {site!r} has shape {shape_str(a.shape)}, which does not start with td's "
            f"batch shape {shape_str(batch)}; the site must hold one activation per example, batch dims first. "
            "Give td the batch shape the model sees, or attribute another site."
        )
    return y, a


def _site_gradient(fn: str, f: Callable, td: TensorDictBase, module: nn.Module, site: str, channels: bool = False):
    """(activation, gradient of every target at the site, K): two forwards + K vjps."""
    _check(fn, td, module, site)
    check_callable(fn, "f", f, AttributionError, expected="f(td) -> Tensor")
    for key in td.keys(include_nested=True, leaves_only=True):  # f may read any entry: every float one is an input
        if td.get(key).is_floating_point():
            check_finite(fn, f"input {_show(_norm(key))}", td.get(key), AttributionError, NONFINITE_FIX)
    _, act = _activation(fn, f, module, td, site)
    if channels and act.dim() <= len(td.batch_size):
        raise AttributionError(
            f"{fn}: the value at site {site!r} has shape {shape_str(act.shape)}, with no channel dim after td's "
            f"batch shape {shape_str(td.batch_size)}; Grad-CAM needs batch + (C, *spatial). Attribute another site."
        )
    g = lambda xs: _run(fn, f, module, td, {site: delta(xs["d"])}, None)
    _, grads, k = grads_per_target(fn, g, {"d": torch.zeros_like(act)}, 0, td.batch_size)
    return act, grads["d"], k


def _out(td: TensorDictBase, site: str, value: torch.Tensor, extra: dict | None = None, *, fn: str = "") -> TensorDict:
    if fn:
        warn_nonfinite(fn, repr(("attr", site)), value)
    out = TensorDict({}, batch_size=td.batch_size)
    out.set(("attr", site), value)
    for k, v in (extra or {}).items():
        out.set(k, v)
    return out


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
    fn = "tdfunc.grad_cam"
    act, grad, k = _site_gradient(fn, f, td, module, site, channels=True)
    nb = len(td.batch_size)
    c = nb + (k is not None)  # the channel dim of the (K,) + act-shaped gradient
    spatial = tuple(range(c + 1, grad.dim()))
    weights = grad.mean(spatial, keepdim=True) if spatial else grad
    cam = weights * act
    if attr_dim_summation:
        cam = cam.sum(c, keepdim=True)
    if relu_attributions:
        cam = torch.relu(cam)
    return _out(td, site, move_target_dim(cam, k, nb), fn=fn)


def layer_gradient_x_activation(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    module: nn.Module,
    site: str,
    *,
    multiply_by_inputs: bool = True,
) -> TensorDict:
    """Gradient times activation at any site, captum's ``LayerGradientXActivation``.

    .. math::  A_{b,k} = a_b \\odot \\frac{\\partial f_k(x)_b}{\\partial a_b}, \\qquad a = \\text{the site's value}

    Args:
        f, td, module, site: as in :func:`tdfunc.grad_cam` (any batch-first site value).
        multiply_by_inputs: multiply by the activation (captum's default); False returns the
            gradient at the site alone.

    Returns:
        TensorDict with ``("attr", site)`` of shape ``batch (+ K) + the site's per-example shape``.

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
    fn = "tdfunc.layer_gradient_x_activation"
    act, grad, k = _site_gradient(fn, f, td, module, site)
    nb = len(td.batch_size)
    grad = move_target_dim(grad, k, nb)
    return _out(td, site, grad * per_target(act, k, nb) if multiply_by_inputs else grad, fn=fn)


def layer_integrated_gradients(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    module: nn.Module,
    site: str,
    *,
    n_steps: int = 50,
    method: IGMethod = "gausslegendre",
    multiply_by_inputs: bool = True,
    chunk_size: int | None = None,
    return_convergence_delta: bool = False,
    in_keys: InKeys | None = None,
    randomness: str = "error",
    baselines: Baselines | None = None,
) -> TensorDict:
    """Integrated gradients at a site (captum's ``LayerIntegratedGradients``), every target from one path forward.

    With ``a`` and ``a'`` the site's values at the inputs and at the baseline inputs, ``f`` runs
    on the inputs with the site's value replaced by points of the straight path between them:

    .. math::
        \\mathrm{LIG}_{b,k} = (a_b - a'_b) \\odot \\int_0^1
            \\frac{\\partial f_k(x;\\ \\text{site} \\leftarrow a' + \\alpha (a - a'))_b}{\\partial a_b}\\, d\\alpha
        \\approx (a_b - a'_b) \\odot \\sum_s w_s\\, \\nabla_a f_k(\\ldots\\alpha_s\\ldots)_b

    Cost: two capture forwards (at ``x`` and at the baseline; captum does the same), one forward
    over the ``n_steps`` path points and one vector-Jacobian product per target.

    The inputs may be integer token ids (captum's ``LayerIntegratedGradients`` on an embedding
    layer): only the site's values are interpolated, so the ids go to baseline ids of the same dtype
    (a ``("baseline", key)`` entry, or ``baselines=<pad token id>``) and the path runs between the
    embedding site's values for the baseline ids and for the input ids.  The map is per element of
    the site's value (``(T, H)`` per example at an embedding); ``.sum(-1)`` gives one score per token.

    Args:
        f, td, module, site: as in :func:`tdfunc.grad_cam` (any batch-first site value).
        n_steps, method, chunk_size: as in :func:`tdfunc.integrated_gradients` (the path is
            ``vmap``-ped; ``f`` always sees ``td``'s batch shape).
        multiply_by_inputs: multiply by ``a - a'`` (captum's default True).
        return_convergence_delta: also return ``"convergence_delta"`` of shape ``batch (+ K)``:
            ``sum(attr) - (f(x) - f(x'))`` (no extra forward: the capture passes give both).
        in_keys: the inputs replaced by their baselines (zeros when absent) to get ``a'``; floating-point,
            integer or bool entries (token ids, masks).  Default: every floating-point entry and every
            entry given a baseline (a ``("baseline", key)`` entry or a key of a ``baselines`` dict), else
            ``td``'s only entry (token ids); entries not named (an attention mask) are held fixed.
        randomness: ``torch.func.vmap``'s flag for random ops in ``f`` (train-mode dropout) under the
            ``vmap`` over the path: ``"error"`` (default, as torch), ``"different"`` or ``"same"``.
        baselines: baselines shared across the batch instead of ``("baseline", key)`` entries, as in
            :func:`tdfunc.integrated_gradients`: a number (for token ids an integer, e.g. the pad token
            id) or a tensor of the input's dtype broadcastable to it; a dict key -> baseline for several
            inputs.

    Returns:
        TensorDict with ``("attr", site)`` of shape ``batch (+ K) + the site's per-example shape``
        (and ``"convergence_delta"`` when asked).

    Raises:
        As :func:`tdfunc.grad_cam`, and AttributionError for a bad method, ``n_steps``,
        ``chunk_size``, input key or baseline (a floating-point baseline for integer ids).

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> out = tdfunc.layer_integrated_gradients(lambda t: net(t["x"]), td, net, "1", return_convergence_delta=True)
        >>> out["attr", "1"].shape, out["convergence_delta"].shape   # 4 classes from one path forward
        (torch.Size([5, 4, 8]), torch.Size([5, 4]))
        >>> bool(out["convergence_delta"].abs().max() < 1e-5)
        True

        Token ids with the pad id (0) as baseline, at the embedding (a bag-of-embeddings classifier):

        >>> emb, head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2)
        >>> lm = torch.nn.ModuleDict({"emb": emb, "head": head})
        >>> ids = TensorDict({"ids": torch.tensor([[3, 7, 0]])}, batch_size=[1])
        >>> out = tdfunc.layer_integrated_gradients(lambda t: head(emb(t["ids"]).mean(1))[:, 0], ids, lm, "emb",
        ...                                         baselines=0, return_convergence_delta=True)
        >>> out["attr", "emb"].sum(-1).shape, bool(out["convergence_delta"].abs().max() < 1e-5)  # one per token
        (torch.Size([1, 3]), True)

    References:
        Sundararajan, Taly, Yan. Axiomatic Attribution for Deep Networks. ICML 2017;
        Kokhlikyan et al. Captum: A unified and generic model interpretability library. 2020.

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward),
    ``torch.compile(fullgraph=True)`` after ``tdfunc.install_sites(module, site)``.
    """
    fn = "tdfunc.layer_integrated_gradients"
    _check_options(fn, n_steps, method, chunk_size, "vmap")
    check_randomness(fn, randomness, AttributionError)
    _check(fn, td, module, site)
    check_callable(fn, "f", f, AttributionError, expected="f(td) -> Tensor")
    keys = _lig_keys(fn, td, in_keys, baselines)
    p = prepare(fn, td, keys, f=f, baselines_arg=baselines, integer_inputs=True)
    nb = len(p.batch)
    y_x, a_x = _activation(fn, f, module, td, site)
    y_b, a_b = _activation(fn, f, module, with_inputs(td, p.baseline), site)
    alphas64, weights64 = quadrature(method, n_steps)
    chunk = n_steps if chunk_size is None else min(chunk_size, n_steps)
    substituted = lambda a: _run(fn, f, module, td, {site: a}, None)
    g = lambda xs: vmap(substituted, randomness=randomness)(xs["a"])
    total, k = None, None
    for start in range(0, n_steps, chunk):
        stop = min(start + chunk, n_steps)
        s = stop - start
        alpha = alphas64[start:stop].to(a_x.dtype).to(a_x.device).view(s, *([1] * a_x.dim()))
        try:
            _, grads, k = grads_per_target(fn, g, {"a": a_b + alpha * (a_x - a_b)}, 1, p.batch)
        except RuntimeError as e:
            err = random_op_error(fn, e, AttributionError)
            if err is None:
                raise
            raise err from e
        gr = grads["a"]
        step = 1 if k is None else 2  # the path dim: after the target dim when there is one
        w = weights64[start:stop].to(gr.dtype).to(gr.device).view(s, *([1] * (gr.dim() - step)))
        contrib = (gr * w).sum(step - 1)
        total = contrib if total is None else total + contrib
    attr = move_target_dim(total, k, nb)  # type: ignore[arg-type]  # n_steps >= 1: total is set
    if multiply_by_inputs:
        attr = attr * per_target(a_x - a_b, k, nb)
    extra = {}
    if return_convergence_delta:
        lead = nb + (k is not None)
        extra["convergence_delta"] = attr.reshape(*attr.shape[:lead], -1).sum(-1) - (y_x - y_b)
    return _out(td, site, attr, extra, fn=fn)


def _lig_keys(fn: str, td: TensorDictBase, in_keys: InKeys | None, baselines: object) -> InKeys:
    """The inputs layer IG sends to their baselines; integer inputs (token ids) need integer baselines."""
    leaves = [_norm(k) for k in td.keys(include_nested=True, leaves_only=True)]
    inputs = [k for k in leaves if k[0] != BASELINE]
    given = {_norm(k): v for k, v in baselines.items()} if isinstance(baselines, Mapping) else {}
    if in_keys is None:
        keys = [k for k in inputs if td.get(k).is_floating_point() or (BASELINE, *k) in leaves or k in given]
        if not keys and not given and len(inputs) == 1:
            keys = inputs  # td's one entry (token ids), to baselines=<pad id> or zeros
        if not keys:
            ids = next((k for k in inputs if not td.get(k).is_floating_point()), ("input_ids",))
            raise AttributionError(
                f"{fn}: td has no floating-point entry and no entry given a baseline (entries: {_show_all(leaves)}), "
                f"so nothing says which inputs go to a baseline; name them with in_keys=[{_show(ids)}] (integer token "
                f"ids too: their baseline is ids of the same dtype, e.g. baselines=<pad token id> or a "
                f"{(BASELINE, *ids)!r} entry; zeros when absent)."
            )
    else:
        keys = [_norm(k) for k in ([in_keys] if isinstance(in_keys, (str, tuple)) else in_keys)]
    for k in keys:
        if k not in inputs or td.get(k).is_floating_point() or td.get(k).is_complex():
            continue  # prepare reports unknown keys, float and complex inputs
        b = given.get(k) if given else (baselines if baselines is not None else None)
        if b is None and (BASELINE, *k) in leaves:
            b = td.get((BASELINE, *k))
        if isinstance(b, torch.Tensor) and (b.is_floating_point() or b.is_complex()):
            v = td.get(k)
            raise AttributionError(
                f"{fn}: baseline for {_show(k)} has dtype {b.dtype} but the input has dtype {v.dtype}; the baseline "
                f"of integer inputs (token ids) is ids of the same dtype (e.g. the pad token id): the path runs "
                "between the site's values for the baseline ids and for the input ids. Give integer ids "
                f"(baselines=<pad token id>, or a {(BASELINE, *k)!r} entry of dtype {v.dtype}); for a baseline in "
                "embedding space, attribute float embeddings (pass inputs_embeds)."
            )
    return keys


def _path_at_site(
    fn: str,
    f: Callable,
    td: TensorDictBase,
    module: nn.Module,
    site: str,
    in_keys,
    alphas64: torch.Tensor,
    randomness: str,
    values: bool,
):
    """At each input-path point ``x' + alpha (x - x')``: every target's gradient at ``site`` (shape ``(K,)? + (S,)
    + site value``), and with ``values`` the site's values there (``(S,) + site value``); also the batch and K."""
    _check(fn, td, module, site)
    check_randomness(fn, randomness, AttributionError)
    p = prepare(fn, td, in_keys, f=f)
    _, a_x = _activation(fn, f, module, td, site)
    s = alphas64.shape[0]
    points = {}
    for key in p.keys:
        x, b = p.x[key], p.baseline[key]
        a = alphas64.to(x.dtype).to(x.device).view(s, *([1] * x.dim()))
        points[key] = b + a * (x - b)
    one = lambda d, pts: _run(fn, f, module, with_inputs(td, pts), {site: delta(d)}, None)  # noqa: E731
    g = lambda xs: vmap(one, randomness=randomness)(xs["d"], points)  # noqa: E731
    try:
        _, grads, k = grads_per_target(
            fn, g, {"d": torch.zeros((s, *a_x.shape), dtype=a_x.dtype, device=a_x.device)}, 1, p.batch
        )
        vals = None
        if values:
            cap = lambda pts: _run(fn, f, module, with_inputs(td, pts), None, [site])[1][site]  # noqa: E731
            vals = vmap(cap, randomness=randomness)(points)
    except RuntimeError as e:
        err = random_op_error(fn, e, AttributionError)
        if err is None:
            raise
        raise err from e
    return grads["d"], vals, p.batch, k


def internal_influence(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    module: nn.Module,
    site: str,
    *,
    n_steps: int = 50,
    method: IGMethod = "gausslegendre",
    in_keys: InKeys | None = None,
    randomness: str = "error",
) -> TensorDict:
    """Internal influence (Leino et al., 2018; captum's ``InternalInfluence``): the gradient at a site,
    integrated along the straight path between the baseline and the input *in input space*.

    .. math::  \\mathrm{II}_{b,k} = \\int_0^1 \\frac{\\partial f_k}{\\partial a}\\Big|_{x' + \\alpha (x - x')} d\\alpha
        \\approx \\sum_s w_s\\, \\frac{\\partial f_k}{\\partial a}\\Big|_{x' + \\alpha_s (x - x')}

    (not multiplied by anything).  Every path point runs in one ``vmap``-ed forward with a zero
    delta at ``site``, and each target is one vector-Jacobian product of it.

    Args:
        f, td, module, site: as in :func:`tdfunc.grad_cam` (any batch-first site value).
        n_steps, method: as in :func:`tdfunc.integrated_gradients` (captum's five rules).
        in_keys: the inputs moved along the path (to their ``("baseline", key)`` entries, zeros when
            absent); default every floating-point entry.
        randomness: ``torch.func.vmap``'s flag for random ops in ``f`` under the ``vmap`` over the path.

    Returns:
        TensorDict with ``("attr", site)`` of shape ``batch (+ K) + the site's per-example shape``.

    Raises:
        As :func:`tdfunc.layer_integrated_gradients`.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> out = tdfunc.internal_influence(lambda t: net(t["x"]), td, net, "1", n_steps=8)
        >>> torch.allclose(out["attr", "1"][:, :, 0], net[2].weight[:, 0].expand(5, 4))  # linear after the site
        True

    References:
        Leino, Sen, Datta, Fredrikson, Li. Influence-Directed Explanations for Deep Convolutional
        Networks. ITC 2018.

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward),
    ``torch.compile(fullgraph=True)`` after ``tdfunc.install_sites(module, site)``.
    """
    fn = "tdfunc.internal_influence"
    _check_options(fn, n_steps, method, None, "vmap")
    alphas64, weights64 = quadrature(method, n_steps)
    grads, _, batch, k = _path_at_site(fn, f, td, module, site, in_keys, alphas64, randomness, values=False)
    step = 0 if k is None else 1  # the path dim: after the target dim when there is one
    w = weights64.to(grads.dtype).to(grads.device).view(n_steps, *([1] * (grads.dim() - step - 1)))
    return _out(td, site, move_target_dim((grads * w).sum(step), k, len(batch)), fn=fn)


def layer_conductance(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    module: nn.Module,
    site: str,
    *,
    n_steps: int = 50,
    method: IGMethod = "gausslegendre",
    in_keys: InKeys | None = None,
    return_convergence_delta: bool = False,
    randomness: str = "error",
) -> TensorDict:
    """Layer conductance (Dhamdhere et al., 2018; captum's ``LayerConductance``): the flow of integrated
    gradients through each unit of a site, along the input-space path.

    .. math::  \\mathrm{Cond}_{b,k} = \\int_0^1 \\frac{\\partial f_k}{\\partial a}\\,
        \\frac{\\partial a}{\\partial \\alpha}\\, d\\alpha
        \\approx \\sum_{s=0}^{n-1} \\frac{\\partial f_k}{\\partial a}\\Big|_{\\alpha_s} \\odot
        \\big(a(\\alpha_{s+1}) - a(\\alpha_s)\\big)

    with ``a(alpha)`` the site's value at the input ``x' + alpha (x - x')`` and ``alpha_0 .. alpha_n``
    the ``n_steps + 1`` nodes of ``method`` (captum's discretisation).  The conductances of a site
    sum to about ``f(x) - f(x')`` (exactly in the limit; ``return_convergence_delta`` reports it).
    One ``vmap``-ed forward over the ``n_steps + 1`` points with a zero delta at ``site``, one
    capture forward over them for ``a(alpha)``, and one vector-Jacobian product per target.

    Args:
        f, td, module, site: as in :func:`tdfunc.grad_cam` (any batch-first site value).
        n_steps, method: ``n_steps + 1`` path points from ``method``'s nodes (captum's five rules).
        in_keys: the inputs moved along the path (to their ``("baseline", key)`` entries, zeros when
            absent); default every floating-point entry.
        return_convergence_delta: also return ``"convergence_delta"``, shape ``batch (+ K)``:
            ``sum(attr) - (f(x) - f(x'))`` (two more forwards).
        randomness: ``torch.func.vmap``'s flag for random ops in ``f`` under the ``vmap`` over the path.

    Returns:
        TensorDict with ``("attr", site)`` of shape ``batch (+ K) + the site's per-example shape``.

    Raises:
        As :func:`tdfunc.layer_integrated_gradients`.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> out = tdfunc.layer_conductance(lambda t: net(t["x"]), td, net, "1", return_convergence_delta=True)
        >>> out["attr", "1"].shape, bool(out["convergence_delta"].abs().max() < 1e-2)
        (torch.Size([5, 4, 8]), True)

    References:
        Dhamdhere, Sundararajan, Yan. How Important Is a Neuron? ICLR 2019 (arXiv:1805.12233).

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward),
    ``torch.compile(fullgraph=True)`` after ``tdfunc.install_sites(module, site)``.
    """
    fn = "tdfunc.layer_conductance"
    _check_options(fn, n_steps, method, None, "vmap")
    if not isinstance(return_convergence_delta, bool):
        raise AttributionError(
            f"{fn}: return_convergence_delta must be True or False, got {type(return_convergence_delta).__name__} "
            f"({return_convergence_delta!r:.60})."
        )
    alphas64, _ = quadrature(method, n_steps + 1)
    grads, vals, batch, k = _path_at_site(fn, f, td, module, site, in_keys, alphas64, randomness, values=True)
    dvals = vals[1:] - vals[:-1]  # values=True: the site's values along the path
    if k is None:
        attr = (grads[:-1] * dvals).sum(0)
    else:  # (K, S, ...) * (S, ...): the K targets' gradients times the same value steps
        attr = move_target_dim((grads[:, :-1] * dvals).sum(1), k, len(batch))
    extra = {}
    if return_convergence_delta:
        p = prepare(fn, td, in_keys, f=f)
        y_x, y_b = f(td), f(with_inputs(td, p.baseline))
        lead = len(batch) + (k is not None)
        extra["convergence_delta"] = attr.reshape(*attr.shape[:lead], -1).sum(-1) - (y_x - y_b)
    return _out(td, site, attr, extra, fn=fn)
