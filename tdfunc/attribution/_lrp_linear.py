"""LRP rules for ``nn.Linear`` and the convolutions: ε, z⁺, αβ, γ, flat, w², zᴮ as terms of one rewrite.

A layer rule is a list of terms ``y_t(x) = W_t · m_t(x)`` (a modified weight applied to a modified
input, the bias entering the denominators only) and ratios ``r_t = c_t z / stab(den_t)``; the rewrite
is ``out = z − S + Σ_t r_t ⊙ y_t(x)`` with ``z``, ``r_t`` and ``S = Σ_t r_t ⊙ y_t(x)`` recorded, so
``R_in = Σ_t m_t(x) ⊙ W_tᵀ (r_t ⊙ g)`` for the output gradient ``g = R_out / z``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import TdfuncTypeError, public
from ._common import AttributionError
from ._lrp_rules import Rule, check_float, stab

__all__ = ["epsilon", "zplus", "alpha_beta", "gamma", "flat", "wsquare", "zbox"]

#: the layers the rules rewrite (zennit's ``Linear`` and ``Convolution``): an affine map ``W x + b``
CONVS: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, *CONVS)
TARGETS = "nn.Linear and nn.ConvNd / nn.ConvTransposeNd"  # (and transformers' Conv1D: pinned messages keep this)


def is_conv1d(m: object) -> bool:
    """transformers' ``Conv1D`` (GPT-2's projections): ``x @ W + b`` with ``W`` of shape ``(in, out)``."""
    t = m if isinstance(m, type) else type(m)
    return (
        isinstance(t, type) and issubclass(t, nn.Module) and t.__name__ == "Conv1D" and "transformers" in t.__module__
    )


_TRANSPOSED = {
    nn.ConvTranspose1d: F.conv_transpose1d,
    nn.ConvTranspose2d: F.conv_transpose2d,
    nn.ConvTranspose3d: F.conv_transpose3d,
}
_ONES = "ones"  # input modifier of the flat and w² rules: the relevance is spread as if every input were 1


class _Bound:
    """Input modifier of the zB rule: the value ``bound`` (a constant), reached as ``bound ⊙ x ⊙ (1 / x_first)``."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _pos(t):
    return None if t is None else t.clamp(min=0)


def _neg(t):
    return None if t is None else t.clamp(max=0)


def _op(m: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, opad) -> torch.Tensor:
    """The layer's affine map with weight ``w`` and bias ``b`` (``opad``: a transposed conv's output padding)."""
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        op = next(fn for t, fn in _TRANSPOSED.items() if isinstance(m, t))
        return op(x, w, b, m.stride, m.padding, opad, m.groups, m.dilation)  # type: ignore[arg-type]  # padding: a tuple here
    if isinstance(m, nn.modules.conv._ConvNd):
        return m._conv_forward(x, w, b)  # Conv1d/2d/3d (padding modes included)
    if is_conv1d(m):
        return F.linear(x, w.t(), b)
    return F.linear(x, w, b)


def _out_padding(m: nn.Module, x: torch.Tensor, kwargs) -> list[int] | None:
    """A transposed conv's output padding for this call (``output_size=`` given to its forward decides it)."""
    if not isinstance(m, nn.modules.conv._ConvTransposeNd):
        return None
    size = kwargs.get("output_size")
    nd = len(m.kernel_size)
    return m._output_padding(x, size, m.stride, m.padding, m.kernel_size, nd, m.dilation)  # type: ignore[arg-type]


