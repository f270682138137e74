"""Image attributions: one heat map, a per-class grid, Grad-CAM upsampled onto the input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from tensordict import TensorDictBase

from .._errors import TdfuncTypeError, public, shape_str
from .._types import Key, PlotMethod, Sign, UpsampleMode
from ._common import (
    CMAPS,
    SIGNS,
    UPSAMPLE_MODES,
    PlotError,
    attr_entry,
    check_outlier_perc,
    choice,
    clim,
    labels,
    new_axes,
    scale,
    tensor,
    upsample,
)

__all__ = ["grad_cam_overlay", "image_attribution", "image_attribution_grid"]

METHODS: tuple[PlotMethod, ...] = ("heat_map", "blended_heat_map", "masked_image")


def _check_channel_dim(channel_dim: object) -> int:
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TdfuncTypeError(f"channel_dim is a {type(channel_dim).__name__}; give an int in [-3, 2].")
    if not -3 <= channel_dim <= 2:
        raise PlotError(
            f"channel_dim={channel_dim} is outside [-3, 2]; give the channel dim of a (C, H, W) map "
            "(0) or of an (H, W, C) map (-1)."
        )
    return channel_dim


def _one_map(x: torch.Tensor, channel_dim: int, name: str = "attr") -> torch.Tensor:
    """(H, W) from (H, W) or (C, H, W) (channels summed over ``channel_dim``)."""
    if x.dim() == 3:
        return x.sum(channel_dim)
    if x.dim() == 2:
        return x
    raise PlotError(
        f"{name} has shape {shape_str(x.shape)} ({x.dim()} dims); give one map of shape (H, W) or "
        "(C, H, W) (channels are summed over channel_dim): index one example (and class) first, e.g. "
        f"{name}[0]."
    )


def _image(image: Any, channel_dim: int, hw: tuple[int, ...], name: str = "image") -> np.ndarray:
    """(H, W) grey or (H, W, 3) RGB in [0, 1] (scaled by its min and max)."""
    x = tensor(name, image)
    if x.dim() == 3:
        x = x.movedim(channel_dim, -1)
        if x.shape[-1] == 1:
            x = x[..., 0]
        elif x.shape[-1] != 3:
            raise PlotError(
                f"{name} has {x.shape[-1]} channels (shape {shape_str(image.shape)}); give 1 or 3 "
                "channels along channel_dim, or an (H, W) image."
            )
    elif x.dim() != 2:
        raise PlotError(
            f"{name} has shape {shape_str(x.shape)} ({x.dim()} dims); give (H, W) or (C, H, W) with C = 1 or 3."
        )
    if tuple(x.shape[:2]) != tuple(hw):
        raise PlotError(
            f"{name} is {x.shape[0]}x{x.shape[1]} but the attribution is {hw[0]}x{hw[1]}; give "
            f"maps of the image's size (coarse maps: tdfunc.plot.upsample(attr, {tuple(x.shape[:2])}))."
        )
    lo, hi = x.min(), x.max()
    x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    return x.numpy()


def _check_common(method: object, sign: object, outlier_perc: object, alpha: object) -> tuple[PlotMethod, Sign, float]:
    method = choice("method", method, METHODS)
    sign = choice("sign", sign, SIGNS)
    if method == "masked_image" and sign == "all":
        raise PlotError(
            "method='masked_image' weights the image by the attribution's magnitude, which "
            "sign='all' does not give; use sign='positive', 'negative' or 'absolute_value'."
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise PlotError(f"alpha={alpha!r}; give the heat map's opacity in [0, 1].")
    return method, sign, check_outlier_perc(outlier_perc)


def _draw(
    ax: Axes,
    shown: torch.Tensor,
    lim: float,
    sign: str,
    method: str,
    img: Any,
    cmap: str | Colormap | None,
    alpha: float,
) -> Any:
    """Draw one map; returns the heat map's image artist (None for a masked image)."""
    ax.set_xticks([])
    ax.set_yticks([])
    if method == "masked_image":
        w = (shown.abs() / lim).clamp(0, 1).numpy()
        if img.ndim == 2:
            ax.imshow(img * w, cmap="gray", vmin=0.0, vmax=1.0)
        else:
            ax.imshow(img * w[..., None])
        return None
    lo, hi = clim(sign, lim)
    if method == "blended_heat_map":
        ax.imshow(img if img.ndim == 2 else img.mean(-1), cmap="gray")
        return ax.imshow(shown.numpy(), cmap=cmap or CMAPS[sign], vmin=lo, vmax=hi, alpha=alpha)
    return ax.imshow(shown.numpy(), cmap=cmap or CMAPS[sign], vmin=lo, vmax=hi)


