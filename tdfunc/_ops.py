"""The torch operations an operation site can name (``"blocks.0.attn/softmax"``), and how calls map to them.

An operation site is seen through a :class:`torch.overrides.TorchFunctionMode` that tdfunc enters only
while a call with an operation site runs (see ``_runtime._OpMode``).  The mode sees each call of a torch
function made from Python — ``torch.softmax``, ``F.softmax``, ``x.softmax``, ``a @ b`` — once, by the
function object, mapped here to one operation name.  A name covers the function, its ``torch.nn.functional``
form, the Tensor method and the operator (``a * b`` is ``mul``; ``2 * x``, which Python calls as
``x.__rmul__(2)``, is ``mul`` with ``x`` as input 0).  In-place forms (``add_``, ``+=``) are never sites:
tdfunc would have to edit a tensor the model writes into.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["OPS", "OP_OF"]


def _table() -> dict[str, tuple[Any, ...]]:
    t = torch.Tensor
    ops: dict[str, tuple[Any, ...]] = {
        "softmax": (torch.softmax, F.softmax, t.softmax, torch.special.softmax),
        "log_softmax": (torch.log_softmax, F.log_softmax, t.log_softmax),
        "matmul": (torch.matmul, t.matmul, t.__matmul__),
        "bmm": (torch.bmm, t.bmm),
        "baddbmm": (torch.baddbmm, t.baddbmm),
        "einsum": (torch.einsum,),
        "scaled_dot_product_attention": (F.scaled_dot_product_attention,),
        "mul": (torch.mul, t.mul, t.__mul__, t.__rmul__),
        "add": (torch.add, t.add, t.__add__, t.__radd__),
        "sub": (torch.sub, t.sub, t.__sub__),
        "div": (torch.div, t.div, t.__truediv__),
        "layer_norm": (F.layer_norm, torch.layer_norm),
        "rms_norm": (F.rms_norm, torch.rms_norm),
        "group_norm": (F.group_norm, torch.group_norm),
        "linear": (F.linear,),
        "gelu": (F.gelu,),
        "silu": (F.silu,),
        "relu": (torch.relu, F.relu, t.relu),
        "tanh": (torch.tanh, t.tanh),
        "sigmoid": (torch.sigmoid, t.sigmoid),
        "exp": (torch.exp, t.exp),
        "cat": (torch.cat,),
    }
    return ops


#: operation name -> the torch callables it covers
OPS: dict[str, tuple[Any, ...]] = _table()

#: torch callable -> operation name (what the mode looks up for every call it sees)
OP_OF: dict[Any, str] = {f: name for name, fs in OPS.items() for f in fs}
