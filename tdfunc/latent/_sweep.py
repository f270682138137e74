"""The activation-patching sweep: every (site x unit) patch, one ``torch.func.vmap`` per site over one-hot masks.

Units are positions along dim 1 or any other dim (heads); ``reuse_prefix=True`` runs only the suffix
from each patched position of a causal LM (:mod:`._sweep_prefix`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from tensordict import TensorDictBase
from torch.func import vmap

from .._call import functional_call
from .._checks import (
    check_bool,
    check_callable,
    check_chunk_size,
    check_module,
    check_randomness,
    random_op_error,
    renamed,
)
from .._errors import here, public
from .._finite import warn_nonfinite
from .._progress import n_chunks, progress_bar, vmap_chunks
from .._types import Over
from ._common import PatchError
from ._patch_checks import MODULE_FIX, _as_list, _check_runs, _match
from ._sweep_prefix import check_prefix_model, n_prefix_chunks, prefix_sweep
from ._units import Units, heads_of
from ._units import backward as unit_backward
from ._units import forward as unit_forward

__all__ = ["patching_sweep", "sweep_units", "unit_dim"]


def sweep_units(module: Any, over: Any) -> Units | int:
    """``over`` checked: a :class:`Units` view (``"heads"`` from the model's config) or an int unit dim."""
    if isinstance(over, Units):
        return over
    if over == "heads":
        return heads_of(module)
    if over == "positions":
        return 1
    if isinstance(over, int) and not isinstance(over, bool):
        return over
    raise PatchError(
        f"over must be 'positions', 'heads', a tdfunc.latent.units(...) view or an int dim of the "
        f"sites' values, got {over!r}."
    )


def unit_dim(site: str, dim: int, v: torch.Tensor) -> int:
    """An int ``over`` checked against the site's value; a negative one that lands on the positions is refused."""
    if not -v.dim() <= dim < v.dim():
        raise PatchError(
            f"unit dim {dim} is out of range for site {site!r} of shape {tuple(v.shape)}; "
            f"give over in [{-v.dim()}, {v.dim()})."
        )
    if dim < 0 and dim % v.dim() == 1:
        raise PatchError(
            f"over={dim} is dim 1 of site {site!r} of shape {tuple(v.shape)}, its positions, not "
            "its heads (an int over indexes the dims of the value as captured, and a (B, T, H * Dh) value "
            "has no head dim); pass over='heads' or over=tdfunc.latent.units('b t (h d) -> b t h d', h=H) "
            "to sweep heads, or over='positions' to sweep positions."
        )
    return dim


def _scalar(r: Any) -> torch.Tensor:
    """The metric's value of one patch, checked: a 0-dim tensor."""
    if not isinstance(r, torch.Tensor) or r.dim() != 0:
        got = f"shape {tuple(r.shape)}" if isinstance(r, torch.Tensor) else type(r).__name__
        raise PatchError(
            f"metric must return a scalar (0-dim) tensor per patch, got {got}; reduce it "
            "inside metric (e.g. logits[0, -1, a] - logits[0, -1, b], or .mean())."
        )
    return r


@public("tdfunc.latent.patching_sweep")
def patching_sweep(
    module: torch.nn.Module,
    state: TensorDictBase | None,
    clean_args: tuple[Any, ...],
    corrupted_args: tuple[Any, ...],
    sites: str | Sequence[str],
    metric: Callable[[Any], torch.Tensor],
    *,
    over: Over | Literal["heads"] | int | Units = "positions",
    chunk_size: int | None = None,
    kwargs: dict[str, Any] | None = None,
    progress: bool = False,
    randomness: str = "error",
    reuse_prefix: bool = False,
) -> torch.Tensor:
    """``metric`` of the corrupted run with one (site, unit) of the clean run patched in, for every pair.

    .. math::
        R_{s,u} = \\text{metric}\\big(f(x^{corr};\\;
            h_s \\leftarrow e_u \\odot h_s^{clean} + (1 - e_u) \\odot h_s^{corr})\\big)

    where ``e_u`` is the one-hot mask of unit ``u`` along the unit dim: positions (dim 1), any dim
    of the value as captured (an int), or the unit axis of a unit view: with ``over="heads"`` or
    ``over=tdfunc.latent.units("b t (h d) -> b t h d", h=H)`` each site's value is rearranged into
    the view, unit ``u`` is patched there and the value rearranged back, so sweeping the input of
    the attention output projection (``"model.layers.*.self_attn.o_proj:input"``,
    ``"transformer.h.*.attn.c_proj:input"``) patches one head (all its positions) at a time. The clean values are
    captured in one call, then each
    site's units are one ``vmap`` over its one-hot masks (``torch.where``: an exact substitution,
    also at ``-inf`` scores). Only the patched site's edit is batched, so under ``vmap`` everything
    upstream of it runs once, unbatched, and only the layers after it run ``U`` times: a sweep over
    ``S`` blocks costs about ``S/2 + U*S/2`` forwards instead of ``S*U`` (measured 1.6x faster than
    one vmap over the whole grid, 6 blocks x 16 positions of a GPT-2). ``chunk_size`` bounds the
    memory of each site's vmap.

    ``reuse_prefix=True`` (a transformers causal LM, ``over="positions"``) also skips the positions
    before each patched one: with causal attention they are the corrupted run's in every layer, so
    the corrupted prompt runs once with the model's KV cache and each chunk of positions ``a ..``
    runs only the tokens ``a .. T-1`` on the cache cut to ``a`` (position ids continue from it);
    the metric's ``output.logits`` are the suffix's with the corrupted run's before ``a``, equal to
    the plain sweep's.  Pass the model's own ``kwargs={"logits_to_keep": k}`` (the last ``k``
    positions, or a 1-D tensor of positions) to compute logits only where the metric reads: the
    metric then sees those positions only, as the model returns them (the LM head runs once per
    chunk of positions over every site's patches).  Measured 5-7x faster than
    a loop of single hook patches on a CPU (GPT-2, 6 blocks, d 512, T 24, batch 4), equal results.

    Args:
        module, state: the model and its (partial) state (None: the module's own).
        clean_args, corrupted_args: positional inputs of the two runs (same shapes).
        sites: sites, globs or a list; rows follow the expanded order of the clean captures.
        metric: ``metric(output) -> scalar tensor`` of the patched run's output.
        over: ``"positions"`` (dim 1); ``"heads"``: the view ``"... (h d) -> ... h d"`` of the last dim
            with ``h = module.config.num_attention_heads`` (transformers models); a
            :func:`tdfunc.latent.units` view; or an int, a dim of every site's value as captured
            (a negative int that lands on dim 1, e.g. ``-2`` of a (B, T, D) value, is an error:
            such a value has no head dim).
        chunk_size: patches per vmapped chunk (``vmap``'s ``chunk_size``); None runs all at once.
        kwargs: keyword inputs of both runs.
        progress: show a tqdm bar on stderr over the sites (over the sites' chunks of units when
            ``chunk_size`` is given; then the chunks run as a Python loop of the same ``vmap``
            calls, equal results).  Never shown under ``vmap`` / ``grad`` / ``torch.compile``.
        randomness: ``torch.func.vmap``'s flag for random ops in the model under the sweep's ``vmap``:
            ``"error"`` (default, as torch), ``"different"`` (independent draws per patch) or ``"same"``.
        reuse_prefix: run only the suffix from each patched position on, on the corrupted run's KV
            cache (see above). Needs a model whose forward takes ``past_key_values`` / ``use_cache``
            and returns ``.logits`` with causal attention modules (``is_causal``), one positional tensor
            of token ids per run, per-position sites (batch, T, ...) and ``kwargs`` among
            ``attention_mask``, ``position_ids``, ``logits_to_keep``. Before the sweep one unpatched
            suffix is compared with the full corrupted run (outside ``vmap`` / ``grad`` / compile; under
            them the LM head runs inside each suffix call, as the model computes it).
            ``chunk_size`` is then the positions per chunk (default ``ceil(sqrt(T))``); ``output``
            holds only ``logits``.

    Returns:
        Tensor of shape (n_sites, n_units).

    Raises:
        PatchError: bad ``over`` (``"heads"`` on a model without a config, a site that does not fit
            the unit view, a negative int dim landing on the positions), sites with different unit counts,
            a non-scalar metric, clean and corrupted inputs of different shapes, non-finite inputs, a random op
            under ``randomness="error"``; with ``reuse_prefix``: a model without a KV cache or with
            bidirectional attention, ``over`` other than positions, a site that is not per-position,
            keyword inputs it cannot cut, a cache that does not reproduce the full run.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> clean, corrupt = torch.randn(1, 5, 3), torch.randn(1, 5, 3)
        >>> r = tdfunc.latent.patching_sweep(net, None, (clean,), (corrupt,), ["0", "1"], lambda y: y[0, -1, 0])
        >>> r.shape
        torch.Size([2, 5])

    Composes with: ``grad`` (w.r.t. state or inputs through the sweep), outer ``vmap`` over states
    (``reuse_prefix``: ``grad`` w.r.t. the state).
    """
    check_module(module, PatchError, fix=MODULE_FIX)
    names = _as_list(sites)
    view = sweep_units(module, over)
    check_chunk_size(chunk_size, PatchError)
    check_bool("progress", progress, PatchError)
    check_callable("metric", metric, PatchError, expected="metric(output) -> scalar tensor")
    check_randomness(randomness, PatchError)
    check_bool("reuse_prefix", reuse_prefix, PatchError)
    if reuse_prefix and view != 1:
        raise PatchError(
            f"reuse_prefix=True skips the positions before each patched position, so it sweeps positions "
            f"only, got over={over!r} (a unit that spans every position has no prefix to reuse); pass "
            "over='positions' or leave reuse_prefix=False."
        )
    _check_runs(clean_args, corrupted_args)
    kw = {} if kwargs is None else dict(kwargs)
    ids = check_prefix_model(module, corrupted_args, kw) if reuse_prefix else None
    with renamed():
        _, caps = functional_call(module, state, clean_args, kwargs, capture=names)
    keys = _match(names, caps)
    if ids is not None:
        t = ids.shape[1]
        bar = progress_bar(
            enabled=progress, desc=here(), total=len(keys) * n_prefix_chunks(t, chunk_size), unit="chunk"
        )
        run = lambda b: prefix_sweep(  # noqa: E731
            module, state, keys, caps, ids, metric, lambda r: _scalar(r),
            chunk_size=chunk_size, kwargs=kw, bar=b, randomness=randomness,
        )  # fmt: skip
        if bar is None:
            out = run(None)
        else:
            with bar:
                out = run(bar)
        warn_nonfinite("", out)
        return out
    shapes, units, cleans = [], [], []
    for k in keys:
        v = caps[k]
        if isinstance(view, Units):  # the sweep runs in the unit view: the clean view, one-hot along its unit axis
            v = unit_forward(k, view, v)
            dim = view.unit_dim
        else:
            dim = unit_dim(k, view, v)
        d = dim % v.dim()
        cleans.append(v)
        units.append(v.shape[d])
        shapes.append([v.shape[d] if i == d else 1 for i in range(v.dim())])
    if len(set(units)) != 1:
        found = dict(zip(keys, units))
        raise PatchError(
            f"the sites have different numbers of units along dim {dim} ({found}); sweep sites "
            "of one unit count per call."
        )
    n_u = units[0]
    # masks[u]: the one-hot mask of unit u, on each site's device (a model may span devices)
    masks_on = {c.device: torch.eye(n_u, dtype=torch.bool, device=c.device) for c in cleans}

    def per_site(k: str, shape: list, clean: torch.Tensor, bar=None) -> torch.Tensor:
        def one(m):  # m: (n_units,) one-hot; only site k is edited, so upstream of k stays unbatched
            if isinstance(view, Units):
                edit = lambda v: unit_backward(view, torch.where(m.reshape(shape), clean, unit_forward(k, view, v)))  # noqa: E731
            else:
                edit = lambda v: torch.where(m.reshape(shape), clean, v)  # noqa: E731
            with renamed():
                out = functional_call(module, state, corrupted_args, kwargs, edits={k: edit})
            return _scalar(metric(out))

        try:
            masks = masks_on[clean.device]
            if bar is None:
                return vmap(one, chunk_size=chunk_size, randomness=randomness)(masks)
            # the same chunks, a Python loop ticking the bar
            return vmap_chunks(one, chunk_size, bar, randomness=randomness)(masks)
        except RuntimeError as e:
            err = random_op_error(e, PatchError, "the model (or metric)")
            if err is None:
                raise
            raise err from e

    bar = progress_bar(
        enabled=progress,
        desc=here(),
        total=len(keys) * n_chunks(n_u, chunk_size),
        unit="site" if chunk_size is None else "chunk",
    )
    if bar is None:
        out = torch.stack([per_site(k, shapes[i], cleans[i]) for i, k in enumerate(keys)])
    else:
        with bar:
            out = torch.stack([per_site(k, shapes[i], cleans[i], bar) for i, k in enumerate(keys)])
    warn_nonfinite("", out)
    return out