def _image_attribution(
    attr, image, *, key, method, sign, channel_dim, outlier_perc, cmap, alpha, colorbar, title, ax, figsize
):
    method, sign, outlier_perc = _check_common(method, sign, outlier_perc, alpha)
    channel_dim = _check_channel_dim(channel_dim)
    a = _one_map(attr_entry("attr", attr, key), channel_dim)
    if image is None and method != "heat_map":
        raise PlotError(
            f"method={method!r} draws over the image, but image is None; pass image= or use method='heat_map'."
        )
    img = None if image is None else _image(image, channel_dim, tuple(a.shape))
    shown, lim = scale(a, sign, outlier_perc)
    fig, ax = new_axes(ax, figsize)
    im = _draw(ax, shown, lim, sign, method, img, cmap, alpha)
    if colorbar and im is not None:
        fig.colorbar(im, ax=ax, shrink=0.8)
    if title is not None:
        ax.set_title(title)
    return fig, ax


@public("tdfunc.plot.image_attribution")
def image_attribution(
    attr: torch.Tensor | TensorDictBase,
    image: torch.Tensor | None = None,
    *,
    key: Key | None = None,
    method: PlotMethod = "heat_map",
    sign: Sign = "all",
    channel_dim: int = 0,
    outlier_perc: float = 2.0,
    cmap: str | Colormap | None = None,
    alpha: float = 0.5,
    colorbar: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (4.0, 4.0),
) -> tuple[Figure, Axes]:
    """One image attribution as a heat map, alone, blended over the image, or masking it
    (captum's ``visualize_image_attr``).

    The map is ``attr`` summed over its channel dim; ``sign`` keeps all of it, its positive or negative
    part, or its magnitude. The colour scale saturates at ``t``, the smallest value whose cumulative sum
    (ascending) reaches ``100 - outlier_perc`` % of the total magnitude (captum's rule, see
    :func:`normalize_attribution`); it is symmetric about zero for ``sign="all"`` (a diverging map, red =
    positive) and one-sided otherwise. The image artist holds the map in the attribution's own units,
    so the colour bar reads them.

    Args:
        attr: ``(H, W)`` or ``(C, H, W)`` on any device and dtype, or a TensorDict result without batch
            dims holding ``("attr", key)`` (e.g. ``tdfunc.saliency(f, td)[0]``).
        image: the input, ``(H, W)`` or ``(C, H, W)`` with 1 or 3 channels (shown scaled to [0, 1] by
            its min and max); needed by the blended and masked methods.
        key: which ``("attr", key)`` entry of a TensorDict (needed only when it holds several).
        method: ``"heat_map"``, ``"blended_heat_map"`` (over the grey image, with ``alpha``) or
            ``"masked_image"`` (the image times the normalised magnitude; not with ``sign="all"``).
        sign: ``"all"``, ``"positive"``, ``"negative"`` or ``"absolute_value"`` (captum's names).
        channel_dim: the channel dim of 3-dim maps and images (0: ``(C, H, W)``, -1: ``(H, W, C)``).
        outlier_perc: percentage of the total magnitude that saturates, in [0, 100); 0 scales to the max.
        cmap: a matplotlib colour map (default ``"RdBu_r"`` for ``"all"``, one-sided maps otherwise).
        alpha: opacity of the blended heat map.
        colorbar: draw a colour bar (not for ``"masked_image"``).
        title: axes title.
        ax: axes to draw on (default: a new figure of ``figsize``).
        figsize: size of a new figure in inches.

    Returns:
        ``(fig, ax)``.

    Raises:
        PlotError: a map that is not 2- or 3-dim, an image of another size, unknown method or sign,
            ``masked_image`` with ``sign="all"``, outlier_perc or alpha out of range, non-finite values.
        TypeError: ``attr``, ``image`` or ``ax`` of the wrong type.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt, torch, tdfunc.plot
        >>> attr, x = torch.randn(3, 8, 8), torch.rand(3, 8, 8)
        >>> fig, ax = tdfunc.plot.image_attribution(attr, x, method="blended_heat_map")
        >>> lo, hi = ax.images[-1].get_clim(); lo == -hi  # centred at zero
        True
        >>> plt.close(fig)

    Composes with: any attribution method's result (``tdfunc.integrated_gradients(f, td)[i]``), indexed
    to one example (and class).
    """
    return _image_attribution(
        attr,
        image,
        key=key,
        method=method,
        sign=sign,
        channel_dim=channel_dim,
        outlier_perc=outlier_perc,
        cmap=cmap,
        alpha=alpha,
        colorbar=colorbar,
        title=title,
        ax=ax,
        figsize=figsize,
    )


