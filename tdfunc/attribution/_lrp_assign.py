"""Which rule each submodule gets: ``rules`` entries (site patterns, then module types), then a composite."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import suggest
from .._match import path_match
from .._ops import OPS
from .._types import CompositeName, SoftmaxMode
from ._common import AttributionError
from ._lrp_attention import attention
from ._lrp_linear import CONVS, LAYERS, alpha_beta, epsilon, flat, is_conv1d, zbox, zplus
from ._lrp_linear import epsilon as _epsilon_rule
from ._lrp_linear import gamma as _gamma_rule
from ._lrp_rules import Rule, _Identity, check_float, gradient, identity, ignore, is_hf_rmsnorm, norm, softmax, uniform
from ._lrp_rules import beta_smooth as _beta_smooth_rule  # beta_smooth composite
from ._lrp_rules import deconvnet as _deconvnet_rule  # deconvnet composite

__all__ = ["Composite", "COMPOSITES", "CompositeName", "assign", "attnlrp", "epsilon_gamma_box"]

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
#: modules whose own parameters no rule needs: an embedding's input is integer (relevance ends at its output)
_NO_RULE_NEEDED: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


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

    def __init__(self, name: str, rules: Mapping[type[nn.Module], Rule], *, first: Rule | None = None) -> None:
        fn = "tdfunc.lrp_rules.Composite"
        for key, r in rules.items() if isinstance(rules, Mapping) else [(rules, None)]:
            if not (isinstance(key, type) and issubclass(key, nn.Module)) or not isinstance(r, Rule):
                raise TypeError(
                    f"{fn}: rules must map nn.Module subclasses to rules, e.g. {{nn.Linear: "
                    f"tdfunc.lrp_rules.epsilon()}}; got {key!r:.60}: {r!r:.60}."
                )
            if not _could_apply(r, key):
                raise AttributionError(
                    f"{fn}: rules gives {key.__name__} the rule {r!r}, which applies to {r.targets} only."
                )
        if first is not None and not isinstance(first, Rule):
            raise TypeError(f"{fn}: first must be a rule or None, got {type(first).__name__} ({first!r:.60}).")
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
    fn = "tdfunc.lrp_rules.attnlrp"
    e = check_float(fn, "eps", eps)
    if not isinstance(softmax, str) or softmax not in ("attnlrp", "constant"):
        raise AttributionError(
            f"{fn}: softmax must be 'attnlrp' (relevance through the softmax, AttnLRP) or 'constant' (attention "
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


def _kind(m: nn.Module) -> str:
    return type(m).__name__


def _check_activations(fn: str, composite: Composite, named) -> None:
    """A composite that gives activation modules the identity rule cannot reach a functional activation."""
    if not any(issubclass(nn.GELU, t) and isinstance(r, _Identity) for t, r in composite.rules.items()):
        return
    for n, m in named:
        act = getattr(m, "activation", None)
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and not (
            isinstance(act, nn.Module) or act is F.relu
        ):
            raise AttributionError(
                f"{fn}: composite {composite.name!r} gives activation modules the identity rule, but {_kind(m)} {n!r} "
                f"calls its activation as a function ({getattr(act, '__name__', act)!r}), which no rule can reach; "
                "build the layer with a module, e.g. activation=nn.GELU()."
            )


def _composite(fn: str, composite) -> Composite | None:
    if composite is None or isinstance(composite, Composite):
        return composite
    if isinstance(composite, str) and composite in COMPOSITES:
        return COMPOSITES[composite]
    if isinstance(composite, str) and composite in ZENNIT_NAMES:
        return COMPOSITES[ZENNIT_NAMES[composite]]
    if isinstance(composite, str) and composite in _ZENNIT_ELSEWHERE:
        raise AttributionError(
            f"{fn}: composite {composite!r} (zennit's) is not a name here; use {_ZENNIT_ELSEWHERE[composite]}."
        )
    raise AttributionError(
        f"{fn}: unknown composite {composite!r}; choose one of {', '.join(map(repr, COMPOSITES))}, "
        "or composite=None to rewrite only the modules named in rules."
    )


def _check_entry(fn: str, key, r, named, owner, visible, module) -> None:
    if not isinstance(r, Rule):
        raise TypeError(
            f"{fn}: rules[{key!r}] must be a rule from tdfunc.lrp_rules (epsilon(), zplus(), ...) or a "
            f"tdfunc.lrp_rules.Rule subclass, got {type(r).__name__} ({r!r:.60})."
        )
    if isinstance(key, type) and issubclass(key, nn.Module):
        if not _could_apply(r, key):
            raise AttributionError(
                f"{fn}: rules gives {key.__name__} the rule {r!r}, which applies to {r.targets} only; give "
                f"{key.__name__} a rule that applies to it (tdfunc.lrp_rules.gradient() and tdfunc.lrp_rules.ignore() "
                "apply to any module), or remove that entry."
            )
        return
    if not isinstance(key, str):
        raise TypeError(
            f"{fn}: a rules key must be a site pattern (str) or an nn.Module subclass, got "
            f"{type(key).__name__} ({key!r:.60})."
        )
    if "/" in key:
        _op_hits(fn, key, r, named, module)
        return
    hits = [(n, m) for n, m in named if path_match(key.split("."), n.split("."))]
    hidden = [n for n, _ in hits if n in owner]
    hits = [(n, m) for n, m in hits if n not in owner]
    bad = [f"{n!r} ({_kind(m)})" for n, m in hits if not r.applies_to(m)]
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


def _op_hits(fn: str, key: str, r: Rule, named, module: nn.Module) -> list[str]:
    """The submodules an operation-site key ``"path/op"`` names (checked: the op, the rule, the path)."""
    path, _, op = key.partition("/")
    if any(c in key for c in ":@") or "/" in op or not path:
        raise AttributionError(
            f"{fn}: rules key {key!r} is not an operation site 'path/op' (every call of op by the module's forward), "
            "e.g. 'model.layers.*.self_attn/matmul'; rules takes no ':input', ':output' or '@k' suffix."
        )
    if op not in OPS:
        raise AttributionError(
            f"{fn}: rules key {key!r} names the operation {op!r}, which is not one tdfunc sees; choose one of "
            f"{', '.join(OPS)}.{suggest(op, list(OPS))}"
        )
    if not r.applies_to_op(op):
        ops = f"the operations {', '.join(r.ops)} only" if r.ops else f"modules ({r.targets}), not operations"
        raise AttributionError(
            f"{fn}: rules gives the operation site {key!r} the rule {r!r}, which rewrites {ops}; give it a rule "
            "for that operation (tdfunc.lrp_rules.uniform() for products, identity() for elementwise "
            "non-linearities, gradient() or ignore() for any)."
        )
    hits = [n for n, _ in named if path_match(path.split("."), n.split("."))]
    if not hits:
        names = [n for n, _ in named]
        shown = ", ".join(map(repr, names[:12])) + (", ..." if len(names) > 12 else "")
        raise AttributionError(
            f"{fn}: rules key {key!r}: pattern {path!r} matches no submodule of {_kind(module)}.{suggest(path, names)} "
            f"Its submodules are [{shown}]."
        )
    return hits


class Coverage:
    """What the rules cover, for the first-forward check of composite 'attnlrp': modules with a rule of their own
    (every operation in their forward is the rule's), and (module, operation) pairs with an operation rule."""

    def __init__(self, composite: Composite, modules: set[str], ops: set[tuple[str, str]]):
        self.composite, self.modules, self.ops = composite, modules, ops


def assign(fn: str, module: nn.Module, rules, composite) -> dict[str, Rule]:
    """``{site: rule}`` for every submodule whose rule rewrites, checked before anything runs."""
    return plan(fn, module, rules, composite)[0]


def plan(fn: str, module: nn.Module, rules, composite) -> tuple[dict[str, Rule], Coverage | None]:
    """:func:`assign`, and what the rules cover where the composite asks for the first-forward check."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module as the module, got {type(module).__name__} ({module!r:.60}).")
    comp = _composite(fn, composite)
    if rules is not None and not isinstance(rules, Mapping):
        raise TypeError(
            f"{fn}: rules must be a dict mapping a site pattern or an nn.Module subclass to a rule, got "
            f"{type(rules).__name__}; e.g. rules={{nn.Conv2d: tdfunc.lrp_rules.zplus(), 'head': "
            "tdfunc.lrp_rules.epsilon(0.1)}."
        )
    named = [(n, m) for n, m in module.named_modules() if n]
    if not named:
        raise AttributionError(
            f"{fn}: module {_kind(module)} has no submodules, so there is no layer to apply an LRP rule to; pass the "
            "model that holds them (the module f calls)."
        )
    # nn.MultiheadAttention uses out_proj's weight directly (the submodule never runs): its rule covers it
    owner = {f"{n}.out_proj": n for n, m in named if isinstance(m, nn.MultiheadAttention)}
    visible = [(n, m) for n, m in named if n not in owner]
    for key, r in (rules or {}).items():
        _check_entry(fn, key, r, named, owner, visible, module)
    pats = [(k.split("."), r) for k, r in (rules or {}).items() if isinstance(k, str) and "/" not in k]
    op_keys = [(k, r) for k, r in (rules or {}).items() if isinstance(k, str) and "/" in k]
    types = [(k, r) for k, r in (rules or {}).items() if isinstance(k, type)]
    if comp is not None:
        _check_activations(fn, comp, visible)
    out: dict[str, Rule] = {}
    unhandled: list[str] = []
    first = comp is not None and comp.first is not None
    for n, m in visible:
        r = next((r for p, r in pats if path_match(p, n.split("."))), None)
        if r is None:
            r = next((r for t, r in types if isinstance(m, t) and r.applies_to(m)), None)
        at_first = first and comp._first_applies(m)  # type: ignore[union-attr]  # first: comp is set
        if r is None and comp is not None:
            r = comp.rule_for(m, at_first)
        first = first and not at_first
        if r is None and comp is not None and _owns_parameters(m):
            unhandled.append(f"{n!r} ({_kind(m)})")
        if r is not None and r.rewrites and not getattr(r, "_plain", False):  # ε = 0: the layer's gradient
            reason = r.check(n, m)
            if reason is not None:
                raise AttributionError(f"{fn}: {reason}")
            out[n] = r
    if unhandled:
        shown = ", ".join(unhandled[:6]) + (f", ... ({len(unhandled)} in all)" if len(unhandled) > 6 else "")
        raise AttributionError(
            f"{fn}: composite {comp.name!r} has no rule for {shown}: modules with their own parameters that would "  # type: ignore[union-attr]  # unhandled only with a composite
            "silently keep their plain gradient. Give each a rule, e.g. rules={"
            f"{unhandled[0].split(' ')[0]}: tdfunc.lrp_rules.gradient()}} to keep the plain gradient on purpose"
            + (
                ", or composite='attnlrp' for nn.MultiheadAttention."
                if any("MultiheadAttention" in u for u in unhandled)
                else "."
            )
        )
    covered_ops: set[tuple[str, str]] = set()
    ops: dict[str, Rule] = {}
    if comp is not None:
        for n, m in visible:
            for site, r in comp._op_sites(n, m).items():
                if r.rewrites:
                    ops[site] = r
                covered_ops.add((n, site.partition("/")[2]))
    for key, r in op_keys:  # the user's operation sites override the composite's
        op = key.partition("/")[2]
        for n in _op_hits(fn, key, r, named, module):
            ops.pop(f"{n}/{op}", None)
            covered_ops.add((n, op))
            if r.rewrites:
                ops[f"{n}/{op}"] = r
    out.update(ops)
    if comp is None or not comp._watch:
        return out, None
    covered = set(out) | {n for n, m in visible if _has_rule(n, m, pats, types, comp)}
    return out, Coverage(comp, covered, covered_ops)


def _has_rule(n: str, m: nn.Module, pats, types, comp: Composite) -> bool:
    """Whether ``m`` has a module rule (one that keeps the gradient included): its operations are that rule's."""
    if any(path_match(p, n.split(".")) for p, _ in pats) or any(isinstance(m, t) for t, _ in types):
        return True
    return comp.rule_for(m, False) is not None


def _owns_parameters(m: nn.Module) -> bool:
    """Whether ``m`` holds parameters of its own (not only through submodules) that a rule would need."""
    return not isinstance(m, _NO_RULE_NEEDED) and next(m.parameters(recurse=False), None) is not None
