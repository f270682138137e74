"""Probes on captured activations, as pure functions of TensorDict parameters.

A probe is ``probe_apply(params, x) -> logits`` with its parameters a TensorDict, so it trains
inside a user's loop with ``torch.func.grad`` (jointly with an edit, an SAE, a state) and runs under
``vmap`` / ``compile``.  ``probe_fit`` is a full-batch Adam written with ``torch.func.grad`` (no
``torch.optim``); ``fit_probes`` (:mod:`._probe_sites`) fits one probe per site of a capture TensorDict,
sites of equal width in one batched run; ``fit_sklearn_probes`` does the same with scikit-learn estimators.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase
from torch.func import grad

from .._checks import check_bool, check_generator, check_int
from .._errors import here, public
from .._optim import adam_init, adam_update
from .._progress import progress_bar
from .._types import ProbeKind
from ._probe_common import (
    ProbeError,
    _check_int,
    _check_kind,
    _check_labels,
    _check_x,
    _cross_entropy,
    _metrics,
    _n_classes,
    _pair,
)
from ._probe_sklearn import fit_sklearn_probes as fit_sklearn_probes

__all__ = [
    "ProbeError",
    "probe_init",
    "probe_apply",
    "probe_fit",
    "probe_evaluate",
    "fit_sklearn_probes",
]

_DECAYED = ("weight", "u", "v")  # weight decay skips biases and class means


# ----------------------------------------------------------------------------------- init and apply


def _init(kind, d_in, n_classes, rank, generator, dtype, device) -> dict:
    _check_kind(kind, rank)
    check_generator(generator, ProbeError)
    _check_int("n_classes", n_classes, 2)
    dims = tuple(d_in) if isinstance(d_in, (tuple, list)) else (d_in,)
    if len(dims) not in (1, 2) or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ProbeError(f"d_in must be an integer >= 1 (or a pair (d1, d2) for bilinear kinds), got {d_in!r}.")
    if len(dims) == 2 and kind in ("linear", "mean_difference"):
        raise ProbeError(f"kind {kind!r} takes one width d_in, got the pair {d_in!r}.")
    d1, d2 = dims[0], dims[-1]
    kw = dict(dtype=dtype or torch.get_default_dtype(), device=device)
    c = n_classes
    uniform = lambda *shape, bound: (torch.rand(*shape, generator=generator, **kw) * 2 - 1) * bound  # noqa: E731
    if kind == "linear":  # nn.Linear's initialisation
        return {"weight": uniform(c, d1, bound=1 / math.sqrt(d1)), "bias": uniform(c, bound=1 / math.sqrt(d1))}
    if kind == "bilinear":  # nn.Bilinear's initialisation
        return {"weight": uniform(c, d1, d2, bound=1 / math.sqrt(d1)), "bias": uniform(c, bound=1 / math.sqrt(d1))}
    if kind == "low_rank_bilinear":
        scale = (d1 * d2 * rank) ** -0.25
        return {
            "u": torch.randn(c, d1, rank, generator=generator, **kw) * scale,
            "v": torch.randn(c, d2, rank, generator=generator, **kw) * scale,
            "bias": torch.zeros(c, **kw),
        }
    return {"means": torch.zeros(c, d1, **kw)}


@public("tdfunc.latent.probe_init")
def probe_init(
    kind: ProbeKind,
    d_in: int | tuple[int, int],
    n_classes: int,
    *,
    rank: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TensorDict:
    """Initial parameters of a probe, as a TensorDict (train them with ``grad`` in your own loop).

    .. math::
        \\text{linear: } z_c = w_c^\\top x + b_c, \\qquad
        \\text{bilinear: } z_c = x_1^\\top W_c x_2 + b_c, \\quad W_c = U_c V_c^\\top \\text{ (low rank)}, \\qquad
        \\text{mean difference: } z_c = \\mu_c^\\top x - \\tfrac12 \\lVert \\mu_c \\rVert^2

    Keys: linear / bilinear ``weight`` ``(C, D)`` / ``(C, D1, D2)`` and ``bias`` ``(C,)`` (PyTorch's
    ``nn.Linear`` / ``nn.Bilinear`` initialisation); low_rank_bilinear ``u`` ``(C, D1, r)``, ``v``
    ``(C, D2, r)``, ``bias``; mean_difference ``means`` ``(C, D)`` (zeros: fit it in closed form
    with ``probe_fit``).  The kind is read back from the keys by ``probe_apply``.

    Args:
        kind: ``"linear"``, ``"bilinear"``, ``"low_rank_bilinear"`` or ``"mean_difference"``.
        d_in: activation width D, or ``(D1, D2)`` for a bilinear probe on pairs of different widths.
        n_classes: number of classes C (>= 2).
        rank: rank r of ``W_c = U_c V_c^T`` (required for ``"low_rank_bilinear"``).
        generator: random generator for the initialisation.
        dtype: dtype of the parameters (default: torch's default float dtype).
        device: device of the parameters.

    Returns:
        TensorDict of the parameters (batch size ``[]``).

    Raises:
        ProbeError: unknown kind, missing rank, bad widths or class count.

    Example:
        >>> import torch, tdfunc
        >>> p = tdfunc.latent.probe_init("low_rank_bilinear", 8, 3, rank=2, generator=torch.Generator().manual_seed(0))
        >>> sorted(p.keys()), p["u"].shape
        (['bias', 'u', 'v'], torch.Size([3, 8, 2]))

    References:
        Alain, Bengio. Understanding intermediate layers using linear classifier probes. 2016.

    Composes with: ``probe_apply`` under ``vmap`` / ``grad`` / ``torch.compile``.
    """
    return TensorDict(_init(kind, d_in, n_classes, rank, generator, dtype, device), batch_size=[])


def _apply(params, x) -> torch.Tensor:
    if not isinstance(params, (Mapping, TensorDictBase)):
        raise ProbeError(
            f"params must be a TensorDict (or dict) from tdfunc.latent.probe_init / probe_fit, "
            f"got {type(params).__name__}."
        )
    keys = set(params.keys())
    if keys == {"weight", "bias"} and params["weight"].dim() == 2:
        return _check_x(x) @ params["weight"].mT + params["bias"]
    if keys == {"weight", "bias"} and params["weight"].dim() == 3:
        x1, x2 = _pair(x)
        return torch.einsum("...i,cij,...j->...c", x1, params["weight"], x2) + params["bias"]
    if keys == {"u", "v", "bias"}:
        x1, x2 = _pair(x)
        a = torch.einsum("...i,cir->...cr", x1, params["u"])
        b = torch.einsum("...j,cjr->...cr", x2, params["v"])
        return (a * b).sum(-1) + params["bias"]
    if keys == {"means"}:
        m = params["means"]
        return _check_x(x) @ m.mT - 0.5 * m.square().sum(-1)
    if keys == {"means", "scale"}:  # normalize=True: logits divided by |mu_1 - mu_0|
        m = params["means"]
        return (_check_x(x) @ m.mT - 0.5 * m.square().sum(-1)) * params["scale"]
    raise ProbeError(
        f"params have keys {sorted(keys)}, which match no probe kind; pass the "
        "TensorDict of tdfunc.latent.probe_init / probe_fit (weight+bias, u+v+bias or means)."
    )


@public("tdfunc.latent.probe_apply")
def probe_apply(
    params: TensorDictBase | Mapping[str, torch.Tensor], x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Logits of a probe on activations ``x`` ``(..., D)`` (a pair ``(x1, x2)`` for bilinear kinds).

    .. math::
        z_c = w_c^\\top x + b_c \\;\\big|\\; x_1^\\top W_c x_2 + b_c \\;\\big|\\;
        (x_1^\\top U_c) \\cdot (x_2^\\top V_c) + b_c \\;\\big|\\; \\mu_c^\\top x - \\tfrac12\\lVert\\mu_c\\rVert^2

    The mean-difference logits rank classes by distance to the class means (nearest mean); for two
    classes ``z_1 - z_0 = (x - (\\mu_0 + \\mu_1)/2)^\\top (\\mu_1 - \\mu_0)``, the projection on the mean
    difference.  A bilinear probe given one tensor uses ``x1 = x2 = x`` (a quadratic probe).

    Args:
        params: the probe's TensorDict (``probe_init`` / ``probe_fit``); the kind is read from its keys.
        x: activations ``(..., D)``, or ``(x1, x2)`` for a bilinear probe.

    Returns:
        Logits ``(..., C)``.

    Raises:
        ProbeError: params that match no kind, non-floating activations.

    Example:
        >>> import torch, tdfunc
        >>> from torch.func import grad
        >>> p = tdfunc.latent.probe_init("linear", 4, 3, generator=torch.Generator().manual_seed(0))
        >>> x, y = torch.randn(10, 4), torch.randint(3, (10,))
        >>> loss = lambda p, x: torch.nn.functional.cross_entropy(tdfunc.latent.probe_apply(p, x), y)
        >>> g = grad(loss)(p, x)  # a TensorDict like p: one step of your own training loop
        >>> tdfunc.latent.probe_apply(p, x).shape, g["weight"].shape
        (torch.Size([10, 3]), torch.Size([3, 4]))

    References:
        Alain, Bengio. Understanding intermediate layers using linear classifier probes. 2016.
        Hewitt, Manning. A Structural Probe for Finding Syntax in Word Representations. NAACL 2019.

    Composes with: ``vmap`` (over inputs or stacked params), ``grad`` w.r.t. ``x`` and ``params``
    (double backward), ``torch.compile(fullgraph=True)``.
    """
    return _apply(params, x)


# ------------------------------------------------------------------------------------------- fitting


def _loss(params, x, y, weight_decay: float) -> torch.Tensor:
    loss = _cross_entropy(_apply(params, x), y)
    if weight_decay:
        loss = loss + 0.5 * weight_decay * sum(v.square().sum() for k, v in params.items() if k in _DECAYED)
    return loss


def _class_means(x: torch.Tensor, y: torch.Tensor, n_classes: int, normalize: bool = False) -> dict:
    onehot = F.one_hot(y, n_classes).to(x.dtype)
    means = (onehot.mT @ x) / onehot.sum(0)[:, None]
    if not normalize:
        return {"means": means}
    gap = torch.linalg.vector_norm(means[1] - means[0])  # two classes (checked by the caller)
    return {"means": means, "scale": torch.where(gap > 0, 1 / torch.where(gap > 0, gap, 1), 1)}


def _check_normalize(normalize, kind) -> None:
    check_bool("normalize", normalize, ProbeError)
    if normalize and kind != "mean_difference":
        raise ProbeError(
            f"normalize=True rescales the mean-difference probe, but kind={kind!r}; use "
            "kind='mean_difference' or drop normalize."
        )


def _check_normalize_classes(normalize: bool, c: int) -> None:
    if normalize and c != 2:
        raise ProbeError(
            f"normalize=True divides by the norm of the mean difference mu_1 - mu_0, which needs "
            f"exactly 2 classes, got n_classes={c}; use normalize=False with {c} classes."
        )


def _adam(loss, params: dict, steps: int, lr: float, bar=None) -> dict:
    """Full-batch Adam (Kingma & Ba) on a dict of tensors, gradients from ``torch.func.grad``.

    ``bar``: a progress bar ticked once per step (None: no bar).
    """
    g_fn = grad(loss)
    state = adam_init(params)
    for _ in range(steps):
        step, state = adam_update(g_fn(params), state, lr=lr)
        params = {k: params[k] - step[k] for k in params}
        if bar is not None:
            bar.update(1)
    return params


def _check_train_options(steps, lr, weight_decay) -> None:
    check_int(
        "steps",
        steps,
        ProbeError,
        lo=1,
        fix=" steps=0 would return the untrained initialisation; for a closed-form probe use kind='mean_difference'.",
    )
    for name, v, ok in (("lr", lr, lambda v: v > 0), ("weight_decay", weight_decay, lambda v: v >= 0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise ProbeError(f"{name} must be a number {'> 0' if name == 'lr' else '>= 0'}, got {v!r}.")


def _check_means_counts(y: torch.Tensor, n_classes: int) -> None:
    counts = torch.bincount(y, minlength=n_classes)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ProbeError(
            f"kind 'mean_difference' needs an example of every class, but classes {empty} have "
            "none in the training data; pass n_classes equal to the classes present, or more data."
        )


@public("tdfunc.latent.probe_fit")
def probe_fit(
    kind: ProbeKind,
    x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    y: torch.Tensor,
    *,
    steps: int = 200,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    rank: int | None = None,
    n_classes: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    normalize: bool = False,
) -> TensorDict:
    """Fit a probe on activations ``x`` ``(N, D)`` and labels ``y`` ``(N,)``; full-batch Adam or closed form.

    .. math::
        \\theta^\\star \\approx \\arg\\min_\\theta\\; \\frac1N \\sum_n
            -\\log \\operatorname{softmax}(z_\\theta(x_n))_{y_n}
            + \\tfrac{\\lambda}{2} \\lVert W \\rVert^2, \\qquad
        \\mu_c = \\frac{1}{|\\{n: y_n = c\\}|} \\sum_{n: y_n = c} x_n \\text{ (mean difference)}

    ``steps`` Adam steps (``torch.func.grad`` for the gradient, Adam state as tensors; no
    ``torch.optim``) from ``probe_init``'s initialisation; ``"mean_difference"`` is the class means in
    closed form.  The fit runs on ``x.detach()``: to train a probe jointly with something else
    (an edit, a state), use ``probe_init`` and ``probe_apply`` in your own loop.

    Args:
        kind: ``"linear"``, ``"bilinear"``, ``"low_rank_bilinear"`` or ``"mean_difference"``.
        x: activations ``(N, D)`` (flatten them first), or ``(x1, x2)`` for bilinear kinds.
        y: integer class labels ``(N,)``.
        steps: Adam steps.
        lr: Adam learning rate.
        weight_decay: L2 coefficient ``lambda`` on ``weight`` / ``u`` / ``v`` (not on biases).
        rank: rank of ``"low_rank_bilinear"``.
        n_classes: number of classes (default ``max(y) + 1``).
        generator: random generator for the initialisation.
        progress: show a tqdm bar on stderr over the Adam steps (none for ``"mean_difference"``);
            never shown under ``vmap`` / ``grad`` / ``torch.compile``.
        normalize: two-class ``"mean_difference"`` only: also return ``scale = 1 / ‖μ_1 - μ_0‖``
            (1 when the means coincide), by which ``probe_apply`` multiplies the logits, so
            ``z_1 - z_0`` is the signed distance to the bisecting hyperplane — tdhook's
            ``MeanDifferenceClassifier(normalize=True)`` decision function (its default; ``False``
            equals ``normalize=False``), and ``softmax(z)`` its ``predict_proba``.

    Returns:
        The fitted parameters (a TensorDict, see ``probe_init``; ``means`` and ``scale`` with
        ``normalize``).

    Raises:
        ProbeError: unknown kind, missing rank, labels not ``(N,)`` integers, bad options,
            ``normalize`` with another kind or more than 2 classes.

    Example:
        >>> import torch, tdfunc
        >>> x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
        >>> y = (x[:, 0] - x[:, 1] > 0).long()
        >>> p = tdfunc.latent.probe_fit("linear", x, y, steps=100, lr=0.05, generator=torch.Generator().manual_seed(0))
        >>> float(tdfunc.latent.probe_evaluate(p, x, y)["accuracy"]) > 0.95
        True
        >>> m = tdfunc.latent.probe_fit("mean_difference", x, y, normalize=True)
        >>> z = tdfunc.latent.probe_apply(m, x)  # z_1 - z_0: signed distance to the bisecting plane
        >>> bool(torch.allclose(m["scale"], 1 / (m["means"][1] - m["means"][0]).norm()))
        True

    References:
        Kingma, Ba. Adam: A Method for Stochastic Optimization. ICLR 2015.

    Composes with: the returned TensorDict goes into ``probe_apply`` under ``vmap`` / ``grad`` / compile.
    """
    _check_kind(kind, rank)
    check_generator(generator, ProbeError)
    _check_train_options(steps, lr, weight_decay)
    check_bool("progress", progress, ProbeError)
    _check_normalize(normalize, kind)
    if kind in ("bilinear", "low_rank_bilinear"):
        x1, x2 = _pair(x)
        if x1.dim() != 2 or x2.dim() != 2 or x1.shape[0] != x2.shape[0]:
            raise ProbeError(
                f"x1 and x2 must be (N, D1) and (N, D2) with the same N, got shapes "
                f"{tuple(x1.shape)} and {tuple(x2.shape)}."
            )
        x, d_in = (x1.detach(), x2.detach()), (x1.shape[1], x2.shape[1])
        ref = x1
    else:
        if isinstance(x, (tuple, list)):
            raise ProbeError(
                f"kind {kind!r} takes one tensor x (N, D), got a {type(x).__name__}; pairs "
                "(x1, x2) are for 'bilinear' and 'low_rank_bilinear'."
            )
        x = _check_x(x)
        if x.dim() != 2:
            raise ProbeError(f"x has shape {tuple(x.shape)}; pass activations (N, D) (x.flatten(1)).")
        x, d_in, ref = x.detach(), x.shape[1], x  # type: ignore[assignment]
    y = _check_labels(y, ref.shape[0])
    c = _n_classes(y, n_classes)
    if kind == "mean_difference":
        _check_normalize_classes(normalize, c)
        _check_means_counts(y, c)
        return TensorDict(_class_means(x, y, c, normalize), batch_size=[])  # type: ignore[arg-type]  # one tensor here
    params = _init(kind, d_in, c, rank, generator, ref.dtype, ref.device)
    loss = lambda p: _loss(p, x, y, weight_decay)  # noqa: E731
    bar = progress_bar(enabled=progress, desc=here(), total=steps, unit="step")
    if bar is None:
        return TensorDict(_adam(loss, params, steps, lr), batch_size=[])
    with bar:
        return TensorDict(_adam(loss, params, steps, lr, bar), batch_size=[])


@public("tdfunc.latent.probe_evaluate")
def probe_evaluate(
    params: TensorDictBase | Mapping[str, torch.Tensor],
    x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    y: torch.Tensor,
) -> TensorDict:
    """Accuracy and mean cross-entropy of a probe on ``(x, y)``.

    .. math::
        \\text{accuracy} = \\frac1N \\sum_n [\\arg\\max_c z_c(x_n) = y_n], \\qquad
        \\text{loss} = -\\frac1N \\sum_n \\log \\operatorname{softmax}(z(x_n))_{y_n}

    Args:
        params: the probe's TensorDict.
        x: activations ``(N, D)`` (or ``(x1, x2)``).
        y: integer labels ``(N,)``.

    Returns:
        ``TensorDict(accuracy=scalar, loss=scalar)`` (``loss`` differentiable in params and x).

    Raises:
        ProbeError: labels not ``(N,)`` integers, params that match no kind.

    Example:
        >>> import torch, tdfunc
        >>> x, y = torch.tensor([[0.0], [1.0], [3.0], [4.0]]), torch.tensor([0, 0, 1, 1])
        >>> p = tdfunc.latent.probe_fit("mean_difference", x, y)  # means 0.5 and 3.5
        >>> tdfunc.latent.probe_evaluate(p, x, y)["accuracy"]
        tensor(1.)

    Composes with: ``vmap`` over stacked params / inputs, ``grad`` of ``loss``, ``torch.compile``.
    """
    logits = _apply(params, x)
    return _metrics(logits, _check_labels(y, logits.shape[0]))
