"""Layer-wise relevance propagation as pure, value-preserving rewrites of module outputs.

Each rule is a value-preserving rewrite of a module's output, ``out == z`` in value, whose Jacobian
with respect to the module input is the rule's modified one, so that input × gradient of the
rewritten model is the LRP relevance.  With the layer's rule written as terms
``y_t(x) = W_t · m_t(x)`` (a modified weight applied to a modified input) and ratios
``r_t = c_t z / stab(den_t)``, the rewrite is ``out = z - S + Σ_t r_t ⊙ y_t(x)`` where ``z``,
``r_t`` and ``S = Σ_t r_t ⊙ y_t(x)`` come from a first forward, outside the vector-Jacobian
product.  The inner product then sees ``Σ_t r_t ∂y_t/∂x`` only; outer derivatives see ``z``, the
true output, and ``r_t`` as functions of the weights and inputs, so the relevance is exactly
differentiable (the usual ``.detach()`` of ``r_t`` drops ``∂r_t/∂θ``).

Transformer rules (AttnLRP, Achtibat et al. 2024) in this form.  Every value ``v`` carries the
relevance ``R_v = v ⊙ g_v`` (``g`` the modified gradient), so a rule with modified Jacobian ``J̃``
gives ``R_in = x ⊙ J̃ᵀ (R_out / y)``:

* softmax, Prop. 3.1, ``R_in = x ⊙ (R − s Σ R)``: with ``R = s ⊙ g`` that is ``x ⊙ (diag(s) − s sᵀ) g``,
  softmax's own Jacobian — no rewrite (a ``-inf`` score gets ``s = 0`` and a zero gradient);
* matmul ``O = A B`` (QKᵀ, A·V), uniform ε rule, Prop. 3.3, ``R_A = A ⊙ ((R / stab(2 O)) Bᵀ)``: the
  product-rule Jacobian with the output gradient scaled by ``r = O / stab(2 O)``: ``O − r O + r ⊙ (A B)``;
* identity for an elementwise ``y = σ(x)``, Prop. 3.4, ``R_in = R_out``: Jacobian ``diag(y / x)``:
  ``y − r x + r ⊙ x`` with ``r = y / x``;
* ε on a residual sum ``a + b`` (Eq. 8), ``R_a = a R / stab(a + b)``: the plain gradient is its
  ``ε → 0`` limit, so sums (not modules) keep their gradient;
* LayerNorm / RMSNorm with ``1 / std`` held constant (Ali et al. 2022; for RMSNorm that is AttnLRP's
  identity rule): ``z − S + γ ⊙ (x − mean x) ⊙ s`` with ``s = 1 / std`` from the first forward;
* ε on a linear map, ``R_in = x ⊙ Wᵀ (R / stab(z))``: ``r = z / stab(z)`` on the bias-free product.
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
from .._errors import NotReachedError, suggest
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
    "lrp_identity",
    "lrp_ignore",
    "lrp_softmax",
    "lrp_norm",
    "lrp_attention",
]

COMPOSITES = ("epsilon", "epsilon_plus", "epsilon_plus_flat", "attnlrp")
_SUPPORTED = (nn.Linear, nn.Conv2d)
_NORMS = (nn.LayerNorm, nn.RMSNorm)
#: elementwise activations that composite 'attnlrp' gives the identity rule (ReLU, LeakyReLU and Dropout in eval
#: already pass relevance unchanged as their gradient does)
_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.ELU, nn.CELU, nn.SELU, nn.Hardswish,
                nn.Hardsigmoid, nn.Hardtanh)
_LAYER_RULES = ("epsilon", "zplus", "alpha_beta", "gamma", "flat", "wsquare", "zbox")
#: per rule: (module types it applies to, types excluded, how a message names them)
_TARGETS = {
    **{n: (_SUPPORTED, (), "nn.Linear and nn.Conv2d") for n in _LAYER_RULES},
    "norm": (_NORMS, (), "nn.LayerNorm and nn.RMSNorm"),
    "attention": ((nn.MultiheadAttention,), (), "nn.MultiheadAttention"),
    "softmax": ((nn.Softmax,), (), "nn.Softmax"),
    "identity": (
        (nn.Module,),
        (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, nn.Softmax),
        "elementwise modules (not nn.Linear, nn.ConvNd, nn.MultiheadAttention or nn.Softmax)",
    ),
    "ignore": ((nn.Module,), (), "any module"),
    "pass": ((nn.Module,), (), "any module"),
}
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
    """An LRP rule for one kind of module; build it with ``tdfunc.lrp_rules.epsilon``, ``lrp_attention`` etc."""

    name: str
    params: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        name = "gradient" if self.name == "pass" else self.name
        return f"tdfunc.lrp_rules.{name}({args})"

    def applies(self, cls: type) -> bool:
        """Whether the rule can rewrite modules of type ``cls``."""
        ok, excluded, _ = _TARGETS[self.name]
        return issubclass(cls, ok) and not issubclass(cls, excluded)

    @property
    def targets(self) -> str:
        return _TARGETS[self.name][2]

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
    return LRPRule("epsilon", {"eps": _check_float("tdfunc.lrp_rules.epsilon", "eps", eps)})


def lrp_zplus(stabilizer: float = 1e-6) -> LRPRule:
    """LRP-z⁺ (αβ with α=1, β=0): ``R_i = Σ_j (x_i⁺ w_ij⁺ + x_i⁻ w_ij⁻) R_j / z_j'`` (Montavon et al., 2017)."""
    return LRPRule("zplus", {"stabilizer": _check_float("tdfunc.lrp_rules.zplus", "stabilizer", stabilizer)})