@public("tdfunc.plot.image_attribution_grid")
def image_attribution_grid(
    attr: torch.Tensor | TensorDictBase,
    images: torch.Tensor | None = None,
    *,
    key: Key | None = None,
    method: PlotMethod = "heat_map",
    sign: Sign = "all",
    outlier_perc: float = 2.0,
    shared: bool = True,
    cmap: str | Colormap | None = None,
    alpha: float = 0.5,
    colorbar: bool = True,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    axes: np.ndarray | None = None,
    figsize: tuple[float, float] | None = None,
) -> tuple[Figure, np.ndarray]:
    """Per-class maps of several examples in one grid: rows = examples, columns = classes.

    ``attr`` is one per-class result, e.g. ``tdfunc.integrated_gradients`` of a ``(B, K)``-valued ``f``:
    ``(B, K, C, H, W)`` (channels summed) or ``(B, K, H, W)``. With ``images``, the first column shows
    each input. With ``shared=True`` one colour scale (saturating as in :func:`image_attribution`, over
    all maps) spans the grid, so classes and examples compare; ``shared=False`` scales each map to its
    own ``t`` and shows it normalised to [-1, 1].

    Args:
        attr: ``(B, K, C, H, W)`` or ``(B, K, H, W)`` on any device and dtype, or a TensorDict result
            holding ``("attr", key)`` of that shape. One class: ``attr.unsqueeze(1)``.
        images: ``(B, H, W)`` or ``(B, C, H, W)`` with 1 or 3 channels, or None.
        key: which ``("attr", key)`` entry of a TensorDict (needed only when it holds several).
        method, sign, outlier_perc, cmap, alpha: as in :func:`image_attribution`.
        shared: one colour scale for the whole grid (default) or one per map.
        colorbar: one colour bar for the grid (not for ``"masked_image"``).
        row_labels: ``B`` labels (y-axis of the first column); col_labels: ``K`` titles of the map columns.
        axes: a ``(B, K)`` (``(B, K + 1)`` with images) array of axes to draw on (default: a new figure).
        figsize: size of a new figure (default about 1.3 inches per cell).

    Returns:
        ``(fig, axes)`` with ``axes`` a ``(B, K (+1))`` array.

    Raises:
        PlotError: ``attr`` not 4- or 5-dim, images of another count or size, wrong label counts, bad
            options as in :func:`image_attribution`.  TypeError: wrong types.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt, torch, tdfunc.plot
        >>> attr = torch.randn(2, 10, 1, 8, 8)  # e.g. integrated gradients of all 10 classes
        >>> fig, axes = tdfunc.plot.image_attribution_grid(attr, torch.rand(2, 1, 8, 8),
        ...                                                col_labels=[f"class {k}" for k in range(10)])
        >>> axes.shape
        (2, 11)
        >>> plt.close(fig)

    Composes with: ``tdfunc.integrated_gradients``, ``tdfunc.saliency``, ... of a ``(B, K)``-valued ``f``
    (every class from one call); ``tdfunc.grad_cam`` through :func:`upsample`.
    """
    method, sign, outlier_perc = _check_common(method, sign, outlier_perc, alpha)
    a = attr_entry("attr", attr, key)
    if a.dim() == 5:
        a = a.sum(2)
    elif a.dim() != 4:
        raise PlotError(
            f"attr has shape {shape_str(a.shape)} ({a.dim()} dims); give (B, K, C, H, W) or "
            "(B, K, H, W): examples x classes (one class: attr.unsqueeze(1))."
        )
    b, k, h, w = a.shape
    if images is None and method != "heat_map":
        raise PlotError(
            f"method={method!r} draws over the images, but images is None; pass images= or use method='heat_map'."
        )
    imgs = None
    if images is not None:
        x = tensor("images", images)
        if x.dim() not in (3, 4) or x.shape[0] != b:
            raise PlotError(
                f"images has shape {shape_str(x.shape)} but attr holds {b} examples; give "
                f"({b}, H, W) or ({b}, C, H, W)."
            )
        imgs = [_image(x[i], 0, (h, w), name="images[i]") for i in range(b)]
    rows = labels("row_labels", row_labels, b, "example")
    cols = labels("col_labels", col_labels, k, "class")
    ncol = k + (imgs is not None)
    if axes is None:
        size = figsize or (1.15 * ncol + (0.9 if colorbar else 0.2), 1.3 * b + (0.3 if cols else 0.1))
        fig, axes = plt.subplots(b, ncol, figsize=size, squeeze=False, layout="constrained")
    else:
        axes = np.asarray(axes, dtype=object).reshape(-1, ncol) if np.size(axes) == b * ncol else None
        if axes is None or not all(isinstance(x, Axes) for x in axes.flat):
            raise PlotError(
                f"axes must be {b * ncol} matplotlib Axes ({b} rows x {ncol} columns); give "
                f"plt.subplots({b}, {ncol})[1] or None."
            )
        fig = axes[0, 0].figure
    if shared:
        shown, lim = scale(a, sign, outlier_perc)
    im = None
    for i in range(b):
        if imgs is not None:
            axes[i, 0].imshow(imgs[i], cmap="gray" if imgs[i].ndim == 2 else None)
            axes[i, 0].set_xticks([])
            axes[i, 0].set_yticks([])
        for j in range(k):
            if shared:
                s, lim_ij = shown[i, j], lim
            else:
                s, lim_ij = scale(a[i, j], sign, outlier_perc)
                s, lim_ij = s / lim_ij, 1.0
            img = imgs[i] if imgs is not None else None
            im = _draw(axes[i, j + ncol - k], s, lim_ij, sign, method, img, cmap, alpha) or im
            if cols and i == 0:
                axes[0, j + ncol - k].set_title(cols[j], fontsize=9)
        if rows:
            axes[i, 0].set_ylabel(rows[i])
    if colorbar and im is not None:
        cb = fig.colorbar(im, ax=axes, shrink=0.8)
        if not shared:
            cb.set_label("relative to each map's scale")
    return fig, axes


