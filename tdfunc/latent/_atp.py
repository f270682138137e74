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
from .._checks import check_callable, check_chunk_size, check_module, renamed, type_error
from .._edits import delta
from .._errors import public
from .._finite import readable, warn_nonfinite
from .._types import Over
from ._common import PatchError
from ._patch import MODULE_FIX, _as_list, _check_runs, _match, sweep_units, unit_dim
from ._units import Units
from ._units import backward as unit_backward
from ._units import forward as unit_forward

__all__ = ["attribution_patching"]


def _scalar(r: Any) -> torch.Tensor:
    if not isinstance(r, torch.Tensor) or r.dim() != 0:
        got = f"shape {tuple(r.shape)}" if isinstance(r, torch.Tensor) else type(r).__name__
        raise PatchError(
            f"metric must return a scalar (0-dim) tensor, got {got}; reduce it inside metric "
            "(e.g. logits[0, -1, a] - logits[0, -1, b], or .mean())."
        )
    return r


def _per_unit(k: str, view: Units | int, e: torch.Tensor) -> torch.Tensor:
    """Sum ``e`` (clean - corrupted) * gradient within each unit: a vector over the units of site ``k``."""
    if isinstance(view, Units):
        e = unit_forward(k, view, e)
        d = view.unit_dim % e.dim()
    else:
        d = unit_dim(k, view, e) % e.dim()
    return e.sum(dim=[i for i in range(e.dim()) if i != d])


#: the last name of a query / key projection site -> the operand of the attention's q @ k^T matmul it feeds
_QK_ROLES = {"q_proj": 0, "query": 0, "q": 0, "k_proj": 1, "key": 1, "k": 1}


def _qk_role(k: str) -> tuple[int, str] | None:
    """``(0 for a query / 1 for a key, the attention module's path)`` of a projection site, else None."""
    if any(c in k for c in ":@/") or "." not in k:
        return None
    parent, last = k.rsplit(".", 1)
    role = _QK_ROLES.get(last)
    return None if role is None else (role, parent)


def _qk_ops(parent: str) -> dict[str, str]:
    """The operation sites of the attention at ``parent``: scores = softmax(s * (q @ k^T) + bias)."""
    return {
        "q": f"{parent}/matmul:input.0@0",
        "kt": f"{parent}/matmul:input.1@0",
        "m": f"{parent}/matmul@0",
        "z": f"{parent}/softmax:input",
        "a": f"{parent}/softmax",
    }


def _qk_check(parent: str, ops: dict[str, str], caps: Any) -> None:
    q, kt, m, z, a = (caps[ops[n]] for n in ("q", "kt", "m", "z", "a"))
    b, h, t, d = q.shape if q.dim() == 4 else (None,) * 4
    ok = q.dim() == 4 and tuple(kt.shape[:3]) == (b, h, d) and kt.dim() == 4
    ok = ok and tuple(m.shape) == (b, h, t, kt.shape[-1]) and z.shape == m.shape and a.shape == m.shape
    if not ok:
        raise PatchError(
            f"qk_fix recomputes the attention pattern of {parent!r} from its first matmul (q @ k^T, "
            f"(B, H, T, D) @ (B, H, D, S)) and its softmax, but they have shapes {tuple(q.shape)} @ "
            f"{tuple(kt.shape)} -> {tuple(m.shape)} and softmax {tuple(z.shape)} -> {tuple(a.shape)}; load the "
            "model with eager attention (attn_implementation='eager'), or pass qk_fix=False."
        )


def _qk_scale(parent: str, ops: dict[str, str], clean: Any, corr: Any) -> torch.Tensor:
    """The factor ``s`` in softmax input = s * (q @ k^T) + bias, fitted on the two runs' unmasked scores.

    The bias (causal / padding mask, ALiBi) is the same in both runs, so the change of the softmax input
    is ``s`` times the change of the product; least squares over the entries both patterns reach.
    """
    dz = clean[ops["z"]] - corr[ops["z"]]
    dm = (clean[ops["m"]] - corr[ops["m"]]).to(dz.dtype)
    reach = (clean[ops["a"]] > 0) & (corr[ops["a"]] > 0) & dz.isfinite()
    dz, dm = torch.where(reach, dz, 0), torch.where(reach, dm, 0)
    den = (dm * dm).sum()
    scale = (dz * dm).sum() / torch.where(den > 0, den, 1)
    if readable(dz):
        top = float(dz.detach().abs().max())
        resid = float((dz - scale * dm).detach().abs().max())
        if resid > 1e-3 * top + 1e-6:
            raise PatchError(
                f"qk_fix recomputes the attention pattern of {parent!r} as softmax(s * (q @ k^T) + bias), "
                f"but its softmax input is not such a function of the product (fitted s = {float(scale.detach()):.4g}, "
                f"largest misfit {resid:.3g} of changes up to {top:.3g}; e.g. logit soft-capping); pass qk_fix=False."
            )
    return scale


