"""LIME (Ribeiro et al., 2016), captum's ``Lime``: a weighted interpretable linear model fitted to perturbations.

Binary interpretable samples ``z_s`` (feature ``g`` kept when ``z_sg = 1``, set to the baseline otherwise)
are drawn once and shared by the batch; every perturbed input is built from boolean masks and evaluated by
one ``vmap``-ed call of ``f`` (``chunk_size`` samples at a time), as the other perturbation methods.  The
similarity of each perturbed input to the original (captum's exponential kernel of the cosine or euclidean
distance) is computed from per-feature sums, without building the inputs again, and the weighted fit
(sklearn's ``Lasso``, ``Ridge`` or ``LinearRegression``, with intercept) is solved in torch for every
example and target at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDict, TensorDictBase

from .._checks import check_callable, check_int
from .._errors import public
from .._finite import readable
from .._types import InKeys, PerKey
from ._common import AttributionError, Baselines, check_output, result
from ._perturb_common import check_draws, per_position, run_perturbed, sampling_setup

__all__ = ["lime"]

_MODELS = ("lasso", "ridge", "linear")
_DISTANCES = ("cosine", "euclidean")


def _draw_samples(n_samples: int, n_feat: int, generator: torch.Generator | None) -> torch.Tensor:
    """captum's ``default_perturb_func``: ``bernoulli(0.5)`` per feature, one row per sample."""
    probs = torch.full((1, n_feat), 0.5)
    rows = [torch.bernoulli(probs, generator=generator)[0] for _ in range(n_samples)]
    return torch.stack(rows).bool() if rows else torch.zeros(0, n_feat, dtype=torch.bool)


def _check_samples(samples, n_samples: int, n_feat: int) -> torch.Tensor:
    ok = lambda t: not (t.is_floating_point() or t.is_complex())  # noqa: E731
    z = check_draws("samples", samples, n_samples, n_feat, "a bool or integer 0/1 tensor", ok)
    if z.dtype != torch.bool:
        if not torch.compiler.is_compiling() and bool(((z != 0) & (z != 1)).any()):
            raise AttributionError("samples must hold only 0 and 1 (1: the feature keeps its input value).")
        z = z != 0
    return z


