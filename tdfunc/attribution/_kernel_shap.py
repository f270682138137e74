"""Kernel SHAP (Lundberg & Lee, 2017), captum's ``KernelShap``: a weighted linear fit over coalitions.

Every coalition's input ``where(z, x, baseline)`` is built from boolean masks and evaluated by one
``vmap``-ed call of ``f`` (``chunk_size`` coalitions at a time), as in :mod:`._perturb`.  The
weighted least-squares fit is solved once for the coalition design (it does not depend on the
inputs): the attributions are a fixed linear map of the outputs, shared by every example and target.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDict, TensorDictBase

from .._checks import check_callable
from .._errors import public
from .._types import InKeys, PerKey
from ._common import AttributionError, Baselines, check_output, result
from ._perturb_common import check_draws, per_position, run_perturbed, sampling_setup

__all__ = ["kernel_shap"]

_INF_WEIGHT = 1000000.0  # captum's weight of the empty and the full coalition


def _draw_coalitions(n_samples: int, n_feat: int, generator: torch.Generator | None) -> torch.Tensor:
    """captum's ``kernel_shap_perturb_generator``: all ones, all zeros, then ``k ~ p(k)`` random ones."""
    rows = [torch.ones(n_feat, dtype=torch.bool), torch.zeros(n_feat, dtype=torch.bool)][:n_samples]
    if n_feat == 0:  # no feature to draw: every coalition is the empty one
        return torch.zeros(n_samples, 0, dtype=torch.bool)
    if n_feat == 1:  # p(k) is 0 / 0 (captum raises): the only coalitions are the full and the empty one
        return (torch.arange(n_samples) % 2 == 0)[:, None]
    if n_samples > 2:
        ks = torch.arange(n_feat, dtype=torch.float)
        probs = torch.tensor(n_feat - 1) / (ks * (n_feat - ks))
        probs[0] = 0.0
        probs = (probs / probs.sum(-1, keepdim=True)).reshape(1, -1)  # torch.distributions.Categorical
        for _ in range(n_samples - 2):
            k = int(torch.multinomial(probs, 1, True, generator=generator).T.reshape(()))
            r = torch.randn(1, n_feat, generator=generator)
            thr = torch.kthvalue(r, n_feat - k).values.item()
            rows.append((r > thr)[0])
    return torch.stack(rows)


def _check_coalitions(coal, n_samples: int, n_feat: int) -> torch.Tensor:
    ok = lambda t: not (t.is_floating_point() or t.is_complex())  # noqa: E731
    coal = check_draws("coalitions", coal, n_samples, n_feat, "a bool or integer 0/1 tensor", ok)
    if coal.dtype != torch.bool:
        if not torch.compiler.is_compiling() and bool(((coal != 0) & (coal != 1)).any()):
            raise AttributionError("coalitions must hold only 0 and 1 (1: the feature keeps its input value).")
        coal = coal != 0
    return coal


