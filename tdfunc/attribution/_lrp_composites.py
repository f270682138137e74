"""LRP composites: :class:`Composite` (a rule per module type, an optional first-layer rule), the built-in ones
by name (``COMPOSITES``, zennit's names), AttnLRP for transformers models and ``epsilon_gamma_box``.  Which rule
each submodule gets is decided in ``_lrp_assign``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .._errors import TdfuncTypeError, public
from .._types import CompositeName, SoftmaxMode
from ._common import AttributionError
from ._lrp_attention import attention, uniform
from ._lrp_linear import CONVS, LAYERS, alpha_beta, epsilon, flat, is_conv1d, zbox, zplus
from ._lrp_linear import epsilon as _epsilon_rule
from ._lrp_linear import gamma as _gamma_rule
from ._lrp_relu import beta_smooth as _beta_smooth_rule  # beta_smooth composite
from ._lrp_relu import deconvnet as _deconvnet_rule  # deconvnet composite
from ._lrp_rules import Rule, check_float, gradient, identity, ignore, is_hf_rmsnorm, norm, softmax

__all__ = ["Composite", "COMPOSITES", "CompositeName", "attnlrp", "epsilon_gamma_box"]

_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm)
#: elementwise activations that composite 'attnlrp' gives the identity rule (ReLU, LeakyReLU and Dropout in eval
#: already pass relevance unchanged as their gradient does)
_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
)
#: the rest of zennit's ``Activation`` types (which its LRP composites give ``Pass``) whose gradient is not already
#: the identity rule (ReLU, LeakyReLU, PReLU and RReLU in eval pass relevance unchanged through their gradient)
_MORE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU6,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Tanhshrink,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Threshold,
)
#: BatchNorm (not merged): relevance passes unchanged (zennit's and tdhook's ``Pass``)
_BATCHNORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _could_apply(r: Rule, key: type) -> bool:
    """Whether ``key`` or one of its subclasses is among the module types ``r`` rewrites."""
    return (
        (issubclass(key, r.modules) and not issubclass(key, r.excluded))
        or any(issubclass(c, key) for c in r.modules)
        or r.covers_type(key)
    )


class Composite:
    """A default rule per module type (the first matching entry that applies), and one for the first layer.

    ``first`` goes to the first submodule (in ``named_modules()`` order) it applies to, whatever rule
    that submodule ends up with.  Pass one as ``tdfunc.lrp(..., composite=...)``; the built-in ones are
    ``tdfunc.lrp_rules.COMPOSITES[name]`` (``composite="epsilon_plus"`` is ``COMPOSITES["epsilon_plus"]``).

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> mine = tdfunc.lrp_rules.Composite("mine", {torch.nn.Linear: tdfunc.lrp_rules.epsilon(0.1)},
        ...                                   first=tdfunc.lrp_rules.flat())
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> tdfunc.lrp(lambda t: net(t["x"]), td, net, composite=mine)["attr", "x"].shape
        torch.Size([5, 2, 3])
        >>> tdfunc.lrp_rules.COMPOSITES["epsilon_plus"].rules[torch.nn.Conv2d]
        tdfunc.lrp_rules.zplus(stabilizer=1e-06)
    """

    name: str
    rules: dict[type[nn.Module], Rule]
    first: Rule | None

    @public("tdfunc.lrp_rules.Composite")
    def __init__(self, name: str, rules: Mapping[type[nn.Module], Rule], *, first: Rule | None = None) -> None:
        for key, r in rules.items() if isinstance(rules, Mapping) else [(rules, None)]:
            if not (isinstance(key, type) and issubclass(key, nn.Module)) or not isinstance(r, Rule):
                raise TdfuncTypeError(
                    f"rules must map nn.Module subclasses to rules, e.g. {{nn.Linear: "
                    f"tdfunc.lrp_rules.epsilon()}}; got {key!r:.60}: {r!r:.60}."
                )
            if not _could_apply(r, key):
                raise AttributionError(f"rules gives {key.__name__} the rule {r!r}, which applies to {r.targets} only.")
        if first is not None and not isinstance(first, Rule):
            raise TdfuncTypeError(f"first must be a rule or None, got {type(first).__name__} ({first!r:.60}).")
        self.name, self.rules, self.first = name, dict(rules), first

    def rule_for(self, module: nn.Module, first: bool) -> Rule | None:
        """The rule for ``module`` (``first``: it is the first submodule the ``first`` rule applies to)."""
        if first:
            return self.first
        return next((r for t, r in self.rules.items() if isinstance(module, t) and r.applies_to(module)), None)

    def _first_applies(self, module: nn.Module) -> bool:
        return self.first is not None and self.first.applies_to(module)

    def _op_sites(self, name: str, module: nn.Module) -> dict[str, Rule]:
        """Operation sites under ``module`` (``"name/op"``) and their rules (composite 'attnlrp' on transformers)."""
        return {}

    #: whether :func:`tdfunc.lrp` checks, in the first forward, that every product and non-linear operation
    #: the model calls has a rule (composite 'attnlrp')
    _watch: bool = False

    def __repr__(self) -> str:
        rules = ", ".join(f"{t.__name__}: {r!r}" for t, r in self.rules.items())
        return f"Composite({self.name!r}, {{{rules}}}{'' if self.first is None else f', first={self.first!r}'})"


_QKV = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("c_attn",), ("qkv_proj",), ("query_key_value",))


def _hf_activation(m: nn.Module) -> bool:
    """transformers' activation modules (``SiLUActivation``, ``NewGELUActivation``, ``GELUActivation``, ...)."""
    return type(m).__module__ == "transformers.activations"


