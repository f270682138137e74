"""Layer attribution along a path: layer integrated gradients, internal influence, layer conductance.

Each method integrates the gradient at a site over a straight-line path, in one ``vmap``-ed
forward over the path points (chunked by ``chunk_size``) and one vector-Jacobian product per
target; the gradient at the site comes from a substituted value or an additive zero delta there,
as in :mod:`._layer` (no backward hook), so every method composes with ``vmap`` / ``grad`` /
``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torch.func import vmap

from .._checks import check_callable, check_randomness, random_op_error
from .._edits import delta
from .._errors import public
from .._types import IGMethod, InKeys
from ._common import (
    BASELINE,
    AttributionError,
    Baselines,
    _norm,
    _show,
    _show_all,
    grads_per_target,
    move_target_dim,
    per_target,
    prepare,
    with_inputs,
)
from ._layer import _activation, _activations, _check, _check_sites, _out, _outs, _run
from ._quadrature import check_path_options as _check_options
from ._quadrature import quadrature

__all__ = ["internal_influence", "layer_conductance", "layer_integrated_gradients"]


@public("tdfunc.layer_integrated_gradients")
def layer_integrated_gradients(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    module: nn.Module,
    site: str | Sequence[str],
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

    Several sites (captum's list of layers: word and position embeddings, or the ``":input.N"`` of a
    layer with several inputs, captum's ``attribute_to_layer_input=True``) are interpolated jointly on one
    path, every site's value replaced by its point at the same ``alpha``; each gets its map, and the maps of
    all sites together sum to about ``f(x) - f(x')`` when the sites cut every path from the inputs to the
    output.  A site downstream of another listed site gets its path value whatever the upstream one holds,
    so the upstream map covers only the paths around it (captum warns about the same).

    The inputs may be integer token ids (captum's ``LayerIntegratedGradients`` on an embedding
    layer): only the site's values are interpolated, so the ids go to baseline ids of the same dtype
    (a ``("baseline", key)`` entry, or ``baselines=<pad token id>``) and the path runs between the
    embedding site's values for the baseline ids and for the input ids.  The map is per element of
    the site's value (``(T, H)`` per example at an embedding); ``.sum(-1)`` gives one score per token.

    Args:
        f, td, module: as in :func:`tdfunc.grad_cam`.
        site: a site as in :func:`tdfunc.grad_cam` (any batch-first value), or a list of distinct sites
            interpolated jointly.
        n_steps, method, chunk_size: as in :func:`tdfunc.integrated_gradients` (the path is
            ``vmap``-ped; ``f`` always sees ``td``'s batch shape).
        multiply_by_inputs: multiply by ``a - a'`` (captum's default True).
        return_convergence_delta: also return ``"convergence_delta"`` of shape ``batch (+ K)``:
            ``sum(attr) - (f(x) - f(x'))``, the sum over every listed site (no extra forward: the capture passes
            give both).
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
        TensorDict with ``("attr", site)`` of shape ``batch (+ K) + the site's per-example shape`` for each
        site (and ``"convergence_delta"`` when asked).

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

        Word and position embeddings on one path (captum's ``LayerIntegratedGradients(model, [word, pos])``):

        >>> pos = torch.nn.Embedding(3, 4)
        >>> lm2 = torch.nn.ModuleDict({"emb": emb, "pos": pos, "head": head})
        >>> both = TensorDict({"ids": torch.tensor([[3, 7, 0]]), "pos_ids": torch.arange(3)[None]}, batch_size=[1])
        >>> g = lambda t: head((emb(t["ids"]) + pos(t["pos_ids"])).mean(1))[:, 0]
        >>> out = tdfunc.layer_integrated_gradients(g, both, lm2, ["emb", "pos"], baselines={"ids": 0, "pos_ids": 0},
        ...                                         return_convergence_delta=True)
        >>> out["attr", "pos"].shape, bool(out["convergence_delta"].abs().max() < 1e-5)  # both sum to f(x) - f(x')
        (torch.Size([1, 3, 4]), True)

    References:
        Sundararajan, Taly, Yan. Axiomatic Attribution for Deep Networks. ICML 2017;
        Kokhlikyan et al. Captum: A unified and generic model interpretability library. 2020.

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward),
    ``torch.compile(fullgraph=True)`` after ``tdfunc.install_sites(module, site)``.
    """
    _check_options(n_steps, method, chunk_size, "vmap")
    check_randomness(randomness, AttributionError)
    sites = _check_sites(td, module, site)
    check_callable("f", f, AttributionError, expected="f(td) -> Tensor")
    keys = _lig_keys(td, in_keys, baselines)
    p = prepare(td, keys, f=f, baselines_arg=baselines, integer_inputs=True)
    nb = len(p.batch)
    y_x, a_x = _activations(f, module, td, sites)
    y_b, a_b = _activations(f, module, with_inputs(td, p.baseline), sites)
    alphas64, weights64 = quadrature(method, n_steps)
    chunk = n_steps if chunk_size is None else min(chunk_size, n_steps)
    names = [f"a{i}" for i in range(len(sites))]  # every site on the one path: its values substituted jointly
    substituted = lambda xs: _run(f, module, td, {s: xs[n] for s, n in zip(sites, names)}, None)  # noqa: E731
    g = lambda xs: vmap(substituted, randomness=randomness)(xs)  # noqa: E731
    total: dict = {}
    k = None
    for start in range(0, n_steps, chunk):
        stop = min(start + chunk, n_steps)
        s = stop - start
        points = {}
        for n, ax, ab in zip(names, a_x, a_b):
            alpha = alphas64[start:stop].to(ax.dtype).to(ax.device).view(s, *([1] * ax.dim()))
            points[n] = ab + alpha * (ax - ab)
        try:
            _, grads, k = grads_per_target(g, points, 1, p.batch)
        except RuntimeError as e:
            err = random_op_error(e, AttributionError)
            if err is None:
                raise
            raise err from e
        for n in names:
            gr = grads[n]
            step = 1 if k is None else 2  # the path dim: after the target dim when there is one
            w = weights64[start:stop].to(gr.dtype).to(gr.device).view(s, *([1] * (gr.dim() - step)))
            contrib = (gr * w).sum(step - 1)
            total[n] = contrib if n not in total else total[n] + contrib
    attrs = {}
    for n, site_, ax, ab in zip(names, sites, a_x, a_b):
        attr = move_target_dim(total[n], k, nb)
        attrs[site_] = attr * per_target(ax - ab, k, nb) if multiply_by_inputs else attr
    extra = {}
    if return_convergence_delta:
        lead = nb + (k is not None)
        summed = sum(a.reshape(*a.shape[:lead], -1).sum(-1) for a in attrs.values())
        extra["convergence_delta"] = summed - (y_x - y_b)
    return _outs(td, attrs, extra, warn=True)


