"""Layer-wise relevance propagation as pure rewrites of ``nn.Linear`` / ``nn.Conv2d`` outputs.

Each rule is a value-preserving rewrite of a layer's output, ``out == z`` in value, whose Jacobian
with respect to the layer input is the rule's modified one, so that input × gradient of the
rewritten model is the LRP relevance.  With the layer's rule written as terms
``y_t(x) = W_t · m_t(x)`` (a modified weight applied to a modified input) and ratios
``r_t = c_t z / stab(den_t)``, the rewrite is ``out = z - S + Σ_t r_t ⊙ y_t(x)`` where ``z``,
``r_t`` and ``S = Σ_t r_t ⊙ y_t(x)`` come from a first forward, outside the vector-Jacobian
product.  The inner product then sees ``Σ_t r_t ∂y_t/∂x`` only; outer derivatives see ``z``, the
true output, and ``r_t`` as functions of the weights and inputs, so the relevance is exactly
differentiable (the usual ``.detach()`` of ``r_t`` drops ``∂r_t/∂θ``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase
from torch import nn

from .._call import intervene
from .._edits import Rule, rule
from .._errors import NotReachedError
from .._sites import _path_match
from ._common import AttributionError, grads_per_target, move_target_dim, per_target, prepare, result, with_inputs

__all__ = [
    "LRPRule",
    "lrp",
    "lrp_epsilon",
    "lrp_zplus",
    "lrp_alpha_beta",
    "lrp_gamma",
    "lrp_flat",
    "lrp_wsquare",
    "lrp_pass",
    "lrp_zbox",
]

COMPOSITES = ("epsilon", "epsilon_plus", "epsilon_plus_flat")
_SUPPORTED = (nn.Linear, nn.Conv2d)
_ONES = "ones"  # input modifier of the flat and w² rules: the relevance is spread as if every input were 1


def _stab(d: torch.Tensor, eps: float) -> torch.Tensor:
    """``d + eps * sign(d)`` with sign(0) = +1 (zennit's convention)."""
    return d + eps * (d.sign() + (d == 0).to(d.dtype))


class _Bound:
    """Input modifier of the zB rule: the value ``bound`` (a constant), reached as ``bound ⊙ x ⊙ (1 / x_first)``."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _pos(t):
    return None if t is None else t.clamp(min=0)


def _neg(t):
    return None if t is None else t.clamp(max=0)


@dataclass(frozen=True)
class LRPRule:
    """An LRP rule for ``nn.Linear`` / ``nn.Conv2d``; build it with ``tdfunc.lrp_epsilon`` etc."""

    name: str
    params: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"tdfunc.lrp_{self.name}({args})"

    # terms: (input modifier, weight, bias entering the denominator only)
    def terms(self, w: torch.Tensor, b: torch.Tensor | None) -> list:
        n = self.name
        if n == "epsilon":
            return [(None, w, b)]
        if n == "zplus":
            return [(_pos, _pos(w), _pos(b)), (_neg, _neg(w), None)]
        if n == "alpha_beta":
            return [(_pos, _pos(w), _pos(b)), (_neg, _neg(w), None), (_pos, _neg(w), _neg(b)), (_neg, _pos(w), None)]
        if n == "gamma":
            g = self.params["gamma"]
            up = lambda t: None if t is None else t + g * t.clamp(min=0)
            dn = lambda t: None if t is None else t + g * t.clamp(max=0)
            return [(_pos, up(w), up(b)), (_neg, dn(w), None), (_pos, dn(w), dn(b)), (_neg, up(w), None)]
        if n == "flat":
            return [(_ONES, torch.ones_like(w), None)]
        if n == "wsquare":
            return [(_ONES, w * w, None if b is None else b * b)]
        if n == "zbox":
            lo, hi = _Bound(self.params["low"]), _Bound(self.params["high"])
            return [(None, w, b), (lo, _pos(w), _pos(b)), (hi, _neg(w), _neg(b))]
        raise AssertionError(n)  # pragma: no cover

    def ratios(self, z: torch.Tensor, ys: list) -> list:
        """``r_t`` with ``R_in = Σ_t m_t(x) ⊙ W_tᵀ (r_t ⊙ g)`` for the output gradient ``g = R_out / z``."""
        n, s = self.name, self.params.get("stabilizer", 1e-6)
        if n == "epsilon":
            return [z / _stab(ys[0], self.params["eps"])]
        if n in ("flat", "wsquare"):
            return [z / _stab(ys[0], s)]
        if n == "zplus":
            r = z / _stab(ys[0] + ys[1], s)
            return [r, r]
        if n == "zbox":
            r = z / _stab(ys[0] - ys[1] - ys[2], s)
            return [r, -r, -r]
        if n == "alpha_beta":
            a, b = self.params["alpha"], self.params["beta"]
            rp, rn = z / _stab(ys[0] + ys[1], s), z / _stab(ys[2] + ys[3], s)
            return [a * rp, a * rp, -b * rn, -b * rn]
        if n == "gamma":
            rp = (z > 0).to(z.dtype) * z / _stab(ys[0] + ys[1], s)
            rn = (z < 0).to(z.dtype) * z / _stab(ys[2] + ys[3], s)
            return [rp, rp, rn, rn]
        raise AssertionError(n)  # pragma: no cover


def _check_float(fn: str, name: str, v, *, low: float = 0.0) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{fn}: {name} must be a float, got {type(v).__name__} ({v!r:.60}).")
    if not math.isfinite(v) or v < low:
        raise AttributionError(f"{fn}: {name} must be a finite number >= {low:g}, got {v!r}.")
    return float(v)


def lrp_epsilon(eps: float = 1e-6) -> LRPRule:
    """LRP-ε: ``R_i = Σ_j x_i w_ij R_j / (z_j + ε sign z_j)``; ``eps=0`` gives LRP-0 (Bach et al., 2015)."""
    return LRPRule("epsilon", {"eps": _check_float("tdfunc.lrp_epsilon", "eps", eps)})


def lrp_zplus(stabilizer: float = 1e-6) -> LRPRule:
    """LRP-z⁺ (αβ with α=1, β=0): ``R_i = Σ_j (x_i⁺ w_ij⁺ + x_i⁻ w_ij⁻) R_j / z_j'`` (Montavon et al., 2017)."""
    return LRPRule("zplus", {"stabilizer": _check_float("tdfunc.lrp_zplus", "stabilizer", stabilizer)})


def lrp_alpha_beta(alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6) -> LRPRule:
    """LRP-αβ: ``α`` × positive contributions − ``β`` × negative ones; ``alpha - beta`` must be 1."""
    fn = "tdfunc.lrp_alpha_beta"
    a, b = _check_float(fn, "alpha", alpha), _check_float(fn, "beta", beta)
    if abs(a - b - 1.0) > 1e-12:
        raise AttributionError(
            f"{fn}: alpha - beta must be 1 (relevance conservation), got alpha={alpha!r}, beta={beta!r}; "
            "e.g. alpha=2, beta=1 or alpha=1, beta=0."
        )
    return LRPRule("alpha_beta", {"alpha": a, "beta": b, "stabilizer": _check_float(fn, "stabilizer", stabilizer)})


def lrp_gamma(gamma: float = 0.25, stabilizer: float = 1e-6) -> LRPRule:
    """LRP-γ (generalised, zennit's ``Gamma``): weights ``w + γ w⁺`` favour positive contributions."""
    fn = "tdfunc.lrp_gamma"
    return LRPRule("gamma", {"gamma": _check_float(fn, "gamma", gamma), "stabilizer": _check_float(fn, "stabilizer", stabilizer)})


def lrp_flat(stabilizer: float = 1e-6) -> LRPRule:
    """LRP-flat: relevance spread uniformly over each output's receptive field (Lapuschkin et al., 2019)."""
    return LRPRule("flat", {"stabilizer": _check_float("tdfunc.lrp_flat", "stabilizer", stabilizer)})


def lrp_wsquare(stabilizer: float = 1e-6) -> LRPRule:
    """LRP-w²: ``R_i = Σ_j w_ij² R_j / Σ_i' w_i'j²`` (Montavon et al., 2017)."""
    return LRPRule("wsquare", {"stabilizer": _check_float("tdfunc.lrp_wsquare", "stabilizer", stabilizer)})


def _check_bound(fn: str, name: str, v):
    if isinstance(v, torch.Tensor):
        if not v.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a float or a floating-point tensor, got a {v.dtype} tensor.")
        if not bool(torch.isfinite(v).all()):
            raise AttributionError(f"{fn}: {name} must be finite everywhere, got a tensor with inf or nan entries.")
        return v.detach()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{fn}: {name} must be a float or a floating-point tensor, got {type(v).__name__} ({v!r:.60}).")
    if not math.isfinite(v):
        raise AttributionError(f"{fn}: {name} must be finite, got {v!r}.")
    return float(v)


def lrp_zbox(low, high, stabilizer: float = 1e-6) -> LRPRule:
    """LRP-zᴮ (box rule, for the input layer; zennit's ``ZBox``, Montavon et al., 2017).

    ``R_i = Σ_j (x_i w_ij − l_i w_ij⁺ − h_i w_ij⁻) R_j / stab(z_j − Σ_i (l_i w_ij⁺ + h_i w_ij⁻) − b_j⁺ − b_j⁻)``
    for inputs known to lie in the box ``low <= x <= high``.  ``low`` / ``high`` are floats or tensors
    broadcasting against the layer input (e.g. shape ``(1, C, 1, 1)`` for per-channel bounds); they
    are constants (detached).  Like the flat rule, the bound terms reach the input as
    ``x ⊙ (bound / x)``, so an input entry that is exactly 0 gets only its ``x w`` share (zero).
    """
    fn = "tdfunc.lrp_zbox"
    lo, hi = _check_bound(fn, "low", low), _check_bound(fn, "high", high)
    try:
        bad = bool((torch.as_tensor(lo) > torch.as_tensor(hi)).any())
    except RuntimeError as e:
        raise AttributionError(f"{fn}: low and high must broadcast against each other: {e}") from None
    if bad:
        raise AttributionError(f"{fn}: low must be <= high everywhere (the box the inputs lie in), got low > high.")
    return LRPRule("zbox", {"low": lo, "high": hi, "stabilizer": _check_float(fn, "stabilizer", stabilizer)})


def lrp_pass() -> LRPRule:
    """No rewrite: the layer keeps its plain gradient (identity rule; LRP-0 with the bias's share dropped)."""
    return LRPRule("pass")


# --------------------------------------------------------------------------------------- the rewrite


def _op(m: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if isinstance(m, nn.Conv2d):
        return m._conv_forward(x, w, b)
    return F.linear(x, w, b)


def _inputs(mod, x: torch.Tensor, inv: torch.Tensor | None) -> torch.Tensor:
    if mod is None:
        return x
    if mod is _ONES:  # x * (1 / x_first): value 1 where x != 0 (0 where x == 0), derivative 1 / x
        return x * inv
    if isinstance(mod, _Bound):  # the bound as a constant (first forward), or bound ⊙ x ⊙ (1 / x_first)
        v = torch.as_tensor(mod.value).to(x)
        return v.expand_as(x) if inv is None else v * (x * inv)
    return mod(x)


def _own(m: nn.Module, mod, w: torch.Tensor) -> bool:
    """Whether the term is the layer's own product (identity input, own weight): then ``_op(m, x, w, ·)`` is ``out``
    up to the bias, so ``out`` is reused instead of recomputed (exact types only: a subclass may change forward)."""
    return mod is None and w is m.weight and type(m) in _SUPPORTED


def _term(m: nn.Module, x: torch.Tensor, out: torch.Tensor, inv, mod, w: torch.Tensor) -> torch.Tensor:
    """``W_t m_t(x)`` without bias; for the layer's own term that is ``out - bias``, same value and Jacobian."""
    if not _own(m, mod, w):
        return _op(m, _inputs(mod, x, inv), w, None)
    if m.bias is None:
        return out
    return out - (m.bias.view(-1, 1, 1) if isinstance(m, nn.Conv2d) else m.bias)


def _ln_parts(module: nn.LayerNorm, x: torch.Tensor):
    """``(x - mean(x))`` over the normalised dims and ``1 / std(x)`` (biased variance + ``eps``)."""
    dims = tuple(range(-len(module.normalized_shape), 0))
    c = x - x.mean(dims, keepdim=True)
    return c, torch.rsqrt((c * c).mean(dims, keepdim=True) + module.eps)


def _ln_map(module: nn.LayerNorm, c: torch.Tensor, inv_std: torch.Tensor) -> torch.Tensor:
    y = c * inv_std
    return y if module.weight is None else y * module.weight


def _record_ln(seen: list) -> Rule:
    def fn(module, args, kwargs, out):
        c, inv_std = _ln_parts(module, args[0])
        seen.append((out.clone(), inv_std, _ln_map(module, c, inv_std)))
        return out

    return rule(fn)


def _rewrite_ln(seen: list) -> Rule:
    calls = iter(seen)

    def fn(module, args, kwargs, out):
        rec = next(calls, None)
        if rec is None or rec[0].shape != out.shape:
            raise NotReachedError(
                "tdfunc.lrp: f called an nn.LayerNorm module more often, or with other shapes, than in the first of "
                "its two forwards; f must be deterministic (put dropout layers in eval())."
            )
        z, inv_std, s = rec
        return z - s + _ln_map(module, _ln_parts(module, args[0])[0], inv_std)

    return rule(fn)


def _record(r: LRPRule, seen: list) -> Rule:
    if r.name == "layernorm":
        return _record_ln(seen)

    def fn(module, args, kwargs, out):
        x = args[0]
        ts = r.terms(module.weight, module.bias)
        ones = any(t[0] is _ONES or isinstance(t[0], _Bound) for t in ts)
        inv = torch.where(x == 0, torch.zeros_like(x), 1 / torch.where(x == 0, torch.ones_like(x), x)) if ones else None
        ys = [
            out
            if _own(module, mod, w) and b is module.bias
            else _op(module, torch.ones_like(x) if mod is _ONES else _inputs(mod, x, None), w, b)
            for mod, w, b in ts
        ]
        rs = r.ratios(out, ys)
        s = sum(rt * _term(module, x, out, inv, mod, w) for rt, (mod, w, _) in zip(rs, ts))
        seen.append((out.clone(), rs, s, inv))  # clone: a later in-place op must not rewrite it
        return out

    return rule(fn)


def _rewrite(r: LRPRule, seen: list) -> Rule:
    if r.name == "layernorm":
        return _rewrite_ln(seen)
    calls = iter(seen)

    def fn(module, args, kwargs, out):
        rec = next(calls, None)
        if rec is None or rec[0].shape != out.shape:
            raise NotReachedError(
                "tdfunc.lrp: f called an nn.Linear / nn.Conv2d module more often, or with other shapes, than in "
                "the first of its two forwards; f must be deterministic (put dropout layers in eval())."
            )
        z, rs, s, inv = rec
        ts = r.terms(module.weight, module.bias)
        return z - s + sum(rt * _term(module, args[0], out, inv, mod, w) for rt, (mod, w, _) in zip(rs, ts))

    return rule(fn)


# --------------------------------------------------------------------------------------- rule mapping


def _kind(m: nn.Module) -> str:
    return type(m).__name__


def _assign(fn: str, module: nn.Module, rules, composite) -> dict[str, LRPRule]:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module as the module, got {type(module).__name__} ({module!r:.60}).")
    if composite is not None and composite not in COMPOSITES:
        raise AttributionError(
            f"{fn}: unknown composite {composite!r}; choose one of {', '.join(map(repr, COMPOSITES))}, "
            "or composite=None to rewrite only the layers named in rules."
        )
    if rules is not None and not isinstance(rules, Mapping):
        raise TypeError(
            f"{fn}: rules must be a dict mapping a site pattern or an nn.Module subclass to a rule, got "
            f"{type(rules).__name__}; e.g. rules={{nn.Conv2d: tdfunc.lrp_zplus(), 'head': tdfunc.lrp_epsilon(0.1)}}."
        )
    named = [(n, m) for n, m in module.named_modules() if n]
    layers = [(n, m) for n, m in named if isinstance(m, _SUPPORTED)]
    if not layers:
        raise AttributionError(
            f"{fn}: module {type(module).__name__} has no nn.Linear or nn.Conv2d submodule, so there is no layer "
            "to apply an LRP rule to; pass the model that holds them."
        )
    pats, types = [], []
    for key, r in (rules or {}).items():
        if not isinstance(r, LRPRule):
            raise TypeError(
                f"{fn}: rules[{key!r}] must be a rule from tdfunc.lrp_epsilon(), lrp_zplus(), ... got "
                f"{type(r).__name__} ({r!r:.60})."
            )
        if isinstance(key, type) and issubclass(key, nn.Module):
            if not issubclass(key, _SUPPORTED) and not any(issubclass(c, key) for c in _SUPPORTED):
                raise AttributionError(
                    f"{fn}: rules has a rule for {key.__name__}, but LRP rules apply to nn.Linear and nn.Conv2d only; "
                    "activations pass relevance through as their gradient does. Remove that entry."
                )
            types.append((key, r))
        elif isinstance(key, str):
            hits = [(n, m) for n, m in named if _path_match(key.split("."), n.split("."))]
            bad = [f"{n!r} ({_kind(m)})" for n, m in hits if not isinstance(m, _SUPPORTED)]
            if bad:
                raise AttributionError(
                    f"{fn}: rules pattern {key!r} matches {', '.join(bad)}, but LRP rules apply to nn.Linear and "
                    "nn.Conv2d only; narrow the pattern to those layers."
                )
            if not hits:
                raise AttributionError(
                    f"{fn}: rules pattern {key!r} matches no submodule of {type(module).__name__}; its nn.Linear / "
                    f"nn.Conv2d layers are {[n for n, _ in layers]}."
                )
            pats.append((key, r))
        else:
            raise TypeError(
                f"{fn}: a rules key must be a site pattern (str) or an nn.Module subclass, got "
                f"{type(key).__name__} ({key!r:.60})."
            )
    out: dict[str, LRPRule] = {}
    for i, (n, m) in enumerate(layers):
        r = next((r for p, r in pats if _path_match(p.split("."), n.split("."))), None)
        if r is None:
            r = next((r for t, r in types if isinstance(m, t)), None)
        if r is None and composite is not None:
            if composite == "epsilon_plus_flat" and i == 0:
                r = lrp_flat()
            elif composite in ("epsilon_plus", "epsilon_plus_flat") and isinstance(m, nn.Conv2d):
                r = lrp_zplus()
            else:
                r = lrp_epsilon()
        if r is not None and r.name != "pass":
            out[n] = r
    if composite is not None:  # the LN rule (Ali et al., 2022): 1 / std held constant
        for n, m in named:
            if isinstance(m, nn.LayerNorm):
                out[n] = LRPRule("layernorm")
    return out


def lrp(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    module: nn.Module,
    *,
    rules: Mapping | None = None,
    composite: str | None = "epsilon_plus",
    in_keys: Sequence | None = None,
) -> TensorDict:
    """Layer-wise relevance propagation (Bach et al., 2015) as input × a rule-modified gradient.

    .. math::  R_i = x_i\\, \\frac{\\partial^{\\mathrm{LRP}} f_k}{\\partial x_i},\\qquad
        \\text{at a layer } z = Wx + b:\\ \\ R_{\\mathrm{in}} = \\sum_t m_t(x) \\odot W_t^\\top
        \\Big(\\frac{c_t\\, R_{\\mathrm{out}}}{\\mathrm{stab}(\\mathrm{den}_t)}\\Big)

    The output relevance is ``f_k(x)`` itself (zennit with ``attr_output = output × one-hot``);
    for a bias-free ReLU network under LRP-0 / z⁺ the input relevance sums to it.  Every
    ``nn.Linear`` / ``nn.Conv2d`` submodule of ``module`` gets a rule: the first ``rules`` entry
    whose site pattern matches its name, else the first whose module type it is an instance of,
    else the composite's: ``'epsilon'`` (ε on every layer), ``'epsilon_plus'`` (z⁺ on
    ``nn.Conv2d``, ε on ``nn.Linear``, zennit's ``EpsilonPlus``), ``'epsilon_plus_flat'`` (also
    flat on the first layer, zennit's ``EpsilonPlusFlat``), ``None`` (no rewrite).  Activations
    keep their gradient (for ReLU this passes relevance through unchanged).  With a composite,
    every ``nn.LayerNorm`` gets the LN rule of Ali et al. (2022): relevance passes through the
    centred-and-scaled map ``γ ⊙ (x − mean x) / std`` with ``1 / std`` held constant (taken from the
    first forward, so outer derivatives still see it as a function of ``x`` and the weights; a bias
    ``β`` absorbs its share, so relevance is conserved without it); ``composite=None`` leaves
    LayerNorm's plain gradient, and ``rules`` cannot name LayerNorm modules.  No canonizers: fold BatchNorm into the convolution before calling.

    Each rule is a :func:`tdfunc.rule` rewrite keeping the layer's value: ``f`` runs twice, first
    to record ``z`` and each rule's ratios ``r_t`` (outside the vector-Jacobian product), then with
    ``out = z - S + Σ_t r_t ⊙ W_t m_t(x)``.  So the relevance is exactly differentiable (e.g.
    ``‖R‖²`` in a loss: its gradient w.r.t. the weights includes ``∂r_t/∂θ``, which the usual
    ``.detach()`` trick drops).  Every target's map comes from one forward and K products.

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)``; it calls
            ``module``, must be deterministic (it runs twice).
        td: the inputs with a batch shape.
        module: the model whose ``nn.Linear`` / ``nn.Conv2d`` layers are rewritten.
        rules: ``{site pattern or nn.Module subclass: rule}`` from :func:`tdfunc.lrp_epsilon`,
            ``lrp_zplus``, ``lrp_alpha_beta``, ``lrp_gamma``, ``lrp_flat``, ``lrp_wsquare``,
            ``lrp_pass``, ``lrp_zbox`` (input layer); overrides the composite.
        composite: ``'epsilon'``, ``'epsilon_plus'`` (default), ``'epsilon_plus_flat'`` or ``None``.
        in_keys: entries to attribute; default every floating-point entry outside ``"baseline"``.

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) + feature shape``.

    Raises:
        AttributionError: unknown composite, a rule for a module type or site that is not
            ``nn.Linear`` / ``nn.Conv2d``, a pattern matching nothing, bad rule parameters; unknown
            key, non-float input, ``f`` output of the wrong shape.
        NotReachedError: ``f`` ran the layers differently in its two forwards.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> out = tdfunc.lrp(lambda t: net(t["x"]), td, net, composite="epsilon")
        >>> out["attr", "x"].shape                      # every class, one call
        torch.Size([5, 4, 3])

    Limits: the flat and w² rules' relevance reaches the layer input as ``x ⊙ (R / x)``, so an
    input entry that is exactly 0 gets relevance 0 there (zennit gives it its uniform share).

    References:
        Bach, Binder, Montavon, Klauschen, Müller, Samek. On Pixel-Wise Explanations for Non-Linear
        Classifier Decisions by Layer-Wise Relevance Propagation. PLoS ONE 2015.
        Ali, Schnake, Eberle, Montavon, Müller, Wolf. XAI for Transformers: Better Explanations
        through Conservative Propagation. ICML 2022 (the LN rule).
        Montavon, Binder, Lapuschkin, Samek, Müller. Layer-Wise Relevance Propagation: An Overview.
        2019.  Anders et al. Software for Dataset-wide XAI (zennit). 2021.

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward, exact),
    ``torch.compile(fullgraph=True)`` after :func:`tdfunc.install_sites`.
    """
    fn = "tdfunc.lrp"
    assigned = _assign(fn, module, rules, composite)
    p = prepare(fn, td, in_keys, baselines=False)
    seen = {s: [] for s in assigned}
    if assigned:
        intervene(f, module, edits={s: _record(r, seen[s]) for s, r in assigned.items()}, strict=False)(td)

    def g(xs):
        if not assigned:
            return f(with_inputs(td, xs))
        return intervene(f, module, edits={s: _rewrite(r, seen[s]) for s, r in assigned.items()}, strict=False)(
            with_inputs(td, xs)
        )

    _, grads, k = grads_per_target(fn, g, p.x, 0, p.batch)
    n = len(p.batch)
    return result(td.batch_size, {key: per_target(p.x[key], k, n) * move_target_dim(gr, k, n) for key, gr in grads.items()})