def _qk_select(k: str, view: Units | int, v: torch.Tensor, heads: int, dh: int) -> torch.Tensor:
    """Per unit, the (batch, attention head, position) blocks of the site ``k`` it covers: (U, B, heads, T).

    The site's last dim holds the projection's heads side by side, ``dh`` wide (as q_proj / k_proj
    outputs do); grouped-query attention repeats each of them for ``heads // n`` attention heads.
    """
    if v.dim() != 3 or v.shape[-1] % dh or heads % (v.shape[-1] // dh):
        raise PatchError(
            f"qk_fix needs the query / key projection's output (B, T, heads * {dh}) at site {k!r}, got "
            f"shape {tuple(v.shape)} for {heads} attention heads of width {dh}; pass qk_fix=False."
        )
    if isinstance(view, Units):
        w = unit_forward(k, view, v)
        d = view.unit_dim % w.dim()
        n = w.shape[d]
        shape = [1] * w.dim()
        shape[d] = n
        onehot = torch.arange(n, device=v.device).reshape(shape) == torch.arange(n, device=v.device).reshape(
            n, *[1] * w.dim()
        )
        sel = vmap(lambda o: unit_backward(view, o.expand(w.shape).to(v.dtype)))(onehot)
    else:
        d = unit_dim(k, view, v) % v.dim()
        n = v.shape[d]
        shape = [1] * v.dim()
        shape[d] = n
        sel = torch.arange(n, device=v.device).reshape(shape) == torch.arange(n, device=v.device).reshape(n, 1, 1, 1)
        sel = sel.expand(n, *v.shape).to(v.dtype)
    blocks = sel.reshape(*sel.shape[:3], -1, dh)  # (U, B, T, n_heads, dh)
    covered = blocks.sum(-1)
    if readable(covered) and not bool(((covered == 0) | (covered == dh)).all()):
        raise PatchError(
            f"qk_fix patches whole (position, head) blocks of a query / key, but a unit of over at site "
            f"{k!r} covers part of a head; sweep over='positions', 'heads' or units('b t (h d) -> b t h d', h=H)."
        )
    out = (covered > 0).permute(0, 1, 3, 2)  # (U, B, n_heads, T)
    return out.repeat_interleave(heads // out.shape[2], dim=2)


def _qk_rows(
    k: str, role: int, view: Units | int, clean: Any, corr: Any, ops: dict[str, str], chunk: int | None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """AtP*'s QK fix for a query (role 0) or key (role 1) site: ``g -> (U,)`` estimates given dmetric/dpattern.

    The pattern with one unit patched is computed exactly (its softmax input changes by
    ``s * (dq @ k^T)`` or ``s * (q @ dk^T)``), only what follows it is linearised.
    """
    q, kt = corr[ops["q"]], corr[ops["kt"]]
    z, a = corr[ops["z"]], corr[ops["a"]]
    dq, dkt = clean[ops["q"]] - q, clean[ops["kt"]] - kt
    sel = _qk_select(k, view, corr[k], q.shape[1], q.shape[-1])

    def rows(g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        def one(s: torch.Tensor) -> torch.Tensor:  # s: (B, heads, L) blocks of one unit
            s = s.to(q.dtype)
            dm = (dq * s[..., None]) @ kt if role == 0 else q @ (dkt * s[:, :, None, :])
            patched = torch.softmax(z + scale * dm.to(z.dtype), dim=-1).to(a.dtype)
            return (g * (patched - a)).sum()

        return vmap(one, chunk_size=chunk)(sel)

    return rows


@public("tdfunc.latent.attribution_patching")
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
    qk_fix: bool = False,
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

    With ``qk_fix`` (AtP*'s fix for saturated attention, Kramár et al. 2024, section 3.1.1) the
    estimate of a query or key site (a ``q_proj`` / ``k_proj`` / ``query`` / ``key`` module inside an
    attention module, e.g. ``"model.layers.*.self_attn.k_proj"``) is no longer linear through the
    softmax: for each unit the attention pattern with that unit's queries (or keys) patched is
    computed exactly, and only what follows the pattern is linearised,

    .. math::
        \\hat c_{s,u} = \\sum \\frac{\\partial\\,\\text{metric}}{\\partial A}\\Big|_{x^{corr}} \\odot
            \\Big(\\operatorname{softmax}\\big(Z^{corr} + \\sigma\\,\\Delta_u(q k^\\top)\\big) - A^{corr}\\Big)

    where ``A`` / ``Z`` are the attention's softmax output / input (operation sites
    ``…self_attn/softmax``), ``Δ_u(q kᵀ)`` is the change of its first matmul when the unit's
    (position, head) blocks of the queries (keys) take their clean values (post-RoPE, grouped KV heads
    repeated: taken from that matmul's operands in the two runs) and ``σ`` the scale between that
    product and the softmax input (fitted on the two runs; the mask cancels). Needs eager attention;
    units must cover whole heads × positions (``"positions"``, ``"heads"``, a ``units('b t (h d) ->
    b t h d', h=H)`` view — for keys with grouped KV heads, ``H`` = the number of KV heads). Other
    sites of the call keep the plain estimate; GradDrop applies to both.

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
        qk_fix: AtP*'s QK fix for the query / key sites among ``sites`` (at least one required):
            the attention pattern recomputed exactly per unit, linearised only after it.
        chunk_size: dropped layers per vmapped chunk (with ``grad_drop``); None runs all at once.
        kwargs: keyword inputs of both runs.

    Returns:
        Tensor of shape (n_sites, n_units): the signed estimates :math:`\\hat c` (plain AtP), or
        the nonnegative AtP+GradDrop magnitudes.

    Raises:
        PatchError: a site not reached, bad ``over`` / ``grad_drop``, sites with different unit
            counts, a non-scalar metric, clean and corrupted inputs of different shapes; with
            ``qk_fix``: no query / key site, an attention without an eager ``q @ kᵀ`` matmul and
            softmax, scores that are not ``σ · q kᵀ + bias`` (soft-capping), units splitting a head.

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
    check_module(module, PatchError, fix=MODULE_FIX)
    names = _as_list(sites)
    view = sweep_units(module, over)
    drops = None if grad_drop is None else _as_list(grad_drop)
    check_chunk_size(chunk_size, PatchError)
    check_callable("metric", metric, PatchError, expected="metric(output) -> scalar tensor")
    if not isinstance(qk_fix, bool):
        raise type_error(PatchError)(f"qk_fix must be True or False, got {type(qk_fix).__name__} ({qk_fix!r:.60}).")
    _check_runs(clean_args, corrupted_args)
    with renamed():
        _, clean = functional_call(module, state, clean_args, kwargs, capture=names)
    keys = _match(names, clean)
    zeros = {k: torch.zeros_like(clean[k]) for k in keys}
    qk: dict[str, tuple[int, dict[str, str]]] = {}
    ops_clean: Any = {}
    if qk_fix:
        for k in keys:
            role = _qk_role(k)
            if role is not None:
                qk[k] = (role[0], _qk_ops(role[1]))
        if not qk:
            raise PatchError(
                f"qk_fix applies to query / key projection sites (a module named "
                f"{' / '.join(sorted(_QK_ROLES))} inside an attention module, e.g. 'model.layers.*.self_attn.k_proj'), "
                f"but none of the sites {keys} is one; add them, or pass qk_fix=False."
            )
        op_sites = sorted({o for _, ops in qk.values() for o in ops.values()})
        with renamed():
            _, ops_clean = functional_call(module, state, clean_args, kwargs, capture=op_sites, strict=False)
        for _, ops in qk.values():
            missing = [o for o in ops.values() if o not in ops_clean.keys()]
            if missing:
                raise PatchError(
                    f"qk_fix recomputes the attention pattern of {ops['q'].split('/')[0]!r} from its q @ k^T "
                    f"matmul and softmax, but this forward reaches no {missing[0]!r}: load the model with "
                    "attn_implementation='eager' (sdpa never materialises the pattern), or pass qk_fix=False."
                )
            _qk_check(ops["q"].split("/")[0], ops, ops_clean)
            zeros[ops["a"]] = torch.zeros_like(ops_clean[ops["a"]])  # the gradient at the attention pattern
    drop_keys: list[str] = []
    corr_drop: dict[str, torch.Tensor] = {}
    if drops is not None:
        with renamed():
            _, cd = functional_call(module, state, corrupted_args, kwargs, capture=drops)
        drop_keys = _match(drops, cd)
        if len(drop_keys) < 2:
            raise PatchError(
                f"grad_drop must match at least two sites (the layers whose gradients are dropped "
                f"one at a time, averaged over L - 1), got {drop_keys}; pass e.g. 'model.layers.*.mlp'."
            )
        corr_drop = {k: cd[k] for k in drop_keys}

    def run(deltas: dict[str, torch.Tensor], m: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        edits: dict[str, Any] = {}
        for k in deltas:
            edits[k] = delta(deltas[k])
        if m is not None:
            for j, k in enumerate(drop_keys):
                # the value is unchanged; with m[j] no gradient flows through it (the constant corrupted value)
                d = deltas.get(k)
                edits[k] = lambda v, j=j, c=corr_drop[k], d=d: torch.where(m[j], c, v if d is None else v + d)
        with renamed():
            out, caps = functional_call(module, state, corrupted_args, kwargs, edits=edits, capture=list(capture))
        return _scalar(metric(out)), caps

    def grads(m: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], Any]:
        return grad(lambda d: run(d, m), has_aux=True)(zeros)

    capture = list(keys) + sorted({o for _, ops in qk.values() for o in ops.values()} - set(keys))

    def estimate(g: dict[str, torch.Tensor], corr: Any) -> list[torch.Tensor]:
        rows = []
        for k in keys:
            if k in qk:
                role, ops = qk[k]
                scale = _qk_scale(ops["q"].split("/")[0], ops, ops_clean, corr)
                rows.append(_qk_rows(k, role, view, ops_clean, corr, ops, chunk_size)(g[ops["a"]], scale))
            else:
                rows.append(_per_unit(k, view, (clean[k] - corr[k]) * g[k]))
        return rows

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
            f"the sites have different numbers of units ({units}); estimate sites of one unit count per call."
        )
    out = torch.stack(rows)
    warn_nonfinite("", out)
    return out
