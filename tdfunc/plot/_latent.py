"""Latent-method results: a patching sweep's heat map, probe accuracy by layer, steering / alpha sweeps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from matplotlib.axes import Axes
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from tensordict import TensorDictBase

from .._errors import TdfuncTypeError, public, shape_str, suggest
from ._common import PlotError, new_axes, no_math, tensor, values
from ._common import labels as _labels

if TYPE_CHECKING:  # matplotlib.typing is new in matplotlib 3.8
    from matplotlib.typing import ColorType

__all__ = ["patching_heatmap", "probe_accuracy", "sweep_curve"]


def _slanted(names: Sequence[str]) -> dict[str, Any]:
    """Tick label options: long labels slanted so neighbours do not overlap."""
    return {"rotation": 45, "ha": "right", "rotation_mode": "anchor"} if max(map(len, names)) > 3 else {}


@public("tdfunc.plot.patching_heatmap")
def patching_heatmap(
    result: torch.Tensor,
    *,
    sites: Sequence[str] | None = None,
    units: Sequence[str] | None = None,
    transpose: bool = False,
    annotate: bool | str = False,
    cmap: str | Colormap = "RdBu_r",
    colorbar: bool = True,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
) -> tuple[Figure, Axes]:
    """A ``(sites, units)`` patching result as a heat map on a colour scale centred at zero.

    Rows are sites, columns units (positions, heads); ``transpose=True`` puts the sites on the x-axis.
    The colour limits are ``±max|result|`` (nan cells, e.g. a combination that does not exist, stay
    blank). Subtract a reference first to centre elsewhere (``result - corrupted_metric``).

    Args:
        result: ``(n_sites, n_units)``, as ``tdfunc.latent.patching_sweep`` returns, any device and dtype.
        sites: ``n_sites`` labels (site names, or layer numbers); units: ``n_units`` labels (the tokens).
        transpose: sites on the x-axis, units on the y-axis.
        annotate: write each value in its cell; a format string (``"{:.2f}"``) or True (``"{:.2g}"``).
        cmap: a diverging matplotlib colour map.
        colorbar: draw a colour bar.
        title, xlabel, ylabel: text of the axes.
        ax: axes to draw on (default: a new figure of ``figsize``, by default sized to the grid).

    Returns:
        ``(fig, ax)``.

    Raises:
        PlotError: ``result`` not 2-dim, label counts that differ from its shape.  TypeError: wrong types.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt, torch, tdfunc.plot
        >>> r = torch.randn(3, 4)  # e.g. tdfunc.latent.patching_sweep(...) over 3 blocks x 4 positions
        >>> fig, ax = tdfunc.plot.patching_heatmap(r, sites=["h.0", "h.1", "h.2"], units=["The", " cat", " sat", " on"])
        >>> [t.get_text() for t in ax.get_yticklabels()]
        ['h.0', 'h.1', 'h.2']
        >>> plt.close(fig)

    Composes with: ``tdfunc.latent.patching_sweep`` (``over="positions"`` or heads).
    """
    r = tensor("result", result)
    if r.dim() != 2:
        raise PlotError(
            f"result has shape {shape_str(r.shape)} ({r.dim()} dims); give (n_sites, n_units) as "
            "tdfunc.latent.patching_sweep returns (one sweep: r.view(1, -1))."
        )
    n_s, n_u = r.shape
    site_labels = _labels("sites", sites, n_s, "site")
    unit_labels = _labels("units", units, n_u, "unit")
    if not isinstance(annotate, (bool, str)):
        raise TdfuncTypeError(f"annotate is a {type(annotate).__name__}; give True or a format string like '{{:.2f}}'.")
    finite = r[torch.isfinite(r)]
    lim = float(finite.abs().max()) if finite.numel() else 1.0
    lim = lim if lim > 0 else 1.0
    shown = r.T if transpose else r
    ny, nx = shown.shape
    fig, ax = new_axes(
        ax, figsize or (min(14.0, 2.0 + 0.45 * nx + (1.0 if colorbar else 0.0)), min(10.0, 1.0 + 0.3 * ny))
    )
    im = ax.imshow(shown.numpy(), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    xl, yl = (site_labels, unit_labels) if transpose else (unit_labels, site_labels)
    if xl is not None:
        ax.set_xticks(range(nx), xl, **_slanted(xl))
        no_math(ax.get_xticklabels())
    if yl is not None:
        ax.set_yticks(range(ny), yl)
        no_math(ax.get_yticklabels())
    if annotate:
        form = "{:.2g}" if annotate is True else annotate
        for i in range(ny):
            for j in range(nx):
                v = float(shown[i, j])
                if math.isfinite(v):
                    ax.text(
                        j,
                        i,
                        form.format(v),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if abs(v) > 0.6 * lim else "black",
                    )
    if colorbar:
        fig.colorbar(im, ax=ax)
    for text, set_text in ((title, ax.set_title), (xlabel, ax.set_xlabel), (ylabel, ax.set_ylabel)):
        if text is not None:
            set_text(text)
    return fig, ax


@public("tdfunc.plot.probe_accuracy")
def probe_accuracy(
    result: TensorDictBase,
    *,
    sites: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    metric: str = "accuracy",
    splits: Sequence[str] = ("train", "test"),
    chance: float | None = None,
    tick_every: int | None = None,
    title: str | None = None,
    xlabel: str | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (8.0, 3.0),
) -> tuple[Figure, Axes]:
    """Probe accuracy (or another metric) by layer, one line per split, from ``tdfunc.latent.fit_probes``.

    Args:
        result: the TensorDict of ``tdfunc.latent.fit_probes`` (or ``fit_sklearn_probes``), holding
            ``(split, site, metric)`` scalars.
        sites: which sites, in order (default: every site of the last split, in the result's order).
        labels: one x tick label per site (default: the site names), e.g. layer numbers.
        metric: the entry per site: ``"accuracy"`` or ``"loss"``.
        splits: the lines, e.g. ``("test",)``; each is labelled with its name in the legend.
        chance: draw a dashed horizontal line at this value (e.g. 0.5 for two balanced classes).
        tick_every: label every n-th site (default: as many as keep at most about 16 labels).
        title, xlabel: text of the axes (the y label is ``metric``).
        ax: axes to draw on (default: a new figure of ``figsize``).

    Returns:
        ``(fig, ax)``.

    Raises:
        PlotError: a split, site or metric the result does not hold, a label count that differs from
            the site count.  TypeError: ``result`` is not a TensorDict.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt, torch, tdfunc.plot
        >>> from tensordict import TensorDict
        >>> acts = TensorDict({f"h.{i}": torch.randn(40, 4) for i in range(3)}, batch_size=[])
        >>> out = tdfunc.latent.fit_probes(acts, torch.randint(0, 2, (40,)), steps=5)
        >>> fig, ax = tdfunc.plot.probe_accuracy(out, chance=0.5)
        >>> [line.get_label() for line in ax.get_lines()]
        ['train', 'test', 'chance']
        >>> plt.close(fig)

    Composes with: ``tdfunc.latent.cache_activations`` then ``tdfunc.latent.fit_probes``.
    """
    if not isinstance(result, TensorDictBase):
        raise TdfuncTypeError(
            f"result is a {type(result).__name__}; give the TensorDict of "
            "tdfunc.latent.fit_probes (or fit_sklearn_probes)."
        )
    if isinstance(splits, str) or not isinstance(splits, Sequence) or not splits:
        raise TdfuncTypeError(f"splits is {splits!r}; give a non-empty list of split names, e.g. ('train', 'test').")
    held = [k for k in result.keys() if isinstance(result.get(k), TensorDictBase)]
    for split in splits:
        if split not in held:
            raise PlotError(
                f"the result holds no split {split!r} (it holds {held}); give splits from those."
                f"{suggest(str(split), held)}"
            )
    names = list(result[splits[-1]].keys()) if sites is None else list(sites)
    for split in splits:
        have = list(result[split].keys())
        for s in names:
            if s not in have:
                raise PlotError(
                    f"the result holds no site {s!r} under {split!r} (sites: {have}).{suggest(str(s), have)}"
                )
            if metric not in result[split, s].keys():
                raise PlotError(
                    f"the result holds no metric {metric!r} for {split!r}/{s!r} (metrics: "
                    f"{list(result[split, s].keys())}); give one of those."
                )
    ticks = _labels("labels", labels, len(names), "site") or names
    if tick_every is not None and (isinstance(tick_every, bool) or not isinstance(tick_every, int) or tick_every < 1):
        raise PlotError(f"tick_every={tick_every!r}; give a positive int (label every n-th site) or None.")
    step = tick_every or max(1, math.ceil(len(names) / 16))
    fig, ax = new_axes(ax, figsize)
    x = list(range(len(names)))
    for k, split in enumerate(splits):
        y = [float(result[split, s, metric]) for s in names]
        ax.plot(x, y, "o-" if k == len(splits) - 1 else ".-", ms=4, label=split)
    if chance is not None:
        ax.axhline(float(chance), color="gray", ls="--", lw=1, label="chance")
    ax.set_xticks(x[::step], ticks[::step], **_slanted(ticks[::step]))
    no_math(ax.get_xticklabels())
    ax.set_ylabel(metric)
    ax.legend()
    for text, set_text in ((title, ax.set_title), (xlabel, ax.set_xlabel)):
        if text is not None:
            set_text(text)
    return fig, ax


@public("tdfunc.plot.sweep_curve")
def sweep_curve(
    x: torch.Tensor | Sequence[float],
    y: torch.Tensor | Sequence[float] | Mapping[str, torch.Tensor | Sequence[float]],
    *,
    labels: Sequence[str] | None = None,
    baseline: float | None = None,
    baseline_label: str = "baseline",
    colors: Sequence[ColorType] | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (5.0, 3.0),
    **plot_kw: Any,
) -> tuple[Figure, Axes]:
    """A metric against a swept value: steering scales, task-vector alphas, pruning amounts.

    Args:
        x: ``(n,)`` swept values (tensor or numbers).
        y: ``(n,)`` or ``(m, n)`` (one curve per row, e.g. a ``vmap`` over scales and directions), or a
            mapping ``{label: (n,)}``.
        labels: ``m`` legend labels (a mapping's keys by default).
        baseline: draw a dashed horizontal line at this value (e.g. the unsteered metric), labelled
            ``baseline_label``.
        colors: ``m`` matplotlib colours (default: the colour cycle).
        xlabel, ylabel, title: text of the axes.
        ax: axes to draw on (default: a new figure of ``figsize``).
        **plot_kw: passed to every ``ax.plot`` (default ``marker="o"``), e.g. ``linestyle="--"``.

    Returns:
        ``(fig, ax)``; a legend is drawn when there are labels or a baseline.

    Raises:
        PlotError: ``y`` of another length than ``x``, more than 2 dims, a label or colour count that
            differs from the curve count.  TypeError: values that are not numbers.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt, torch, tdfunc.plot
        >>> scales = torch.linspace(-4, 4, 9)
        >>> fig, ax = tdfunc.plot.sweep_curve(scales, 2 * scales + 1, baseline=1.0, xlabel="scale")
        >>> len(ax.get_lines())  # the curve and the baseline
        2
        >>> plt.close(fig)

    Composes with: ``vmap`` over ``tdfunc.latent.steer`` scales, ``tdfunc.weights.task_vector_sweep``,
    ``tdfunc.weights.prune_masks`` amounts.
    """
    xs = values("x", x)
    if xs.dim() != 1:
        raise PlotError(f"x has shape {shape_str(xs.shape)}; give the swept values as one dim (n,).")
    if isinstance(y, Mapping):
        keys = [str(k) for k in y]
        ys = [values(f"y[{k!r}]", v) for k, v in y.items()]
        labels = keys if labels is None else labels
    else:
        yt = values("y", y)
        if yt.dim() not in (1, 2):
            raise PlotError(f"y has shape {shape_str(yt.shape)}; give (n,) or (m, n) (one curve per row).")
        ys = [yt] if yt.dim() == 1 else list(yt)
    for k, yk in enumerate(ys):
        if yk.shape != xs.shape:
            raise PlotError(
                f"curve {k} has shape {shape_str(yk.shape)} but x has {xs.shape[0]} values; give "
                f"{xs.shape[0]} values per curve."
            )
    names = _labels("labels", labels, len(ys), "curve")
    cols = None
    if colors is not None:
        if isinstance(colors, str) or not isinstance(colors, Sequence) or len(colors) != len(ys):
            raise PlotError(
                f"colors={colors!r} does not give one colour per curve ({len(ys)}); give a list "
                f"of {len(ys)} matplotlib colours or None."
            )
        cols = list(colors)
    fig, ax = new_axes(ax, figsize)
    kw = {"marker": "o", **plot_kw}
    for k, yk in enumerate(ys):
        extra: dict[str, Any] = {"color": cols[k]} if cols is not None else {}
        ax.plot(xs.numpy(), yk.numpy(), label=names[k] if names else None, **extra, **kw)
    if baseline is not None:
        ax.axhline(float(baseline), color="gray", ls="--", lw=1, label=baseline_label)
    if names or baseline is not None:
        ax.legend()
    for text, set_text in ((title, ax.set_title), (xlabel, ax.set_xlabel), (ylabel, ax.set_ylabel)):
        if text is not None:
            set_text(text)
    return fig, ax
