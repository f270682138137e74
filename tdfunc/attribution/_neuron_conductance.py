"""Neuron conductance: the integrated gradient of ``f`` that flows through selected neuron(s) of a site.

Per chunk of path points, one ``vmap``-ed forward with a zero delta at the site that also captures the site's
value, under two nested vector-Jacobian products: the inner one (w.r.t. the delta) gives each target's gradient
``g`` at the site by the part of the backward after the site; the outer one (w.r.t. the inputs) the input
gradient of the site's value against the cotangent ``w * g`` (``w`` the neuron's weights) by the part before
it, so the part of the gradient that passes through the selected neurons only.  No backward hook, no backward
pass over the whole model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torch.func import vjp, vmap

from .._checks import check_bool, check_callable, check_randomness, random_op_error
from .._edits import delta
from .._errors import public
from .._types import IGMethod, InKeys
from ._common import (
    AttributionError,
    Baselines,
    _check_compiled,
    check_float_output,
    check_output,
    check_rows_as_targets,
    prepare,
    result,
    with_inputs,
)
from ._layer import _activation, _check, _run
from ._neuron import NeuronSelector, selection
from ._quadrature import check_path_options, quadrature

__all__ = ["neuron_conductance"]


@public("tdfunc.neuron_conductance")
def neuron_conductance(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    module: nn.Module,
    site: str,
    selector: NeuronSelector,
    *,
    n_steps: int = 50,
    method: IGMethod = "gausslegendre",
    multiply_by_inputs: bool = True,
    chunk_size: int | None = None,
    in_keys: InKeys | None = None,
    randomness: str = "error",
    baselines: Baselines | None = None,
) -> TensorDict:
    """Neuron conductance (Dhamdhere et al., 2018; captum's ``NeuronConductance``): the part of each input's
    integrated gradient that flows through the selected neuron(s) of a site.

    With ``y_j`` the site's unit ``j`` and ``x(alpha) = x' + alpha (x - x')`` the input path:

    .. math::
        \\mathrm{NC}^{j}_{b,k,i} = (x_i - x'_i) \\int_0^1 \\frac{\\partial f_k}{\\partial y_j}
            \\frac{\\partial y_j}{\\partial x_i}\\Big|_{x(\\alpha)} d\\alpha
        \\approx (x_i - x'_i) \\sum_s w_s\\, \\frac{\\partial f_k}{\\partial y_j}
            \\frac{\\partial y_j}{\\partial x_i}\\Big|_{x(\\alpha_s)}

    Summed over every unit of the site it is the input's integrated gradient (the paths through the site
    are all the paths).  A selector naming several units (a slice, fewer indices than dims) gives the sum
    of their conductances, the flow through that group: ``NC^S = sum_{j in S} NC^j``.  captum multiplies
    the sums instead (``(sum_S df/dy_j) (sum_S dy_j/dx)``): equal for one unit, not for a group.  A callable
    selector ``sel(value)`` weighs unit ``j`` by ``d sel / d y_j``: for a selection such as
    ``lambda v: v[:, 3]`` that unit's conductance.

    Cost per chunk of path points: one ``vmap``-ed forward (a zero delta at the site, which is also
    captured), then of that forward one backward from the output to the site per target (the site's
    gradient) and one from the site to the inputs per (target, neuron) (the input gradient through the
    neuron); plus one capture forward for the site's shape.  captum's ``NeuronConductance`` does the same
    per target and neuron, with one forward each.

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)`` (K targets from one
            forward); it calls ``module`` somewhere (directly or through :func:`tdfunc.functional_call`).
        td: the inputs; baselines are ``("baseline", key)`` entries (zeros when absent) or ``baselines=``.
        module: the model whose site holds the neuron(s).
        site: one site of ``module`` (output, ``":input"``, ``":output.N"``, ``"@k"``, an operation site),
            batch-first: ``td.batch_size + unit shape``.
        selector: as in :func:`tdfunc.neuron`: an index tuple per example (ints; slices or fewer indices
            select a group), a list of N index tuples (N neurons in one call), or ``sel(value)`` returning
            shape ``batch`` or ``batch + (N,)``.
        n_steps, method, chunk_size: as in :func:`tdfunc.integrated_gradients` (Gauss–Legendre by default;
            captum's ``NeuronConductance`` defaults to ``"riemann_trapezoid"``).
        multiply_by_inputs: multiply by ``x - x'`` (captum's default True).
        in_keys: the inputs moved along the path; default every floating-point entry.
        randomness: ``torch.func.vmap``'s flag for random ops in ``f`` under the ``vmap`` over the path.
        baselines: baselines shared across the batch, as in :func:`tdfunc.integrated_gradients`.

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) (+ N) + feature shape``: K when ``f`` returns
        K targets, N for a list of N neurons (or a callable returning ``batch + (N,)``).

    Raises:
        AttributionError: a bad selector, method, ``n_steps``, ``chunk_size``, input key or baseline, a site
        value that is not batch-first, ``f``'s output shape.  SiteError / NotReachedError: as
        :func:`tdfunc.grad_cam`.  TypeError: ``module`` is not an ``nn.Module``, ``td`` not a TensorDict.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> td = TensorDict({"x": torch.randn(4, 3)}, batch_size=[4])
        >>> f = lambda t: net(t["x"])[:, 0]
        >>> every = tdfunc.neuron_conductance(f, td, net, "1", [(j,) for j in range(8)])  # 8 units, one call
        >>> every["attr", "x"].shape
        torch.Size([4, 8, 3])
        >>> ig = tdfunc.integrated_gradients(f, td)["attr", "x"]  # the flows through all units add up to IG
        >>> torch.allclose(every["attr", "x"].sum(1), ig, atol=1e-5)
        True

    References:
        Dhamdhere, Sundararajan, Yan. How Important Is a Neuron? ICLR 2019 (arXiv:1805.12233).

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward),
    ``torch.compile(fullgraph=True)`` after ``tdfunc.install_sites(module, site)``.
    """
    check_path_options(n_steps, method, chunk_size, "vmap")
    check_bool("multiply_by_inputs", multiply_by_inputs, AttributionError)
    check_randomness(randomness, AttributionError)
    _check(td, module, site)
    check_callable("f", f, AttributionError, expected="f(td) -> Tensor")
    pick = selection(selector)
    p = prepare(td, in_keys, f=f, baselines_arg=baselines)
    batch, nb = p.batch, len(p.batch)
    _, a_x = _activation(f, module, td, site)
    alphas64, weights64 = quadrature(method, n_steps)
    chunk = n_steps if chunk_size is None else min(chunk_size, n_steps)

    def one(d: torch.Tensor, pts: dict) -> tuple[torch.Tensor, torch.Tensor]:
        y, caps = _run(f, module, with_inputs(td, pts), {site: delta(d)}, [site])
        return check_float_output(y), caps[site]

    total: dict = {}
    for start in range(0, n_steps, chunk):
        stop = min(start + chunk, n_steps)
        s = stop - start
        pts = {}
        for key in p.keys:
            x, b = p.x[key], p.baseline[key]
            pts[key] = b + alphas64[start:stop].to(x.dtype).to(x.device).view(s, *([1] * x.dim())) * (x - b)
        zero = torch.zeros((s, *a_x.shape), dtype=a_x.dtype, device=a_x.device)

        def through_site(pts: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, list[torch.Tensor]]]:
            """The site's values (differentiated w.r.t. the inputs by the caller) and, as aux, ``f`` and every
            target's gradient at the site: a vjp w.r.t. the site's delta only, so it runs the part of the backward
            after the site (the inputs are constants at its level)."""
            (y, a), pull_d = vjp(lambda d: vmap(one, randomness=randomness)(d, pts), zero)  # type: ignore[misc]
            k = check_output(y[0], batch)
            cots = [torch.ones_like(y)] if k is None else [_one_hot(y, t) for t in range(k)]
            return a, (y, [pull_d((c, torch.zeros_like(a)))[0] for c in cots])

        try:
            a, pull_x, (y, site_grads) = vjp(through_site, pts, has_aux=True)  # type: ignore[misc]
        except RuntimeError as e:
            err = random_op_error(e, AttributionError)
            if err is None:
                raise
            raise err from e
        if torch.compiler.is_compiling():
            _check_compiled(y.device.type != "cpu")
        k = check_output(y[0], batch)
        check_rows_as_targets(k, batch, pts, 1)
        units, n_units = _unit_weights(pick, a, batch, site)  # N (or 1) of shape (s, *site value)
        qw = weights64[start:stop].to(a.dtype).to(a.device).view(s, *([1] * a_x.dim()))
        per_target = []
        for g in site_grads:  # each target's gradient at the site, at each path point
            # the input gradient through the unit(s): the part of the backward before the site, against w * g
            per_unit = [pull_x(g * qw * w)[0] for w in units]
            per_target.append({key: torch.stack([u[key].sum(0) for u in per_unit]) for key in p.keys})
        for key in p.keys:
            contrib = torch.stack([pt[key] for pt in per_target])  # (K or 1, N or 1, *x.shape)
            total[key] = contrib if key not in total else total[key] + contrib
    attrs = {}
    for key, t in total.items():
        t = t.movedim((0, 1), (nb, nb + 1))  # batch first, then target, then unit
        if n_units is None:
            t = t.squeeze(nb + 1)
        if k is None:
            t = t.squeeze(nb)
        if multiply_by_inputs:
            dx = p.x[key] - p.baseline[key]
            t = t * dx.view(*batch, *([1] * (t.dim() - dx.dim())), *dx.shape[nb:])
        attrs[key] = t
    return result(td.batch_size, attrs, warn=True)


def _unit_weights(
    pick: Callable, a: torch.Tensor, batch: torch.Size, site: str
) -> tuple[list[torch.Tensor], int | None]:
    """``d sel_n(value) / d value`` at each path point for each neuron ``n`` (an index selector: its 0/1 mask),
    and N (None for one neuron)."""
    nb = len(batch)
    sel, pull = vjp(lambda v: vmap(lambda u: pick(u, batch, site))(v), a)  # type: ignore[misc]  # no has_aux
    if sel.dim() == nb + 1:  # one neuron: (s, *batch)
        return [pull(torch.ones_like(sel))[0]], None
    n = int(sel.shape[-1])
    return [pull(_one_hot(sel, i))[0] for i in range(n)], n


def _one_hot(like: torch.Tensor, i: int) -> torch.Tensor:
    """A cotangent of ``like``'s shape: 1 at index ``i`` of the last dim, 0 elsewhere."""
    eye = torch.zeros(like.shape[-1], dtype=like.dtype, device=like.device)
    return eye.index_fill(0, torch.tensor([i], device=like.device), 1.0).expand(like.shape)