def _lig_keys(td: TensorDictBase, in_keys: InKeys | None, baselines: object) -> InKeys:
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
                f"td has no floating-point entry and no entry given a baseline (entries: {_show_all(leaves)}), "
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
                f"baseline for {_show(k)} has dtype {b.dtype} but the input has dtype {v.dtype}; the baseline "
                f"of integer inputs (token ids) is ids of the same dtype (e.g. the pad token id): the path runs "
                "between the site's values for the baseline ids and for the input ids. Give integer ids "
                f"(baselines=<pad token id>, or a {(BASELINE, *k)!r} entry of dtype {v.dtype}); for a baseline in "
                "embedding space, attribute float embeddings (pass inputs_embeds)."
            )
    return keys


def _path_at_site(
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
    _check(td, module, site)
    check_randomness(randomness, AttributionError)
    p = prepare(td, in_keys, f=f)
    _, a_x = _activation(f, module, td, site)
    s = alphas64.shape[0]
    points = {}
    for key in p.keys:
        x, b = p.x[key], p.baseline[key]
        a = alphas64.to(x.dtype).to(x.device).view(s, *([1] * x.dim()))
        points[key] = b + a * (x - b)
    one = lambda d, pts: _run(f, module, with_inputs(td, pts), {site: delta(d)}, None)  # noqa: E731
    g = lambda xs: vmap(one, randomness=randomness)(xs["d"], points)  # noqa: E731
    try:
        _, grads, k = grads_per_target(
            g, {"d": torch.zeros((s, *a_x.shape), dtype=a_x.dtype, device=a_x.device)}, 1, p.batch
        )
        vals = None
        if values:
            cap = lambda pts: _run(f, module, with_inputs(td, pts), None, [site])[1][site]  # noqa: E731
            vals = vmap(cap, randomness=randomness)(points)
    except RuntimeError as e:
        err = random_op_error(e, AttributionError)
        if err is None:
            raise
        raise err from e
    return grads["d"], vals, p.batch, k


@public("tdfunc.internal_influence")
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
    _check_options(n_steps, method, None, "vmap")
    alphas64, weights64 = quadrature(method, n_steps)
    grads, _, batch, k = _path_at_site(f, td, module, site, in_keys, alphas64, randomness, values=False)
    step = 0 if k is None else 1  # the path dim: after the target dim when there is one
    w = weights64.to(grads.dtype).to(grads.device).view(n_steps, *([1] * (grads.dim() - step - 1)))
    return _out(td, site, move_target_dim((grads * w).sum(step), k, len(batch)), warn=True)


@public("tdfunc.layer_conductance")
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
    _check_options(n_steps, method, None, "vmap")
    if not isinstance(return_convergence_delta, bool):
        raise AttributionError(
            f"return_convergence_delta must be True or False, got {type(return_convergence_delta).__name__} "
            f"({return_convergence_delta!r:.60})."
        )
    alphas64, _ = quadrature(method, n_steps + 1)
    grads, vals, batch, k = _path_at_site(f, td, module, site, in_keys, alphas64, randomness, values=True)
    dvals = vals[1:] - vals[:-1]  # values=True: the site's values along the path
    if k is None:
        attr = (grads[:-1] * dvals).sum(0)
    else:  # (K, S, ...) * (S, ...): the K targets' gradients times the same value steps
        attr = move_target_dim((grads[:, :-1] * dvals).sum(1), k, len(batch))
    extra = {}
    if return_convergence_delta:
        p = prepare(td, in_keys, f=f)
        y_x, y_b = f(td), f(with_inputs(td, p.baseline))
        lead = len(batch) + (k is not None)
        extra["convergence_delta"] = attr.reshape(*attr.shape[:lead], -1).sum(-1) - (y_x - y_b)
    return _out(td, site, attr, extra, warn=True)
