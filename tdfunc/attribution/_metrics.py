"""Attribution quality metrics: infidelity and max-sensitivity (Yeh et al., 2019), captum's definitions."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from tensordict import TensorDictBase
from torch.func import vmap

from .._checks import check_chunk_size, check_generator, check_int, check_randomness, random_op_error
from .._errors import public, shape_str
from .._types import InKeys, KeyedTensors
from ._common import AttributionError, _norm, _show, check_output, per_target, prepare, with_inputs
from ._noise import with_randomness

__all__ = ["infidelity", "sensitivity_max"]

#: standard deviation of the default infidelity perturbation (captum's documented example)
INFIDELITY_STD = 0.003


def _check_common(n_perturb_samples, chunk_size, generator) -> None:
    check_int("n_perturb_samples", n_perturb_samples, AttributionError)
    check_chunk_size(chunk_size, AttributionError)
    check_generator(generator, AttributionError)


def _attr_keys(attributions, in_keys) -> list:
    if not isinstance(attributions, TensorDictBase):
        raise AttributionError(
            f"attributions must be the TensorDict returned by a tdfunc attribution method "
            f"(entries ('attr', key)), got {type(attributions).__name__}."
        )
    have = [_norm(k)[1:] for k in attributions.keys(include_nested=True, leaves_only=True) if _norm(k)[0] == "attr"]
    if in_keys is None:
        if not have:
            raise AttributionError(
                f"attributions has no ('attr', key) entry (entries: "
                f"{[k for k in attributions.keys(include_nested=True, leaves_only=True)]}); pass the "
                "TensorDict returned by a tdfunc attribution method."
            )
        return have
    keys = [_norm(k) for k in ([in_keys] if isinstance(in_keys, (str, tuple)) else in_keys)]
    for k in keys:
        if k not in have:
            raise AttributionError(
                f"attributions has no entry {('attr', *k)!r} for the input {_show(k)}; it has "
                f"{[('attr', *h) for h in have]}. Attribute that input too, or leave it out of in_keys."
            )
    return keys


def _n_targets(key, a: torch.Tensor, x: torch.Tensor, nb: int, k: int | str | None, what: str) -> int | None:
    """Check an attribution's shape against its input: batch (+ K) + feature shape (k="infer": find K)."""
    feat = tuple(x.shape[nb:])
    batch = tuple(x.shape[:nb])
    if k == "infer":
        if tuple(a.shape) == tuple(x.shape):
            return None
        if a.dim() == x.dim() + 1 and tuple(a.shape[:nb]) == batch and tuple(a.shape[nb + 1 :]) == feat:
            return int(a.shape[nb])
        expected = f"{shape_str(x.shape)} or {shape_str((*batch, 'K', *feat))}"
    else:
        want = x.shape if k is None else (*batch, k, *feat)
        if tuple(a.shape) == tuple(want):
            return k  # type: ignore[return-value]  # an int or None here
        expected = shape_str(want)
    targets = (
        ""
        if k == "infer"
        else " and f returns " + ("one target per example" if k is None else f"{k} targets per example")
    )
    raise AttributionError(
        f"{what} {('attr', *key)!r} has shape {shape_str(a.shape)}, but the input {_show(key)} has shape "
        f"{shape_str(x.shape)}{targets}; expected {expected} (batch (+ K) + feature shape)."
    )


def _get(out, key, what: str, want: torch.Size) -> torch.Tensor:
    if isinstance(out, TensorDictBase):
        v = out.get(key, None)
    elif isinstance(out, Mapping):
        v = out.get(key, out.get(key[0])) if len(key) == 1 else out.get(key)
    else:
        raise AttributionError(
            f"perturb_fn must return {what} as a TensorDict or dict keyed like td, got {type(out).__name__}."
        )
    if not isinstance(v, torch.Tensor):
        raise AttributionError(
            f"perturb_fn returned {what} without a tensor for the input {_show(key)} "
            f"(got {type(v).__name__}); return one for every attributed input."
        )
    if tuple(v.shape) != tuple(want):
        raise AttributionError(
            f"perturb_fn returned {what} of shape {shape_str(v.shape)} for {_show(key)}; expected "
            f"{shape_str(want)} (n_perturb_samples + the input's shape)."
        )
    return v


def _flat_sum(t: torch.Tensor, lead: int) -> torch.Tensor:
    return t.reshape(*t.shape[:lead], -1).sum(-1)


