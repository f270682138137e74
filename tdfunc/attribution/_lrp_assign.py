"""Which LRP rule rewrites which module of a model: ``rules`` by site pattern or type, then the composite,
checked for modules and operations that no rule covers (:func:`plan`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import nn

from .._errors import TdfuncTypeError, suggest
from .._match import path_match
from .._ops import OPS
from ._common import AttributionError
from ._lrp_composites import Composite, _composite, _could_apply
from ._lrp_rules import Rule, _Identity

__all__ = ["Coverage", "assign", "plan"]


#: modules whose own parameters no rule needs: an embedding's input is integer (relevance ends at its output)
_NO_RULE_NEEDED: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


def _kind(m: nn.Module) -> str:
    return type(m).__name__


def _check_activations(composite: Composite, named) -> None:
    """A composite that gives activation modules the identity rule cannot reach a functional activation."""
    if not any(issubclass(nn.GELU, t) and isinstance(r, _Identity) for t, r in composite.rules.items()):
        return
    for n, m in named:
        act = getattr(m, "activation", None)
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and not (
            isinstance(act, nn.Module) or act is F.relu
        ):
            raise AttributionError(
                f"composite {composite.name!r} gives activation modules the identity rule, but {_kind(m)} {n!r} "
                f"calls its activation as a function ({getattr(act, '__name__', act)!r}), which no rule can reach; "
                "build the layer with a module, e.g. activation=nn.GELU()."
            )


def _check_entry(key, r, named, owner, visible, module) -> None:
    if not isinstance(r, Rule):
        raise TdfuncTypeError(
            f"rules[{key!r}] must be a rule from tdfunc.lrp_rules (epsilon(), zplus(), ...) or a "
            f"tdfunc.lrp_rules.Rule subclass, got {type(r).__name__} ({r!r:.60})."
        )
    if isinstance(key, type) and issubclass(key, nn.Module):
        if not _could_apply(r, key):
            raise AttributionError(
                f"rules gives {key.__name__} the rule {r!r}, which applies to {r.targets} only; give "
                f"{key.__name__} a rule that applies to it (tdfunc.lrp_rules.gradient() and tdfunc.lrp_rules.ignore() "
                "apply to any module), or remove that entry."
            )
        return
    if not isinstance(key, str):
        raise TdfuncTypeError(
            f"a rules key must be a site pattern (str) or an nn.Module subclass, got "
            f"{type(key).__name__} ({key!r:.60})."
        )
    if "/" in key:
        _op_hits(key, r, named, module)
        return
    hits = [(n, m) for n, m in named if path_match(key.split("."), n.split("."))]
    hidden = [n for n, _ in hits if n in owner]
    hits = [(n, m) for n, m in hits if n not in owner]
    bad = [f"{n!r} ({_kind(m)})" for n, m in hits if not r.applies_to(m)]
    if bad:
        raise AttributionError(
            f"rules pattern {key!r} matches {', '.join(bad)}, but {r!r} applies to {r.targets} "
            "only; narrow the pattern to those modules."
        )
    if not hits and hidden:
        raise AttributionError(
            f"rules pattern {key!r} matches {hidden[0]!r}, the output projection of "
            f"nn.MultiheadAttention {owner[hidden[0]]!r}, which uses its weight directly (the submodule never "
            f"runs); give the attention module a rule instead, e.g. "
            f"rules={{{owner[hidden[0]]!r}: tdfunc.lrp_rules.attention(eps=0.1)}}."
        )
    if not hits:
        names = [n for n, _ in visible]
        shown = ", ".join(map(repr, names[:12])) + (", ..." if len(names) > 12 else "")
        raise AttributionError(
            f"rules pattern {key!r} matches no submodule of {_kind(module)}.{suggest(key, names)} "
            f"Its submodules are [{shown}]."
        )


def _op_hits(key: str, r: Rule, named, module: nn.Module) -> list[str]:
    """The submodules an operation-site key ``"path/op"`` names (checked: the op, the rule, the path)."""
    path, _, op = key.partition("/")
    if any(c in key for c in ":@") or "/" in op or not path:
        raise AttributionError(
            f"rules key {key!r} is not an operation site 'path/op' (every call of op by the module's forward), "
            "e.g. 'model.layers.*.self_attn/matmul'; rules takes no ':input', ':output' or '@k' suffix."
        )
    if op not in OPS:
        raise AttributionError(
            f"rules key {key!r} names the operation {op!r}, which is not one tdfunc sees; choose one of "
            f"{', '.join(OPS)}.{suggest(op, list(OPS))}"
        )
    if not r.applies_to_op(op):
        ops = f"the operations {', '.join(r.ops)} only" if r.ops else f"modules ({r.targets}), not operations"
        raise AttributionError(
            f"rules gives the operation site {key!r} the rule {r!r}, which rewrites {ops}; give it a rule "
            "for that operation (tdfunc.lrp_rules.uniform() for products, identity() for elementwise "
            "non-linearities, gradient() or ignore() for any)."
        )
    hits = [n for n, _ in named if path_match(path.split("."), n.split("."))]
    if not hits:
        names = [n for n, _ in named]
        shown = ", ".join(map(repr, names[:12])) + (", ..." if len(names) > 12 else "")
        raise AttributionError(
            f"rules key {key!r}: pattern {path!r} matches no submodule of {_kind(module)}.{suggest(path, names)} "
            f"Its submodules are [{shown}]."
        )
    return hits


class Coverage:
    """What the rules cover, for the first-forward check of composite 'attnlrp': modules with a rule of their own
    (every operation in their forward is the rule's), and (module, operation) pairs with an operation rule."""

    def __init__(self, composite: Composite, modules: set[str], ops: set[tuple[str, str]]):
        self.composite, self.modules, self.ops = composite, modules, ops


def assign(module: nn.Module, rules, composite) -> dict[str, Rule]:
    """``{site: rule}`` for every submodule whose rule rewrites, checked before anything runs."""
    return plan(module, rules, composite)[0]


def plan(module: nn.Module, rules, composite) -> tuple[dict[str, Rule], Coverage | None]:
    """:func:`assign`, and what the rules cover where the composite asks for the first-forward check."""
    if not isinstance(module, nn.Module):
        raise TdfuncTypeError(f"expected an nn.Module as the module, got {type(module).__name__} ({module!r:.60}).")
    comp = _composite(composite)
    if rules is not None and not isinstance(rules, Mapping):
        raise TdfuncTypeError(
            f"rules must be a dict mapping a site pattern or an nn.Module subclass to a rule, got "
            f"{type(rules).__name__}; e.g. rules={{nn.Conv2d: tdfunc.lrp_rules.zplus(), 'head': "
            "tdfunc.lrp_rules.epsilon(0.1)}."
        )
    named = [(n, m) for n, m in module.named_modules() if n]
    if not named:
        raise AttributionError(
            f"module {_kind(module)} has no submodules, so there is no layer to apply an LRP rule to; pass the "
            "model that holds them (the module f calls)."
        )
    # nn.MultiheadAttention uses out_proj's weight directly (the submodule never runs): its rule covers it
    owner = {f"{n}.out_proj": n for n, m in named if isinstance(m, nn.MultiheadAttention)}
    visible = [(n, m) for n, m in named if n not in owner]
    for key, r in (rules or {}).items():
        _check_entry(key, r, named, owner, visible, module)
    pats = [(k.split("."), r) for k, r in (rules or {}).items() if isinstance(k, str) and "/" not in k]
    op_keys = [(k, r) for k, r in (rules or {}).items() if isinstance(k, str) and "/" in k]
    types = [(k, r) for k, r in (rules or {}).items() if isinstance(k, type)]
    if comp is not None:
        _check_activations(comp, visible)
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
                raise AttributionError(f"{reason}")
            out[n] = r
    if unhandled:
        shown = ", ".join(unhandled[:6]) + (f", ... ({len(unhandled)} in all)" if len(unhandled) > 6 else "")
        raise AttributionError(
            f"composite {comp.name!r} has no rule for {shown}: modules with their own parameters that would "  # type: ignore[union-attr]  # unhandled only with a composite
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
        for n in _op_hits(key, r, named, module):
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
