"""The LRP rule protocol (:class:`Rule`) and the rules that need no layer algebra.

Each rule is a value-preserving rewrite of a module's output, ``out == z`` in value, whose Jacobian
with respect to the module input is the rule's modified one, so that input × gradient of the
rewritten model is the LRP relevance.  Every value ``v`` carries the relevance ``R_v = v ⊙ g_v``
(``g`` the modified gradient), so a rule with modified Jacobian ``J̃`` gives
``R_in = x ⊙ J̃ᵀ (R_out / y)``.  The rewrite is ``out = z − S + Σ_t r_t ⊙ y_t(x)`` where ``z``, the
ratios ``r_t`` and ``S = Σ_t r_t ⊙ y_t(x)`` come from a first forward (:meth:`Rule.record`), outside
the vector-Jacobian product: the inner product sees ``Σ_t r_t ∂y_t/∂x`` only, outer derivatives see
``z``, the true output, and ``r_t`` as functions of the weights and inputs, so the relevance is
exactly differentiable (the usual ``.detach()`` of ``r_t`` drops ``∂r_t/∂θ``).

Transformer rules (AttnLRP, Achtibat et al. 2024) in this form: softmax (Prop. 3.1) is its own
Jacobian, no rewrite; the uniform-ε rule on a matmul (Prop. 3.3) and ε on the projections live in
``_lrp_attention``; identity for an elementwise ``y = σ(x)`` (Prop. 3.4) has Jacobian ``diag(y / x)``;
ε on a residual sum ``a + b`` (Eq. 8) has the plain gradient as its ``ε → 0`` limit, so sums (not
modules) keep their gradient; LayerNorm / RMSNorm hold ``1 / std`` constant (Ali et al. 2022).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from .._errors import TdfuncTypeError, public
from .._rewrite import Rewrite, main_output
from ._common import AttributionError

__all__ = ["Rule", "gradient", "identity", "passthrough", "ignore", "softmax", "norm"]

#: the elementwise operations the identity rule rewrites at operation sites (``"mlp/gelu"``)
ELEMENTWISE_OPS: tuple[str, ...] = ("gelu", "silu", "tanh", "sigmoid", "exp", "relu")
#: the products of two tensors the uniform rule rewrites at operation sites (``"self_attn/matmul"``)
PRODUCT_OPS: tuple[str, ...] = ("matmul", "bmm", "mul", "einsum")


def is_hf_rmsnorm(m: object) -> bool:
    """A transformers-style RMSNorm module (``LlamaRMSNorm``, ``Qwen2RMSNorm``, ...): not ``nn.RMSNorm``, named so."""
    t = m if isinstance(m, type) else type(m)
    return (
        isinstance(t, type)
        and issubclass(t, nn.Module)
        and not issubclass(t, nn.RMSNorm)
        and t.__name__.endswith("RMSNorm")
    )


def stab(d: torch.Tensor, eps: float) -> torch.Tensor:
    """``d + eps * sign(d)`` with sign(0) = +1 (zennit's convention); the same values as that formula, in fewer ops."""
    return torch.where(d >= 0, d + eps, d - eps)


def check_float(name: str, v, *, low: float = 0.0) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TdfuncTypeError(f"{name} must be a float, got {type(v).__name__} ({v!r:.60}).")
    if not math.isfinite(v) or v < low:
        raise AttributionError(f"{name} must be a finite number >= {low:g}, got {v!r}.")
    return float(v)


class Rule(Rewrite):
    """An LRP rule: a rewrite of a module's output that keeps its value and has the rule's Jacobian.

    :func:`tdfunc.lrp` runs ``f`` twice.  In the first forward each rewritten call's :meth:`record`
    returns the constants the rule needs (ratios, the output ``z`` itself); in the second,
    :meth:`rewrite` returns the module's new output from the call and those constants.  It must equal
    the output in value; its Jacobian with respect to the inputs is what relevance flows through
    (``R_in = x ⊙ J̃ᵀ (R_out / z)``).  The usual form is ``z − S + r ⊙ y(x)`` with ``r`` and
    ``S = r ⊙ y(x)`` recorded: value ``z``, Jacobian ``r ∂y/∂x``, and outer derivatives (``grad`` of
    a loss on the relevance) see the constants as functions of the weights.  Under ``torch.no_grad()``
    one forward records (from detached values) and rewrites.  A subclass sets:

    * ``modules`` / ``excluded``: the module types it rewrites (default any ``nn.Module``), or overrides
      :meth:`applies_to`; ``targets`` names them in messages;
    * :meth:`record` and :meth:`rewrite` (required; ``args`` / ``kwargs`` are the module call's, the
      module carries the call's parameters); clone a recorded output (a later in-place op may change it);
    * optionally :meth:`check` (configurations it cannot handle, before anything runs); a call it
      cannot handle raises ``AttributionError`` with the reason, which ``tdfunc.lrp`` prefixes with the
      rule, site and module type; :meth:`recorded_output` (what the first forward continues with);
      ``rewrites = False`` for a rule that keeps the plain gradient (nothing recorded or rewritten).

    ``repr`` shows the public attributes: ``MyEps(eps=0.1)``.

    Example (LRP-ε on ``nn.Linear`` written against the protocol, equal to ``epsilon(0.1)``):
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> class MyEps(tdfunc.lrp_rules.Rule):
        ...     modules, targets = (torch.nn.Linear,), "nn.Linear"
        ...     def __init__(self, eps):
        ...         self.eps = eps
        ...     def record(self, m, args, kwargs, z):  # r = z / (z + ε sign z), S = r ⊙ W x
        ...         r = z / torch.where(z >= 0, z + self.eps, z - self.eps)
        ...         return z.clone(), r, r * (z - m.bias)
        ...     def rewrite(self, m, args, kwargs, out, c):  # z − S + r ⊙ W x: value z, Jacobian r W
        ...         z, r, s = c
        ...         return z - s + r * torch.nn.functional.linear(args[0], m.weight)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> td, f = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5]), lambda t: net(t["x"])
        >>> a = tdfunc.lrp(f, td, net, rules={torch.nn.Linear: MyEps(0.1)}, composite=None)
        >>> b = tdfunc.lrp(f, td, net, rules={torch.nn.Linear: tdfunc.lrp_rules.epsilon(0.1)}, composite=None)
        >>> torch.allclose(a["attr", "x"], b["attr", "x"]), MyEps(0.1)
        (True, MyEps(eps=0.1))
    """

    modules: ClassVar[tuple[type, ...]] = (nn.Module,)
    excluded: ClassVar[tuple[type, ...]] = ()
    targets: ClassVar[str] = "any module"
    #: False for rules that keep the plain gradient: nothing is recorded or rewritten (no site hook either)
    rewrites: ClassVar[bool] = True
    _public: ClassVar[str | None] = None  # built-in rules: the tdfunc.lrp_rules constructor that builds them
    #: the operations (``tdfunc`` operation names, ``"*"`` for any) the rule rewrites at operation sites
    #: (``rules={"model.layers.*.self_attn/matmul": ...}``): :meth:`record` / :meth:`rewrite` then get the torch
    #: function in place of the module
    ops: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def covers_type(cls, t: type) -> bool:
        """Whether the rule rewrites modules of type ``t`` beyond ``modules`` (duck-typed transformers classes)."""
        return False

    def applies_to_op(self, op: str) -> bool:
        """Whether the rule can rewrite the operation ``op`` at an operation site."""
        return "*" in self.ops or op in self.ops

    def applies_to(self, module: nn.Module) -> bool:
        """Whether the rule can rewrite ``module`` (by default: an instance of ``modules``, not of ``excluded``)."""
        return isinstance(module, self.modules) and not isinstance(module, self.excluded)

    def check(self, name: str, module: nn.Module) -> str | None:
        """Why the rule cannot rewrite ``module`` (at site ``name``), found before anything runs, or None."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in getattr(self, "__dict__", {}).items() if k[0] != "_")
        name = f"tdfunc.lrp_rules.{self._public}" if self._public else type(self).__qualname__
        return f"{name}({args})"


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The call's first positional tensor input, else its first keyword tensor (``norm(hidden_states=x)``)."""
    if args:
        return args[0]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


class _Gradient(Rule):
    rewrites, _public, ops = False, "gradient", ("*",)


class _Softmax(Rule):
    modules, targets, rewrites, _public, ops = (nn.Softmax,), "nn.Softmax", False, "softmax", ("softmax",)


class _Ignore(Rule):
    _public, ops = "ignore", ("*",)

    def record(self, module, args, kwargs, out):
        return main_output(out).clone()

    def rewrite(self, module, args, kwargs, out, constants):
        return constants.clone()  # a copy: an in-place op downstream must not change the record


class _Identity(Rule):
    modules, _public, ops = (nn.Module,), "identity", ELEMENTWISE_OPS
    excluded = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.Softmax)
    targets = "elementwise modules (not nn.Linear, nn.ConvNd, nn.MultiheadAttention or nn.Softmax)"

    def check(self, name, module):
        if getattr(module, "inplace", False):
            return (
                f"{self!r} at {name!r} needs the input of {type(module).__name__}(inplace=True), which the module "
                "overwrites; build it with inplace=False, or give it tdfunc.lrp_rules.gradient()."
            )
        return None

    def record(self, module, args, kwargs, out):
        x, y = _first_input(args, kwargs), main_output(out)
        if not isinstance(x, torch.Tensor) or x.shape != y.shape:
            got = f"input {tuple(x.shape)}" if isinstance(x, torch.Tensor) else "no positional tensor input"
            raise AttributionError(
                f"needs an elementwise module whose output has its input's shape, got {got} and output "
                f"{tuple(y.shape)}; use tdfunc.lrp_rules.gradient() or tdfunc.lrp_rules.ignore() there."
            )
        nz = x != 0
        ratio = torch.where(nz, y / torch.where(nz, x, torch.ones_like(x)), torch.zeros_like(y))
        return y.clone(), ratio, ratio * x

    def rewrite(self, module, args, kwargs, out, constants):
        z, ratio, s = constants
        return z - s + ratio * _first_input(args, kwargs)