def _vmap_samples(g, perturbed, chunk_size: int | None, randomness: str):
    """``g`` vmapped over the perturbed samples; a random op in ``f`` under ``randomness="error"`` becomes
    the family's message (a plain function, not a context manager: dynamo traces it under fullgraph)."""
    try:
        return vmap(g, chunk_size=chunk_size, randomness=randomness)(perturbed)
    except RuntimeError as e:
        err = random_op_error(e, AttributionError)
        if err is None:
            raise
        raise err from e


@public("tdfunc.infidelity")
def infidelity(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    attributions: TensorDictBase,
    *,
    in_keys: InKeys | None = None,
    perturb_fn: Callable[[TensorDictBase, torch.Generator | None], tuple[KeyedTensors, KeyedTensors]] | None = None,
    n_perturb_samples: int = 10,
    normalize: bool = False,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    randomness: str = "error",
) -> torch.Tensor:
    """Explanation infidelity (Yeh et al., 2019), captum's definition, per example and target.

    .. math::
        \\mathrm{INFD}_{b,k} = \\frac{1}{S}\\sum_{s=1}^{S}
            \\Big(\\beta\\, I_s^\\top \\Phi_{b,k} - \\big(f_k(x)_b - f_k(\\tilde x_s)_b\\big)\\Big)^2,
        \\qquad \\beta = \\frac{\\sum_s I_s^\\top \\Phi_{b,k}\\,(f_k(x)_b - f_k(\\tilde x_s)_b)}
                              {\\sum_s (I_s^\\top \\Phi_{b,k})^2}

    with ``β = 1`` unless ``normalize`` (then the value is invariant to scaling the attribution;
    ``β``'s denominator 0 is replaced by 1, as captum's ``safe_div``).  ``I_s`` is the
    perturbation and ``x̃_s`` the perturbed input of sample ``s``, both given by ``perturb_fn``;
    the dot product runs over every attributed input's features.  The ``S`` perturbed forwards are
    one ``vmap``-ed call of ``f`` (``chunk_size`` samples at a time).

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)``: the function
            the attributions explain (it sees ``td``'s batch shape).
        td: the inputs the attributions were computed for.
        attributions: the TensorDict returned by a tdfunc method: ``("attr", key)`` of shape
            ``batch (+ K) + feature shape``.
        in_keys: inputs to perturb; default every ``("attr", key)`` in ``attributions``.
        perturb_fn: ``perturb_fn(tds, generator) -> (perturbations, perturbed_inputs)``, where
            ``tds = td.expand(n_perturb_samples, *batch)`` and each result maps every attributed key to
            a tensor of shape ``(n_perturb_samples,) + input shape`` (TensorDict or dict).  Default:
            ``I ~ N(0, 0.003²)`` (captum's documented example), ``x̃ = x - I``.  For attributions
            that multiply by the inputs, return ``I = (x - x̃) / (x - x')`` as captum's
            ``infidelity_perturb_func_decorator(True)`` does.
        n_perturb_samples: ``S``.
        normalize: rescale the attribution by the optimal ``β`` (captum's ``normalize``).
        generator: random generator of the default ``perturb_fn`` (also passed to a custom one).
        chunk_size: perturbed samples per forward (None: all at once).
        randomness: ``torch.func.vmap``'s flag for random ops in ``f`` (train-mode dropout) under the
            ``vmap`` over the perturbed samples: ``"error"`` (default, as torch), ``"different"`` or ``"same"``.

    Returns:
        Tensor of shape ``batch (+ K)``.

    Raises:
        AttributionError: attributions missing an input or of the wrong shape, unknown key,
            ``n_perturb_samples < 1``, ``perturb_fn`` output of the wrong form or shape.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> lin = torch.nn.Linear(3, 2)
        >>> td = TensorDict({"x": torch.randn(4, 3)}, batch_size=[4])
        >>> attr = tdfunc.saliency(lambda t: lin(t["x"]), td, abs=False)  # exact for a linear f
        >>> infd = tdfunc.infidelity(lambda t: lin(t["x"]), td, attr, n_perturb_samples=8)
        >>> infd.shape, bool(infd.abs().max() < 1e-12)
        (torch.Size([4, 2]), True)

    References:
        Yeh, Hsieh, Suggala, Inouye, Ravikumar. On the (In)fidelity and Sensitivity of
        Explanations. NeurIPS 2019.

    Composes with: ``vmap`` (with a deterministic ``perturb_fn``: random draws under ``vmap``
    follow its ``randomness`` rule), ``grad`` (w.r.t. attributions, inputs or parameters; double
    backward), ``torch.compile(fullgraph=True)``.
    """
    _check_common(n_perturb_samples, chunk_size, generator)
    check_randomness(randomness, AttributionError)
    if perturb_fn is not None and not callable(perturb_fn):
        raise AttributionError(f"perturb_fn must be None or a callable, got {type(perturb_fn).__name__}.")
    keys = _attr_keys(attributions, in_keys)
    p = prepare(td, keys, baselines=False, f=f)
    nb, n = len(p.batch), n_perturb_samples
    y0 = f(td)
    k = check_output(y0, p.batch)
    attrs = {}
    for key in keys:
        a = attributions.get(("attr", *key))
        _n_targets(key, a, p.x[key], nb, k, "attributions")
        attrs[key] = a

    if perturb_fn is None:
        pert = {
            key: INFIDELITY_STD * torch.randn((n, *x.shape), dtype=x.dtype, device=x.device, generator=generator)
            for key, x in p.x.items()
        }
        perturbed = {key: x - pert[key] for key, x in p.x.items()}
    else:
        out = perturb_fn(td.expand(n, *p.batch), generator)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise AttributionError(
                f"perturb_fn must return a pair (perturbations, perturbed_inputs), got "
                f"{type(out).__name__}{f' of length {len(out)}' if isinstance(out, (tuple, list)) else ''}."
            )
        want = {key: torch.Size((n, *x.shape)) for key, x in p.x.items()}
        pert = {key: _get(out[0], key, "perturbations", want[key]) for key in keys}
        perturbed = {key: _get(out[1], key, "perturbed inputs", want[key]) for key in keys}

    y = _vmap_samples(lambda xs: f(with_inputs(td, xs)), perturbed, chunk_size, randomness)
    lead = 1 + nb + (k is not None)
    # I^T Phi per (sample, example, target), summed over every input's features
    dot = sum(_flat_sum(per_target(pert[key], k, nb + 1) * attrs[key], lead) for key in keys)
    diff = y0 - y
    if normalize:
        num, den = (dot * diff).sum(0), dot.square().sum(0)  # type: ignore[union-attr]  # keys is not empty
        beta = num / torch.where(den != 0, den, torch.ones_like(den))
        dot = beta * dot
    return (dot - diff).square().mean(0)