@public("tdfunc.plot.grad_cam_overlay")
def grad_cam_overlay(
    cam: torch.Tensor | TensorDictBase,
    image: torch.Tensor,
    *,
    key: Key | None = None,
    mode: UpsampleMode = "bilinear",
    sign: Sign = "positive",
    outlier_perc: float = 0.0,
    cmap: str | Colormap | None = None,
    alpha: float = 0.5,
    colorbar: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (4.0, 4.0),
) -> tuple[Figure, Axes]:
    """A Grad-CAM map upsampled to the input's size (:func:`upsample`) and blended over the image.

    Args:
        cam: ``(h, w)`` or ``(1, h, w)`` (one example and class of ``tdfunc.grad_cam``'s
            ``batch (+ K) + (1, h, w)``), any device and dtype, or a TensorDict result without batch
            dims holding ``("attr", site)``.
        image: the input, ``(H, W)`` or ``(C, H, W)`` with 1 or 3 channels.
        key: which ``("attr", site)`` entry of a TensorDict (needed only when it holds several).
        mode: upsampling, ``"bilinear"``, ``"nearest"``, ``"bicubic"`` or ``"area"``.
        sign: ``"positive"`` (default: the ReLU of the original Grad-CAM), ``"all"``, ``"negative"``,
            ``"absolute_value"``.
        outlier_perc, cmap, alpha, colorbar, title, ax, figsize: as in :func:`image_attribution`
            (``outlier_perc`` defaults to 0: a coarse map has few values to saturate).

    Returns:
        ``(fig, ax)``.

    Raises:
        PlotError: a map that is not ``(h, w)`` / ``(1, h, w)``, a bad image, unknown mode or sign.
        TypeError: wrong types.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt, torch, tdfunc.plot
        >>> fig, ax = tdfunc.plot.grad_cam_overlay(torch.randn(1, 4, 4), torch.rand(1, 16, 16))
        >>> ax.images[-1].get_array().shape  # upsampled to the image
        (16, 16)
        >>> plt.close(fig)

    Composes with: ``tdfunc.grad_cam(f, td, module, site)`` (index one example and class).
    """
    m = attr_entry("cam", cam, key)
    if m.dim() == 3 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise PlotError(
            f"cam has shape {shape_str(m.shape)}; give one map (h, w) or (1, h, w): index one "
            "example (and class) of tdfunc.grad_cam's result first, e.g. cam[0, k]."
        )
    mode = choice("mode", mode, UPSAMPLE_MODES)
    x = tensor("image", image)
    if x.dim() not in (2, 3):
        raise PlotError(
            f"image has shape {shape_str(x.shape)} ({x.dim()} dims); give (H, W) or (C, H, W) with C = 1 or 3."
        )
    up = upsample(m, cast("tuple[int, int]", tuple(int(s) for s in x.shape[-2:])), mode=mode)
    return _image_attribution(
        up,
        x,
        key=None,
        method="blended_heat_map",
        sign=sign,
        channel_dim=0,
        outlier_perc=outlier_perc,
        cmap=cmap,
        alpha=alpha,
        colorbar=colorbar,
        title=title,
        ax=ax,
        figsize=figsize,
    )
