"""Integrated gradients, with every target's map from one forward over the path."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDict, TensorDictBase
from torch.func import vmap

from .._checks import check_bool, check_randomness, random_op_error
from .._errors import here, public
from .._progress import progress_bar
from .._types import IGMethod, IGStrategy, InKeys
from ._common import (
    AttributionError,
    Baselines,
    check_output,
    grads_per_target,
    move_target_dim,
    per_target,
    prepare,
    result,
    tensor_output,
    with_inputs,
)
from ._quadrature import check_path_options, quadrature

__all__ = ["integrated_gradients", "quadrature"]


@public("tdfunc.integrated_gradients")
def integrated_gradients(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    *,
    in_keys: InKeys | None = None,
    n_steps: int = 50,
    method: IGMethod = "gausslegendre",
    multiply_by_inputs: bool = True,
    chunk_size: int | None = None,
    strategy: IGStrategy = "vmap",
    return_convergence_delta: bool = False,
    progress: bool = False,
    randomness: str = "error",
    baselines: Baselines | None = None,
) -> TensorDict:
    """Integrated gradients (Sundararajan et al., 2017), every target's map from one path forward.

    .. math::
        \\mathrm{IG}_{b,k}(x) = (x_b - x'_b) \\odot \\int_0^1
            \\frac{\\partial f_k(x' + \\alpha (x - x'))_b}{\\partial x_b}\\, d\\alpha
        \\approx (x_b - x'_b) \\odot \\sum_{s} w_s\\, \\nabla f_k(x' + \\alpha_s (x - x'))_b

    with nodes ``alpha_s`` and weights ``w_s`` of ``method`` (captum's five rules).  ``f`` runs once
    over all ``n_steps`` points of the path; the K targets' gradients are K vector-Jacobian
    products of that one forward — per-class maps cost one forward, not K (captum, tdhook).

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` (one target per example) or
            ``td.batch_size + (K,)`` (K maps per example, e.g. every class).  ``f`` always sees a
            TensorDict with ``td``'s batch shape, so it may close over per-example data (labels).
        td: the inputs; baselines are ``("baseline", key)`` entries (zeros when absent).
        in_keys: entries to attribute (others are held fixed); default every float entry.
        n_steps: number of path points.
        method: ``"gausslegendre"`` (default), ``"riemann_left"``, ``"riemann_right"``,
            ``"riemann_middle"`` or ``"riemann_trapezoid"``.  The last is captum's rule, kept for
            equality with it: weights ``1/n`` with the ends halved, which sum to ``(n-1)/n``, so it is
            not complete even for a linear ``f``.
        multiply_by_inputs: multiply the integrated gradient by ``x - x'`` (captum's default True;
            tdhook's default is False).
        chunk_size: path points per forward; bounds memory to ``chunk_size`` copies of the batch
            (None: all ``n_steps`` at once).  The bound holds when the result needs no outer graph:
            under ``torch.no_grad()`` or with a detached state (``tdfunc.state``); when ``f`` uses
            parameters that require grad, autograd keeps every chunk's activations so that the
            attribution stays differentiable.
        strategy: ``"vmap"`` (default; ``vmap`` over the path, ``f`` sees ``td``'s batch shape) or
            ``"fold"`` (path folded into the batch dim: often faster eager on the CPU, but ``f`` then
            sees batch ``chunk * B`` and must not close over per-example data).
        return_convergence_delta: also return ``"convergence_delta"``, shape ``batch (+ K)``:
            ``sum(attr) - (f(x) - f(x'))`` (two more forwards).
        progress: show a tqdm bar on stderr over the chunks of path points (one step when
            ``chunk_size`` is None); never shown under ``vmap`` / ``grad`` / ``torch.compile``.
        randomness: ``torch.func.vmap``'s flag for random ops in ``f`` (train-mode dropout) under this
            method's ``vmap``: ``"error"`` (default, as torch), ``"different"`` (independent draws per path point)
            or ``"same"`` (one draw shared).
        baselines: baselines shared across the batch, broadcast to the input as captum does: a number,
            or a tensor of the input's dtype of the feature shape, ``(1, *feature shape)`` or the input's
            shape; a dict key -> baseline, or a bare one when one input is attributed.  Instead of
            ``("baseline", key)`` entries of ``td`` (default: those, else zeros).

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) + feature shape``.

    Raises:
        AttributionError: unknown key or method, non-float input, baseline shape/device mismatch,
            ``f`` output of the wrong shape, ``n_steps < 1``.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> out = tdfunc.integrated_gradients(lambda t: net(t["x"]), td, return_convergence_delta=True)
        >>> out["attr", "x"].shape, out["convergence_delta"].shape   # 4 classes from one path forward
        (torch.Size([5, 4, 3]), torch.Size([5, 4]))
        >>> bool(out["convergence_delta"].abs().max() < 1e-4)
        True

    References:
        Sundararajan, Taly, Yan. Axiomatic Attribution for Deep Networks. ICML 2017.

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward: attribution
    penalties in a loss), ``torch.compile(fullgraph=True)``.
    """
    check_path_options(n_steps, method, chunk_size, strategy)
    check_bool("progress", progress, AttributionError)
    check_randomness(randomness, AttributionError)
    p = prepare(td, in_keys, f=f, baselines_arg=baselines)
    f = tensor_output(f, p.batch)
    nb = len(p.batch)
    alphas64, weights64 = quadrature(method, n_steps)
    chunk = n_steps if chunk_size is None else min(chunk_size, n_steps)
    total: dict = {}
    k_targets = None
    for start in progress_bar(range(0, n_steps, chunk), enabled=progress, desc=here(), unit="chunk"):
        stop = min(start + chunk, n_steps)
        s = stop - start
        scaled = {}
        for key in p.keys:
            x, b = p.x[key], p.baseline[key]
            a = alphas64[start:stop].to(x.dtype).to(x.device).view(s, *([1] * x.dim()))
            scaled[key] = b + a * (x - b)

        if strategy == "vmap":
            g = lambda xs: vmap(lambda one: f(with_inputs(td, one)), randomness=randomness)(xs)
        else:
            folded_td = td.expand(s, *p.batch).reshape(s * p.batch.numel()) if nb else td.expand(s)
            g = lambda xs: _unfold(
                f(with_inputs(folded_td, {k: v.reshape(-1, *v.shape[nb + 1 :]) for k, v in xs.items()})), s, p.batch
            )
        w = weights64[start:stop]
        path_sum = lambda key, gr: torch.tensordot(w.to(gr.dtype).to(gr.device), gr, dims=1)  # noqa: E731
        # the weighted sum over the path is taken per target, before the K targets are stacked
        try:
            _, grads, k_targets = grads_per_target(g, scaled, 1, p.batch, reduce=path_sum)
        except RuntimeError as e:
            err = random_op_error(e, AttributionError)
            if err is None:
                raise
            raise err from e
        for key, contrib in grads.items():
            total[key] = contrib if key not in total else total[key] + contrib
    attrs = {}
    for key, t in total.items():
        t = move_target_dim(t, k_targets, nb)
        if multiply_by_inputs:
            t = t * per_target(p.x[key] - p.baseline[key], k_targets, nb)
        attrs[key] = t
    extra = {}
    if return_convergence_delta:
        at_x, at_base = f(td), f(with_inputs(td, p.baseline))
        check_output(at_x, p.batch)
        lead = nb + (k_targets is not None)
        summed = sum(a.reshape(*a.shape[:lead], -1).sum(-1) for a in attrs.values())
        extra["convergence_delta"] = summed - (at_x - at_base)
    return result(td.batch_size, attrs, extra, warn=True)


def _unfold(y: torch.Tensor, s: int, batch: torch.Size) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[0] != s * max(batch.numel(), 1):
        return y  # left for check_output to report
    return y.reshape(s, *batch, *y.shape[1:])
