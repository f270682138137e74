"""Activation patching: the clean run's values patched into the corrupted run, one site or a sweep.

``patch`` is one edited call; ``patching_sweep`` (in :mod:`._sweep`) evaluates every (site x unit)
patch — units are positions along dim 1 or any other dim (heads) — with one ``torch.func.vmap`` per
site over one-hot masks; ``path_patch`` patches a sender only as seen by a set of receivers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from tensordict import TensorDictBase

from .._call import functional_call
from .._checks import check_module, renamed
from .._errors import public
from .._finite import check_finite
from .._match import site_match
from ._common import PatchError, position_mask
from ._patch_checks import MODULE_FIX, _as_list, _check_runs, _checked_clean, _match
from ._sweep import patching_sweep
from ._sweep import sweep_units as sweep_units  # re-exported: tdfunc.latent._atp imports it from here
from ._sweep import unit_dim as unit_dim
from ._units import Units, heads_of, unit_mask
from ._units import backward as unit_backward
from ._units import forward as unit_forward

__all__ = ["PatchError", "patch", "patching_sweep", "path_patch"]


# ------------------------------------------------------------------------------------------------ patch


@public("tdfunc.latent.patch")
def patch(
    module: torch.nn.Module,
    state: TensorDictBase | None,
    corrupted_args: tuple[Any, ...],
    clean_captures: TensorDictBase | Mapping[str, torch.Tensor],
    sites: str | Sequence[str],
    *,
    positions: Any = None,
    patch_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    units: Units | Literal["heads"] | None = None,
    index: int | list[int] | torch.Tensor | None = None,
    kwargs: dict[str, Any] | None = None,
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
        units: patch only the ``index`` units of a unit view (``"heads"``: ``"... (h d) -> ... h d"``
            with ``h = module.config.num_attention_heads``, or a :func:`tdfunc.latent.units` view),
            e.g. one head of ``"...self_attn.o_proj:input"``; None patches every unit.
        index: the units patched (an int, a list of ints, a boolean mask); required with ``units``.
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
        >>> torch.allclose(tdfunc.latent.patch(net, None, (corrupt,), caps, "1"), out)
        True

    Composes with: ``vmap`` (over clean values, corrupted inputs, states), ``grad``, ``torch.compile``.
    """
    check_module(module, PatchError, fix=MODULE_FIX)
    _check_runs(None, corrupted_args)
    edits = _patch_edits(clean_captures, sites, positions, patch_fn, _units_of(module, units, index), index)
    with renamed():
        return functional_call(module, state, corrupted_args, kwargs, edits=edits)


def _units_of(module: Any, units: Any, index: Any) -> Units | None:
    """``units=`` / ``index=`` of patch and path_patch checked together."""
    if units is None:
        if index is not None:
            raise PatchError(
                f"index={index!r} selects units of a unit view, but units is None; pass "
                "units='heads' or units=tdfunc.latent.units(...) with it."
            )
        return None
    if index is None:
        raise PatchError(
            f"units={units!r} needs index= (the units to patch, e.g. index=3 for head 3); leave "
            "units=None to patch the whole site."
        )
    if isinstance(index, bool) or not isinstance(index, (int, list, tuple, torch.Tensor)):
        raise PatchError(f"index must be an int, a list of ints or a boolean mask of the units, got {index!r}.")
    if units == "heads":
        return heads_of(module)
    if not isinstance(units, Units):
        raise PatchError(f"units must be None, 'heads' or a tdfunc.latent.units(...) view, got {units!r}.")
    return units


def _patch_edits(clean_captures, sites, positions, patch_fn, view=None, index=None) -> dict:
    """``{site: clean value or edit}`` substituting the clean values (at ``positions``, through ``patch_fn``)."""
    if patch_fn is not None and not callable(patch_fn):
        raise PatchError(
            f"patch_fn must be None or a callable patch_fn(corrupted_value, clean_value) -> value, "
            f"got {type(patch_fn).__name__} ({patch_fn!r:.60})."
        )
    edits = {}
    for site in _match(sites, clean_captures):
        clean = clean_captures[site]
        if isinstance(clean, torch.Tensor) and clean.is_floating_point():
            check_finite(
                f"clean_captures[{site!r}]",
                clean,
                PatchError,
                "replace them (e.g. torch.nan_to_num) or capture a finite clean run",
            )
        mask = None if positions is None else position_mask(site, positions, clean)
        if patch_fn is None and mask is None and view is None:
            edits[site] = clean
        else:

            def edit(v, c=clean, m=mask, site=site):
                if isinstance(c, torch.Tensor) and isinstance(v, torch.Tensor):
                    _checked_clean(site, c, v)
                    if c.device != v.device:  # a model spread over devices: the clean value on the site's
                        c = c.to(v.device)
                        m = None if m is None else m.to(v.device)
                new = c if patch_fn is None else patch_fn(v, c)
                if view is not None:  # only the index units of the view
                    w = unit_forward(site, view, v)
                    new = unit_backward(view, torch.where(unit_mask(view, w, index), unit_forward(site, view, new), w))
                return new if m is None else torch.where(m, new, v)

            edits[site] = edit
    return edits