class _AttnLRP(Composite):
    """AttnLRP's rules, also on transformers models (eager attention): ε on their ``Conv1D``, the norm rule on
    their RMSNorm modules, identity on their activation modules, the uniform-ε rule on the matmuls of every
    attention module (QKᵀ, A·V; the softmax keeps its own Jacobian, AttnLRP's rule) and on the gated-MLP
    product ``act(gate) * up``."""

    _watch = True

    def __init__(self, name, rules, *, first=None, eps: float = 1e-6, softmax: str = "attnlrp"):
        super().__init__(name, rules, first=first)
        self.eps, self.softmax = eps, softmax

    def rule_for(self, module: nn.Module, first: bool) -> Rule | None:
        r = super().rule_for(module, first)
        if r is not None or first:
            return r
        if is_conv1d(module):
            return self.rules[nn.Linear]
        if is_hf_rmsnorm(module):
            return norm()
        if _hf_activation(module):
            return identity()
        return None

    def _op_sites(self, name: str, module: nn.Module) -> dict[str, Rule]:
        kids = module._modules
        if isinstance(module, nn.MultiheadAttention):
            return {}
        const = self.softmax == "constant"  # CP-LRP: probabilities and the gate constant, A·V and gate ⊙ up linear
        if any(all(k in kids for k in names) for names in _QKV):
            if const:
                return {f"{name}/softmax": ignore(), f"{name}/matmul": gradient()}
            return {f"{name}/matmul": uniform(self.eps)}
        if "gate_proj" in kids and "up_proj" in kids:
            if const:
                return {f"{name}/mul": gradient(), f"{name}.gate_proj": ignore()}
            return {f"{name}/mul": uniform(self.eps)}
        return {}


