"""Attribution patching (AtP) and AtP*'s GradDrop: first-order estimates of every activation-patching effect.

One clean forward (the clean values), one corrupted forward + backward through zero ``delta`` edits
at every site (the corrupted values and the metric's gradient at each of them), then
``(clean - corrupted) * gradient`` summed within each unit.  With ``grad_drop`` the backward runs
once per dropped layer, vmapped over one-hot masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from tensordict import TensorDictBase
from torch.func import grad, vmap

from .._call import functional_call
from .._checks import check_callable, check_chunk_size, check_module, renamed
from .._edits import delta
from .._finite import warn_nonfinite
from .._types import Over
from ._common import PatchError
from ._patch import MODULE_FIX, _as_list, _check_runs, _match, sweep_units, unit_dim
from ._units import Units
from ._units import forward as unit_forward

__all__ = ["attribution_patching"]


def _scalar(fn: str, r: Any) -> torch.Tensor:
    if not isinstance(r, torch.Tensor) or r.dim() != 0:
        got = f"shape {tuple(r.shape)}" if isinstance(r, torch.Tensor) else type(r).__name__
        raise PatchError(
            f"{fn}: metric must return a scalar (0-dim) tensor, got {got}; reduce it inside metric "
            "(e.g. logits[0, -1, a] - logits[0, -1, b], or .mean())."
        )
    return r


def _per_unit(fn: str, k: str, view: Units | int, e: torch.Tensor) -> torch.Tensor:
    """Sum ``e`` (clean - corrupted) * gradient within each unit: a vector over the units of site ``k``."""
    if isinstance(view, Units):
        e = unit_forward(fn, k, view, e)
        d = view.unit_dim % e.dim()
    else:
        d = unit_dim(fn, k, view, e) % e.dim()
    return e.sum(dim=[i for i in range(e.dim()) if i != d])


def attribution_patching(
    module: torch.nn.Module,
    state: TensorDictBase | None,
    clean_args: tuple[Any, ...],
    corrupted_args: tuple[Any, ...],
    sites: str | Sequence[str],
    metric: Callable[[Any], torch.Tensor],
    *,
    over: Over | Literal["heads"] | int | Units = "positions",
    grad_drop: str | Sequence[str] | None = None,
    chunk_size: int | None = None,
    kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Attribution patching: the first-order estimate of every effect ``patching_sweep`` measures.

    .. math::
        \\hat c_{s,u} = \\sum_{i \\in u} \\big(h^{clean}_{s} - h^{corr}_{s}\\big)_i
            \\,\\frac{\\partial\\,\\text{metric}}{\\partial (h_s)_i}\\Big|_{x^{corr}}
        \\;\\approx\\; R_{s,u} - \\text{metric}\\big(f(x^{corr})\\big)

    for every site ``s`` and unit ``u`` (a position, a head, any unit of ``over`` as in
    :func:`tdfunc.latent.patching_sweep`, whose result ``R`` it estimates, minus the corrupted
    metric), from one clean forward and one corrupted forward + backward: the gradient at every
    site at once is the gradient with respect to zero :func:`tdfunc.delta` edits there (Nanda 2023;
    Syed et al. 2023). It is exact when the metric is linear in the site's value, and a fast
    prefilter otherwise: rank the cells, then verify the top ones with the exact sweep.

    With ``grad_drop`` (AtP*'s GradDrop, Kramár et al. 2024, eq. 11) the backward is repeated once
    per dropped layer ``l``, with no gradient flowing through that layer's contribution (its value
    held as a constant), and the estimate becomes the magnitude
    :math:`\\tfrac{1}{L-1}\\sum_{l=1}^{L} |\\hat c^{\\,GD_l}_{s,u}|` (nonnegative), which undoes
    cancellations between a node's direct and indirect effects. The ``L`` backward passes run as
    one ``vmap`` over one-hot masks (``chunk_size`` bounds its memory).

    Args:
        module, state: the model (never changed) and its (partial) state (None: the module's own).
        clean_args, corrupted_args: positional inputs of the two runs (same shapes).
        sites: sites, globs or a list; rows follow the expanded order of the clean captures.
        metric: ``metric(output) -> scalar tensor`` of the corrupted run's output.
        over: the units, as in :func:`tdfunc.latent.patching_sweep`: ``"positions"``, ``"heads"``,
            a :func:`tdfunc.latent.units` view, or an int dim of every site's value.
        grad_drop: sites holding each layer's contribution to the residual stream (e.g. the
            attention and MLP outputs ``["model.layers.*.self_attn", "model.layers.*.mlp"]``);
            every matched site is one term ``l`` of the GradDrop sum. None: plain AtP.
        chunk_size: dropped layers per vmapped chunk (with ``grad_drop``); None runs all at once.
        kwargs: keyword inputs of both runs.

    Returns:
        Tensor of shape (n_sites, n_units): the signed estimates :math:`\\hat c` (plain AtP), or
        the nonnegative AtP+GradDrop magnitudes.

    Raises:
        PatchError: a site not reached, bad ``over`` / ``grad_drop``, sites with different unit
            counts, a non-scalar metric, clean and corrupted inputs of different shapes.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> clean, corrupt = torch.randn(1, 5, 3), torch.randn(1, 5, 3)
        >>> metric = lambda y: y[0, -1, 0]
        >>> est = tdfunc.latent.attribution_patching(net, None, (clean,), (corrupt,), ["1"], metric)
        >>> exact = tdfunc.latent.patching_sweep(net, None, (clean,), (corrupt,), ["1"], metric) - metric(net(corrupt))
        >>> torch.allclose(est, exact, atol=1e-6)   # the metric is linear in the Tanh output
        True

    Composes with: ``vmap`` (over inputs or states), ``grad`` (w.r.t. the state; needs double backward).

    References:
        Nanda. Attribution Patching: Activation Patching At Industrial Scale. 2023.
        Syed, Rager, Conmy. Attribution Patching Outperforms Automated Circuit Discovery. 2023.
        Kramár, Lieberum, Shah, Nanda. AtP*: An efficient and scalable method for localizing LLM
        behaviour to components. 2024.
    """
    fn = "tdfunc.latent.attribution_patching"
    check_module(fn, module, PatchError, fix=MODULE_FIX)
    names = _as_list(fn, sites)
    view = sweep_units(fn, module, over)
    drops = None if grad_drop is None else _as_list(fn, grad_drop)
    check_chunk_size(fn, chunk_size, PatchError)
    check_callable(fn, "metric", metric, PatchError, expected="metric(output) -> scalar tensor")
    _check_runs(fn, clean_args, corrupted_args)
    with renamed(fn):
        _, clean = functional_call(module, state, clean_args, kwargs, capture=names)
    keys = _match(fn, names, clean)
    zeros = {k: torch.zeros_like(clean[k]) for k in keys}
    drop_keys: list[str] = []
    corr_drop: dict[str, torch.Tensor] = {}
    if drops is not None:
        with renamed(fn):
            _, cd = functional_call(module, state, corrupted_args, kwargs, capture=drops)
        drop_keys = _match(fn, drops, cd)
        if len(drop_keys) < 2:
            raise PatchError(
                f"{fn}: grad_drop must match at least two sites (the layers whose gradients are dropped "
                f"one at a time, averaged over L - 1), got {drop_keys}; pass e.g. 'model.layers.*.mlp'."
            )
        corr_drop = {k: cd[k] for k in drop_keys}

    def run(deltas: dict[str, torch.Tensor], m: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        edits: dict[str, Any] = {}
        for k in keys:
            edits[k] = delta(deltas[k])
        if m is not None:
            for j, k in enumerate(drop_keys):
                # the value is unchanged; with m[j] no gradient flows through it (the constant corrupted value)
                d = deltas.get(k)
                edits[k] = lambda v, j=j, c=corr_drop[k], d=d: torch.where(m[j], c, v if d is None else v + d)
        with renamed(fn):
            out, caps = functional_call(module, state, corrupted_args, kwargs, edits=edits, capture=keys)
        return _scalar(fn, metric(out)), caps

    def grads(m: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], Any]:
        return grad(lambda d: run(d, m), has_aux=True)(zeros)

    def estimate(g: dict[str, torch.Tensor], corr: Any) -> list[torch.Tensor]:
        return [_per_unit(fn, k, view, (clean[k] - corr[k]) * g[k]) for k in keys]

    if drops is None:
        g, corr = grads(None)
        rows = estimate(g, corr)
    else:
        _, corr = run(zeros, None)  # the corrupted values, no gradient needed

        def dropped(m: torch.Tensor) -> list[torch.Tensor]:
            return [r.abs() for r in estimate(grads(m)[0], corr)]

        per_layer = vmap(dropped, chunk_size=chunk_size)(torch.eye(len(drop_keys), dtype=torch.bool))
        rows = [r.sum(0) / (len(drop_keys) - 1) for r in per_layer]
    units = {k: r.shape[0] for k, r in zip(keys, rows)}
    if len(set(units.values())) != 1:
        raise PatchError(
            f"{fn}: the sites have different numbers of units ({units}); estimate sites of one unit count per call."
        )
    out = torch.stack(rows)
    warn_nonfinite(fn, "", out)
    return out
