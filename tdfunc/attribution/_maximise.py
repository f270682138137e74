"""Activation maximisation: functional gradient ascent on the inputs."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tensordict import TensorDict, TensorDictBase
from torch.func import grad

from .._checks import check_int
from .._errors import public, shape_str
from .._optim import adam_init, adam_update
from .._types import InKeys, Optimizer
from ._common import AttributionError, prepare, with_inputs

__all__ = ["activation_maximisation"]

OPTIMIZERS: tuple[Optimizer, ...] = ("adam", "sgd", "sign")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_options(steps, lr, optimizer, betas, eps, l2, tv, clamp, regulariser) -> None:
    check_int("steps", steps, AttributionError)
    if not _number(lr) or lr <= 0:
        raise AttributionError(f"lr must be a finite number > 0, got {lr!r}; the step size of the ascent.")
    if optimizer not in OPTIMIZERS:
        raise AttributionError(
            f"unknown optimizer {optimizer!r}; choose 'adam' (default), 'sgd' (x + lr * grad, as tdhook) "
            "or 'sign' (x + lr * sign(grad))."
        )
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas)):
        raise AttributionError(f"betas must be two numbers in [0, 1), got {betas!r}.")
    if not _number(eps) or eps <= 0:
        raise AttributionError(f"eps must be a finite number > 0, got {eps!r}.")
    for name, w in (("l2", l2), ("tv", tv)):
        if not _number(w) or w < 0:
            raise AttributionError(f"{name} must be a finite number >= 0 (a penalty weight), got {w!r}.")
    if clamp is not None and not (
        isinstance(clamp, (tuple, list))
        and len(clamp) == 2
        and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in clamp)
        and clamp[0] < clamp[1]
    ):
        raise AttributionError(f"clamp must be None or a pair (low, high) with low < high, got {clamp!r}.")
    if regulariser is not None and not callable(regulariser):
        raise AttributionError(
            f"regulariser must be None or a callable td -> Tensor of shape batch, got {type(regulariser).__name__}."
        )


def _tv(x: torch.Tensor, nb: int) -> torch.Tensor:
    """Squared total variation over the last two feature dims (the last one for vector inputs), per example."""
    feat = x.dim() - nb
    dims = [d for d in (x.dim() - 2, x.dim() - 1) if d >= nb] if feat >= 2 else [x.dim() - 1] if feat == 1 else []
    total = x.new_zeros(x.shape[:nb])
    for d in dims:
        diff = x.narrow(d, 1, x.shape[d] - 1) - x.narrow(d, 0, x.shape[d] - 1)
        total = total + diff.square().reshape(*x.shape[:nb], -1).sum(-1)
    return total


@public("tdfunc.activation_maximisation")
def activation_maximisation(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    *,
    in_keys: InKeys | None = None,
    steps: int = 100,
    lr: float = 0.1,
    optimizer: Optimizer = "adam",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    l2: float = 0.0,
    tv: float = 0.0,
    regulariser: Callable[[TensorDictBase], torch.Tensor] | None = None,
    clamp: tuple[float, float] | None = None,
) -> TensorDict:
    """Inputs that maximise ``f`` by gradient ascent, each example on its own (Erhan et al., 2009).

    .. math::
        x_b^{t+1} = \\Pi_{[lo, hi]}\\Big(x_b^t + \\mathrm{lr}\\cdot u\\big(\\nabla_{x_b} J_b(x^t)\\big)\\Big),
        \\qquad J_b(x) = f(x)_b - l_2 \\lVert x_b\\rVert^2 - \\mathrm{tv}\\, \\mathrm{TV}(x_b) - r(x)_b

    with ``u`` the Adam update (bias-corrected, as ``torch.optim.Adam(maximize=True)``), the
    identity (``"sgd"``: tdhook's step) or ``sign``.  ``TV`` is the squared total variation
    ``Σ (Δ_h x)² + (Δ_w x)²`` over the last two feature dims (β = 2 of Mahendran & Vedaldi; the
    last dim for vector inputs).  The ascent is written with ``torch.func.grad``; the optimiser
    state is plain tensors, so the whole run is a pure function of ``td`` (differentiable through
    the unrolled steps).  ``J`` is summed over the batch for the gradient: examples stay
    independent as long as ``f`` does not mix them (no train-mode BatchNorm).

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size``: one objective per example, e.g. a unit's
            activation read with ``tdfunc.functional_call(..., capture=[site])``.
        td: the starting inputs (and anything else ``f`` needs).
        in_keys: entries to optimise (others are held fixed); default every float entry except
            ``"objective"`` (so a result can be passed back in to continue the ascent).
        steps: number of ascent steps.
        lr: step size.
        optimizer: ``"adam"`` (default), ``"sgd"`` or ``"sign"``.
        betas, eps: Adam's moment decay rates and denominator constant.
        l2: weight of the penalty ``Σ x²`` per example (summed over the optimised entries).
        tv: weight of the squared total-variation penalty per example.
        regulariser: extra penalty ``r(td) -> Tensor`` of shape ``td.batch_size``, subtracted.
        clamp: ``(low, high)``: project the inputs into this range after every step.

    Returns:
        A new TensorDict: ``td``'s entries with the optimised ones replaced (same keys and shapes),
        and ``"objective"`` of shape ``batch + (steps + 1,)``: ``f`` at every iterate, the start
        first (the penalties are not included).

    Raises:
        AttributionError: unknown key, non-float input, ``f`` output not of shape ``batch``,
            ``steps < 1``, ``lr <= 0``, a bad optimizer, penalty weight or clamp range.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> unit = lambda t: tdfunc.functional_call(net, None, (t["x"],), capture=["1"])[1]["1"][:, 4]
        >>> td = TensorDict({"x": torch.zeros(2, 3)}, batch_size=[2])
        >>> out = tdfunc.activation_maximisation(unit, td, steps=20, l2=1e-3, clamp=(-1, 1))
        >>> out["x"].shape, out["objective"].shape, bool((out["objective"][:, -1] > out["objective"][:, 0]).all())
        (torch.Size([2, 3]), torch.Size([2, 21]), True)

    References:
        Erhan, Bengio, Courville, Vincent. Visualizing Higher-Layer Features of a Deep Network. 2009.
        Mahendran, Vedaldi. Understanding Deep Image Representations by Inverting Them. CVPR 2015.

    Composes with: ``vmap`` (over examples or units), ``grad`` (through the unrolled ascent),
    ``torch.compile(fullgraph=True)``.
    """
    _check_options(steps, lr, optimizer, betas, eps, l2, tv, clamp, regulariser)
    if in_keys is None and isinstance(td, TensorDictBase) and "objective" in td.keys():
        leaves = [k if isinstance(k, tuple) else (k,) for k in td.keys(include_nested=True, leaves_only=True)]
        in_keys = [k for k in leaves if k[0] not in ("objective", "baseline") and td.get(k).is_floating_point()]
        in_keys = in_keys or None  # let prepare() report a td with nothing to optimise
    p = prepare(td, in_keys, baselines=False, f=f)
    nb = len(p.batch)

    def value(xs):
        t = with_inputs(td, xs)
        y = f(t)
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(p.batch):
            got = shape_str(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise AttributionError(
                f"f must return one objective per example, shape {shape_str(p.batch)}, got {got}. "
                "Select or combine the units inside f, e.g. lambda td: acts(td)[:, unit] or .sum(-1)."
            )
        j = y
        if l2:
            j = j - l2 * sum(v.square().reshape(*p.batch, -1).sum(-1) for v in xs.values())
        if tv:
            j = j - tv * sum(_tv(v, nb) for v in xs.values())
        if regulariser is not None:
            r = regulariser(t)
            if not isinstance(r, torch.Tensor) or tuple(r.shape) != tuple(p.batch):
                got = shape_str(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
                raise AttributionError(
                    f"regulariser must return one penalty per example, shape {shape_str(p.batch)}, got {got}."
                )
            j = j - r
        return j.sum(), y

    b1, b2 = betas
    xs = dict(p.x)
    adam = adam_init(xs)
    trace = []
    for _ in range(steps):
        g, y = grad(value, has_aux=True)(xs)
        trace.append(y)
        if optimizer == "adam":
            step, adam = adam_update(g, adam, lr=lr, b1=b1, b2=b2, eps=eps)
        else:
            step = {k: lr * (g[k] if optimizer == "sgd" else g[k].sign()) for k in xs}
        xs = {k: x + step[k] for k, x in xs.items()}
        if clamp is not None:
            xs = {k: x.clamp(clamp[0], clamp[1]) for k, x in xs.items()}
    out = with_inputs(td, xs)
    trace.append(f(out))
    out.set("objective", torch.stack(trace, dim=-1))
    return out