def _feature_sums(p, masks: dict, n_feat: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Per example and feature id: sum of x*x, x*b, b*b over the feature's positions (all inputs), (*batch, F)."""
    nb = len(p.batch)
    xx = xb = bb = None
    for key, m in masks.items():
        x, b = p.x[key].to(dtype), p.baseline[key].to(dtype)
        idx = m.expand(x.shape).reshape(*x.shape[:nb], -1)
        parts = []
        for v in (x * x, x * b, b * b):
            z = torch.zeros(*x.shape[:nb], n_feat, dtype=dtype, device=x.device)
            parts.append(z.scatter_add(-1, idx, v.reshape(idx.shape)))
        xx = parts[0] if xx is None else xx + parts[0]
        xb = parts[1] if xb is None else xb + parts[1]
        bb = parts[2] if bb is None else bb + parts[2]
    return xx, xb, bb  # type: ignore[return-value]


def _similarity(z: torch.Tensor, sums: tuple[torch.Tensor, ...], distance: str, width: float) -> torch.Tensor:
    """captum's ``get_exp_kernel_similarity_function``: ``exp(-d^2 / (2 w^2))`` per sample and example, (S, *batch)."""
    xx, xb, bb = sums
    zf = z.to(xx.dtype)  # (S, F); 1: the input's value, 0: the baseline's
    if distance == "euclidean":  # ||x - x_s||^2 = sum over dropped features of ||x - b||^2
        d2 = torch.tensordot(1 - zf, xx - 2 * xb + bb, dims=([1], [-1])).clamp_min(0)
        d = d2.sqrt()
    else:  # 1 - cos(x, x_s), torch's CosineSimilarity (norms clamped at eps = 1e-8)
        dot = torch.tensordot(zf, xx, dims=([1], [-1])) + torch.tensordot(1 - zf, xb, dims=([1], [-1]))
        ns2 = torch.tensordot(zf, xx, dims=([1], [-1])) + torch.tensordot(1 - zf, bb, dims=([1], [-1]))
        nx = xx.sum(-1).sqrt()
        d = 1 - dot / (nx * ns2.clamp_min(0).sqrt()).clamp_min(1e-8)
    return torch.exp(-(d**2) / (2 * width**2))


def _fit(
    z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, model: str, alpha: float, max_iter: int, tol: float
) -> torch.Tensor:
    """Weighted fit with intercept of ``y`` (S, N, K) on ``z`` (S, F) with weights ``w`` (S, N): coefs (N, K, F).

    sklearn's estimators: the design and targets are centred on their weighted means (the intercept is
    not penalised); ``linear``: the minimum-norm weighted least squares; ``ridge``:
    ``sum_s w_s r_s^2 + alpha ||c||^2``; ``lasso``: ``sum_s w_s r_s^2 / (2 sum_s w_s) + alpha ||c||_1``
    (sklearn rescales the weights to sum to S), minimised by accelerated proximal gradient (FISTA).
    """
    zf = z.to(y.dtype)
    wt = w.transpose(0, 1)  # (N, S)
    tot = wt.sum(-1, keepdim=True)  # (N, 1)
    z_off = (wt @ zf) / tot  # (N, F)
    y_off = torch.einsum("ns,snk->nk", wt, y) / tot  # (N, K)
    zc = zf[None] - z_off[:, None]  # (N, S, F)
    yc = y.transpose(0, 1) - y_off[:, None]  # (N, S, K)
    if model == "linear":
        sw = wt.sqrt()[..., None]
        coef = torch.linalg.pinv(sw * zc) @ (sw * yc)  # (N, F, K)
    else:
        gram = zc.transpose(1, 2) @ (wt[..., None] * zc)  # (N, F, F)
        rhs = zc.transpose(1, 2) @ (wt[..., None] * yc)  # (N, F, K)
        n_feat = gram.shape[-1]
        if model == "ridge":
            coef = torch.linalg.solve(gram + alpha * torch.eye(n_feat, dtype=y.dtype, device=y.device), rhs)
        else:
            coef = _lasso(gram / tot[..., None], rhs / tot[..., None], alpha, max_iter, tol)
    return coef.transpose(1, 2)  # (N, K, F)


def _lasso(gram: torch.Tensor, rhs: torch.Tensor, alpha: float, max_iter: int, tol: float) -> torch.Tensor:
    """``argmin_c  c'Gc / 2 - rhs'c + alpha ||c||_1`` per (N, K) column by FISTA (step ``1 / lambda_max(G)``).

    ``max_iter`` steps; outside transforms it stops once no coefficient moved by more than ``tol`` times the
    largest coefficient in a step (checked every 20 steps).
    """
    lip = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(torch.finfo(gram.dtype).tiny)[:, None, None]  # (N, 1, 1)
    c = torch.zeros_like(rhs)
    v, t = c, 1.0
    for i in range(max_iter):
        step = v - (gram @ v - rhs) / lip
        new = torch.sign(step) * (step.abs() - alpha / lip).clamp_min(0)
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        v = new + ((t - 1) / t_new) * (new - c)
        moved = new - c
        c, t = new, t_new
        if i % 20 == 19 and readable(moved) and bool(moved.abs().max() <= tol * c.abs().max().clamp_min(1e-12)):
            break
    return c


@public("tdfunc.lime")
def lime(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    *,
    feature_mask: PerKey | None = None,
    n_samples: int = 25,
    interpretable_model: str = "lasso",
    alpha: float = 0.01,
    distance: str = "cosine",
    kernel_width: float = 1.0,
    generator: torch.Generator | None = None,
    samples: torch.Tensor | None = None,
    max_iter: int = 1000,
    in_keys: InKeys | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    randomness: str = "error",
    baselines: Baselines | None = None,
) -> TensorDict:
    """LIME (Ribeiro et al., 2016), captum's ``Lime`` with its interpretable-model fit, in torch.

    .. math::
        (c_{b,k}, c_0) = \\arg\\min_{c, c_0} \\sum_{s=1}^{S} \\pi_b(z_s)
            \\big(f_k(x^{(z_s)})_b - c_0 - z_s^\\top c\\big)^2 + \\Omega(c),
        \\qquad \\pi_b(z) = \\exp\\!\\Big(-\\frac{d(x_b, x_b^{(z)})^2}{2\\,\\sigma^2}\\Big)

    where ``x^(z)`` holds the input on the features with ``z_g = 1`` and the baseline elsewhere, ``z_s``
    are ``bernoulli(0.5)`` draws per feature (captum's default sampling), ``d`` the cosine distance
    ``1 - cos`` (or the euclidean one) between the flattened attributed inputs of one example, ``σ``
    the kernel width, and the fit sklearn's estimator as captum trains it (``Lasso``: the squared error
    divided by ``2 Σ π`` plus ``alpha ||c||_1``; ``Ridge``: ``alpha ||c||^2``; ``LinearRegression``); every
    position of feature ``g`` gets ``c_g`` (captum's ``return_input_shape=True``).  One set of samples
    serves every example (captum draws new ones per example); the ``S`` inputs are one stacked tensor
    evaluated by one ``vmap``-ed call of ``f``; the fit runs for every example and target at once.

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)``, or one value for
            the whole batch (shape ``()``, captum's scalar forward): then one fit for that value, weighted
            by the similarity of the whole batch's inputs (as captum), one map of the batch expanded to
            every example (captum returns it with a batch dim of 1).
        td: the inputs; baselines are ``("baseline", key)`` entries (zeros when absent).
        feature_mask: integer feature ids ``0 .. n_features - 1`` per input, broadcastable to the
            input (see :func:`tdfunc.feature_ablation`); default every scalar its own feature.
        n_samples: ``S``, the number of interpretable samples.
        interpretable_model: ``"lasso"`` (captum's default ``SkLearnLasso``), ``"ridge"`` or ``"linear"``.
        alpha: the penalty of ``"lasso"`` / ``"ridge"`` (captum's default ``Lasso(alpha=0.01)``).
        distance: ``"cosine"`` (captum's default) or ``"euclidean"``, in the similarity kernel.
        kernel_width: ``σ`` (captum's default 1.0).
        generator: random generator of the samples (default: torch's global one; captum's draws
            after ``torch.manual_seed(s)`` when ``generator`` is seeded with ``s``).
        samples: a bool (or 0/1 integer) tensor ``(n_samples, n_features)`` to use instead of drawing
            them (1: the feature keeps its input value; no random op: for ``vmap`` and ``torch.compile``).
        max_iter: the lasso solver's most steps (FISTA; outside transforms it stops once converged).
        in_keys: entries to attribute; default every floating-point entry (integer / bool entries, e.g.
            token ids, when named here: their baseline is of the same dtype).
        chunk_size: samples per forward (None: all ``S`` at once).
        progress: show a tqdm bar on stderr over the chunks of samples (one step when ``chunk_size``
            is None); never shown under ``vmap`` / ``grad`` / ``torch.compile``.
        randomness: ``torch.func.vmap``'s flag for random ops in ``f`` (train-mode dropout) under this
            method's ``vmap``: ``"error"`` (default, as torch), ``"different"`` (independent draws per sample)
            or ``"same"`` (one draw shared).
        baselines: baselines shared across the batch, broadcast to the input as captum does: a number,
            or a tensor of the input's dtype of the feature shape, ``(1, *feature shape)`` or the input's
            shape; a dict key -> baseline, or a bare one when one input is attributed.  Instead of
            ``("baseline", key)`` entries of ``td`` (default: those, else zeros).

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) + feature shape``.

    Raises:
        AttributionError: ``n_samples < 1``, an unknown ``interpretable_model`` or ``distance``, a
            negative ``alpha``, a ``kernel_width <= 0``, ``samples`` of the wrong shape or values, a bad
            feature_mask or baseline, unknown key, ``f`` output of the wrong shape.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> lin = torch.nn.Linear(3, 2)
        >>> td = TensorDict({"x": torch.randn(4, 3)}, batch_size=[4])
        >>> out = tdfunc.lime(lambda t: lin(t["x"]), td, n_samples=40, interpretable_model="linear")
        >>> torch.allclose(out["attr", "x"], td["x"][:, None] * lin.weight, atol=1e-4)  # linear f: w * x
        True

    References:
        Ribeiro, Singh, Guestrin. "Why Should I Trust You?": Explaining the Predictions of Any
        Classifier. KDD 2016.

    Composes with: ``vmap`` and ``torch.compile(fullgraph=True)`` given ``samples`` and the default mask
    (``"lasso"`` then runs all ``max_iter`` steps), ``grad`` (double backward; through the fit).
    """
    check_callable("f", f, AttributionError, expected="f(td) -> Tensor")
    if interpretable_model not in _MODELS or not isinstance(interpretable_model, str):
        raise AttributionError(
            f"interpretable_model must be 'lasso', 'ridge' or 'linear' (sklearn's Lasso, Ridge, "
            f"LinearRegression), got {interpretable_model!r}."
        )
    if distance not in _DISTANCES or not isinstance(distance, str):
        raise AttributionError(f"distance must be 'cosine' or 'euclidean', got {distance!r}.")
    for name, v, lo in (("alpha", alpha, "a number >= 0"), ("kernel_width", kernel_width, "a number > 0")):
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not (v >= 0 if name == "alpha" else v > 0)
            or v != v
            or v == float("inf")
        ):
            raise AttributionError(f"{name} must be {lo}, got {v!r}.")
    check_int("max_iter", max_iter, AttributionError)
    p, masks, dev, n_feat = sampling_setup(
        td, in_keys, feature_mask, n_samples, chunk_size, generator, progress, randomness, baselines
    )
    if samples is None:
        z = _draw_samples(n_samples, n_feat, generator).to(dev)
    else:
        z = _check_samples(samples, n_samples, n_feat).to(dev)

    def masks_for(lo, hi):  # True: set to the baseline (z = 0)
        c = z[lo:hi]
        return {key: ~c[:, m.flatten()].view(len(c), *m.shape) for key, m in masks.items()}

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
    whole = ys.dim() == 1 and len(p.batch) > 0  # one value per batch: one fit, the whole batch's similarity
    dtype = ys.dtype if ys.is_floating_point() else torch.get_default_dtype()
    ys = ys.to(dtype)
    sums = _feature_sums(p, masks, n_feat, dtype)  # each (*batch, F)
    if whole:
        sums = tuple(t.flatten(0, len(p.batch) - 1).sum(0) for t in sums)
    sim = _similarity(z, sums, distance, float(kernel_width))  # (S, *batch), or (S,) for the whole batch
    s_n = ys.shape[0]
    y = ys.reshape(s_n, -1, 1 if k is None else k)  # (S, N, K)
    coef = _fit(z, y, sim.reshape(s_n, -1), interpretable_model, float(alpha), max_iter, 1e-6)  # (N, K, F)
    phi = (
        coef.reshape(n_feat).expand(*p.batch, n_feat)
        if whole
        else coef.reshape(*p.batch, *(() if k is None else (k,)), n_feat)
    )
    return result(td.batch_size, per_position(phi, masks, p, k), warn=True)
