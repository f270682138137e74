"""The first-forward check of composite ``'attnlrp'``: every product and non-linearity the model computes has a rule.

A transformers model computes its attention products (``q @ kᵀ``, ``A @ v``), its gated-MLP product and some
activations with torch functions inside a module's forward, where module rules cannot reach.  Left alone they keep
their plain gradient, which is not AttnLRP's rule: a silently different relevance.  So while the first forward
runs, a :class:`torch.overrides.TorchFunctionMode` and temporary module hooks see every such operation with the
innermost module running it (as operation sites are named), and an operation that neither a rule of that module
(or of a module around it) nor an operation-site rule covers is an error that names it.  Only operations on
values that depend on ``f``'s inputs count: a product with a parameter or with a value computed with grad mode off
or from constants only (transformers' rotary table, masks) is linear in the input.  A model passes once per
composite and rules: later calls skip the check.  A model built only of ``torch.nn`` modules is not watched
(their operations are known: ``nn.MultiheadAttention`` has its rule, and the mode would turn off
``nn.TransformerEncoder``'s fast path in the first forward only).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._ops import OP_OF
from ._common import AttributionError
from ._lrp_assign import Coverage

__all__ = ["watched"]

_PRODUCTS = ("matmul", "bmm", "baddbmm", "einsum")
_ELEMENTWISE = ("gelu", "silu", "tanh", "sigmoid", "exp")
_NORMS = ("layer_norm", "rms_norm", "group_norm")
_CHECKED: weakref.WeakKeyDictionary[nn.Module, set] = weakref.WeakKeyDictionary()


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


class _Watch(torch.overrides.TorchFunctionMode):
    """Sees every torch call; ``const`` holds the tensors that do not depend on ``f``'s inputs: parameters (added
    when their module starts), what is computed with grad mode off or from constants only (a rotary table, a mask).
    A product with a constant is linear, an activation of a constant is a constant: only the others need rules."""

    def __init__(self, scope: list, found: list, const: dict):
        super().__init__()
        self.scope, self.found, self.const = scope, found, const

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ts = _tensors(args, kwargs)
        const = self.const
        if not torch.is_grad_enabled() or all(id(t) in const for t in ts):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    const[id(t)] = t  # held: the id stays this tensor's while the forward runs
            return out
        op = OP_OF.get(func)
        if op is None or not self.scope:
            return out
        name, module, covered, ops = self.scope[-1]
        if covered or op in ops:
            return out
        live = [t for t in ts if id(t) not in const]
        two = len(live) >= 2 and all(t.is_floating_point() for t in live)
        if (op in _PRODUCTS or op == "mul") and two:
            self.found.append((name, module, op))
        elif op in _ELEMENTWISE or op in _NORMS or op == "scaled_dot_product_attention":
            self.found.append((name, module, op))
        return out


def _advice(comp: str, name: str, module: nn.Module, op: str, calls: int) -> str:
    where = f"the {op!r} called by {name!r} ({type(module).__name__}){f' ({calls} calls)' if calls > 1 else ''}"
    if op == "scaled_dot_product_attention":
        return (
            f"composite {comp!r} cannot reach inside {where}: the attention matmuls and softmax run in one "
            "fused kernel. Load the model with eager attention (transformers: from_pretrained(..., "
            "attn_implementation='eager'), or model.set_attn_implementation('eager')), whose matmuls the rules reach."
        )
    rule = "uniform" if op in _PRODUCTS or op == "mul" else "identity" if op in _ELEMENTWISE else "gradient"
    what = (
        "a product of two tensors (AttnLRP: the uniform rule)"
        if rule == "uniform"
        else "an elementwise non-linearity (AttnLRP: the identity rule)"
        if rule == "identity"
        else "a normalisation (AttnLRP: the norm rule; give the module that calls it tdfunc.lrp_rules.norm() or "
        "identity() if it is elementwise)"
    )
    return (
        f"composite {comp!r} has no rule for {where}, {what}; its plain gradient would be used silently. "
        f"Give it a rule, e.g. rules={{{f'{name}/{op}'!r}: tdfunc.lrp_rules.{rule}()}}, or "
        "tdfunc.lrp_rules.gradient() there to keep the plain gradient on purpose."
    )


def watched(module: nn.Module, cov: Coverage) -> Callable[[Callable], Callable] | None:
    """A wrapper for ``f``'s first forward that checks coverage (None: this model passed already, or compiling)."""
    key = (frozenset(cov.modules), frozenset(cov.ops))  # what the check depends on (not the composite object)
    if key in _CHECKED.get(module, ()):
        return None
    names = {m: n for n, m in module.named_modules() if n}
    if all(type(m).__module__.startswith("torch.") for m in (module, *names)):
        return None  # torch.nn's own modules: known statically (nn.MultiheadAttention has its rule; assign checks)
    ops_of: dict[str, frozenset[str]] = {}
    for n, op in cov.ops:
        ops_of[n] = ops_of.get(n, frozenset()) | {op}

    def wrap(f: Callable) -> Callable:
        def g(*args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():
                return f(*args, **kwargs)
            scope: list = []
            found: list = []
            const: dict = {}

            def pre(m, a, kw):
                n = names[m]
                for t in (*m._parameters.values(), *m._buffers.values()):
                    if isinstance(t, torch.Tensor):
                        const[id(t)] = t
                covered = n in cov.modules or bool(scope and scope[-1][2])
                scope.append((n, m, covered, ops_of.get(n, frozenset())))

            def post(m, a, kw, out):
                if scope:
                    scope.pop()

            handles = []
            try:
                for m in names:
                    handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
                    handles.append(m.register_forward_hook(post, with_kwargs=True))
                with _Watch(scope, found, const):
                    out = f(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
            if found:
                name, m, op = found[0]
                calls = sum(1 for x in found if x[0] == name and x[2] == op)
                raise AttributionError(_advice(cov.composite.name, name, m, op, calls))
            _CHECKED.setdefault(module, set()).add(key)
            return out

        return g

    return wrap