@public("tdfunc.lrp_rules.attnlrp")
def attnlrp(eps: float = 1e-6, *, softmax: SoftmaxMode = "attnlrp") -> Composite:
    """Composite ``'attnlrp'`` with its ε and softmax treatment chosen: AttnLRP, or CP-LRP with ``softmax="constant"``.

    ``composite="attnlrp"`` is ``attnlrp()``.  ``eps`` is the ε of every ``nn.Linear`` / convolution /
    transformers ``Conv1D`` and of the uniform rule on the attention matmuls and the gated-MLP product
    (:func:`tdfunc.lrp_rules.uniform`); ``eps=0`` is the limit LXT's efficient mode computes (the linear layers
    keep their gradient, each factor of a product gets exactly half).  ``softmax="constant"`` is CP-LRP (Ali et
    al. 2022; LXT's ``cp_LRP``): the attention probabilities and a gated MLP's gate are held constant, so
    relevance reaches the input through the values and ``up_proj`` only (``A·V`` and ``gate ⊙ up`` are then
    linear and keep their gradient); ``nn.MultiheadAttention`` gets ``attention(eps, softmax="constant")``.
    Everything else as ``'attnlrp'``: the norm rule on LayerNorm / RMSNorm, identity on activations.

    Args:
        eps: the stabilizer ``ε >= 0``.
        softmax: ``"attnlrp"`` (the softmax keeps its own Jacobian, AttnLRP's rule) or ``"constant"`` (CP-LRP).

    Returns:
        A :class:`tdfunc.lrp_rules.Composite` for ``tdfunc.lrp(..., composite=...)``.

    Raises:
        AttributionError: a negative or non-finite ``eps``, an unknown ``softmax``.
        TypeError: ``eps`` not a number.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> layer = torch.nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, activation=torch.nn.GELU(),
        ...                                          batch_first=True)
        >>> model = torch.nn.Sequential(layer, torch.nn.Flatten(), torch.nn.Linear(12, 2))
        >>> td = TensorDict({"x": torch.randn(5, 3, 4)}, batch_size=[5])
        >>> cp = tdfunc.lrp_rules.attnlrp(0.0, softmax="constant")
        >>> tdfunc.lrp(lambda t: model(t["x"]), td, model, composite=cp)["attr", "x"].shape
        torch.Size([5, 2, 3, 4])

    References:
        Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin, Samek. AttnLRP: Attention-Aware
        Layer-Wise Relevance Propagation for Transformers. ICML 2024.
        Ali, Schnake, Eberle, Montavon, Müller, Wolf. XAI for Transformers: Better Explanations through
        Conservative Propagation. ICML 2022.

    Composes with: :func:`tdfunc.lrp` (``vmap``, ``grad`` with double backward, ``torch.compile``).
    """
    e = check_float("eps", eps)
    if not isinstance(softmax, str) or softmax not in ("attnlrp", "constant"):
        raise AttributionError(
            f"softmax must be 'attnlrp' (relevance through the softmax, AttnLRP) or 'constant' (attention "
            f"probabilities held constant, CP-LRP), got {softmax!r}."
        )
    rules = _built_in("attnlrp", epsilon(e), attn=True).rules
    rules[nn.Linear] = epsilon(e)
    rules[nn.MultiheadAttention] = attention(e, softmax)
    if softmax == "constant":
        rules[nn.Softmax] = ignore()
    return _AttnLRP("attnlrp", rules, eps=e, softmax=softmax)


def _built_in(name: str, conv: Rule, *, first: Rule | None = None, attn: bool = False) -> Composite:
    """ε on nn.Linear, ``conv`` on the convolutions, the LN rule on norms, activations and BatchNorm passing
    relevance unchanged (zennit's ``layer_map_base``: ``Pass`` on activations and BatchNorm)."""
    rules: dict[type[nn.Module], Rule] = {
        **{t: conv for t in CONVS},
        nn.Linear: epsilon(),
        **{t: norm() for t in _NORMS},
    }  # every composite: the LN rule
    rules.update({t: identity() for t in (*_ACTIVATIONS, *_MORE_ACTIVATIONS, *_BATCHNORMS)})
    if attn:
        rules.update({nn.MultiheadAttention: attention(), nn.Softmax: softmax()})
    return Composite(name, rules, first=first)


class _ConvFirst(Composite):
    """The ``first`` rule on the first convolution only (zennit's ``first_map`` of ``EpsilonGammaBox``)."""

    def _first_applies(self, module: nn.Module) -> bool:
        return isinstance(module, CONVS) and super()._first_applies(module)


@public("tdfunc.lrp_rules.epsilon_gamma_box")
def epsilon_gamma_box(
    low: float | torch.Tensor,
    high: float | torch.Tensor,
    *,
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    stabilizer: float = 1e-6,
) -> Composite:
    """zennit's ``EpsilonGammaBox``: zᴮ on the first convolution, γ on the others, ε on ``nn.Linear``.

    Activations and unmerged BatchNorm pass relevance unchanged, LayerNorm / RMSNorm get the LN rule, as in
    every built-in LRP composite.  ``low`` / ``high`` are the bounds of the input (floats, or tensors
    broadcasting against it, e.g. the normalised 0 and 1 of each channel); see :func:`tdfunc.lrp_rules.zbox`.

    Args:
        low: the smallest input value (per entry, broadcasting).
        high: the largest input value.
        epsilon: ε of the rule on ``nn.Linear``.
        gamma: γ of the rule on the convolutions after the first.
        stabilizer: the other rules' stabilizer.

    Returns:
        A :class:`tdfunc.lrp_rules.Composite` named ``'epsilon_gamma_box'`` for ``tdfunc.lrp(..., composite=...)``.

    Raises:
        AttributionError: bad bounds or parameters (as the rules raise them).

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(
        ...     torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 3)
        ... )
        >>> td = TensorDict({"x": torch.rand(2, 1, 4, 4)}, batch_size=[2])
        >>> comp = tdfunc.lrp_rules.epsilon_gamma_box(0.0, 1.0)
        >>> tdfunc.lrp(lambda t: net(t["x"]), td, net, composite=comp)["attr", "x"].shape
        torch.Size([2, 3, 1, 4, 4])

    Composes with: :func:`tdfunc.lrp` (``vmap``, ``grad`` with double backward, ``torch.compile``).
    """
    try:
        rule = zbox(low, high, stabilizer)
        comp = _built_in("epsilon_gamma_box", _gamma_rule(gamma, stabilizer), first=rule)
        comp.rules[nn.Linear] = _epsilon_rule(epsilon)
    except (AttributionError, TypeError) as e:  # the rule's message, naming this function first
        raise type(e)(f"tdfunc.lrp_rules.epsilon_gamma_box: {e}") from None
    return _ConvFirst(comp.name, comp.rules, first=rule)