def lrp_alpha_beta(alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6) -> LRPRule:
    """LRP-αβ: ``α`` × positive contributions − ``β`` × negative ones; ``alpha - beta`` must be 1."""
    fn = "tdfunc.lrp_rules.alpha_beta"
    a, b = _check_float(fn, "alpha", alpha), _check_float(fn, "beta", beta)
    if abs(a - b - 1.0) > 1e-12:
        raise AttributionError(
            f"{fn}: alpha - beta must be 1 (relevance conservation), got alpha={alpha!r}, beta={beta!r}; "
            "e.g. alpha=2, beta=1 or alpha=1, beta=0."
        )
    return LRPRule("alpha_beta", {"alpha": a, "beta": b, "stabilizer": _check_float(fn, "stabilizer", stabilizer)})


def lrp_gamma(gamma: float = 0.25, stabilizer: float = 1e-6) -> LRPRule:
    """LRP-γ (generalised, zennit's ``Gamma``): weights ``w + γ w⁺`` favour positive contributions."""
    fn = "tdfunc.lrp_rules.gamma"
    return LRPRule("gamma", {"gamma": _check_float(fn, "gamma", gamma), "stabilizer": _check_float(fn, "stabilizer", stabilizer)})


def lrp_flat(stabilizer: float = 1e-6) -> LRPRule:
    """LRP-flat: relevance spread uniformly over each output's receptive field (Lapuschkin et al., 2019)."""
    return LRPRule("flat", {"stabilizer": _check_float("tdfunc.lrp_rules.flat", "stabilizer", stabilizer)})


def lrp_wsquare(stabilizer: float = 1e-6) -> LRPRule:
    """LRP-w²: ``R_i = Σ_j w_ij² R_j / Σ_i' w_i'j²`` (Montavon et al., 2017)."""
    return LRPRule("wsquare", {"stabilizer": _check_float("tdfunc.lrp_rules.wsquare", "stabilizer", stabilizer)})


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
    fn = "tdfunc.lrp_rules.zbox"
    lo, hi = _check_bound(fn, "low", low), _check_bound(fn, "high", high)
    try:
        bad = bool((torch.as_tensor(lo) > torch.as_tensor(hi)).any())
    except RuntimeError as e:
        raise AttributionError(f"{fn}: low and high must broadcast against each other: {e}") from None
    if bad:
        raise AttributionError(f"{fn}: low must be <= high everywhere (the box the inputs lie in), got low > high.")
    return LRPRule("zbox", {"low": lo, "high": hi, "stabilizer": _check_float(fn, "stabilizer", stabilizer)})


def lrp_pass() -> LRPRule:
    """No rewrite: the module keeps its plain gradient, so relevance crosses it as input × gradient does.

    For ``nn.Linear`` / ``nn.Conv2d`` that is LRP-0 with the bias's share dropped; for ReLU, LeakyReLU and
    Dropout in eval it equals the identity rule; on any other module it opts that module out of the
    composite's rule (e.g. ``rules={nn.LayerNorm: tdfunc.lrp_rules.gradient()}`` for LayerNorm's own gradient).
    Nothing is recorded or recomputed.

    Returns:
        An :class:`LRPRule` for any module.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> a = tdfunc.lrp(lambda t: net(t["x"]), td, net, rules={torch.nn.Linear: tdfunc.lrp_rules.gradient()})
        >>> b = tdfunc.input_x_gradient(lambda t: net(t["x"]), td)
        >>> torch.allclose(a["attr", "x"], b["attr", "x"])
        True

    Composes with: ``vmap``, ``grad``, ``torch.compile`` (it changes nothing).
    """
    return LRPRule("pass")


def lrp_identity() -> LRPRule:
    """Identity rule for elementwise modules (AttnLRP Prop. 3.4): ``R_in = R_out``.

    For a shape-preserving elementwise ``y = σ(x)`` (GELU, SiLU, Tanh, Sigmoid, Dropout, ...) the relevance
    is passed on unchanged, which in the input × gradient form is the Jacobian ``diag(y / x)``:
    the rewrite is ``y − S + r ⊙ x`` with ``r = y / x`` and ``S = r ⊙ x`` from the first forward.
    An input entry that is exactly 0 gets ``r = 0`` (relevance 0 there: it cannot be written as
    ``x ⊙ g``); for σ(0) = 0 activations that is also what the rule gives.

    Returns:
        An :class:`LRPRule` for modules whose output has their input's shape (not nn.Linear, nn.ConvNd,
        nn.MultiheadAttention or nn.Softmax).

    Raises:
        AttributionError (from :func:`tdfunc.lrp`): the module's output shape differs from its input's, or
        it is built with ``inplace=True`` (its input is overwritten before the rule can read it).

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> lin = lambda i, o: torch.nn.Linear(i, o, bias=False, dtype=torch.float64)
        >>> net = torch.nn.Sequential(lin(3, 4), torch.nn.GELU(), lin(4, 2))
        >>> td = TensorDict({"x": torch.randn(5, 3, dtype=torch.float64)}, batch_size=[5])
        >>> rules = {torch.nn.Linear: tdfunc.lrp_rules.epsilon(0.0), torch.nn.GELU: tdfunc.lrp_rules.identity()}
        >>> r = tdfunc.lrp(lambda t: net(t["x"]), td, net, rules=rules)["attr", "x"]
        >>> torch.allclose(r.sum(-1), net(td["x"]))          # conserved: every rule is conservative here
        True

    References:
        Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin, Samek. AttnLRP: Attention-Aware
        Layer-Wise Relevance Propagation for Transformers. ICML 2024 (Prop. 3.4).

    Composes with: ``vmap``, ``grad`` (double backward, exact: ``r`` is a function of the weights in
    outer derivatives), ``torch.compile(fullgraph=True)``.
    """
    return LRPRule("identity")