@public("tdfunc.sensitivity_max")
def sensitivity_max(
    method: Callable[..., TensorDictBase],
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    /,
    *,
    perturb_radius: float = 0.02,
    n_perturb_samples: int = 10,
    norm_ord: Literal["fro"] | float = "fro",
    perturb_fn: Callable[[TensorDictBase, torch.Generator | None], KeyedTensors] | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    randomness: str = "error",
    **method_kwargs: Any,
) -> torch.Tensor:
    """Max-sensitivity of an explanation (Yeh et al., 2019), captum's definition, per example and target.

    .. math::
        \\mathrm{SENS}_{b,k} = \\max_{s \\le S}
            \\frac{\\lVert \\Phi_k(x + \\epsilon_s)_b - \\Phi_k(x)_b \\rVert}{\\lVert \\Phi_k(x)_b \\rVert},
        \\qquad \\epsilon_s \\sim U[-r, r]^d

    where ``Φ = method(f, ·, **method_kwargs)``, the norm runs over every attributed input's
    features together (a zero denominator is replaced by 1, as captum).  The noise is drawn for
    every attributed input in order as ``uniform_(-r, r)`` of shape ``batch + (S,) + feature``:
    for float32 inputs and ``generator=torch.Generator().manual_seed(s)`` that is exactly the draw
    of captum's ``default_perturb_func`` after ``torch.manual_seed(s)``.  The ``S`` perturbed
    explanations are one ``vmap``-ed call of ``method`` (``chunk_size`` samples at a time).

    Args:
        method: a tdfunc attribution method (``tdfunc.saliency``, ``tdfunc.integrated_gradients``,
            ...) or any ``method(f, td, **method_kwargs) -> TensorDict`` with ``("attr", key)``.
        f: the function explained, passed to ``method``.
        td: the inputs; the entries ``method`` attributes are perturbed.
        perturb_radius: ``r``, the half-width of the uniform noise.
        n_perturb_samples: ``S``.
        norm_ord: ``"fro"`` (the 2-norm of the flattened map) or a number ``p`` (vector p-norm).
        perturb_fn: ``perturb_fn(tds, generator) -> perturbed inputs`` (TensorDict or dict keyed
            like td, shape ``(S,) + input shape``) in place of the uniform noise, with
            ``tds = td.expand(S, *batch)`` (captum's ``perturb_func``).
        generator: random generator of the noise (also passed to a custom ``perturb_fn``).
        chunk_size: perturbed samples per ``method`` call (None: all at once).
        randomness: ``torch.func.vmap``'s flag for random ops in ``f`` under the ``vmap`` over the perturbed
            samples (``"error"``, ``"different"`` or ``"same"``); also passed to ``method`` when it takes a
            ``randomness`` option and it is not ``"error"``.
        **method_kwargs: passed to ``method`` (``in_keys``, ``n_steps``, ``abs``, and ``method`` —
            the first three arguments are positional-only, so IG's ``method=`` passes through).

    Returns:
        Tensor of shape ``batch (+ K)``.

    Raises:
        AttributionError: ``method`` not returning ``("attr", key)`` entries, bad ``norm_ord``,
            ``n_perturb_samples < 1``, ``perturb_radius < 0``, ``perturb_fn`` output of the wrong shape.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> td = TensorDict({"x": torch.randn(4, 3)}, batch_size=[4])
        >>> sens = tdfunc.sensitivity_max(tdfunc.saliency, lambda t: net(t["x"]), td, abs=False)
        >>> sens.shape, bool((sens >= 0).all())
        (torch.Size([4, 2]), True)

    References:
        Yeh, Hsieh, Suggala, Inouye, Ravikumar. On the (In)fidelity and Sensitivity of
        Explanations. NeurIPS 2019.

    Composes with: ``vmap`` (with a deterministic ``perturb_fn``), ``grad`` (double backward),
    ``torch.compile(fullgraph=True)``.
    """
    _check_common(n_perturb_samples, chunk_size, generator)
    check_randomness(randomness, AttributionError)
    method_kwargs = with_randomness(method, method_kwargs, randomness)
    if not callable(method):
        raise AttributionError(
            f"method must be an attribution method such as tdfunc.saliency, got {type(method).__name__}."
        )
    r = perturb_radius
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0:
        raise AttributionError(f"perturb_radius must be a finite number >= 0, got {r!r}.")
    if not (norm_ord == "fro" or (isinstance(norm_ord, (int, float)) and not isinstance(norm_ord, bool))):
        raise AttributionError(
            f"norm_ord must be 'fro' or a number (the vector p-norm, inf allowed), got {norm_ord!r}."
        )
    if perturb_fn is not None and not callable(perturb_fn):
        raise AttributionError(f"perturb_fn must be None or a callable, got {type(perturb_fn).__name__}.")
    if not isinstance(td, TensorDictBase):
        prepare(td, None)  # raises the shared TypeError
    base = method(f, td, **method_kwargs)
    name = getattr(method, "__name__", type(method).__name__)
    if not isinstance(base, TensorDictBase):
        raise AttributionError(
            f"method {name} returned {type(base).__name__}; it must return a TensorDict with "
            "('attr', key) entries, as tdfunc's attribution methods do."
        )
    keys = _attr_keys(base, None)
    p = prepare(td, keys, baselines=False)
    nb, n = len(p.batch), n_perturb_samples
    first = keys[0]
    k = _n_targets(first, base.get(("attr", *first)), p.x[first], nb, "infer", "method's attribution")
    attrs = {key: base.get(("attr", *key)) for key in keys}
    for key in keys[1:]:
        _n_targets(key, attrs[key], p.x[key], nb, k, "method's attribution")

    if perturb_fn is None:
        perturbed = {}
        for key, x in p.x.items():  # batch + (S,) + feature: captum's repeat_interleave order
            noise = torch.empty((*p.batch, n, *x.shape[nb:]), dtype=x.dtype, device=x.device)
            noise = noise.uniform_(-r, r, generator=generator).movedim(nb, 0)
            perturbed[key] = x + noise
    else:
        out = perturb_fn(td.expand(n, *p.batch), generator)
        perturbed = {key: _get(out, key, "perturbed inputs", torch.Size((n, *x.shape))) for key, x in p.x.items()}

    def explain(xs):
        res = method(f, with_inputs(td, xs), **method_kwargs)
        return {key: res.get(("attr", *key)) for key in keys}

    moved = _vmap_samples(explain, perturbed, chunk_size, randomness)
    lead = 1 + nb + (k is not None)
    flat = lambda t, lead: t.reshape(*t.shape[:lead], -1)
    delta = torch.cat([flat(moved[key] - attrs[key], lead) for key in keys], dim=-1)
    ref = torch.cat([flat(attrs[key], lead - 1) for key in keys], dim=-1)
    ord_ = 2 if norm_ord == "fro" else norm_ord
    den = torch.linalg.vector_norm(ref, ord=ord_, dim=-1)
    den = torch.where(den == 0, torch.ones_like(den), den)
    return (torch.linalg.vector_norm(delta, ord=ord_, dim=-1) / den).amax(0)