def _bias_view(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
    """``b`` shaped to broadcast against the layer's output (per channel for a convolution)."""
    return b.view(-1, *[1] * len(m.kernel_size)) if isinstance(m, nn.modules.conv._ConvNd) else b


def _inputs(mod, x: torch.Tensor, inv: torch.Tensor | None) -> torch.Tensor:
    if mod is None:
        return x
    if mod is _ONES:  # x * (1 / x_first): value 1 where x != 0 (0 where x == 0), derivative 1 / x
        return x * inv  # type: ignore[operator]  # _ONES inputs always come with inv
    if isinstance(mod, _Bound):  # the bound as a constant (first forward), or bound ⊙ x ⊙ (1 / x_first)
        v = torch.as_tensor(mod.value).to(x)
        return v.expand_as(x) if inv is None else v * (x * inv)
    return mod(x)


def _own(m: nn.Module, mod, w: torch.Tensor) -> bool:
    """Whether the term is the layer's own product (identity input, own weight): then ``_op(m, x, w, ·)`` is ``out``
    up to the bias, so ``out`` is reused instead of recomputed (exact types only: a subclass may change forward)."""
    return mod is None and w is m.weight and (type(m) in LAYERS or is_conv1d(m))


def _term(m: nn.Module, x: torch.Tensor, out: torch.Tensor, inv, mod, w: torch.Tensor, opad) -> torch.Tensor:
    """``W_t m_t(x)`` without bias; for the layer's own term that is ``out - bias``, same value and Jacobian."""
    if not _own(m, mod, w):
        return _op(m, _inputs(mod, x, inv), w, None, opad)
    if m.bias is None:
        return out
    return out - _bias_view(m, m.bias)  # type: ignore[arg-type]


class _Layer(Rule):
    """A rule given as terms (input modifier, weight, bias entering the denominator only) and their ratios."""

    modules, targets = LAYERS, TARGETS
    #: whether some term has a constant input modifier (flat, w², zᴮ): zero inputs then get relevance via a probe
    constant_inputs: bool = False

    @classmethod
    def covers_type(cls, t: type) -> bool:
        return is_conv1d(t)

    def applies_to(self, module: nn.Module) -> bool:
        return super().applies_to(module) or is_conv1d(module)

    def __init__(self, **params):
        self.__dict__.update(params)

    def _bias(self, m: nn.Module) -> torch.Tensor | None:
        """The bias the rule's denominators see: none with ``zero_params=("bias",)`` (zennit's ``zero_params``)."""
        return None if "bias" in self.__dict__.get("zero_params", ()) else m.bias  # type: ignore[return-value]

    def terms(self, w: torch.Tensor, b: torch.Tensor | None) -> list:
        raise NotImplementedError

    def ratios(self, z: torch.Tensor, ys: list) -> list:
        """``r_t`` with ``R_in = Σ_t m_t(x) ⊙ W_tᵀ (r_t ⊙ g)`` for the output gradient ``g = R_out / z``."""
        raise NotImplementedError

    def record(self, module, args, kwargs, out):
        x = args[0]
        opad = _out_padding(module, x, kwargs)
        ts = self.terms(module.weight, self._bias(module))
        ones = any(t[0] is _ONES or isinstance(t[0], _Bound) for t in ts)
        inv = torch.where(x == 0, torch.zeros_like(x), 1 / torch.where(x == 0, torch.ones_like(x), x)) if ones else None
        ys, terms = [], []
        for mod, w, b in ts:
            if mod is _ONES or isinstance(mod, _Bound) or _own(module, mod, w):
                ys.append(
                    out
                    if _own(module, mod, w) and b is module.bias
                    else _op(module, torch.ones_like(x) if mod is _ONES else _inputs(mod, x, None), w, b, opad)
                )
                terms.append(_term(module, x, out, inv, mod, w, opad))
            else:  # one product serves both: the term W_t m_t(x), and the denominator's W_t m_t(x) + b_t
                t = _op(module, _inputs(mod, x, None), w, None, opad)
                ys.append(t if b is None else t + _bias_view(module, b))
                terms.append(t)
        rs = self.ratios(out, ys)
        s = sum(rt * t for rt, t in zip(rs, terms))
        return out.clone(), rs, s, inv  # clone: a later in-place op must not rewrite it

    def rewrite(self, module, args, kwargs, out, constants):
        z, rs, s, inv = constants
        opad = _out_padding(module, args[0], kwargs)
        ts = self.terms(module.weight, self._bias(module))
        return z - s + sum(rt * _term(module, args[0], out, inv, mod, w, opad) for rt, (mod, w, _) in zip(rs, ts))

    def zero_input_term(self, module, args, kwargs, out, constants, probe: torch.Tensor) -> torch.Tensor | None:
        """``Σ_t r_t ⊙ W_t (v_t ⊙ [x = 0] ⊙ P)`` over the terms whose input modifier is a constant ``v_t`` (1 for
        flat / w², the bound for zᴮ): value 0 (``P = 0``), and its gradient w.r.t. the probe ``P`` is the relevance
        those terms give the input entries that are exactly 0, which ``x ⊙ g`` cannot carry."""
        z, rs, s, inv = constants
        if inv is None:
            return None
        zero = (inv == 0).to(probe.dtype)  # inv = 1 / x, or 0 exactly where x == 0
        opad = _out_padding(module, args[0], kwargs)
        parts = [
            rt
            * _op(
                module,
                (torch.as_tensor(mod.value).to(probe) if isinstance(mod, _Bound) else 1.0) * zero * probe,
                w,
                None,
                opad,
            )
            for rt, (mod, w, _) in zip(rs, self.terms(module.weight, self._bias(module)))
            if mod is _ONES or isinstance(mod, _Bound)
        ]
        return sum(parts[1:], parts[0]) if parts else None


class _Epsilon(_Layer):
    _public = "epsilon"

    def terms(self, w, b):
        return [(None, w, b)]

    def ratios(self, z, ys):
        return [z / stab(ys[0], self.eps)]

    @property
    def _plain(self) -> bool:
        """ε = 0 with the bias in the denominator is LRP-0, whose ratio z / z is 1: the layer's own gradient (and
        no 0 / 0 where z is exactly 0), so nothing is rewritten."""
        return self.__dict__.get("eps") == 0 and "bias" not in self.__dict__.get("zero_params", ())

    # the layer's own product (no input modifier, its own weight): out = z − r ⊙ z + r ⊙ out₂ with r = z / stab(z)
    # (or stab(z − b) without the bias), so value z and Jacobian r W from the module's output itself: nothing
    # recomputed, two ops per call (the generic terms' form, kept for other rules, takes about twice as many)
    def record(self, module, args, kwargs, out):
        if not _own(module, None, module.weight):
            return super().record(module, args, kwargs, out)
        b = self._bias(module)
        den = out if b is not None or module.bias is None else out - _bias_view(module, module.bias)
        r = out / stab(den, self.eps)
        return "own", r, out - r * out

    def rewrite(self, module, args, kwargs, out, constants):
        if not isinstance(constants[0], str):
            return super().rewrite(module, args, kwargs, out, constants)
        _, r, c = constants
        return c + r * out

    def zero_input_term(self, module, args, kwargs, out, constants, probe):
        return None


class _ZPlus(_Layer):
    _public = "zplus"

    def terms(self, w, b):
        return [(_pos, _pos(w), _pos(b)), (_neg, _neg(w), None)]

    def ratios(self, z, ys):
        r = z / stab(ys[0] + ys[1], self.stabilizer)
        return [r, r]


class _AlphaBeta(_Layer):
    _public = "alpha_beta"

    def terms(self, w, b):
        return [(_pos, _pos(w), _pos(b)), (_neg, _neg(w), None), (_pos, _neg(w), _neg(b)), (_neg, _pos(w), None)]

    def ratios(self, z, ys):
        rp, rn = z / stab(ys[0] + ys[1], self.stabilizer), z / stab(ys[2] + ys[3], self.stabilizer)
        return [self.alpha * rp, self.alpha * rp, -self.beta * rn, -self.beta * rn]


class _Gamma(_Layer):
    _public = "gamma"

    def terms(self, w, b):
        g = self.gamma
        up = lambda t: None if t is None else t + g * t.clamp(min=0)  # noqa: E731
        dn = lambda t: None if t is None else t + g * t.clamp(max=0)  # noqa: E731
        return [(_pos, up(w), up(b)), (_neg, dn(w), None), (_pos, dn(w), dn(b)), (_neg, up(w), None)]

    def ratios(self, z, ys):
        rp = (z > 0).to(z.dtype) * z / stab(ys[0] + ys[1], self.stabilizer)
        rn = (z < 0).to(z.dtype) * z / stab(ys[2] + ys[3], self.stabilizer)
        return [rp, rp, rn, rn]


class _Flat(_Layer):
    _public, constant_inputs = "flat", True

    def terms(self, w, b):
        return [(_ONES, torch.ones_like(w), None)]

    def ratios(self, z, ys):
        return [z / stab(ys[0], self.stabilizer)]


class _WSquare(_Flat):
    _public = "wsquare"

    def terms(self, w, b):
        return [(_ONES, w * w, None if b is None else b * b)]


class _ZBox(_Layer):
    _public, constant_inputs = "zbox", True

    def terms(self, w, b):
        lo, hi = _Bound(self.low), _Bound(self.high)
        return [(None, w, b), (lo, _pos(w), _pos(b)), (hi, _neg(w), _neg(b))]

    def ratios(self, z, ys):
        r = z / stab(ys[0] - ys[1] - ys[2], self.stabilizer)
        return [r, -r, -r]


def _zero(zero_params) -> dict:
    """``zero_params`` (zennit's): ``("bias",)`` drops the bias from the rule's denominators; shown in the repr."""
    try:
        names = (zero_params,) if isinstance(zero_params, str) else tuple(zero_params)
    except TypeError:
        names = (zero_params,)
    if any(n != "bias" for n in names):
        raise AttributionError(
            f"zero_params names the parameters the rule treats as zero; only 'bias' is supported (a zero weight "
            f"gives no relevance at all), got {zero_params!r}; e.g. zero_params=('bias',)."
        )
    return {"zero_params": ("bias",)} if names else {}


@public("tdfunc.lrp_rules.epsilon")
def epsilon(eps: float = 1e-6, *, zero_params: Sequence[str] = ()) -> Rule:
    """LRP-ε: ``R_i = Σ_j x_i w_ij R_j / (z_j + ε sign z_j)``; ``eps=0`` gives LRP-0 (Bach et al., 2015).

    ``eps=0`` (with the bias in the denominator) is the layer's own gradient: the layer is then not rewritten.

    ``zero_params=("bias",)`` (zennit's ``zero_params``; every layer rule takes it): the rule sees the layer
    without its bias (dropped from the denominators), so the bias absorbs no relevance.

    Example:
        >>> import tdfunc
        >>> tdfunc.lrp_rules.epsilon(0.1)   # for nn.Linear / nn.Conv2d (zennit's Epsilon)
        tdfunc.lrp_rules.epsilon(eps=0.1)
    """
    return _Epsilon(eps=check_float("eps", eps), **_zero(zero_params))


@public("tdfunc.lrp_rules.zplus")
def zplus(stabilizer: float = 1e-6, *, zero_params: Sequence[str] = ()) -> Rule:
    """LRP-z⁺ (αβ with α=1, β=0): ``R_i = Σ_j (x_i⁺ w_ij⁺ + x_i⁻ w_ij⁻) R_j / z_j'`` (Montavon et al., 2017).

    ``zero_params=("bias",)``: the rule sees the layer without its bias (zennit's ``zero_params``).

    Example:
        >>> import tdfunc
        >>> tdfunc.lrp_rules.zplus()        # for nn.Linear / nn.Conv2d (zennit's ZPlus)
        tdfunc.lrp_rules.zplus(stabilizer=1e-06)
    """
    return _ZPlus(
        stabilizer=check_float("stabilizer", stabilizer),
        **_zero(zero_params),
    )


@public("tdfunc.lrp_rules.alpha_beta")
def alpha_beta(
    alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6, *, zero_params: Sequence[str] = ()
) -> Rule:
    """LRP-αβ: ``α`` × positive contributions − ``β`` × negative ones; ``alpha - beta`` must be 1.

    ``zero_params=("bias",)``: the rule sees the layer without its bias (zennit's ``zero_params``).

    Example:
        >>> import tdfunc
        >>> tdfunc.lrp_rules.alpha_beta(2, 1)   # zennit's AlphaBeta
        tdfunc.lrp_rules.alpha_beta(alpha=2.0, beta=1.0, stabilizer=1e-06)
    """
    a, b = check_float("alpha", alpha), check_float("beta", beta)
    if abs(a - b - 1.0) > 1e-12:
        raise AttributionError(
            f"alpha - beta must be 1 (relevance conservation), got alpha={alpha!r}, beta={beta!r}; "
            "e.g. alpha=2, beta=1 or alpha=1, beta=0."
        )
    return _AlphaBeta(alpha=a, beta=b, stabilizer=check_float("stabilizer", stabilizer), **_zero(zero_params))


@public("tdfunc.lrp_rules.gamma")
def gamma(gamma: float = 0.25, stabilizer: float = 1e-6, *, zero_params: Sequence[str] = ()) -> Rule:
    """LRP-γ (generalised, zennit's ``Gamma``): weights ``w + γ w⁺`` favour positive contributions.

    ``zero_params=("bias",)``: the rule sees the layer without its bias (zennit's ``zero_params``).

    Example:
        >>> import tdfunc
        >>> tdfunc.lrp_rules.gamma(0.3)
        tdfunc.lrp_rules.gamma(gamma=0.3, stabilizer=1e-06)
    """
    return _Gamma(
        gamma=check_float("gamma", gamma),
        stabilizer=check_float("stabilizer", stabilizer),
        **_zero(zero_params),
    )


@public("tdfunc.lrp_rules.flat")
def flat(stabilizer: float = 1e-6, *, zero_params: Sequence[str] = ()) -> Rule:
    """LRP-flat: relevance spread uniformly over each output's receptive field (Lapuschkin et al., 2019).

    ``zero_params=("bias",)``: the rule sees the layer without its bias (zennit's ``zero_params``).

    Example:
        >>> import tdfunc
        >>> tdfunc.lrp_rules.flat()         # the first layer of composite 'epsilon_plus_flat'
        tdfunc.lrp_rules.flat(stabilizer=1e-06)
    """
    return _Flat(
        stabilizer=check_float("stabilizer", stabilizer),
        **_zero(zero_params),
    )


@public("tdfunc.lrp_rules.wsquare")
def wsquare(stabilizer: float = 1e-6, *, zero_params: Sequence[str] = ()) -> Rule:
    """LRP-w²: ``R_i = Σ_j w_ij² R_j / Σ_i' w_i'j²`` (Montavon et al., 2017).

    ``zero_params=("bias",)``: the rule sees the layer without its bias (zennit's ``zero_params``).

    Example:
        >>> import tdfunc
        >>> tdfunc.lrp_rules.wsquare()
        tdfunc.lrp_rules.wsquare(stabilizer=1e-06)
    """
    return _WSquare(
        stabilizer=check_float("stabilizer", stabilizer),
        **_zero(zero_params),
    )


def _check_bound(name: str, v):
    if isinstance(v, torch.Tensor):
        if not v.is_floating_point():
            raise TdfuncTypeError(f"{name} must be a float or a floating-point tensor, got a {v.dtype} tensor.")
        if not bool(torch.isfinite(v).all()):
            raise AttributionError(f"{name} must be finite everywhere, got a tensor with inf or nan entries.")
        return v.detach()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TdfuncTypeError(f"{name} must be a float or a floating-point tensor, got {type(v).__name__} ({v!r:.60}).")
    if not math.isfinite(v):
        raise AttributionError(f"{name} must be finite, got {v!r}.")
    return float(v)


@public("tdfunc.lrp_rules.zbox")
def zbox(
    low: float | torch.Tensor, high: float | torch.Tensor, stabilizer: float = 1e-6, *, zero_params: Sequence[str] = ()
) -> Rule:
    """LRP-zᴮ (box rule, for the input layer; zennit's ``ZBox``, Montavon et al., 2017).

    ``zero_params=("bias",)``: the rule sees the layer without its bias (zennit's ``zero_params``).

    ``R_i = Σ_j (x_i w_ij − l_i w_ij⁺ − h_i w_ij⁻) R_j / stab(z_j − Σ_i (l_i w_ij⁺ + h_i w_ij⁻) − b_j⁺ − b_j⁻)``
    for inputs known to lie in the box ``low <= x <= high``.  ``low`` / ``high`` are floats or tensors
    broadcasting against the layer input (e.g. shape ``(1, C, 1, 1)`` for per-channel bounds); they
    are constants (detached).  An input entry that is exactly 0 gets its bound terms' share, as in
    zennit (see :func:`tdfunc.lrp`, zero inputs).

    Example:
        >>> import tdfunc
        >>> tdfunc.lrp_rules.zbox(-1.0, 1.0)    # e.g. rules={"conv1": ...} for inputs in [-1, 1]
        tdfunc.lrp_rules.zbox(low=-1.0, high=1.0, stabilizer=1e-06)
    """
    lo, hi = _check_bound("low", low), _check_bound("high", high)
    try:
        bad = bool((torch.as_tensor(lo) > torch.as_tensor(hi)).any())
    except RuntimeError as e:
        raise AttributionError(f"low and high must broadcast against each other: {e}") from None
    if bad:
        raise AttributionError("low must be <= high everywhere (the box the inputs lie in), got low > high.")
    return _ZBox(low=lo, high=hi, stabilizer=check_float("stabilizer", stabilizer), **_zero(zero_params))
