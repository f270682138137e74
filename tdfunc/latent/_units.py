"""Unit-level views of a site (attention heads, groups of features) given as an einops pattern.

``units("b t (h d) -> b t h d", h=12)`` says how a site's value splits into units: the value is
rearranged into the view, where one axis (``h``) indexes the units.  ``unit_view`` applies it to
captures (per-head values), ``unit_edit`` edits in the view and rearranges back (a pure edit), and
``patching_sweep(..., over=units)`` / ``attribution_patching(..., over=units)`` sweep the units.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, overload

import einops
import torch
from tensordict import TensorDict, TensorDictBase

from .._edits import Delta
from .._errors import public
from ._common import PatchError

__all__ = ["Units", "units", "unit_view", "unit_edit", "heads_of"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Units:
    """How a site's value splits into units: an einops ``pattern`` whose right side has the ``unit`` axis.

    Build it with :func:`tdfunc.latent.units`.
    """

    pattern: str
    unit: str
    sizes: Mapping[str, int] = field(default_factory=dict)

    @property
    def view_axes(self) -> list[str]:
        """The axis names of the view (the right side), ``...`` included."""
        return self.pattern.split("->")[1].split()

    @property
    def unit_dim(self) -> int:
        """The unit axis of the view: from the front when it comes before ``...``, else from the back."""
        axes = self.view_axes
        i = axes.index(self.unit)
        if "..." in axes and axes.index("...") < i:
            return i - len(axes)
        return i


@public("tdfunc.latent.units")
def units(pattern: str, unit: str | None = None, **sizes: int) -> Units:
    """A unit-level view of a site: ``pattern`` (einops ``rearrange``) splits its value into units.

    .. math::  v \\mapsto \\operatorname{rearrange}(v,\\ \\text{pattern}),
        \\qquad \\text{unit } u = \\text{the slice } u \\text{ along axis } \\texttt{unit}

    The right side of ``pattern`` is the view and must list plain axes (and ``...``); the inverse
    rearrangement (right to left) restores the site's shape, so every edit made in the view is an
    edit of the site.  For the heads of an attention block, view the input of its output projection
    (``o_proj`` in Llama / Qwen2, ``attn.c_proj`` in GPT-2, ``attention.output.dense`` in BERT):
    it is the concatenation of the per-head outputs, ``(B, T, H * Dh)``.

    Args:
        pattern: an einops pattern ``"left -> right"``, e.g. ``"b t (h d) -> b t h d"``.
        unit: the axis of the right side that indexes the units; may be omitted when exactly one
            size is given (``h=12`` makes ``h`` the unit axis).
        **sizes: the axis lengths einops needs to split composite axes (``h=12``).

    Returns:
        A :class:`tdfunc.latent.Units` for :func:`unit_view`, :func:`unit_edit`, and ``over=`` of
        :func:`patching_sweep` and :func:`attribution_patching`.

    Raises:
        PatchError: not a ``left -> right`` pattern, a composite axis on the right, an unknown or
            missing ``unit``, a size that is not a positive int.

    Example:
        >>> import torch, tdfunc
        >>> heads = tdfunc.latent.units("b t (h d) -> b t h d", h=4)
        >>> tdfunc.latent.unit_view(torch.randn(2, 5, 32), heads).shape
        torch.Size([2, 5, 4, 8])

    Composes with: everything (a description, no computation).
    """
    if not isinstance(pattern, str) or pattern.count("->") != 1:
        raise PatchError(
            f"pattern must be an einops rearrange pattern 'left -> right', got {pattern!r}; e.g. "
            "'b t (h d) -> b t h d' with h=12."
        )
    left, right = (s.strip() for s in pattern.split("->"))
    axes = right.split()
    if not axes or any(not (a == "..." or _NAME.match(a)) for a in axes) or len(set(axes)) != len(axes):
        raise PatchError(
            f"the right side of the pattern (the view) must list distinct plain axis names (and "
            f"'...'), got {right!r}; put the composition on the left, e.g. 'b t (h d) -> b t h d'."
        )
    for k, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PatchError(f"the size of axis {k!r} must be a positive int, got {v!r}.")
    named = [a for a in axes if a != "..."]
    if unit is None:
        if len(sizes) != 1:
            raise PatchError(
                f"give unit= (one of {named}) when not exactly one axis size is given, got sizes "
                f"{dict(sizes)}; e.g. units('b t (h d) -> b t h d', h=12) or unit='h'."
            )
        unit = next(iter(sizes))
    if unit not in named:
        raise PatchError(f"unit axis {unit!r} is not an axis of the view {right!r}; name one of {named}.")
    return Units(f"{left} -> {right}", unit, dict(sizes))


def heads_of(module: Any) -> Units:
    """``over="heads"``: ``"... (h d) -> ... h d"`` with ``h`` from the module's (transformers) config."""
    config = getattr(module, "config", None)
    h = getattr(config, "num_attention_heads", None) if config is not None else None
    if not isinstance(h, int) or isinstance(h, bool) or h < 1:
        raise PatchError(
            f"over='heads' reads the number of heads from module.config.num_attention_heads, "
            f"which {type(module).__name__} does not have; pass over=tdfunc.latent.units('b t (h d) -> "
            "b t h d', h=H) with your model's head count H."
        )
    return Units("... (h d) -> ... h d", "h", {"h": h})