class _Pass(_Identity):
    _public = "passthrough"


class _Norm(Rule):
    modules, targets, _public = (nn.LayerNorm, nn.RMSNorm), "nn.LayerNorm and nn.RMSNorm", "norm"  # + HF RMSNorm

    @classmethod
    def covers_type(cls, t: type) -> bool:
        return is_hf_rmsnorm(t)

    def applies_to(self, module: nn.Module) -> bool:
        return super().applies_to(module) or is_hf_rmsnorm(module)

    @staticmethod
    def _centred(module, x: torch.Tensor) -> torch.Tensor:
        """``x − mean(x)`` over the normalised dims (LayerNorm), ``x`` itself (RMSNorm)."""
        if isinstance(module, nn.RMSNorm):
            return x
        return x - x.mean(tuple(range(-len(module.normalized_shape), 0)), keepdim=True)

    @staticmethod
    def _map(module, c: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        y = c * inv
        return y if module.weight is None else y * module.weight

    def record(self, module, args, kwargs, out):
        if is_hf_rmsnorm(module):  # y = w ⊙ x / rms(x), 1 / rms held constant: the ratio y / x per entry
            return _Identity.record(self, module, args, kwargs, out)  # the same algebra
        x = args[0]
        c = self._centred(module, x)
        eps = module.eps
        if eps is None:  # nn.RMSNorm's default, as F.rms_norm
            eps = torch.finfo(x.dtype).eps
        inv = torch.rsqrt((c * c).mean(tuple(range(-len(module.normalized_shape), 0)), keepdim=True) + eps)
        return out.clone(), inv, self._map(module, c, inv)

    def rewrite(self, module, args, kwargs, out, constants):
        z, inv, s = constants
        if is_hf_rmsnorm(module):
            return z - s + inv * _first_input(args, kwargs)
        return z - s + self._map(module, self._centred(module, args[0]), inv)


@public("tdfunc.lrp_rules.gradient")
def gradient() -> Rule:
    """No rewrite: the module keeps its plain gradient, so relevance crosses it as input × gradient does.

    For ``nn.Linear`` / a convolution that is LRP-0 with the bias's share dropped; for ReLU, LeakyReLU and
    Dropout in eval it equals the identity rule; on any other module it opts that module out of the
    composite's rule (e.g. ``rules={nn.LayerNorm: tdfunc.lrp_rules.gradient()}`` for LayerNorm's own gradient).
    Nothing is recorded or recomputed.

    Returns:
        A :class:`Rule` for any module.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> a = tdfunc.lrp(lambda t: net(t["x"]), td, net, rules={torch.nn.Linear: tdfunc.lrp_rules.gradient()},
        ...                composite=None)
        >>> b = tdfunc.input_x_gradient(lambda t: net(t["x"]), td)
        >>> torch.allclose(a["attr", "x"], b["attr", "x"])
        True

    Composes with: ``vmap``, ``grad``, ``torch.compile`` (it changes nothing).
    """
    return _Gradient()


@public("tdfunc.lrp_rules.identity")
def identity() -> Rule:
    """Identity rule for elementwise modules (AttnLRP Prop. 3.4): ``R_in = R_out``.

    For a shape-preserving elementwise ``y = σ(x)`` (GELU, SiLU, Tanh, Sigmoid, Dropout, ...) the relevance
    is passed on unchanged, which in the input × gradient form is the Jacobian ``diag(y / x)``:
    the rewrite is ``y − S + r ⊙ x`` with ``r = y / x`` and ``S = r ⊙ x`` from the first forward.
    An input entry that is exactly 0 gets ``r = 0`` (relevance 0 there: it cannot be written as
    ``x ⊙ g``); for σ(0) = 0 activations that is also what the rule gives.

    Returns:
        A :class:`Rule` for modules whose output has their input's shape (not nn.Linear, nn.ConvNd,
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
    return _Identity()


@public("tdfunc.lrp_rules.ignore")
def ignore() -> Rule:
    """No relevance flows through the module: its output is held constant (taken from the first forward).

    The module's inputs get no relevance along this path; where its output multiplies another path,
    that path gets all of it.  On the ``nn.Softmax`` of a hand-written attention this is CP-LRP's rule
    for attention heads (Ali et al. 2022): the probabilities are constants, relevance flows through the
    values only (for ``nn.MultiheadAttention`` use ``tdfunc.lrp_rules.attention(softmax="constant")``).
    Outer derivatives still see the output as a function of the weights and inputs.

    Returns:
        A :class:`Rule` for any module.

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
    return _Ignore()


@public("tdfunc.lrp_rules.softmax")
def softmax() -> Rule:
    """The softmax rule of AttnLRP (Prop. 3.1) for ``nn.Softmax`` modules: ``R_in = x ⊙ (R − s Σ R)``.

    With ``R = s ⊙ g`` this is ``x ⊙ (diag(s) − s sᵀ) g`` — softmax's own Jacobian, so the rule
    rewrites nothing (it names the choice; composite ``'attnlrp'`` uses it).  Masked scores
    (``-inf``) have ``s = 0`` and a zero gradient: they get relevance 0, also when the scores are the
    attributed input (``x ⊙ g`` is taken as 0 where ``x`` is infinite and ``g`` is 0, not ``nan``).
    The alternative is :func:`tdfunc.lrp_rules.ignore` (probabilities held constant, CP-LRP).  The rule is not
    conservative: ``Σ R_in = Σ R − (Σ_i x_i s_i) Σ R``.

    Returns:
        A :class:`Rule` for ``nn.Softmax``.

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
    return _Softmax()


@public("tdfunc.lrp_rules.norm")
def norm() -> Rule:
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
        A :class:`Rule` for ``nn.LayerNorm`` and ``nn.RMSNorm``.

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
    return _Norm()


@public("tdfunc.lrp_rules.passthrough")
def passthrough() -> Rule:
    """zennit's and tdhook's ``Pass``: relevance crosses an elementwise module unchanged, ``R_in = R_out``.

    The same rule as :func:`tdfunc.lrp_rules.identity` (AttnLRP's name for it), under the name zennit and
    tdhook users know; not the plain gradient (:func:`tdfunc.lrp_rules.gradient`, which the deprecated
    ``tdfunc.lrp_pass`` was).  The LRP composites give it to activations and unmerged BatchNorm.  An input
    entry that is exactly 0 gets relevance 0 (see :func:`tdfunc.lrp_rules.identity`).

    Returns:
        A :class:`Rule` for modules whose output has their input's shape (not nn.Linear, nn.ConvNd,
        nn.MultiheadAttention or nn.Softmax).

    Raises:
        AttributionError (from :func:`tdfunc.lrp`): the module's output shape differs from its input's, or
        it is built with ``inplace=True``.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> lin = lambda i, o: torch.nn.Linear(i, o, bias=False, dtype=torch.float64)
        >>> net = torch.nn.Sequential(lin(3, 4), torch.nn.Tanh(), lin(4, 2))
        >>> td = TensorDict({"x": torch.randn(5, 3, dtype=torch.float64)}, batch_size=[5])
        >>> rules = {torch.nn.Linear: tdfunc.lrp_rules.epsilon(0.0), torch.nn.Tanh: tdfunc.lrp_rules.passthrough()}
        >>> r = tdfunc.lrp(lambda t: net(t["x"]), td, net, rules=rules)["attr", "x"]
        >>> torch.allclose(r.sum(-1), net(td["x"]))          # Tanh passes relevance: conserved
        True

    Composes with: ``vmap``, ``grad`` (double backward, exact), ``torch.compile(fullgraph=True)``.
    """
    return _Pass()
