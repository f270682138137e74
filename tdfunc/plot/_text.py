"""Token attributions: coloured tokens as a matplotlib figure and as HTML for notebooks."""

from __future__ import annotations

import html
from collections.abc import Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize, to_hex
from matplotlib.figure import Figure
from matplotlib.transforms import offset_copy
from tensordict import TensorDictBase

from .._errors import TdfuncTypeError, public, shape_str
from .._types import Key
from ._common import PlotError, attr_entry, check_outlier_perc, new_axes, scale

__all__ = ["TokenHTML", "token_attribution", "token_attribution_html"]


class TokenHTML(str):
    """An HTML string that notebooks render (``_repr_html_``); write it to a file as it is."""

    def _repr_html_(self) -> str:
        return str(self)


def _scores(tokens: object, scores: object, key: object, outlier_perc: object, cmap: object):
    """(tokens, scores (T,), Normalize centred at 0, colour map)."""
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise TdfuncTypeError(
            f"tokens is a {type(tokens).__name__}; give a list of strings (one per position), "
            "e.g. [tok.decode(i) for i in input_ids[0]]."
        )
    s = attr_entry("scores", scores, key)
    if s.dim() == 2:
        s = s.sum(-1)  # (T, D) embedding attributions: one score per token
    if s.dim() != 1:
        raise PlotError(
            f"scores has shape {shape_str(s.shape)}; give one score per token (T,) or (T, D) "
            "(summed over D): index one example first, e.g. scores[0]."
        )
    if len(tokens) != s.shape[0]:
        raise PlotError(
            f"{len(tokens)} tokens but {s.shape[0]} scores; give one score per token (same "
            "length, e.g. tokens of the same input_ids the attribution was computed for)."
        )
    _, lim = scale(s, "all", check_outlier_perc(outlier_perc))
    try:
        cm = cmap if isinstance(cmap, Colormap) else colormaps[cmap]  # type: ignore[index]
    except (KeyError, TypeError):
        raise PlotError(
            f"unknown cmap {cmap!r}; give a matplotlib colour map name (e.g. 'RdBu_r') or a Colormap."
        ) from None
    return [str(t) for t in tokens], s, Normalize(-lim, lim), cm


def _ink(rgba) -> str:
    """Black or white text, whichever reads better on the background colour."""
    r, g, b = rgba[:3]
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "#ffffff"