def _inverse(u: Units) -> str:
    left, right = u.pattern.split("->")
    return f"{right.strip()} -> {left.strip()}"


def forward(site: str, u: Units, v: torch.Tensor) -> torch.Tensor:
    """The view of ``v``; einops' errors become the family's, naming the site and its shape."""
    try:
        return einops.rearrange(v, u.pattern, **u.sizes)
    except einops.EinopsError as e:
        raise PatchError(
            f"site {site!r} of shape {tuple(v.shape)} does not fit the unit pattern "
            f"{u.pattern!r} with sizes {dict(u.sizes)} (einops: {str(e).strip().splitlines()[-1].strip()}); "
            "give a pattern that "
            "matches the site's value (for heads, the (B, T, H * Dh) input of the output projection)."
        ) from e


def backward(u: Units, w: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`forward` (the right side's plain axes fix every length)."""
    return einops.rearrange(w, _inverse(u))


def unit_mask(u: Units, w: torch.Tensor, index: Any) -> torch.Tensor:
    """Boolean mask broadcastable to the view ``w`` selecting ``index`` along the unit axis."""
    # Same skeleton as _common.position_mask, kept apart: no integer tensors here, and messages name the unit axis.
    d = u.unit_dim % w.dim()
    n = w.shape[d]
    if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
        if index.shape != (n,):
            raise PatchError(
                f"the boolean unit mask has shape {tuple(index.shape)} but the view has {n} units "
                f"along axis {u.unit!r}; give a mask of shape ({n},)."
            )
        m = index.to(w.device)
    else:
        if isinstance(index, int) and not isinstance(index, bool):
            idx = [index]
        elif isinstance(index, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in index):
            idx = list(index)
        else:
            raise PatchError(
                f"index must be None, an int, a list of ints or a boolean mask of the units, got {index!r}."
            )
        for i in idx:
            if not -n <= i < n:
                raise PatchError(
                    f"unit {i} is out of range for {n} units along axis {u.unit!r}; give units in [{-n}, {n})."
                )
        m = torch.zeros(n, dtype=torch.bool, device=w.device)
        if idx:
            m[torch.tensor(idx, device=w.device) % n] = True
    return m.reshape([n if i == d else 1 for i in range(w.dim())])


def _check_units(u: Any) -> Units:
    if not isinstance(u, Units):
        raise PatchError(
            f"units must be a tdfunc.latent.units(...) view, got {type(u).__name__} ({u!r:.60}); "
            "build one with tdfunc.latent.units('b t (h d) -> b t h d', h=H)."
        )
    return u


@overload
def unit_view(x: torch.Tensor, units: Units) -> torch.Tensor: ...
@overload
def unit_view(x: TensorDictBase | Mapping[str, torch.Tensor], units: Units) -> TensorDict: ...


@public("tdfunc.latent.unit_view")
def unit_view(x: torch.Tensor | TensorDictBase | Mapping[str, torch.Tensor], units: Units) -> Any:
    """The unit-level view of a captured value (or of every entry of a TensorDict of captures).

    ``einops.rearrange(x, units.pattern, **units.sizes)``: the per-head values of a captured
    ``o_proj`` / ``c_proj`` input, ``(B, T, H, Dh)`` for ``"b t (h d) -> b t h d"``.

    Args:
        x: a captured value, or the captures ``functional_call(..., capture=...)[1]``.
        units: the view, from :func:`tdfunc.latent.units`.

    Returns:
        The view, a tensor or a TensorDict of views keyed as ``x``.

    Raises:
        PatchError: ``units`` is not a view, or a value does not fit its pattern.

    Example:
        >>> import torch, tdfunc
        >>> attn = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(8, 8))  # "1": the output projection
        >>> _, caps = tdfunc.functional_call(attn, None, (torch.randn(1, 3, 8),), capture=["1:input"])
        >>> tdfunc.latent.unit_view(caps, tdfunc.latent.units("b t (h d) -> b t h d", h=2))["1:input"].shape
        torch.Size([1, 3, 2, 4])

    Composes with: ``vmap``, ``grad``, ``torch.compile`` (einops' ``rearrange``).
    """
    u = _check_units(units)
    if isinstance(x, torch.Tensor):
        return forward("value", u, x)
    if isinstance(x, (TensorDictBase, Mapping)):
        out = {}
        for k, v in x.items():
            if not isinstance(v, torch.Tensor):
                raise PatchError(
                    f"entry {k!r} of x is a {type(v).__name__}, not a tensor; pass a flat "
                    "TensorDict of captures (functional_call(..., capture=sites)[1])."
                )
            out[k] = forward(str(k), u, v)
        return TensorDict(out, batch_size=[])
    raise PatchError(f"x must be a tensor or a TensorDict / mapping of captures, got {type(x).__name__}.")


@public("tdfunc.latent.unit_edit")
def unit_edit(
    units: Units,
    edit: torch.Tensor | Delta | Callable[[torch.Tensor], torch.Tensor],
    *,
    index: int | list[int] | torch.Tensor | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """An edit made in the unit view: rearrange the site's value, edit the ``index`` units, rearrange back.

    .. math::  v \\leftarrow \\operatorname{rearrange}^{-1}\\big(m \\odot e(w) + (1 - m) \\odot w\\big),
        \\quad w = \\operatorname{rearrange}(v)

    with ``m`` the one-hot mask of the ``index`` units (all units when ``index`` is None) and ``e``
    the edit: a tensor in the view's shape (broadcast) substitutes, a :func:`tdfunc.delta` adds
    (its gradient is the per-unit gradient), a callable maps the view.  The result is an ordinary
    callable edit for ``edits={site: ...}``: pure (nothing is written), under every transform.

    Args:
        units: the view, from :func:`tdfunc.latent.units`.
        edit: a tensor of view values (e.g. ``unit_view`` of the clean run's capture), a
            ``tdfunc.delta(t)`` in the view, or ``fn(view) -> view``.
        index: the units to change: an int, a list of ints, a boolean mask, or None for all.

    Returns:
        A callable edit ``value -> value``.

    Raises:
        PatchError: bad ``units`` / ``edit`` / ``index`` (when the edit is built), or, during the
            call, a site value that does not fit the pattern or an index out of range.

    Example:
        >>> import torch, tdfunc
        >>> attn = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(8, 8))
        >>> heads = tdfunc.latent.units("b t (h d) -> b t h d", h=2)
        >>> x, clean = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
        >>> y = tdfunc.functional_call(attn, None, (x,), edits={
        ...     "1:input": tdfunc.latent.unit_edit(heads, tdfunc.latent.unit_view(clean, heads), index=1)})
        >>> torch.allclose(y, attn[1](torch.cat([x[..., :4], clean[..., 4:]], -1)))  # head 1 patched
        True

    Composes with: ``vmap`` (over the edit's tensor), ``grad`` (through a ``delta``), ``torch.compile``.
    """
    u = _check_units(units)
    if not (isinstance(edit, (torch.Tensor, Delta)) or callable(edit)):
        raise PatchError(
            f"edit must be a tensor of view values, a tdfunc.delta(t) or a callable fn(view) -> "
            f"view, got {type(edit).__name__} ({edit!r:.60})."
        )
    if index is not None and not (isinstance(index, (int, list, tuple, torch.Tensor)) and not isinstance(index, bool)):
        raise PatchError(f"index must be None, an int, a list of ints or a boolean mask of the units, got {index!r}.")

    def edited(v: torch.Tensor) -> torch.Tensor:
        w = forward("edited", u, v)
        if isinstance(edit, torch.Tensor):
            new = edit.expand_as(w) if edit.shape != w.shape else edit
        elif isinstance(edit, Delta):
            new = w + edit.tensor
        else:
            new = edit(w)
        if index is not None:
            new = torch.where(unit_mask(u, w, index), new, w)
        return backward(u, new)

    return public("tdfunc.latent.unit_edit")(edited)  # its errors, raised inside a call, name unit_edit
