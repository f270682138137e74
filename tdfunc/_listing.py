"""``list_sites``: the module and operation sites one forward reaches, with their shapes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._checks import check_args, check_module
from ._errors import TdfuncTypeError, public
from ._ops import OP_OF
from ._sites import module_table

__all__ = ["list_sites"]


def _describe(v: Any) -> tuple[int, ...] | str:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__


def _outputs(name: str, out: Any) -> list[tuple[str, Any]]:
    if isinstance(out, torch.Tensor):
        return [(name, out)]
    if isinstance(out, Mapping):
        return [(f"{name}:output.{k}", v) for k, v in out.items() if isinstance(v, torch.Tensor)]
    if isinstance(out, (tuple, list)):
        return [(f"{name}:output.{i}", v) for i, v in enumerate(out) if isinstance(v, torch.Tensor)]
    return []


class _Recorder(torch.overrides.TorchFunctionMode):
    def __init__(self, rows: list, scope: list):
        super().__init__()
        self.rows, self.scope = rows, scope

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = OP_OF.get(func)
        if name is not None and self.scope:
            self.rows.append((f"{self.scope[-1]}/{name}", out if isinstance(out, torch.Tensor) else None))
        return out


def _arg_names(m: nn.Module) -> list[str]:
    import inspect

    try:
        params = inspect.signature(m.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    names = []
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    return names


@public("tdfunc.list_sites")
def list_sites(
    module: nn.Module, args: Any, kwargs: Mapping[str, Any] | None = None, *, ops: bool = True
) -> dict[str, tuple[int, ...] | str]:
    """The sites one forward of ``module`` reaches, in the order it reaches them, with the shapes of their values.

    Runs ``module(*args, **kwargs)`` once under ``torch.no_grad`` and lists, for every submodule call, its
    output sites (``"path"``, or ``"path:output.N"`` / ``"path:output.KEY"`` for tuple and dict /
    ``ModelOutput`` outputs), its keyword inputs and — for modules with submodules, e.g. a transformer
    block — its positional inputs by argument name (``"path:input.NAME"``); with ``ops=True`` also the
    operation sites (``"path/softmax"``, ``"path/matmul"``, …) called while each module — the innermost
    one running — computes.  A site reached more than once is listed per call, ``"site@0"``,
    ``"site@1"``, …, as :func:`tdfunc.functional_call` addresses them.  Use it to discover the sites of
    an unfamiliar model, e.g. where a transformers model computes its attention pattern.

    Nothing is left on the module: the temporary hooks are removed also when the forward raises.

    Args:
        module: the model.
        args: positional inputs (a tuple, or a single value).
        kwargs: keyword inputs.
        ops: also list operation sites.

    Returns:
        A dict from site string to the value's shape (a tuple), or the type name of a non-tensor value.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.

    Example:
        >>> import torch, tdfunc
        >>> class Attn(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.q = torch.nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return torch.softmax(self.q(x) @ x.transpose(-1, -2), -1) @ x
        >>> net = torch.nn.Sequential(Attn())
        >>> tdfunc.list_sites(net, torch.randn(3, 4))
        {'0:input.x': (3, 4), '0.q/linear': (3, 4), '0.q': (3, 4), '0/matmul@0': (3, 3), '0/softmax': (3, 3),
         '0/matmul@1': (3, 4), '0': (3, 4)}

    Composes with: nothing — a discovery helper run eagerly once (the sites it lists compose as usual).
    """
    check_module(module)
    if not isinstance(ops, bool):
        raise TdfuncTypeError(f"ops must be True or False, got {type(ops).__name__} ({ops!r:.60}).")
    args = check_args(args)
    names: dict[nn.Module, str] = {}
    for name, m in module_table(module).items():
        names.setdefault(m, name)
    rows: list[tuple[str, Any]] = []
    scope: list[str] = []

    def pre(m, a, kw):
        name = names[m]
        scope.append(name)
        if a and m._modules:  # a block's positional inputs, by the names of its forward's arguments
            rows.extend((f"{name}:input.{k}", v) for k, v in zip(_arg_names(m), a) if isinstance(v, torch.Tensor))
        rows.extend((f"{name}:input.{k}", v) for k, v in kw.items() if isinstance(v, torch.Tensor))

    def post(m, a, kw, out):
        scope.pop()
        rows.extend(_outputs(names[m], out))

    handles = []
    try:
        for m in names:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        with torch.no_grad():
            if ops:
                with _Recorder(rows, scope):
                    module(*args, **dict(kwargs or {}))
            else:
                module(*args, **dict(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    counts: dict[str, int] = {}
    for key, _ in rows:
        counts[key] = counts.get(key, 0) + 1
    seen: dict[str, int] = {}
    out: dict[str, tuple[int, ...] | str] = {}
    for key, v in rows:
        if counts[key] > 1:
            k = seen.get(key, 0)
            seen[key] = k + 1
            key = f"{key}@{k}"
        out[key] = _describe(v)
    return out