def _solver(coal: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(F, S)`` matrix ``A`` with ``coef = A @ y``: sklearn's weighted ``LinearRegression`` (with intercept).

    sklearn centres ``Z`` and ``y`` on their weighted means, scales rows by ``sqrt(w)`` and takes the
    minimum-norm least-squares solution; the same here with a pseudo-inverse (the design holds no
    input, so ``A`` is a constant and the fit is linear in ``y``).
    """
    z = coal.to(dtype)
    all_or_none = coal.all(1) | ~coal.any(1)
    ones = torch.ones(z.shape[0], dtype=dtype, device=z.device)
    w = torch.where(all_or_none, _INF_WEIGHT * ones, ones)
    sw = w.sqrt()
    zc = z - (w[:, None] * z).sum(0) / w.sum()
    pinv = torch.linalg.pinv(sw[:, None] * zc)  # (F, S)
    # y_c = y - (w . y) / sum(w): fold the centring of y and the sqrt(w) row scale into A
    center = torch.eye(len(w), dtype=dtype, device=w.device) - w[None, :] / w.sum()
    return (pinv * sw[None, :]) @ center


@public("tdfunc.kernel_shap")
def kernel_shap(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    *,
    feature_mask: PerKey | None = None,
    n_samples: int = 25,
    generator: torch.Generator | None = None,
    coalitions: torch.Tensor | None = None,
    chunk_size: int | None = None,
    in_keys: InKeys | None = None,
    progress: bool = False,
    randomness: str = "error",
    baselines: Baselines | None = None,
) -> TensorDict:
    """Kernel SHAP (Lundberg & Lee, 2017), captum's ``KernelShap``.

    .. math::
        \\phi_{b,k} = \\arg\\min_{\\phi, \\phi_0} \\sum_{s=1}^{S} w_s
            \\big(f_k(x^{(z_s)})_b - \\phi_0 - z_s^\\top \\phi\\big)^2,
        \\qquad w_s = \\begin{cases} 10^6 & z_s = 0 \\text{ or } z_s = 1 \\\\ 1 & \\text{else} \\end{cases}

    where ``x^(z)`` holds the input on the features with ``z_g = 1`` and the baseline elsewhere;
    every position of feature ``g`` gets ``φ_g``.  As captum, the coalitions ``z_s`` are the full
    one, the empty one, then ``k ~ p(k) ∝ (M - 1) / (k (M - k))`` features drawn at random
    (sampling with the Shapley kernel, so the fit weights are 1), and the fit is sklearn's
    weighted ``LinearRegression`` (with intercept, minimum-norm solution).  Feature ids are
    ``0 .. max(feature_mask)`` shared across inputs.  The ``S`` coalition inputs are one stacked
    tensor evaluated by one ``vmap``-ed call of ``f``; one set of coalitions serves every example.

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)``, or one value for
            the whole batch (shape ``()``, captum's scalar forward): then one fit for that value, one map
            of the batch expanded to every example (captum returns it with a batch dim of 1).
        td: the inputs; baselines are ``("baseline", key)`` entries (zeros when absent).
        feature_mask: integer feature ids ``0 .. n_features - 1`` per input, broadcastable to the
            input (see :func:`tdfunc.feature_ablation`); default every scalar its own feature.
        n_samples: ``S``, the number of coalitions (the first two are the full and empty ones).
        generator: random generator of the coalitions (default: torch's global one; captum's
            draws after ``torch.manual_seed(s)`` when ``generator`` is seeded with ``s``).
        coalitions: a bool (or 0/1 integer) tensor ``(n_samples, n_features)`` to use instead of
            drawing them (no random op: for ``vmap`` over examples and ``torch.compile``).
        chunk_size: coalitions per forward (None: all ``S`` at once).
        in_keys: entries to attribute; default every floating-point entry (integer / bool entries, e.g.
            token ids, when named here: their baseline is of the same dtype).
        progress: show a tqdm bar on stderr over the chunks of coalitions (one step when
            ``chunk_size`` is None); never shown under ``vmap`` / ``grad`` / ``torch.compile``.
        randomness: ``torch.func.vmap``'s flag for random ops in ``f`` (train-mode dropout) under this
            method's ``vmap``: ``"error"`` (default, as torch), ``"different"`` (independent draws per coalition)
            or ``"same"`` (one draw shared).
        baselines: baselines shared across the batch, broadcast to the input as captum does: a number,
            or a tensor of the input's dtype of the feature shape, ``(1, *feature shape)`` or the input's
            shape; a dict key -> baseline, or a bare one when one input is attributed.  Instead of
            ``("baseline", key)`` entries of ``td`` (default: those, else zeros).

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) + feature shape``.

    Raises:
        AttributionError: ``n_samples < 1``, ``coalitions`` of the wrong shape or values, a bad
            feature_mask, unknown key, ``f`` output of the wrong shape.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> lin = torch.nn.Linear(3, 2)
        >>> td = TensorDict({"x": torch.randn(4, 3)}, batch_size=[4])
        >>> out = tdfunc.kernel_shap(lambda t: lin(t["x"]), td, n_samples=30)
        >>> torch.allclose(out["attr", "x"], td["x"][:, None] * lin.weight, atol=1e-4)  # linear f: w * x
        True

    References:
        Lundberg, Lee. A Unified Approach to Interpreting Model Predictions. NeurIPS 2017.

    Composes with: ``vmap`` and ``torch.compile(fullgraph=True)`` given ``coalitions`` and the
    default mask, ``grad`` (double backward: the fit is a constant linear map of the outputs).
    """
    check_callable("f", f, AttributionError, expected="f(td) -> Tensor")
    p, masks, dev, n_feat = sampling_setup(
        td, in_keys, feature_mask, n_samples, chunk_size, generator, progress, randomness, baselines
    )
    if coalitions is None:
        coal = _draw_coalitions(n_samples, n_feat, generator).to(dev)
    else:
        coal = _check_coalitions(coalitions, n_samples, n_feat).to(dev)

    def masks_for(lo, hi):  # True: set to the baseline (the feature is out of the coalition)
        c = coal[lo:hi]
        return {key: ~c[:, m.flatten()].view(len(c), *m.shape) for key, m in masks.items()}  # also 0 features

    ys, _ = run_perturbed(
        f,
        td,
        p,
        n_samples,
        chunk_size,
        masks_for,
        progress=progress,
        # (S, *batch (+ K))
        randomness=randomness,
    )
    k = check_output(ys[0], p.batch, p.x, batch_value=True)
    wide = torch.float64 if dev.type != "mps" else torch.float32
    solve = _solver(coal, wide).to(ys.dtype)  # (F, S), solved in float64
    phi = torch.tensordot(solve, ys, dims=([1], [0])).movedim(0, -1)  # (*batch (+ K), F)
    if ys.dim() == 1 and len(p.batch):  # one value per batch: one map of the batch, for every example
        phi = phi.expand(*p.batch, n_feat)
    return result(td.batch_size, per_position(phi, masks, p, k), warn=True)
