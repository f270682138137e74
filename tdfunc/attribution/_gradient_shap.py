"""GradientShap: expected gradients over random baselines, path points and input noise, one vmapped forward."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torch.func import vmap

from .._checks import check_bool, check_chunk_size, check_generator, check_int, check_randomness, random_op_error
from .._edits import delta
from .._errors import TdfuncTypeError, here, public, shape_str
from .._finite import readable
from .._types import InKeys, Key
from ._common import (
    BASELINE,
    AttributionError,
    grads_per_target,
    move_target_dim,
    prepare,
    result,
    tensor_output,
    with_inputs,
)
from ._deep_lift import check_baseline_distribution
from ._noise import _draws, _stdevs

__all__ = ["gradient_shap", "layer_gradient_shap"]


def _sample_tensor(
    name: str, v: object, want: tuple, dtype_ok: Callable[[torch.dtype], bool], what: str, device: torch.device
) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != want or not dtype_ok(v.dtype) or v.device != device:
        got = (
            f"shape {shape_str(v.shape)}, dtype {v.dtype} on {v.device}"
            if isinstance(v, torch.Tensor)
            else f"{type(v).__name__} ({v!r:.60})"
        )
        raise AttributionError(
            f"{name} must be a tensor of shape (n_samples, *batch) = {shape_str(torch.Size(want))} of {what} "
            f"on {device}, got {got}."
        )
    return v


@public("tdfunc.gradient_shap")
def gradient_shap(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    baselines: TensorDictBase,
    *,
    in_keys: InKeys | None = None,
    n_samples: int = 5,
    stdevs: float | Mapping[Key, float] = 0.0,
    multiply_by_inputs: bool = True,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | Mapping[Key, torch.Tensor] | None = None,
    alphas: torch.Tensor | None = None,
    baseline_index: torch.Tensor | None = None,
    chunk_size: int | None = None,
    randomness: str = "error",
) -> TensorDict:
    """GradientShap (Lundberg & Lee, 2017; captum's ``GradientShap``): expected gradients between the input
    and baselines drawn from a distribution, on noisy inputs.

    .. math::  \\mathrm{GS}_{b,k}(x) = \\frac{1}{S} \\sum_{s=1}^{S} (\\tilde x_{s,b} - x'_{j_{s,b}}) \\odot
        \\nabla f_k\\big(x'_{j_{s,b}} + \\alpha_{s,b} (\\tilde x_{s,b} - x'_{j_{s,b}})\\big)_b,
        \\quad \\tilde x_{s,b} = x_b + \\sigma \\epsilon_{s,b}

    with ``j ~ U{0..N-1}`` (a baseline of ``baselines``), ``alpha ~ U(0, 1)`` and ``eps ~ N(0, I)``, one
    draw per sample and example.  Its expectation over ``alpha`` (with ``stdevs=0`` and one baseline)
    is integrated gradients; over baselines, it is SHAP's expected gradients.  The ``S`` samples are
    evaluated in one ``vmap`` (``chunk_size`` at a time) and every target's map comes from K
    vector-Jacobian products of that forward.  A drawn baseline is one joint draw for all inputs
    (captum draws an index per input tensor).

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)``; under the
            ``vmap`` it sees ``td``'s batch shape, so it may close over per-example data.
        td: the inputs (no ``("baseline", key)`` entries: the baselines come from ``baselines``).
        baselines: a TensorDict of batch shape ``(N,)`` with an entry per attributed input, of shape
            ``(N, *feature shape)``.
        in_keys: entries to attribute; default every floating-point entry.
        n_samples: samples ``S`` per example.
        stdevs: standard deviation ``sigma`` of the input noise (captum's default 0.0): one float or
            one per input key.
        multiply_by_inputs: multiply by ``x~ - x'`` (captum's default True).
        generator: draws what is not given (the noise per input in key order, then ``alphas``, then
            ``baseline_index``; default: torch's global RNG).
        noise: pre-drawn standard-normal ``eps`` (a tensor, or a mapping key -> tensor) of shape
            ``(S, *input.shape)``: with ``alphas`` and ``baseline_index`` it makes the call
            deterministic (and traceable by ``torch.compile`` / an outer ``vmap``).
        alphas: pre-drawn path positions, shape ``(S, *batch)``, in ``[0, 1]``.
        baseline_index: pre-drawn baseline indices, shape ``(S, *batch)``, integers in ``[0, N)``.
        chunk_size: samples per ``vmap`` call (bounds memory; None: all at once).
        randomness: ``torch.func.vmap``'s flag for random ops in ``f`` under this method's ``vmap``.

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) + feature shape``.

    Raises:
        AttributionError: ``baselines`` not a TensorDict of batch ``(N,)`` or missing a key; samples
            of the wrong shape or dtype; ``n_samples < 1``; negative ``stdevs``; ``td`` holding baseline
            entries; unknown key, non-float input, ``f`` output of the wrong shape.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> refs = TensorDict({"x": torch.randn(10, 3)}, batch_size=[10])
        >>> g = torch.Generator().manual_seed(0)
        >>> out = tdfunc.gradient_shap(lambda t: net(t["x"]), td, refs, n_samples=8, generator=g)
        >>> out["attr", "x"].shape
        torch.Size([5, 4, 3])

    References:
        Lundberg, Lee. A Unified Approach to Interpreting Model Predictions. NeurIPS 2017.
        Erion et al. Improving performance of deep learning models with axiomatic attribution priors
        and expected gradients. Nature Machine Intelligence 2021.

    Composes with: ``vmap`` (with pre-drawn samples, or a ``randomness`` flag), ``grad`` (double
    backward), ``torch.compile(fullgraph=True)`` (with pre-drawn samples).
    """
    p, f, refs, std, eps, a, idx = _samples(
        f,
        td,
        baselines,
        in_keys,
        n_samples,
        stdevs,
        multiply_by_inputs,
        generator,
        noise,
        alphas,
        baseline_index,
        chunk_size,
        randomness,
    )
    nb = len(p.batch)
    s = n_samples
    total: dict = {}
    k_targets = None
    chunk = s if chunk_size is None else min(chunk_size, s)
    for start in range(0, s, chunk):
        stop = min(start + chunk, s)
        points, noisy, bases = _points(p, refs, std, eps, a, idx, slice(start, stop))
        diffs = {key: noisy[key] - bases[key] for key in p.keys}

        g = lambda xs: vmap(lambda one: f(with_inputs(td, one)), randomness=randomness)(xs)

        def weigh(key, gr, diffs=diffs):  # one target's gradients (chunk, *x.shape) -> their weighted sum
            return (gr * diffs[key] if multiply_by_inputs else gr).sum(0)

        try:
            _, grads, k_targets = grads_per_target(g, points, 1, p.batch, reduce=weigh)
        except RuntimeError as e:
            err = random_op_error(e, AttributionError)
            if err is None:
                raise
            raise err from e
        for key, contrib in grads.items():
            total[key] = contrib if key not in total else total[key] + contrib
    attrs = {key: move_target_dim(t / s, k_targets, nb) for key, t in total.items()}
    return result(td.batch_size, attrs, warn=True)


def _samples(
    f,
    td,
    baselines,
    in_keys,
    n_samples,
    stdevs,
    multiply_by_inputs,
    generator,
    noise,
    alphas,
    baseline_index,
    chunk_size,
    randomness,
):
    """Validated inputs and the samples: ``(p, refs, std, eps, alphas, baseline_index)``; ``f`` checked."""
    check_int("n_samples", n_samples, AttributionError)
    check_chunk_size(chunk_size, AttributionError)
    check_generator(generator, AttributionError)
    check_bool("multiply_by_inputs", multiply_by_inputs, AttributionError)
    check_randomness(randomness, AttributionError)
    if not isinstance(td, TensorDictBase):
        raise TdfuncTypeError(
            f"td must be a TensorDict holding the inputs, got {type(td).__name__}; "
            "e.g. TensorDict({'x': x}, batch_size=[len(x)])."
        )
    held = [k for k in td.keys(include_nested=True, leaves_only=True) if isinstance(k, tuple) and k[0] == BASELINE]
    if held:
        raise AttributionError(
            f"td holds the baseline entry {held[0]!r}, but {here()[7:]} draws its baselines from the "
            "baselines TensorDict (N per input); remove the entry from td."
        )
    p = prepare(td, in_keys, f=f, baselines=False)
    f = tensor_output(f, p.batch)
    nb = len(p.batch)
    refs = check_baseline_distribution(baselines, p.keys, p.x, nb)
    n_base = baselines.batch_size[0]
    std = _stdevs(stdevs, p.keys)
    x0 = p.x[p.keys[0]]
    s = n_samples
    want = (s, *p.batch)
    if noise is None and all(v == 0.0 for v in std.values()):
        eps = {k: torch.zeros((s, *p.x[k].shape), dtype=p.x[k].dtype, device=p.x[k].device) for k in p.keys}
    else:
        eps = _draws(noise, generator if noise is None else None, p.keys, p.x, s)
    if alphas is None:
        dev = generator.device if generator is not None else x0.device
        alphas = torch.rand(want, generator=generator, dtype=x0.dtype, device=dev).to(x0.device)
    a = _sample_tensor("alphas", alphas, want, lambda d: d == x0.dtype, f"dtype {x0.dtype} in [0, 1]", x0.device)
    if baseline_index is None:
        dev = generator.device if generator is not None else x0.device
        baseline_index = torch.randint(n_base, want, generator=generator, device=dev).to(x0.device)
    idx = _sample_tensor(
        "baseline_index",
        baseline_index,
        want,
        lambda d: not d.is_floating_point and d != torch.bool,
        f"integers in [0, {n_base})",
        x0.device,
    )
    if idx.numel() and readable(idx.double()) and (int(idx.min()) < 0 or int(idx.max()) >= n_base):
        raise AttributionError(
            f"baseline_index holds {int(idx.min()) if int(idx.min()) < 0 else int(idx.max())}, outside "
            f"[0, {n_base}) for the {n_base} baselines."
        )
    return p, f, refs, std, eps, a, idx


def _points(p, refs, std, eps, a, idx, sl: slice) -> tuple[dict, dict, dict]:
    """Samples ``sl`` of ``_samples``' draws: ``(points, noisy inputs, baselines)`` per key, each
    ``(len(sl), *batch, *feature)``; a point is ``b + alpha (x~ - b)`` with ``x~ = x + stdev * eps``."""
    nb = len(p.batch)
    points, noisy, bases = {}, {}, {}
    for key in p.keys:
        noisy[key] = p.x[key] + std[key] * eps[key][sl]
        bases[key] = refs[key][idx[sl]]  # (samples, *batch, *feature)
        al = a[sl]
        al = al.view(al.shape[0], *p.batch, *([1] * (noisy[key].dim() - 1 - nb)))
        points[key] = bases[key] + al * (noisy[key] - bases[key])
    return points, noisy, bases


@public("tdfunc.layer_gradient_shap")
def layer_gradient_shap(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    module: nn.Module,
    site: str,
    baselines: TensorDictBase,
    *,
    in_keys: InKeys | None = None,
    n_samples: int = 5,
    stdevs: float | Mapping[Key, float] = 0.0,
    multiply_by_inputs: bool = True,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | Mapping[Key, torch.Tensor] | None = None,
    alphas: torch.Tensor | None = None,
    baseline_index: torch.Tensor | None = None,
    randomness: str = "error",
) -> TensorDict:
    """GradientShap at a site (captum's ``LayerGradientShap``): the site's gradient at random points
    between noisy inputs and drawn baselines, times the site's change between them.

    .. math::  \\mathrm{LGS}_{b,k} = \\frac{1}{S} \\sum_s \\big(a(\\tilde x_{s,b}) - a(x'_{j_{s,b}})\\big)
        \\odot \\frac{\\partial f_k}{\\partial a}\\Big|_{x'_{j_{s,b}} + \\alpha_{s,b} (\\tilde x_{s,b} - x'_{j_{s,b}})}

    with the samples of :func:`tdfunc.gradient_shap` (same arguments, same draw order).  The ``S``
    samples run in one ``vmap``-ed forward with a zero delta at ``site`` (K vector-Jacobian products
    for K targets), plus two ``vmap``-ed capture forwards for ``a`` at the noisy inputs and the baselines.

    Args:
        f, td, baselines, in_keys, n_samples, stdevs, multiply_by_inputs, generator, noise, alphas,
            baseline_index, randomness: as in :func:`tdfunc.gradient_shap`.
        module, site: as in :func:`tdfunc.grad_cam` (any batch-first site value).

    Returns:
        TensorDict with ``("attr", site)`` of shape ``batch (+ K) + the site's per-example shape``.

    Raises:
        As :func:`tdfunc.gradient_shap` and :func:`tdfunc.grad_cam`.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> refs = TensorDict({"x": torch.randn(10, 3)}, batch_size=[10])
        >>> g = torch.Generator().manual_seed(0)
        >>> tdfunc.layer_gradient_shap(lambda t: net(t["x"]), td, net, "1", refs, generator=g)["attr", "1"].shape
        torch.Size([5, 4, 8])

    References:
        Lundberg, Lee. A Unified Approach to Interpreting Model Predictions. NeurIPS 2017.

    Composes with: ``vmap`` (with pre-drawn samples, or a ``randomness`` flag), ``grad`` (double
    backward), ``torch.compile(fullgraph=True)`` (pre-drawn samples, after ``tdfunc.install_sites``).
    """
    from ._layer import _activation, _check, _run

    _check(td, module, site)
    p, f, refs, std, eps, a, idx = _samples(
        f,
        td,
        baselines,
        in_keys,
        n_samples,
        stdevs,
        multiply_by_inputs,
        generator,
        noise,
        alphas,
        baseline_index,
        None,
        randomness,
    )
    nb = len(p.batch)
    _, act = _activation(f, module, td, site)
    points, noisy, bases = _points(p, refs, std, eps, a, idx, slice(None))
    one = lambda d, pts: _run(f, module, with_inputs(td, pts), {site: delta(d)}, None)  # noqa: E731
    g = lambda xs: vmap(one, randomness=randomness)(xs["d"], points)  # noqa: E731
    cap = lambda pts: _run(f, module, with_inputs(td, pts), None, [site])[1][site]  # noqa: E731
    try:
        _, grads, k = grads_per_target(
            g, {"d": torch.zeros((n_samples, *act.shape), dtype=act.dtype, device=act.device)}, 1, p.batch
        )
        diff = (
            vmap(cap, randomness=randomness)(noisy) - vmap(cap, randomness=randomness)(bases)
            if multiply_by_inputs
            else None
        )
    except RuntimeError as e:
        err = random_op_error(e, AttributionError)
        if err is None:
            raise
        raise err from e
    gr = grads["d"]  # (K,)? + (S, *batch, *site)
    step = 0 if k is None else 1
    attr = (gr * diff if diff is not None else gr).mean(step)
    out = TensorDict({}, batch_size=td.batch_size)
    out.set(("attr", site), move_target_dim(attr, k, nb))
    return out
