"""Noise tunnel: SmoothGrad, SmoothGrad² and VarGrad over any attribution method."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch.func import vmap

from .._checks import (
    check_bool,
    check_chunk_size,
    check_generator,
    check_input_keys,
    check_int,
    check_randomness,
    random_op_error,
)
from .._errors import TdfuncTypeError, here, public, shape_str
from .._progress import n_chunks, progress_bar, vmap_chunks
from .._types import Key, NoiseType
from ._common import AttributionError, _norm, _show, prepare, result, with_inputs

__all__ = ["smooth_grad"]

NT_TYPES: tuple[NoiseType, ...] = ("smoothgrad", "smoothgrad_sq", "vargrad")


def _check_options(method, nt_type, nt_samples, chunk_size, generator) -> None:
    if not callable(method):
        raise TdfuncTypeError(
            f"method must be an attribution function such as tdfunc.saliency or "
            f"tdfunc.integrated_gradients, got {type(method).__name__} ({method!r:.60}); pass the function "
            "itself: tdfunc.smooth_grad(tdfunc.saliency, f, td)."
        )
    if nt_type not in NT_TYPES:
        raise AttributionError(f"unknown nt_type {nt_type!r}; choose one of {list(NT_TYPES)}.")
    check_int("nt_samples", nt_samples, AttributionError)
    check_chunk_size(chunk_size, AttributionError)
    check_generator(generator, AttributionError)


def _names(keys: list) -> str:
    return "[" + ", ".join(_show(k) for k in keys) + "]"


def _stdevs(stdevs, keys: list) -> dict:
    def one(key, s) -> float:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s >= 0:  # `not >=` also catches nan
            raise AttributionError(
                f"stdevs for {_show(key)} must be a non-negative float (the standard deviation of the "
                f"Gaussian noise added to the input), got {s!r}."
            )
        return float(s)

    if not isinstance(stdevs, Mapping):
        return {k: one(k, stdevs) for k in keys}
    given = {_norm(k): v for k, v in stdevs.items()}
    check_input_keys(
        "stdevs", list(given), keys, AttributionError, "give one entry per attributed input, or a single float"
    )
    missing = [k for k in keys if k not in given]
    if missing:
        raise AttributionError(
            f"stdevs has no entry for input {_show(missing[0])}; give one entry per attributed input "
            f"({_names(keys)}), or a single float."
        )
    return {k: one(k, given[k]) for k in keys}


def _draws(noise, generator, keys: list, xs: dict, nt_samples: int) -> dict:
    """Standard-normal draws of shape ``(nt_samples, *x.shape)`` per input, in key order."""
    if noise is None:
        out = {}
        for k in keys:  # one draw per input, in the order of the keys (captum: in the order of the inputs)
            x = xs[k]
            dev = generator.device if generator is not None else x.device
            eps = torch.randn((nt_samples, *x.shape), generator=generator, dtype=x.dtype, device=dev)
            out[k] = eps.to(x.device)
        return out
    if generator is not None:
        raise AttributionError(
            "got both noise and a generator; the generator only draws noise that is not given. Pass one of them."
        )
    if isinstance(noise, torch.Tensor):
        if len(keys) != 1:
            raise AttributionError(
                f"noise is one tensor but {len(keys)} inputs are attributed ({_names(keys)}); "
                "give a mapping from input key to its noise."
            )
        noise = {keys[0]: noise}
    if not isinstance(noise, Mapping):
        raise TdfuncTypeError(
            f"noise must be None, a tensor or a mapping from input key to tensor, got "
            f"{type(noise).__name__} ({noise!r:.60})."
        )
    given = {_norm(k): v for k, v in noise.items()}
    out = {}
    for k in keys:
        x, eps = xs[k], given.get(k)  # type: ignore[assignment]  # checked just below
        if not isinstance(eps, torch.Tensor):
            raise AttributionError(
                f"noise has no tensor for input {_show(k)}; give one of shape (nt_samples, *input.shape) "
                f"per attributed input ({_names(keys)})."
            )
        want = (nt_samples, *x.shape)
        if tuple(eps.shape) != want:
            raise AttributionError(
                f"noise for {_show(k)} has shape {shape_str(eps.shape)}, expected (nt_samples, *input.shape) "
                f"= {shape_str(want)}; draw it with torch.randn({want}) (standard normal: stdevs scales it)."
            )
        if eps.dtype != x.dtype or eps.device != x.device:
            raise AttributionError(
                f"noise for {_show(k)} has dtype {eps.dtype} on {eps.device} but the input has dtype "
                f"{x.dtype} on {x.device}; convert it with .to(input)."
            )
        out[k] = eps
    check_input_keys(
        "noise",
        list(given),
        keys,
        AttributionError,
        "give one tensor of shape (nt_samples, *input.shape) per attributed input",
    )
    return out


def with_randomness(method: Callable, method_kwargs: dict, randomness: str) -> dict:
    """``method_kwargs`` with ``randomness`` added when it is not ``"error"`` and ``method`` takes that option."""
    if randomness == "error" or "randomness" in method_kwargs:
        return method_kwargs
    try:
        takes = "randomness" in inspect.signature(method).parameters
    except (TypeError, ValueError):  # no signature (a builtin): pass nothing
        takes = False
    return {**method_kwargs, "randomness": randomness} if takes else method_kwargs


def _reduce(a: torch.Tensor, nt_type: str) -> torch.Tensor:
    if nt_type == "smoothgrad":
        return a.mean(0)
    if nt_type == "smoothgrad_sq":
        return a.square().mean(0)
    return (a - a.mean(0)).square().mean(0)  # population variance = E[a^2] - E[a]^2 (captum's VarGrad)


@public("tdfunc.smooth_grad")
def smooth_grad(
    method: Callable[..., TensorDictBase],
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    /,
    *,
    nt_type: NoiseType = "smoothgrad",
    nt_samples: int = 5,
    stdevs: float | Mapping[Key, float] = 1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | Mapping[Key, torch.Tensor] | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    randomness: str = "error",
    **method_kwargs: Any,
) -> TensorDict:
    """Noise tunnel (captum's ``NoiseTunnel``): ``method`` averaged over Gaussian-perturbed inputs.

    .. math::
        A^{\\mathrm{SG}}(x) = \\frac1S \\sum_{s=1}^{S} A(x + \\sigma \\varepsilon_s),\\quad
        A^{\\mathrm{SG^2}}(x) = \\frac1S \\sum_s A(x + \\sigma \\varepsilon_s)^2,\\quad
        A^{\\mathrm{Var}}(x) = A^{\\mathrm{SG^2}}(x) - A^{\\mathrm{SG}}(x)^2,
        \\qquad \\varepsilon_s \\sim \\mathcal N(0, I)

    Only the attributed inputs are perturbed; baselines (``("baseline", key)``) and every other
    entry of ``td`` are not, so for integrated gradients with ``multiply_by_inputs=True`` each
    sample is multiplied by ``(x + sigma eps_s) - x'`` (captum's semantics).  The ``S`` samples are
    evaluated with ``vmap`` (``f`` still sees ``td``'s batch shape); ``chunk_size`` samples at a time.

    Args:
        method: any tdfunc attribution method of the shared calling shape, e.g.
            ``tdfunc.saliency``, ``tdfunc.input_x_gradient``, ``tdfunc.integrated_gradients``.
            ``method``, ``f``, ``td`` are positional-only, so ``method="riemann_left"`` reaches
            integrated gradients; options named like ours (``chunk_size``, ``progress``) go in
            with ``functools.partial``.
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)``.
        td: the inputs (and baselines, labels, ...) with a batch shape.
        nt_type: ``"smoothgrad"`` (mean), ``"smoothgrad_sq"`` (mean of squares) or ``"vargrad"``
            (population variance over the samples).
        nt_samples: number of noise samples ``S``.
        stdevs: standard deviation ``sigma`` of the noise: one float, or a mapping from input key
            to float.
        generator: the ``torch.Generator`` that draws ``eps`` (default: torch's global RNG), one
            ``randn((S, *x.shape))`` per input in key order, before anything is evaluated.
        noise: pre-drawn standard-normal ``eps`` instead (a tensor, or a mapping from input key to
            tensor) of shape ``(S, *x.shape)``; scaled by ``stdevs``.  Needed inside
            ``torch.compile`` (a generator cannot be traced) and under an outer ``vmap`` (random
            draws there need ``vmap(..., randomness="same" | "different")``).
        chunk_size: noise samples per ``vmap`` call (bounds memory; None: all at once).
        progress: show a tqdm bar on stderr over the chunks of noise samples (one step when
            ``chunk_size`` is None; the chunks then run as a Python loop of the same ``vmap`` calls,
            equal results); never shown under ``vmap`` / ``grad`` / ``torch.compile``.
        randomness: ``torch.func.vmap``'s flag for random ops in ``f`` (train-mode dropout) under the
            ``vmap`` over the samples: ``"error"`` (default, as torch), ``"different"`` (independent draws
            per sample) or ``"same"`` (one draw shared); also passed to ``method`` when it takes a
            ``randomness`` option (``tdfunc.integrated_gradients``) and it is not ``"error"``.
        **method_kwargs: passed to ``method`` (``in_keys``, ``n_steps``, ``abs``, ...).

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) + feature shape``; any other entry
        of ``method``'s result (e.g. ``"convergence_delta"``) is returned per sample, with the
        sample dim right after the batch dims.

    Raises:
        AttributionError: unknown ``nt_type``, ``nt_samples < 1``, negative ``stdevs``, noise of the
            wrong shape, and whatever ``method`` raises.
        TypeError: ``method`` or ``generator`` of the wrong type.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> g = torch.Generator().manual_seed(0)
        >>> out = tdfunc.smooth_grad(tdfunc.saliency, lambda t: net(t["x"]), td, nt_samples=8,
        ...                          stdevs=0.1, generator=g, abs=False)   # every class at once
        >>> out["attr", "x"].shape
        torch.Size([5, 4, 3])

    References:
        Smilkov, Thorat, Kim, Viégas, Wattenberg. SmoothGrad: removing noise by adding noise.
        arXiv:1706.03825, 2017.  Adebayo et al. Local explanation methods for deep neural networks
        lack sensitivity to parameter values (VarGrad). ICLR workshop 2018.

    Composes with: ``vmap`` (with ``noise=`` or a ``randomness`` flag), ``grad`` (double
    backward), ``torch.compile(fullgraph=True)`` (with ``noise=``; not over
    :func:`tdfunc.guided_backprop`, whose ``autograd.Function`` torch <= 2.13 cannot compile
    under ``vmap``: pytorch/pytorch#129845).
    """
    _check_options(method, nt_type, nt_samples, chunk_size, generator)
    check_bool("progress", progress, AttributionError)
    check_randomness(randomness, AttributionError)
    method_kwargs = with_randomness(method, method_kwargs, randomness)
    p = prepare(td, method_kwargs.get("in_keys"), baselines=False, f=f)
    std = _stdevs(stdevs, p.keys)
    eps = _draws(noise, generator, p.keys, p.x, nt_samples)
    noisy = {k: p.x[k] + std[k] * eps[k] for k in p.keys}

    def one(xs: dict) -> dict:
        out = method(f, with_inputs(td, xs), **method_kwargs)
        if not isinstance(out, TensorDictBase):
            raise AttributionError(
                f"method {getattr(method, '__name__', method)!r} returned {type(out).__name__}, not a "
                "TensorDict; pass a tdfunc attribution method (method(f, td, **kwargs) -> TensorDict)."
            )
        return {_norm(k): out.get(k) for k in out.keys(include_nested=True, leaves_only=True)}

    bar = progress_bar(enabled=progress, desc=here(), total=n_chunks(nt_samples, chunk_size), unit="chunk")
    try:
        if bar is None:
            per = vmap(one, chunk_size=chunk_size, randomness=randomness)(noisy)
        else:
            with bar:
                per = vmap_chunks(one, chunk_size, bar, randomness=randomness)(noisy)
    except RuntimeError as e:
        err = random_op_error(e, AttributionError)
        if err is None:
            raise
        raise err from e
    nb = len(p.batch)
    attrs, extra = {}, {}
    for key, v in per.items():
        if key[0] == "attr":
            attrs[key[1:]] = _reduce(v, nt_type)
        else:
            extra[key] = v.movedim(0, nb)
    return result(td.batch_size, attrs, extra, warn=True)
