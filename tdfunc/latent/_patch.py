"""Activation patching: the clean run's values patched into the corrupted run, one site or a sweep.

``patch`` is one edited call; ``patching_sweep`` evaluates every (site x unit) patch — units are
positions along dim 1 or any other dim (heads) — in one ``torch.func.vmap`` over one-hot masks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tensordict import TensorDictBase
from torch.func import vmap

from .._call import functional_call
from .._errors import TdfuncError

__all__ = ["PatchError", "patch", "patching_sweep"]


class PatchError(TdfuncError, ValueError):
    """Bad input to a patching or steering function (sites, positions, metric, activations)."""


# ---------------------------------------------------------------------------------------------- checks


def _pattern(site: str) -> re.Pattern:
    # '**' spans segments, '*' stays within one name segment (no '.', ':' or '@')
    parts = [re.escape(p).replace(r"\*", "[^.:@]*") for p in site.split("**")]
    return re.compile(".*".join(parts))


def _as_list(fn: str, sites: Any) -> list[str]:
    sites = [sites] if isinstance(sites, str) else sites
    if not isinstance(sites, (list, tuple)) or not sites or not all(isinstance(s, str) for s in sites):
        raise PatchError(f"{fn}: sites must be a site string or a non-empty list of them, got {sites!r}; "
                         "pass e.g. 'blocks.*' or ['blocks.0', 'blocks.1.attn'].")
    return list(sites)


def _match(fn: str, sites: Any, captures: Any) -> list[str]:
    """Concrete capture keys matched by ``sites`` (globs expanded in the captures' order)."""
    if not isinstance(captures, (Mapping, TensorDictBase)):
        raise PatchError(f"{fn}: clean_captures must be the TensorDict of captures of the clean run, got "
                         f"{type(captures).__name__}; use functional_call(..., capture=sites)[1].")
    keys = [k for k in captures.keys() if isinstance(k, str)]
    out: list[str] = []
    for site in _as_list(fn, sites):
        hits = [site] if site in keys else [k for k in keys if _pattern(site).fullmatch(k)]
        if not hits:
            raise PatchError(f"{fn}: site {site!r} matches no entry of clean_captures (entries {keys}); capture "
                             f"it in the clean run: functional_call(..., capture=[{site!r}]).")
        for k in hits:
            if k.endswith("@*"):
                raise PatchError(f"{fn}: site {k!r} stacks every call of its module and cannot be patched; "
                                 f"capture and patch one call with '@k' (e.g. {k[:-1] + '0'!r}).")
            if k not in out:
                out.append(k)
    return out


def _position_mask(fn: str, site: str, positions: Any, value: torch.Tensor) -> torch.Tensor:
    """Boolean mask of shape (T, 1, ..., 1) selecting ``positions`` along dim 1 of ``value``."""
    if value.dim() < 2:
        raise PatchError(f"{fn}: positions index dim 1, but site {site!r} has shape {tuple(value.shape)}; "
                         "pass positions=None to patch the whole site, or a patch_fn.")
    t = value.shape[1]
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if positions.shape != (t,):
            raise PatchError(f"{fn}: the boolean positions mask has shape {tuple(positions.shape)} but site "
                             f"{site!r} has {t} positions along dim 1; give a mask of shape ({t},).")
        mask = positions.to(value.device)
    else:
        if isinstance(positions, torch.Tensor) and not positions.dtype.is_floating_point and positions.dim() <= 1:
            idx = positions.reshape(-1).tolist()
        elif isinstance(positions, int) and not isinstance(positions, bool):
            idx = [positions]
        elif isinstance(positions, Sequence) and all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
            idx = list(positions)
        else:
            raise PatchError(f"{fn}: positions must be None, an int, a list of ints, an integer tensor or a boolean "
                             f"mask of shape (T,), got {positions!r}.")
        for p in idx:
            if not -t <= p < t:
                raise PatchError(f"{fn}: position {p} is out of range for site {site!r} with {t} positions along "
                                 f"dim 1; give positions in [{-t}, {t}).")
        mask = torch.zeros(t, dtype=torch.bool, device=value.device)
        if idx:
            mask[torch.tensor(idx, device=value.device) % t] = True
    return mask.reshape(t, *([1] * (value.dim() - 2)))


# ------------------------------------------------------------------------------------------------ patch


def patch(
    module: torch.nn.Module,
    state: TensorDictBase | None,
    corrupted_args: tuple,
    clean_captures: TensorDictBase | Mapping[str, torch.Tensor],
    sites: str | Sequence[str],
    *,
    positions: Any = None,
    patch_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    kwargs: dict | None = None,
) -> Any:
    """Run the corrupted input with the clean run's captured values patched in at ``sites``.

    .. math::
        h_s \\leftarrow m \\odot f(h_s^{corr}, h_s^{clean}) + (1 - m) \\odot h_s^{corr},
        \\qquad f(a, b) = b \\text{ by default}

    with ``m`` selecting ``positions`` along dim 1 (all of the site when ``positions`` is None).
    Direction is the caller's: swap the clean and corrupted runs for denoising vs. noising.

    Args:
        module: the model (never changed).
        state: a (partial) state TensorDict, or None for the module's own parameters.
        corrupted_args: positional inputs of the run to patch into.
        clean_captures: captures of the other run, ``functional_call(..., capture=sites)[1]``.
        sites: a site, a glob or a list; matched against the keys of ``clean_captures``.
        positions: None (whole site), an int, a list / integer tensor of positions along dim 1
            (negative counts from the end) or a boolean mask of shape (T,).
        patch_fn: ``patch_fn(corrupted_value, clean_value) -> value`` instead of substitution.
        kwargs: keyword inputs of the corrupted run.

    Returns:
        The module's output on the corrupted input with the patches applied.

    Raises:
        PatchError: a site matches no capture, a position is out of range, bad positions.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> clean, corrupt = torch.randn(1, 3), torch.randn(1, 3)
        >>> out, caps = tdfunc.functional_call(net, None, (clean,), capture=["1"])
        >>> torch.allclose(tdfunc.patch(net, None, (corrupt,), caps, "1"), out)
        True

    Composes with: ``vmap`` (over clean values, corrupted inputs, states), ``grad``, ``torch.compile``.
    """
    fn = "tdfunc.patch"
    edits = {}
    for site in _match(fn, sites, clean_captures):
        clean = clean_captures[site]
        mask = None if positions is None else _position_mask(fn, site, positions, clean)
        if patch_fn is None and mask is None:
            edits[site] = clean
        else:
            def edit(v, c=clean, m=mask):
                new = c if patch_fn is None else patch_fn(v, c)
                return new if m is None else torch.where(m, new, v)

            edits[site] = edit
    return functional_call(module, state, corrupted_args, kwargs, edits=edits)


# ------------------------------------------------------------------------------------------------ sweep


def patching_sweep(
    module: torch.nn.Module,
    state: TensorDictBase | None,
    clean_args: tuple,
    corrupted_args: tuple,
    sites: str | Sequence[str],
    metric: Callable[[Any], torch.Tensor],
    *,
    over: str | int = "positions",
    chunk_size: int | None = None,
    kwargs: dict | None = None,
) -> torch.Tensor:
    """``metric`` of the corrupted run with one (site, unit) of the clean run patched in, for every pair.

    .. math::
        R_{s,u} = \\text{metric}\\big(f(x^{corr};\\;
            h_s \\leftarrow e_u \\odot h_s^{clean} + (1 - e_u) \\odot h_s^{corr})\\big)

    where ``e_u`` is the one-hot mask of unit ``u`` along the unit dim (positions: dim 1; heads:
    e.g. ``over=-2`` for (B, T, H, Dh) sites). The clean values are captured in one call, then the
    whole (sites x units) grid is one ``vmap`` over masks: patch (s, u) gives site ``s`` the mask
    ``e_u`` and every other site a zero mask (``torch.where``: an exact no-op, also at ``-inf``
    scores). One vmapped call over the grid, rather than a loop over sites, batches all ``S*U``
    forwards together and lets ``chunk_size`` bound the memory of the whole sweep; each forward
    costs ``S`` extra elementwise edits, negligible beside it.

    Args:
        module, state: the model and its (partial) state (None: the module's own).
        clean_args, corrupted_args: positional inputs of the two runs (same shapes).
        sites: sites, globs or a list; rows follow the expanded order of the clean captures.
        metric: ``metric(output) -> scalar tensor`` of the patched run's output.
        over: ``"positions"`` (dim 1) or an int, the unit dim of every site's value.
        chunk_size: patches per vmapped chunk (``vmap``'s ``chunk_size``); None runs all at once.
        kwargs: keyword inputs of both runs.

    Returns:
        Tensor of shape (n_sites, n_units).

    Raises:
        PatchError: bad ``over``, sites with different unit counts, a non-scalar metric.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> clean, corrupt = torch.randn(1, 5, 3), torch.randn(1, 5, 3)
        >>> r = tdfunc.patching_sweep(net, None, (clean,), (corrupt,), ["0", "1"], lambda y: y[0, -1, 0])
        >>> r.shape
        torch.Size([2, 5])

    Composes with: ``grad`` (w.r.t. state or inputs through the sweep), outer ``vmap`` over states.
    """
    fn = "tdfunc.patching_sweep"
    names = _as_list(fn, sites)
    if not (over == "positions" or (isinstance(over, int) and not isinstance(over, bool))):
        raise PatchError(f"{fn}: over must be 'positions' or an int unit dim (e.g. -2 for heads in (B, T, H, Dh)), "
                         f"got {over!r}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise PatchError(f"{fn}: chunk_size must be None or an integer >= 1, got {chunk_size!r}.")
    _, caps = functional_call(module, state, clean_args, kwargs, capture=names)
    keys = _match(fn, names, caps)
    dim = 1 if over == "positions" else over
    shapes, units = [], []
    for k in keys:
        v = caps[k]
        if not -v.dim() <= dim < v.dim():
            raise PatchError(f"{fn}: unit dim {dim} is out of range for site {k!r} of shape {tuple(v.shape)}; "
                             f"give over in [{-v.dim()}, {v.dim()}).")
        d = dim % v.dim()
        units.append(v.shape[d])
        shapes.append([v.shape[d] if i == d else 1 for i in range(v.dim())])
    if len(set(units)) != 1:
        found = dict(zip(keys, units))
        raise PatchError(f"{fn}: the sites have different numbers of units along dim {dim} ({found}); sweep sites "
                         "of one unit count per call.")
    n_s, n_u = len(keys), units[0]
    dtype, device = caps[keys[0]].dtype, caps[keys[0]].device
    eye = torch.eye(n_u, dtype=dtype, device=device)
    grid = torch.zeros(n_s, n_u, n_s, n_u, dtype=dtype, device=device)  # grid[s, u] = masks of every site
    for s in range(n_s):
        grid[s, :, s] = eye
    clean = [caps[k] for k in keys]

    def one(masks):  # masks: (n_sites, n_units), a one-hot row for one site, zeros elsewhere
        edits = {
            k: (lambda v, m=masks[i].reshape(shapes[i]), c=clean[i]: torch.where(m != 0, c, v))
            for i, k in enumerate(keys)
        }
        r = metric(functional_call(module, state, corrupted_args, kwargs, edits=edits))
        if not isinstance(r, torch.Tensor) or r.dim() != 0:
            got = f"shape {tuple(r.shape)}" if isinstance(r, torch.Tensor) else type(r).__name__
            raise PatchError(f"{fn}: metric must return a scalar (0-dim) tensor per patch, got {got}; reduce it "
                             "inside metric (e.g. logits[0, -1, a] - logits[0, -1, b], or .mean()).")
        return r

    out = vmap(one, chunk_size=chunk_size)(grid.reshape(n_s * n_u, n_s, n_u))
    return out.reshape(n_s, n_u)
