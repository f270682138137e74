"""Layer feature ablation, captum's ``LayerFeatureAblation``: ablate groups of a site's value.

A first forward captures the site's value ``a`` (batch first) and ``f(td)``; every ablated value
``where(M_g, a', a)`` is substituted at the site through the edit machinery (an edit is data, so the
stack of them is ``vmap``-ed: one call of ``f`` per chunk of features, as the other perturbation methods).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from .._checks import check_bool, check_callable, check_chunk_size, check_randomness
from .._errors import public
from .._finite import check_finite
from .._types import PerKey
from ._common import NONFINITE_FIX, AttributionError, Inputs, _norm, _show, check_output, result, shared_baseline
from ._layer import _batch_first, _check, _run
from ._perturb_common import feature_masks, run_perturbed

__all__ = ["layer_feature_ablation"]


@public("tdfunc.layer_feature_ablation")
def layer_feature_ablation(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    module: nn.Module,
    site: str,
    *,
    feature_mask: PerKey | None = None,
    baselines: torch.Tensor | float | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    randomness: str = "error",
) -> TensorDict:
    """Feature ablation at a site, captum's ``LayerFeatureAblation``: replace groups of the site's value.

    .. math::  A_{b,k}(a)_i = f_k(x)_b - f_k(x;\\ \\text{site} \\leftarrow a^{(g(i))})_b,
        \\qquad a^{(g)} = a \\text{ with every position of feature id } g \\text{ set to the baseline } a'

    ``a`` is the site's value at ``td`` (batch first); the feature ids are the distinct values of
    ``feature_mask`` (captum's ``layer_mask``).  The ``n_features`` ablated values are one stacked tensor,
    substituted at the site by one ``vmap``-ed call of ``f`` (``chunk_size`` features at a time).

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)`` (or one value for the
            whole batch, shape ``()``: as in :func:`tdfunc.feature_ablation`); it runs ``module`` somewhere.
        td: the inputs.
        module: the model whose site is ablated.
        site: one site of ``module`` (a module output, ``":input"``, ``"@k"``, an operation site); its
            value must be a floating-point tensor with ``td``'s batch dims first.
        feature_mask: integer feature ids broadcastable to the site's value (batch + its shape, or its
            per-example shape); default every scalar its own feature.
        baselines: the values put at ablated positions (captum's ``layer_baselines``): a number or a
            tensor broadcastable to the site's value; default zeros.
        chunk_size: features per forward; bounds memory to ``chunk_size`` copies of the site's value.
        progress: show a tqdm bar on stderr over the chunks of features (one step when ``chunk_size``
            is None); never shown under ``vmap`` / ``grad`` / ``torch.compile``.
        randomness: ``torch.func.vmap``'s flag for random ops in ``f`` (train-mode dropout) under this
            method's ``vmap``: ``"error"`` (default, as torch), ``"different"`` or ``"same"``.

    Returns:
        TensorDict with ``("attr", site)`` of shape ``batch (+ K) + the site's per-example shape``.

    Raises:
        TypeError: ``module`` or ``td`` of the wrong type.
        AttributionError: a glob site, a site value that is not a batch-first floating-point tensor,
            a bad feature_mask or baseline, ``f`` output of the wrong shape.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> out = tdfunc.layer_feature_ablation(lambda t: net(t["x"])[:, 0], td, net, "1")
        >>> h = net[1](net[0](td["x"]))  # a linear head after the site: attribution = h * w
        >>> torch.allclose(out["attr", "1"], h * net[2].weight[0], atol=1e-6)
        True

    References:
        Kokhlikyan et al. Captum: A unified and generic model interpretability library. 2020
        (``LayerFeatureAblation``).

    Composes with: ``vmap``, ``grad`` (double backward), ``torch.compile(fullgraph=True)`` after
    ``tdfunc.install_sites(module, site)`` with the default mask.
    """
    _check(td, module, site)
    check_callable("f", f, AttributionError, expected="f(td) -> Tensor")
    check_chunk_size(chunk_size, AttributionError)
    check_bool("progress", progress, AttributionError)
    check_randomness(randomness, AttributionError)
    for key in td.keys(include_nested=True, leaves_only=True):  # f may read any entry
        if td.get(key).is_floating_point():
            check_finite(f"input {_show(_norm(key))}", td.get(key), AttributionError, NONFINITE_FIX)
    y0, caps = _run(f, module, td, None, [site])
    batch = td.batch_size
    k = check_output(y0, batch, batch_value=True)
    a = _batch_first(caps[site], batch, site)
    key = (site,)
    base = torch.zeros_like(a) if baselines is None else shared_baseline(key, baselines, a, "the site's value")
    p = Inputs([key], {key: a}, {key: base}, batch)
    nb = len(batch)
    given = (
        None
        if feature_mask is None
        else ({key: feature_mask} if isinstance(feature_mask, torch.Tensor) else feature_mask)
    )
    masks = feature_masks(given, p, "the site's value")
    if feature_mask is None:
        ids = torch.arange(math.prod(a.shape[nb:]), device=a.device)
    else:
        ids = torch.unique(masks[key].flatten().to(a.device))
    n = int(ids.numel())

    def masks_for(lo, hi):
        cur = ids[lo:hi]
        return {key: m.unsqueeze(0) == cur.view(-1, *([1] * m.dim())) for key, m in masks.items()}

    at_site = lambda t: _run(f, module, td, {site: t.get(key)}, None)  # noqa: E731
    holder = TensorDict({key: a}, batch_size=batch)
    _, total = run_perturbed(at_site, holder, p, n, chunk_size, masks_for, y0, progress=progress, randomness=randomness)
    t = total[key]
    want = (*a.shape[:nb], *(() if k is None else (k,)), *a.shape[nb:])
    return result(batch, {key: t.expand(want) if tuple(t.shape) != want else t}, warn=True)