def lrp_ignore() -> LRPRule:
    """No relevance flows through the module: its output is held constant (taken from the first forward).

    The module's inputs get no relevance along this path; where its output multiplies another path,
    that path gets all of it.  On the ``nn.Softmax`` of a hand-written attention this is CP-LRP's rule
    for attention heads (Ali et al. 2022): the probabilities are constants, relevance flows through the
    values only (for ``nn.MultiheadAttention`` use ``tdfunc.lrp_rules.attention(softmax="constant")``).
    Outer derivatives still see the output as a function of the weights and inputs.

    Returns:
        An :class:`LRPRule` for any module.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> class Gate(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin, self.gate = torch.nn.Linear(3, 3, bias=False), torch.nn.Sigmoid()
        ...     def forward(self, x):
        ...         return (self.lin(x) * self.gate(x)).sum(-1)
        >>> net = Gate().double()
        >>> td = TensorDict({"x": torch.randn(4, 3, dtype=torch.float64)}, batch_size=[4])
        >>> rules = {"gate": tdfunc.lrp_rules.ignore(), "lin": tdfunc.lrp_rules.epsilon(0.0)}
        >>> r = tdfunc.lrp(lambda t: net(t["x"]), td, net, rules=rules)["attr", "x"]
        >>> torch.allclose(r.sum(-1), net(td["x"]))          # the gate is a constant: all relevance via lin
        True

    References:
        Ali, Schnake, Eberle, Montavon, Müller, Wolf. XAI for Transformers: Better Explanations through
        Conservative Propagation. ICML 2022.

    Composes with: ``vmap``, ``grad`` (double backward, exact), ``torch.compile(fullgraph=True)``.
    """
    return LRPRule("ignore")


def lrp_softmax() -> LRPRule:
    """The softmax rule of AttnLRP (Prop. 3.1) for ``nn.Softmax`` modules: ``R_in = x ⊙ (R − s Σ R)``.

    With ``R = s ⊙ g`` this is ``x ⊙ (diag(s) − s sᵀ) g`` — softmax's own Jacobian, so the rule
    rewrites nothing (it names the choice; composite ``'attnlrp'`` uses it).  Masked scores
    (``-inf``) have ``s = 0`` and a zero gradient: they get relevance 0, also when the scores are the
    attributed input (``x ⊙ g`` is taken as 0 where ``x`` is infinite and ``g`` is 0, not ``nan``).
    The alternative is :func:`tdfunc.lrp_rules.ignore` (probabilities held constant, CP-LRP).  The rule is not
    conservative: ``Σ R_in = Σ R − (Σ_i x_i s_i) Σ R``.

    Returns:
        An :class:`LRPRule` for ``nn.Softmax``.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Softmax(-1))
        >>> td = TensorDict({"x": torch.randn(2, 3)}, batch_size=[2])
        >>> out = tdfunc.lrp(lambda t: net(t["x"]), td, net, rules={torch.nn.Softmax: tdfunc.lrp_rules.softmax()})
        >>> out["attr", "x"].shape
        torch.Size([2, 4, 3])

    References:
        Achtibat et al. AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers.
        ICML 2024 (Prop. 3.1).

    Composes with: ``vmap``, ``grad``, ``torch.compile`` (it changes nothing).
    """
    return LRPRule("softmax")


def lrp_norm() -> LRPRule:
    """The LN rule for ``nn.LayerNorm`` / ``nn.RMSNorm``: relevance through the normalisation with ``1 / std`` fixed.

    .. math::  y = γ ⊙ (x − \\bar x)\\, s + β,\\quad s = 1/\\sqrt{\\mathrm{var}(x) + ε}\\ \\text{held constant};
        \\qquad R_{\\mathrm{in}} = x ⊙ J̃^\\top (R / y),\\
        J̃ = s\\,\\mathrm{diag}(γ)(I − \\tfrac{1}{n}\\mathbf{1}\\mathbf{1}^\\top)

    (Ali et al. 2022; AttnLRP's identity rule on ``1 / std`` with ε → 0 on the centring, as LXT's
    ``layer_norm``).  For RMSNorm (no centring, no bias) ``s = 1 / rms(x)`` and the rule is the identity
    rule ``R_in = R_out`` (LXT's ``rms_norm_identity``).  ``s`` comes from the first forward; outer
    derivatives see it as a function of ``x`` and the weights.  Without ``β`` relevance is conserved.
    Every composite applies it to LayerNorm and RMSNorm modules.

    Returns:
        An :class:`LRPRule` for ``nn.LayerNorm`` and ``nn.RMSNorm``.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.RMSNorm(4), torch.nn.Linear(4, 2))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> r = tdfunc.lrp(lambda t: net(t["x"]), td, net, composite=None, rules={"1": tdfunc.lrp_rules.norm()})
        >>> r["attr", "x"].shape
        torch.Size([5, 2, 3])

    References:
        Ali, Schnake, Eberle, Montavon, Müller, Wolf. XAI for Transformers: Better Explanations through
        Conservative Propagation. ICML 2022.  Achtibat et al. AttnLRP. ICML 2024 (Prop. 3.4).

    Composes with: ``vmap``, ``grad`` (double backward, exact), ``torch.compile(fullgraph=True)``.
    """
    return LRPRule("norm")


_SOFTMAX_MODES = ("attnlrp", "constant")