def _visible(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t")


@public("tdfunc.plot.token_attribution")
def token_attribution(
    tokens: Sequence[str],
    scores: torch.Tensor | TensorDictBase,
    *,
    key: Key | None = None,
    outlier_perc: float = 0.0,
    cmap: str | Colormap = "RdBu_r",
    fontsize: float = 12.0,
    width: float = 8.0,
    colorbar: bool = False,
    title: str | None = None,
    ax: Axes | None = None,
) -> tuple[Figure, Axes]:
    """Tokens as coloured boxes that wrap over lines, coloured by their score on a scale centred at zero.

    The colour of score ``s`` is ``cmap((s / t + 1) / 2)`` (clipped), with ``t`` the largest ``|s|`` (or
    the :func:`normalize_attribution` threshold for ``outlier_perc > 0``): white is zero, red positive,
    blue negative with the default map. Newlines and tabs in tokens show as ``\\n`` and ``\\t``.

    Args:
        tokens: ``T`` strings (decoded tokens, leading spaces kept).
        scores: ``(T,)`` or ``(T, D)`` (summed over ``D``, e.g. an attribution to the embeddings), any
            device and dtype, or a TensorDict result without batch dims holding ``("attr", key)``.
        key: which ``("attr", key)`` entry of a TensorDict (needed only when it holds several).
        outlier_perc: percentage of the total ``|score|`` that saturates, in [0, 100).
        cmap: a diverging matplotlib colour map (name or Colormap).
        fontsize: in points.
        width: width in inches of a new figure (its height follows from the number of lines).
        colorbar: draw a horizontal colour bar under the tokens.
        title: title above the tokens.
        ax: axes to draw on: tokens wrap at its width, from its top-left corner (give it room).

    Returns:
        ``(fig, ax)``; ``ax.texts`` holds one text per token, its box coloured by the score.

    Raises:
        PlotError: a score count that differs from the token count, scores not 1- or 2-dim, unknown cmap.
        TypeError: tokens not a list of strings, scores not a tensor.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt, torch, tdfunc.plot
        >>> fig, ax = tdfunc.plot.token_attribution(
        ...     ["The", " capital", " of", " France"], torch.tensor([0.1, -0.5, 0.0, 2.0])
        ... )
        >>> [t.get_text() for t in ax.texts]
        ['The', ' capital', ' of', ' France']
        >>> plt.close(fig)

    Composes with: ``tdfunc.integrated_gradients`` / ``tdfunc.layer_integrated_gradients`` on the
    embeddings (sum over the width), :func:`token_attribution_html` for notebooks.
    """
    tokens, s, norm, cm = _scores(tokens, scores, key, outlier_perc, cmap)
    own = ax is None
    if own:
        fig = plt.figure(figsize=(width, 1.0))
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    else:
        fig, ax = new_axes(ax, (width, 1.0))
    ax.set_axis_off()
    if colorbar:  # before the layout: it takes its room from the axes
        from matplotlib.cm import ScalarMappable

        fig.colorbar(
            ScalarMappable(norm=norm, cmap=cm), ax=ax, orientation="horizontal", fraction=0.25, pad=0.02, shrink=0.6
        )
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    pt = 72.0 / fig.dpi  # points per pixel
    margin, pad, gap, line_h = 0.5 * fontsize, 0.25 * fontsize, 0.35 * fontsize, 1.9 * fontsize
    avail = ax.get_window_extent(renderer).width * pt - 2 * margin
    placed, x, line = [], 0.0, 0
    for tok, v in zip(tokens, s.tolist()):
        rgba = cm(norm(v))
        t = ax.text(
            0.0,
            1.0,
            _visible(tok),
            fontsize=fontsize,
            color=_ink(rgba),
            ha="left",
            va="top",
            parse_math=False,
            bbox={"boxstyle": f"square,pad={pad / fontsize}", "facecolor": rgba, "edgecolor": "none"},
        )
        w = t.get_window_extent(renderer).width * pt + 2 * pad
        if x > 0 and x + w > avail:
            x, line = 0.0, line + 1
        placed.append((t, x, line))
        x += w + gap
    n_lines = line + 1
    if own:
        content = n_lines * line_h + 2 * margin
        top = 2.2 * fontsize if title else 0.0
        bar = 0.9 * 72 if colorbar else 0.0
        fig.set_size_inches(width, (content + top + bar) / 72)
        h = content + top + bar
        ax.set_position((0.0, bar / h, 1.0, content / h))
    for t, x0, ln in placed:  # offsets in points from the axes' top-left corner
        t.set_transform(
            offset_copy(ax.transAxes, fig=fig, x=margin + pad + x0, y=-(margin + pad + ln * line_h), units="points")
        )
    if title is not None:
        ax.set_title(title, fontsize=fontsize)
    return fig, ax


@public("tdfunc.plot.token_attribution_html")
def token_attribution_html(
    tokens: Sequence[str],
    scores: torch.Tensor | TensorDictBase,
    *,
    key: Key | None = None,
    outlier_perc: float = 0.0,
    cmap: str | Colormap = "RdBu_r",
) -> TokenHTML:
    """Tokens as coloured HTML spans, for notebooks (the same colours as :func:`token_attribution`).

    Each token is ``html.escape``-d into a ``<span>`` with its colour as background, its score as
    tooltip (``title``) and ``white-space: pre`` (leading spaces show). The result is a ``str`` that a
    notebook renders (``_repr_html_``).

    Args:
        tokens, scores, key, outlier_perc, cmap: as in :func:`token_attribution`.

    Returns:
        :class:`TokenHTML`, a ``str`` holding one ``<div>``.

    Raises:
        PlotError, TypeError: as in :func:`token_attribution`.

    Example:
        >>> import torch, tdfunc.plot
        >>> page = tdfunc.plot.token_attribution_html(["<b>", " x"], torch.tensor([1.0, -1.0]))
        >>> "&lt;b&gt;" in page, "background-color:#67001f" in page
        (True, True)
    """
    tokens, s, norm, cm = _scores(tokens, scores, key, outlier_perc, cmap)
    spans = []
    for tok, v in zip(tokens, s.tolist()):
        rgba = cm(norm(v))
        spans.append(
            f'<span title="{v:.4g}" style="background-color:{to_hex(rgba)};color:{_ink(rgba)};'
            f'white-space:pre;padding:1px 2px;margin:0 1px;border-radius:3px">'
            f"{html.escape(_visible(tok))}</span>"
        )
    return TokenHTML('<div style="line-height:2;font-family:monospace">' + "".join(spans) + "</div>")