def _excitation() -> Composite:
    """zennit's ``ExcitationBackprop``: z⁺ on every layer; activations and BatchNorm keep their gradient."""
    return Composite("excitation_backprop", {**{t: zplus() for t in LAYERS}, **{t: gradient() for t in _BATCHNORMS}})


#: the built-in composites, by the name ``tdfunc.lrp(..., composite=name)`` takes
COMPOSITES: dict[str, Composite] = {
    "epsilon": _built_in("epsilon", epsilon()),
    "epsilon_plus": _built_in("epsilon_plus", zplus()),  # zennit's EpsilonPlus
    "epsilon_plus_flat": _built_in("epsilon_plus_flat", zplus(), first=flat()),  # zennit's EpsilonPlusFlat
    "epsilon_alpha2_beta1": _built_in("epsilon_alpha2_beta1", alpha_beta(2.0, 1.0)),  # zennit's EpsilonAlpha2Beta1
    # zennit's EpsilonAlpha2Beta1Flat
    "epsilon_alpha2_beta1_flat": _built_in("epsilon_alpha2_beta1_flat", alpha_beta(2.0, 1.0), first=flat()),
    "excitation_backprop": _excitation(),  # zennit's ExcitationBackprop
    "attnlrp": attnlrp(),  # AttnLRP (Achtibat et al. 2024)
}

#: zennit's composite class names, as ``composite=`` strings (its registered snake-case names are the keys above)
ZENNIT_NAMES: dict[str, str] = {
    "EpsilonPlus": "epsilon_plus",
    "EpsilonPlusFlat": "epsilon_plus_flat",
    "EpsilonAlpha2Beta1": "epsilon_alpha2_beta1",
    "EpsilonAlpha2Beta1Flat": "epsilon_alpha2_beta1_flat",
    "ExcitationBackprop": "excitation_backprop",
}


def _relu_only(name: str, relu: Rule) -> Composite:  # deconvnet, beta_smooth
    """zennit's ``DeconvNet`` / ``BetaSmooth``: ``relu`` on every ``nn.ReLU``, every other module on its gradient."""
    return Composite(name, {nn.ReLU: relu, nn.Module: gradient()})


COMPOSITES["deconvnet"] = _relu_only("deconvnet", _deconvnet_rule())  # zennit's DeconvNet
COMPOSITES["beta_smooth"] = _relu_only("beta_smooth", _beta_smooth_rule())  # zennit's BetaSmooth (beta_smooth=10)
ZENNIT_NAMES.update(DeconvNet="deconvnet", BetaSmooth="beta_smooth")  # deconvnet, beta_smooth

#: zennit composites that need arguments (or are not LRP): what to use instead
_ZENNIT_ELSEWHERE: dict[str, str] = {
    "EpsilonGammaBox": "tdfunc.lrp_rules.epsilon_gamma_box(low, high) (it needs the input bounds)",
    "epsilon_gamma_box": "tdfunc.lrp_rules.epsilon_gamma_box(low, high) (it needs the input bounds)",
    "GuidedBackprop": "tdfunc.guided_backprop",
    "guided_backprop": "tdfunc.guided_backprop",
}


def _composite(composite) -> Composite | None:
    if composite is None or isinstance(composite, Composite):
        return composite
    if isinstance(composite, str) and composite in COMPOSITES:
        return COMPOSITES[composite]
    if isinstance(composite, str) and composite in ZENNIT_NAMES:
        return COMPOSITES[ZENNIT_NAMES[composite]]
    if isinstance(composite, str) and composite in _ZENNIT_ELSEWHERE:
        raise AttributionError(
            f"composite {composite!r} (zennit's) is not a name here; use {_ZENNIT_ELSEWHERE[composite]}."
        )
    raise AttributionError(
        f"unknown composite {composite!r}; choose one of {', '.join(map(repr, COMPOSITES))}, "
        "or composite=None to rewrite only the modules named in rules."
    )