def lrp_attention(eps: float = 1e-6, softmax: str = "attnlrp") -> LRPRule:
    """AttnLRP for ``nn.MultiheadAttention``: the module's forward recomputed with every piece rewritten.

    .. math::  q, k, v = x W_{q,k,v}^\\top + b\\ \\ (\\varepsilon),\\quad
        S = \\tfrac{1}{\\sqrt{d}}\\, q k^\\top\\ \\ (\\text{uniform-}\\varepsilon),\\quad
        A = \\mathrm{softmax}(S + M),\\quad O = A v\\ \\ (\\text{uniform-}\\varepsilon),\\quad
        y = O W_o^\\top + b_o\\ \\ (\\varepsilon)

    The projections get the ε rule ``R_in = x ⊙ Wᵀ (R / stab(z))``; both matmuls the uniform-ε rule
    of AttnLRP Prop. 3.3, ``R_A = A ⊙ ((R / stab(2 O)) Bᵀ)`` and ``R_B = B ⊙ (Aᵀ (R / stab(2 O)))``;
    the softmax either its AttnLRP rule (Prop. 3.1, its own Jacobian, ``softmax="attnlrp"``) or
    constant probabilities (``softmax="constant"``: CP-LRP of Ali et al. 2022 — relevance flows through
    the values only, and ``A v`` is then linear in ``v``).  Masks are constants: ``attn_mask`` (bool or
    float, 2-D or per head, causal included), ``key_padding_mask``, ``is_causal``; ``batch_first`` either
    way, unbatched inputs, cross-attention, separate ``kdim`` / ``vdim`` projections, with or without
    bias.  The ratios come from a first forward (two passes), so outer derivatives are exact; the module's
    own output is not used (its CPU flash-attention kernel has no double backward), and with
    ``need_weights=True`` the returned weights keep their plain gradient.

    Args:
        eps: ε of the four projections and the two matmuls (``stab(z) = z + ε sign z``), ``>= 0``.
        softmax: ``"attnlrp"`` (relevance through the softmax) or ``"constant"`` (CP-LRP).

    Returns:
        An :class:`LRPRule` for ``nn.MultiheadAttention`` (used by ``nn.TransformerEncoderLayer`` /
        ``nn.TransformerDecoderLayer``).

    Raises:
        AttributionError: a bad ``eps`` or ``softmax``; from :func:`tdfunc.lrp`: a module with
            ``add_bias_kv`` or ``add_zero_attn``, in training mode with ``dropout > 0``, or given nested
            tensors.
        TypeError: ``eps`` not a number.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=torch.nn.GELU(),
        ...                                          batch_first=True)
        >>> model = torch.nn.Sequential(layer, torch.nn.Linear(8, 3))
        >>> td = TensorDict({"x": torch.randn(4, 5, 8)}, batch_size=[4])
        >>> rules = {torch.nn.MultiheadAttention: tdfunc.lrp_rules.attention(eps=1e-6, softmax="constant")}
        >>> out = tdfunc.lrp(lambda t: model(t["x"])[:, -1], td, model, rules=rules, composite="attnlrp")
        >>> out["attr", "x"].shape                         # (batch, class, tokens, features)
        torch.Size([4, 3, 5, 8])

    References:
        Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin, Samek. AttnLRP: Attention-Aware
        Layer-Wise Relevance Propagation for Transformers. ICML 2024.
        Ali, Schnake, Eberle, Montavon, Müller, Wolf. XAI for Transformers: Better Explanations through
        Conservative Propagation. ICML 2022.

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward, exact),
    ``torch.compile(fullgraph=True)`` after :func:`tdfunc.install_sites`.
    """
    fn = "tdfunc.lrp_rules.attention"
    e = _check_float(fn, "eps", eps)
    if not isinstance(softmax, str) or softmax not in _SOFTMAX_MODES:
        raise AttributionError(
            f"{fn}: softmax must be 'attnlrp' (relevance through the softmax, AttnLRP) or 'constant' (attention "
            f"probabilities held constant, CP-LRP), got {softmax!r}."
        )
    return LRPRule("attention", {"eps": e, "softmax": softmax})


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


def _main(out):
    """The tensor a rule rewrites: the module's output, or its first element (``nn.MultiheadAttention``)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def _layer_record(r: LRPRule, name: str, module, args, kwargs, out):
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
    return out.clone(), rs, s, inv  # clone: a later in-place op must not rewrite it


def _layer_rewrite(r: LRPRule, module, args, kwargs, out, rec):
    z, rs, s, inv = rec
    ts = r.terms(module.weight, module.bias)
    return z - s + sum(rt * _term(module, args[0], out, inv, mod, w) for rt, (mod, w, _) in zip(rs, ts))


def _centred(module, x: torch.Tensor) -> torch.Tensor:
    """``x − mean(x)`` over the normalised dims (LayerNorm), ``x`` itself (RMSNorm)."""
    if isinstance(module, nn.RMSNorm):
        return x
    return x - x.mean(tuple(range(-len(module.normalized_shape), 0)), keepdim=True)


def _norm_map(module, c: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    y = c * inv
    return y if module.weight is None else y * module.weight


def _norm_record(r: LRPRule, name: str, module, args, kwargs, out):
    x = args[0]
    c = _centred(module, x)
    eps = module.eps
    if eps is None:  # nn.RMSNorm's default, as F.rms_norm
        eps = torch.finfo(x.dtype).eps
    inv = torch.rsqrt((c * c).mean(tuple(range(-len(module.normalized_shape), 0)), keepdim=True) + eps)
    return out.clone(), inv, _norm_map(module, c, inv)


def _norm_rewrite(r: LRPRule, module, args, kwargs, out, rec):
    z, inv, s = rec
    return z - s + _norm_map(module, _centred(module, args[0]), inv)


def _identity_record(r: LRPRule, name: str, module, args, kwargs, out):
    x, y = (args[0] if args else None), _main(out)
    if not isinstance(x, torch.Tensor) or x.shape != y.shape:
        got = f"input {tuple(x.shape)}" if isinstance(x, torch.Tensor) else "no positional tensor input"
        raise AttributionError(
            f"tdfunc.lrp: tdfunc.lrp_rules.identity() at {name!r} ({type(module).__name__}) needs an elementwise module "
            f"whose output has its input's shape, got {got} and output {tuple(y.shape)}; use tdfunc.lrp_rules.gradient() or "
            "tdfunc.lrp_rules.ignore() there."
        )
    nz = x != 0
    ratio = torch.where(nz, y / torch.where(nz, x, torch.ones_like(x)), torch.zeros_like(y))
    return y.clone(), ratio, ratio * x


def _identity_rewrite(r: LRPRule, module, args, kwargs, out, rec):
    z, ratio, s = rec
    return z - s + ratio * args[0]


def _ignore_record(r: LRPRule, name: str, module, args, kwargs, out):
    return _main(out).clone()


def _ignore_rewrite(r: LRPRule, module, args, kwargs, out, rec):
    return rec.clone()  # a copy: an in-place op downstream must not change the record


# ------------------------------------------------------------------ nn.MultiheadAttention (AttnLRP)


def _mha_call(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True,
              is_causal=False):
    """``nn.MultiheadAttention.forward``'s arguments by name."""
    return query, key, value, key_padding_mask, need_weights, attn_mask, is_causal