# ------------------------------------------------------------------------------------------ path patch


@public("tdfunc.latent.path_patch")
def path_patch(
    module: torch.nn.Module,
    state: TensorDictBase | None,
    clean_args: tuple[Any, ...],
    corrupted_args: tuple[Any, ...],
    senders: str | Sequence[str],
    receivers: str | Sequence[str],
    *,
    freeze: str | Sequence[str] | None = None,
    positions: Any = None,
    patch_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    units: Units | Literal["heads"] | None = None,
    index: int | list[int] | torch.Tensor | None = None,
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """The corrupted run with the senders' clean values reaching the model only through the receivers.

    Path patching (Wang et al., 2022; Goldowsky-Dill et al., 2023) in two edited calls:

    .. math::
        r^{*} = r\\big(x^{corr};\\; h_{send} \\leftarrow h_{send}^{clean},\\;
            h_{frz} \\leftarrow h_{frz}^{corr}\\big), \\qquad
        y = f\\big(x^{corr};\\; r \\leftarrow r^{*}\\big)

    First the corrupted input runs with the senders patched to their clean values (at
    ``positions``, through ``patch_fn``, as in :func:`tdfunc.latent.patch`) and every ``freeze`` site
    held at its corrupted value, and the receivers' values are captured: they now carry the
    senders' effect along the paths that avoid the frozen sites. Then the corrupted input runs
    again with only the receivers replaced by those values, so the senders act on the output
    only as seen by the receivers (their direct effect on everything else is removed).
    With ``freeze=None`` every path from the senders to the receivers counts; freezing e.g. every
    attention head output (``"blocks.*.attn"``) keeps only the paths through the residual stream
    and the MLPs. Receivers are usually input sites (``"blocks.3.attn:input"``) or other
    intermediate sites downstream of the senders; a receiver upstream of every sender receives
    nothing, and the result is the corrupted output.

    Args:
        module, state: the model (never changed) and its (partial) state, None for its own.
        clean_args, corrupted_args: positional inputs of the two runs (same shapes).
        senders: site(s) whose clean values are sent (globs allowed; as in :func:`tdfunc.latent.patch`).
        receivers: site(s) through which alone the senders may act; must not overlap the senders.
        freeze: site(s) held at their corrupted values while the receivers are computed (senders
            and receivers are never frozen, even where a glob matches them).
        positions: sender positions along dim 1, as in :func:`tdfunc.latent.patch` (None: the whole site).
        patch_fn: ``patch_fn(corrupted_value, clean_value) -> value`` for the senders.
        units, index: send only these units of the senders (e.g. ``units="heads", index=3``: head 3
            of ``"...attn.c_proj:input"``), as in :func:`tdfunc.latent.patch`.
        kwargs: keyword inputs of every run.

    Returns:
        The module's output on the corrupted input with the receivers patched.

    Raises:
        PatchError: a site matches nothing, senders and receivers overlap, bad positions.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4),
        ...                           torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> clean, corrupt = torch.randn(1, 3), torch.randn(1, 3)
        >>> y = tdfunc.latent.path_patch(net, None, (clean,), (corrupt,), senders="0", receivers="3")
        >>> torch.allclose(y, net(clean))        # every path from "0" runs through "3"
        True

    Composes with: ``vmap`` (over inputs or states), ``grad``, ``torch.compile``.

    References:
        Wang, Variengien, Conmy, Shlegeris, Steinhardt. Interpretability in the Wild: a Circuit for
        Indirect Object Identification in GPT-2 small. 2022. Goldowsky-Dill, MacLeod, Sato, Arora.
        Localizing Model Behavior with Path Patching. 2023.
    """
    check_module(module, PatchError, fix=MODULE_FIX)
    send, recv = _as_list(senders), _as_list(receivers)
    frz = [] if freeze is None else _as_list(freeze)
    received = lambda k: any(site_match(r, k) for r in recv)  # noqa: E731
    _check_runs(clean_args, corrupted_args)
    with renamed():
        _, clean = functional_call(module, state, clean_args, kwargs, capture=send)
    edits = _patch_edits(clean, send, positions, patch_fn, _units_of(module, units, index), index)
    both = [k for k in edits if received(k)]
    if both:
        raise PatchError(
            f"site(s) {both} are both senders and receivers; a receiver must be a later site than "
            "the senders (e.g. senders='blocks.0.attn', receivers='blocks.2.attn:input')."
        )
    with renamed():
        if frz:
            _, corr = functional_call(module, state, corrupted_args, kwargs, capture=frz)
            edits.update({k: corr[k] for k in _match(frz, corr) if k not in edits and not received(k)})
        _, seen = functional_call(module, state, corrupted_args, kwargs, edits=edits, capture=recv)
    keys = _match(recv, seen)
    with renamed():
        return functional_call(module, state, corrupted_args, kwargs, edits={k: seen[k] for k in keys})