def _float_mask(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = masked) as an additive ``-inf`` mask; float masks as given."""
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
    return m


def _mha_inputs(m: nn.MultiheadAttention, args, kwargs):
    """Query, key and value in ``(N, L, E)`` layout, and the layout to return to."""
    q, k, v, *_ = _mha_call(*args, **kwargs)
    batched = q.dim() == 3
    if not batched:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    elif not m.batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    return (q, k, v), (batched, m.batch_first)


def _mha_mask(m: nn.MultiheadAttention, args, kwargs, n: int, tgt: int, src: int, dtype, device):
    """The additive mask torch applies (``attn_mask`` + ``key_padding_mask``), broadcasting to ``(N, H, L, S)``."""
    _, _, _, kpm, need_weights, am, is_causal = _mha_call(*args, **kwargs)
    if is_causal and kpm is None and not need_weights:  # torch then ignores attn_mask and masks causally
        am = torch.ones(tgt, src, dtype=torch.bool, device=device).tril().logical_not()
    mask = None
    if am is not None:
        am = _float_mask(am, dtype)
        mask = am.view(n, m.num_heads, tgt, src) if am.dim() == 3 else am
    if kpm is not None:
        kpm = _float_mask(kpm, dtype).view(n, 1, 1, src)
        mask = kpm if mask is None else mask + kpm
    return mask


def _mha_weights(m: nn.MultiheadAttention):
    ws = m.in_proj_weight.chunk(3) if m._qkv_same_embed_dim else (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
    bs = (None,) * 3 if m.in_proj_bias is None else m.in_proj_bias.chunk(3)
    return ws, bs


def _eps_record(x, w, b, eps):
    """ε rule on ``x Wᵀ + b``: the output, the ratio ``z / stab(z)`` and ``S = r ⊙ x Wᵀ``."""
    lin = F.linear(x, w)
    z = lin if b is None else lin + b
    ratio = z / _stab(z, eps)
    return z, ratio, ratio * lin


def _eps_apply(rec, x, w):
    z, ratio, s = rec
    return z - s + ratio * F.linear(x, w)


def _uniform_record(a, b, eps):
    """Uniform-ε rule on ``a @ b``: the product, the ratio ``z / stab(2 z)`` and ``S = r ⊙ z``."""
    z = a @ b
    ratio = z / _stab(2 * z, eps)
    return z, ratio, ratio * z


def _uniform_apply(rec, a, b):
    z, ratio, s = rec
    return z - s + ratio * (a @ b)


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """``(N, L, E) -> (N, H, L, E / H)``."""
    return t.unflatten(-1, (h, t.shape[-1] // h)).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).flatten(-2)


def _mha_layout(y: torch.Tensor, layout) -> torch.Tensor:
    batched, batch_first = layout
    if not batched:
        return y[0]
    return y if batch_first else y.transpose(0, 1)


def _attention_record(r: LRPRule, name: str, m, args, kwargs, out):
    if m.training and m.dropout > 0:
        raise AttributionError(
            f"tdfunc.lrp: nn.MultiheadAttention {name!r} is in training mode with dropout={m.dropout}; f runs twice "
            "and must be deterministic: call .eval() on the model (or build it with dropout=0.0)."
        )
    eps, const = r.params["eps"], r.params["softmax"] == "constant"
    (q, k, v), layout = _mha_inputs(m, args, kwargs)
    mask = _mha_mask(m, args, kwargs, q.shape[0], q.shape[1], k.shape[1], q.dtype, q.device)
    (wq, wk, wv), (bq, bk, bv) = _mha_weights(m)
    h = m.num_heads
    scale = math.sqrt(1.0 / (q.shape[-1] // h))  # torch scales q by 1 / sqrt(head_dim) before q kᵀ
    rv = _eps_record(v, wv, bv, eps)
    if const:  # q and k reach the output only through the constant probabilities: no ratios needed
        rq = rk = rs = None
        qh, kt = _heads(F.linear(q, wq, bq), h) * scale, _heads(F.linear(k, wk, bk), h).transpose(-2, -1)
        zs = qh @ kt
    else:
        rq, rk = _eps_record(q, wq, bq, eps), _eps_record(k, wk, bk, eps)
        rs = _uniform_record(_heads(rq[0], h) * scale, _heads(rk[0], h).transpose(-2, -1), eps)
        zs = rs[0]
    probs = torch.softmax(zs if mask is None else zs + mask, -1)
    vh = _heads(rv[0], h)
    ro = (probs @ vh, None, None) if const else _uniform_record(probs, vh, eps)
    ry = _eps_record(_merge(ro[0]), m.out_proj.weight, m.out_proj.bias, eps)
    # the first forward continues with this value, not the module's: equal, and twice differentiable (the module's
    # CPU flash-attention kernel has no double backward)
    value = _mha_layout(ry[0], layout)
    return {"q": rq, "k": rk, "v": rv, "s": rs, "p": probs, "o": ro, "y": ry, "mask": mask, "value": value}


def _attention_rewrite(r: LRPRule, m, args, kwargs, out, rec):
    (q, k, v), layout = _mha_inputs(m, args, kwargs)
    (wq, wk, wv), _ = _mha_weights(m)
    h = m.num_heads
    vh = _heads(_eps_apply(rec["v"], v, wv), h)
    if r.params["softmax"] == "constant":  # A from the first forward: a constant here, A v linear in v
        o = rec["p"] @ vh
    else:
        scale = math.sqrt(1.0 / (q.shape[-1] // h))
        qh, kh = _heads(_eps_apply(rec["q"], q, wq), h) * scale, _heads(_eps_apply(rec["k"], k, wk), h)
        s = _uniform_apply(rec["s"], qh, kh.transpose(-2, -1))
        o = _uniform_apply(rec["o"], torch.softmax(s if rec["mask"] is None else s + rec["mask"], -1), vh)
    return _mha_layout(_eps_apply(rec["y"], _merge(o), m.out_proj.weight), layout)


_RECORD = {"norm": _norm_record, "identity": _identity_record, "ignore": _ignore_record, "attention": _attention_record}
_REWRITE = {
    "norm": _norm_rewrite, "identity": _identity_rewrite, "ignore": _ignore_rewrite, "attention": _attention_rewrite
}


def _check_not_nested(name: str, args, kwargs) -> None:
    if any(isinstance(a, torch.Tensor) and a.is_nested for a in (*args, *kwargs.values())):
        raise AttributionError(
            f"tdfunc.lrp: module {name!r} received a nested tensor: nn.TransformerEncoder converts its input to one "
            "(its fast path) in eval mode when given a src_key_padding_mask and nothing requires grad; build the "
            "encoder with enable_nested_tensor=False."
        )


def _record(r: LRPRule, name: str, seen: list) -> Rule:
    rec = _RECORD.get(r.name, _layer_record)

    def fn(module, args, kwargs, out):
        _check_not_nested(name, args, kwargs)
        seen.append((_main(out).shape, rec(r, name, module, args, kwargs, out)))
        return seen[-1][1]["value"] if r.name == "attention" else out

    return rule(fn)


def _rewrite(r: LRPRule, name: str, seen: list) -> Rule:
    rw = _REWRITE.get(r.name, _layer_rewrite)
    calls = iter(seen)

    def fn(module, args, kwargs, out):
        rec = next(calls, None)
        if rec is None or rec[0] != _main(out).shape:
            raise NotReachedError(
                f"tdfunc.lrp: f called the {type(module).__name__} module {name!r} more often, or with other shapes, "
                "than in the first of its two forwards; f must be deterministic (put dropout layers in eval())."
            )
        return rw(r, module, args, kwargs, out, rec[1])

    return rule(fn)


def _detached(v):
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, (tuple, list)):
        return type(v)(_detached(e) for e in v)
    return v


def _one_pass(r: LRPRule, name: str) -> Rule:
    """Record and rewrite in the same forward, the constants from detached values: the same value and inner
    Jacobian, but outer derivatives would miss the constants' dependence on the weights (the ``.detach()`` trick),
    so this is used only when no outer derivative can be taken (``lrp`` called with grad mode disabled)."""
    rec, rw = _RECORD.get(r.name, _layer_record), _REWRITE.get(r.name, _layer_rewrite)

    def fn(module, args, kwargs, out):
        _check_not_nested(name, args, kwargs)
        consts = rec(r, name, module, _detached(args), {k: _detached(v) for k, v in kwargs.items()}, _detached(out))
        return rw(r, module, args, kwargs, out, consts)

    return rule(fn)


# --------------------------------------------------------------------------------------- rule mapping


def _kind(m: nn.Module) -> str:
    return type(m).__name__


def _composite_rule(composite: str, m: nn.Module, first_layer: bool) -> LRPRule | None:
    if isinstance(m, _SUPPORTED):
        if composite == "epsilon_plus_flat" and first_layer:
            return lrp_flat()
        if composite in ("epsilon_plus", "epsilon_plus_flat") and isinstance(m, nn.Conv2d):
            return lrp_zplus()
        return lrp_epsilon()
    if isinstance(m, _NORMS):  # every composite: the LN rule (Ali et al., 2022)
        return lrp_norm()
    if composite == "attnlrp":
        if isinstance(m, nn.MultiheadAttention):
            return lrp_attention()
        if isinstance(m, _ACTIVATIONS):
            return lrp_identity()
    return None


def _check_module(fn: str, name: str, m: nn.Module, r: LRPRule) -> None:
    """Configurations a rule cannot handle, found before anything runs."""
    if r.name == "identity" and getattr(m, "inplace", False):
        raise AttributionError(
            f"{fn}: tdfunc.lrp_rules.identity() at {name!r} needs the input of {_kind(m)}(inplace=True), which the module "
            "overwrites; build it with inplace=False, or give it tdfunc.lrp_rules.gradient()."
        )
    if r.name == "attention":
        flags = (("add_bias_kv=True", m.bias_k is not None), ("add_zero_attn=True", m.add_zero_attn))
        bad = [what for what, on in flags if on]
        if bad:
            raise AttributionError(
                f"{fn}: nn.MultiheadAttention {name!r} has {' and '.join(bad)}, which tdfunc.lrp_rules.attention does not "
                "support; build it without, or give it tdfunc.lrp_rules.gradient() (its plain gradient)."
            )


def _check_attnlrp(fn: str, named) -> None:
    for n, m in named:
        act = getattr(m, "activation", None)
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and not (
            isinstance(act, nn.Module) or act is F.relu
        ):
            raise AttributionError(
                f"{fn}: composite 'attnlrp' gives activation modules the identity rule, but {_kind(m)} {n!r} calls "
                f"its activation as a function ({getattr(act, '__name__', act)!r}), which no rule can reach; build the "
                "layer with a module, e.g. activation=nn.GELU()."
            )


def _assign(fn: str, module: nn.Module, rules, composite) -> dict[str, LRPRule]:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module as the module, got {type(module).__name__} ({module!r:.60}).")
    if composite is not None and composite not in COMPOSITES:
        raise AttributionError(
            f"{fn}: unknown composite {composite!r}; choose one of {', '.join(map(repr, COMPOSITES))}, "
            "or composite=None to rewrite only the modules named in rules."
        )
    if rules is not None and not isinstance(rules, Mapping):
        raise TypeError(
            f"{fn}: rules must be a dict mapping a site pattern or an nn.Module subclass to a rule, got "
            f"{type(rules).__name__}; e.g. rules={{nn.Conv2d: tdfunc.lrp_rules.zplus(), 'head': tdfunc.lrp_rules.epsilon(0.1)}}."
        )
    named = [(n, m) for n, m in module.named_modules() if n]
    if not named:
        raise AttributionError(
            f"{fn}: module {_kind(module)} has no submodules, so there is no layer to apply an LRP rule to; pass the "
            "model that holds them (the module f calls)."
        )
    # nn.MultiheadAttention uses out_proj's weight directly (the submodule never runs): lrp_attention covers it
    owner = {f"{n}.out_proj": n for n, m in named if isinstance(m, nn.MultiheadAttention)}
    visible = [(n, m) for n, m in named if n not in owner]
    pats, types = [], []
    for key, r in (rules or {}).items():
        if not isinstance(r, LRPRule):
            raise TypeError(
                f"{fn}: rules[{key!r}] must be a rule from tdfunc.lrp_rules.epsilon(), lrp_zplus(), ... got "
                f"{type(r).__name__} ({r!r:.60})."
            )
        if isinstance(key, type) and issubclass(key, nn.Module):
            if not r.applies(key) and not any(issubclass(c, key) for c in _TARGETS[r.name][0]):
                raise AttributionError(
                    f"{fn}: rules gives {key.__name__} the rule {r!r}, which applies to {r.targets} only; give "
                    f"{key.__name__} a rule that applies to it (tdfunc.lrp_rules.gradient() and tdfunc.lrp_rules.ignore() apply to any module), "
                    "or remove that entry."
                )
            types.append((key, r))
        elif isinstance(key, str):
            hits = [(n, m) for n, m in named if _path_match(key.split("."), n.split("."))]
            hidden = [n for n, _ in hits if n in owner]
            hits = [(n, m) for n, m in hits if n not in owner]
            bad = [f"{n!r} ({_kind(m)})" for n, m in hits if not r.applies(type(m))]
            if bad:
                raise AttributionError(
                    f"{fn}: rules pattern {key!r} matches {', '.join(bad)}, but {r!r} applies to {r.targets} "
                    "only; narrow the pattern to those modules."
                )
            if not hits and hidden:
                raise AttributionError(
                    f"{fn}: rules pattern {key!r} matches {hidden[0]!r}, the output projection of "
                    f"nn.MultiheadAttention {owner[hidden[0]]!r}, which uses its weight directly (the submodule never "
                    f"runs); give the attention module a rule instead, e.g. "
                    f"rules={{{owner[hidden[0]]!r}: tdfunc.lrp_rules.attention(eps=0.1)}}."
                )
            if not hits:
                names = [n for n, _ in visible]
                shown = ", ".join(map(repr, names[:12])) + (", ..." if len(names) > 12 else "")
                raise AttributionError(
                    f"{fn}: rules pattern {key!r} matches no submodule of {_kind(module)}.{suggest(key, names)} "
                    f"Its submodules are [{shown}]."
                )
            pats.append((key, r))
        else:
            raise TypeError(
                f"{fn}: a rules key must be a site pattern (str) or an nn.Module subclass, got "
                f"{type(key).__name__} ({key!r:.60})."
            )
    if composite == "attnlrp":
        _check_attnlrp(fn, visible)
    out: dict[str, LRPRule] = {}
    first = True
    for n, m in visible:
        r = next((r for p, r in pats if _path_match(p.split("."), n.split("."))), None)
        if r is None:
            r = next((r for t, r in types if isinstance(m, t) and r.applies(type(m))), None)
        if r is None and composite is not None:
            r = _composite_rule(composite, m, first)
        first = first and not isinstance(m, _SUPPORTED)
        if r is not None and r.name not in ("pass", "softmax"):  # these two rewrite nothing
            _check_module(fn, n, m, r)
            out[n] = r
    return out


def _times(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``x ⊙ g``, with 0 where ``x`` is infinite and ``g`` is 0 (a masked score; LXT's convention, not nan)."""
    return torch.where(torch.isinf(x) & (g == 0), torch.zeros_like(x), x) * g


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
    for a bias-free ReLU network under LRP-0 / z⁺ the input relevance sums to it.  Every submodule
    of ``module`` gets a rule: the first ``rules`` entry whose site pattern matches its name, else
    the first whose module type it is an instance of (and that applies to it), else the
    composite's:

    * ``'epsilon'``: ε on every ``nn.Linear`` / ``nn.Conv2d``;
    * ``'epsilon_plus'``: z⁺ on ``nn.Conv2d``, ε on ``nn.Linear`` (zennit's ``EpsilonPlus``);
    * ``'epsilon_plus_flat'``: also flat on the first layer (zennit's ``EpsilonPlusFlat``);
    * ``'attnlrp'`` (transformers, Achtibat et al. 2024): ε on ``nn.Linear`` / ``nn.Conv2d``,
      :func:`tdfunc.lrp_rules.attention` on ``nn.MultiheadAttention``, :func:`tdfunc.lrp_rules.identity` on
      elementwise activation modules (GELU, SiLU, Tanh, Sigmoid, ...), :func:`tdfunc.lrp_rules.softmax` on
      ``nn.Softmax``;
    * ``None``: only the modules named in ``rules``.

    Every composite gives ``nn.LayerNorm`` / ``nn.RMSNorm`` the LN rule (:func:`tdfunc.lrp_rules.norm`:
    ``1 / std`` held constant).  Modules without a rule keep their gradient (ReLU and Dropout in eval
    then pass relevance on unchanged); so do residual sums, which are not modules: their plain gradient
    is the ``ε → 0`` limit of AttnLRP's ε rule for additions.  No canonizers: fold BatchNorm into the
    convolution before calling (:func:`tdfunc.lrp_rules.merge_batchnorm`).

    Each rule is a :func:`tdfunc.rule` rewrite keeping the module's value: ``f`` runs twice, first
    to record ``z`` and each rule's ratios ``r_t`` (outside the vector-Jacobian product), then with
    ``out = z - S + Σ_t r_t ⊙ W_t m_t(x)``.  So the relevance is exactly differentiable (e.g.
    ``‖R‖²`` in a loss: its gradient w.r.t. the weights includes ``∂r_t/∂θ``, which the usual
    ``.detach()`` trick drops).  Every target's map comes from one forward and K products.  Called
    under ``torch.no_grad()`` (where nothing can differentiate the result) ``f`` runs once, the
    constants taken from the same forward: equal values, one forward fewer.

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)``; it calls
            ``module``, must be deterministic (it runs twice).
        td: the inputs with a batch shape.
        module: the model whose submodules are rewritten.
        rules: ``{site pattern or nn.Module subclass: rule}`` from :func:`tdfunc.lrp_rules.epsilon`,
            ``lrp_zplus``, ``lrp_alpha_beta``, ``lrp_gamma``, ``lrp_flat``, ``lrp_wsquare``,
            ``lrp_zbox`` (input layer) for ``nn.Linear`` / ``nn.Conv2d``; ``lrp_norm``,
            ``lrp_attention``, ``lrp_softmax``, ``lrp_identity`` (elementwise modules),
            ``lrp_ignore`` and ``lrp_pass`` (any module); overrides the composite.
        composite: ``'epsilon'``, ``'epsilon_plus'`` (default), ``'epsilon_plus_flat'``,
            ``'attnlrp'`` or ``None``.
        in_keys: entries to attribute; default every floating-point entry outside ``"baseline"``.

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) + feature shape``.  An input entry that
        is infinite where its gradient is 0 (a masked attention score) gets 0, not ``nan``.

    Raises:
        AttributionError: unknown composite, a rule for a module type or site it does not apply to, a
            pattern matching nothing (or only an attention's ``out_proj``), bad rule parameters, an
            unsupported module configuration (in-place activation under the identity rule, attention
            with ``add_bias_kv`` / ``add_zero_attn`` or training-mode dropout, a transformer layer with a
            functional non-ReLU activation under ``'attnlrp'``, nested-tensor inputs); unknown key,
            non-float input, ``f`` output of the wrong shape.
        NotReachedError: ``f`` ran the rewritten modules differently in its two forwards.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> out = tdfunc.lrp(lambda t: net(t["x"]), td, net, composite="epsilon")
        >>> out["attr", "x"].shape                      # every class, one call
        torch.Size([5, 4, 3])

    Limits: the flat and w² rules' relevance reaches the layer input as ``x ⊙ (R / x)``, so an
    input entry that is exactly 0 gets relevance 0 there (zennit gives it its uniform share); the
    same holds for the identity rule.  Products of two tensors outside ``nn.MultiheadAttention``
    (gates, hand-written attention) keep their plain gradient unless written with modules
    (``lrp_ignore`` on one factor).  ``nn.TransformerEncoder`` in eval mode with a
    ``src_key_padding_mask`` converts its input to a nested tensor when nothing requires grad (its
    fast path): build it with ``enable_nested_tensor=False``.  ``nn.TransformerEncoderLayer``'s fused
    eval path (``torch._transformer_encoder_layer_fwd``), which skips its submodules, is not taken by
    a layer with a rewritten submodule (tdfunc's site hooks disable it); a layer without one may take
    it in the first forward only, where it changes no value.  Under ``vmap`` over examples, the
    attention module's own forward (still run, its output replaced) uses a CPU kernel without a
    batching rule: torch warns of a slow fallback.

    References:
        Bach, Binder, Montavon, Klauschen, Müller, Samek. On Pixel-Wise Explanations for Non-Linear
        Classifier Decisions by Layer-Wise Relevance Propagation. PLoS ONE 2015.
        Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin, Samek. AttnLRP: Attention-Aware
        Layer-Wise Relevance Propagation for Transformers. ICML 2024.
        Ali, Schnake, Eberle, Montavon, Müller, Wolf. XAI for Transformers: Better Explanations
        through Conservative Propagation. ICML 2022 (the LN rule, CP-LRP).
        Montavon, Binder, Lapuschkin, Samek, Müller. Layer-Wise Relevance Propagation: An Overview.
        2019.  Anders et al. Software for Dataset-wide XAI (zennit). 2021.

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward, exact),
    ``torch.compile(fullgraph=True)`` after :func:`tdfunc.install_sites`.
    """
    fn = "tdfunc.lrp"
    assigned = _assign(fn, module, rules, composite)
    p = prepare(fn, td, in_keys, baselines=False)
    # Under no_grad nothing outside can differentiate the result, so the constants may come from the same forward
    # (detached): one forward instead of two, equal values. Otherwise a first forward records them.
    two_pass = torch.is_grad_enabled()
    seen = {s: [] for s in assigned}
    if assigned and two_pass:
        intervene(f, module, edits={s: _record(r, s, seen[s]) for s, r in assigned.items()}, strict=False)(td)

    def g(xs):
        if not assigned:
            return f(with_inputs(td, xs))
        edits = {s: _rewrite(r, s, seen[s]) if two_pass else _one_pass(r, s) for s, r in assigned.items()}
        return intervene(f, module, edits=edits, strict=False)(with_inputs(td, xs))

    _, grads, k = grads_per_target(fn, g, p.x, 0, p.batch)
    n = len(p.batch)
    attrs = {key: _times(per_target(p.x[key], k, n), move_target_dim(gr, k, n)) for key, gr in grads.items()}
    return result(td.batch_size, attrs)
