"""Gradient edits: a site whose value is unchanged and whose backward applies a function to the gradient.

``tdfunc.grad_edit(fn)`` at a site puts one operation ``E`` on the value the forward continues with
there: ``E(v) = v`` in value, and its vector-Jacobian product is ``g -> fn(g)``.  It is a
:class:`torch.autograd.Function` (``setup_context`` + ``generate_vmap_rule``), so it composes with
``vmap`` (``fn`` sees one example's gradient), ``grad`` and ``torch.compile(fullgraph=True)``.

Higher derivatives: ``E``'s backward is an ordinary differentiable computation, so a derivative of a
first-order result flows through ``fn`` (to ``g`` and to the tensors ``fn`` closes over, e.g. a mask),
and ``E`` applies ``fn`` to every gradient that flows back through the site, in every backward pass
(one autograd node serves the first-order cotangent and the later passes alike).  No ``jvp``: forward
mode reaching the site is refused with an ``EditError`` (torch's NotImplementedError, renamed; a custom
``jvp`` would break dynamo's tracing of the Function under ``torch.compile``).  For a linear
``fn(g) = g * m`` the site is the straight-through map ``stop(v) + m * (v - stop(v))`` in every order.

The runtime applies a gradient edit after every value edit at its site, of every active call (see
``_runtime._apply``), so a rule or a substitute at the same site (LRP's rewrites) cannot bypass it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._errors import EditError, here, shape_str

__all__ = ["apply_grad_edit"]


class _GradEdit(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(value: torch.Tensor, fn: Callable, where: tuple[str, str]) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.fn, ctx.where = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, None, None]:
        new = ctx.fn(g)
        if not isinstance(new, torch.Tensor) or new.shape != g.shape or new.dtype != g.dtype:
            name, site = ctx.where  # the public call that applied the edit: the backward may run after it
            got = (
                f"a tensor of shape {shape_str(new.shape)}, dtype {new.dtype}"
                if isinstance(new, torch.Tensor)
                else f"a value of type {type(new).__name__}"
            )
            raise EditError(
                f"{name}: the tdfunc.grad_edit function at site {site!r} returned {got} for a gradient of shape "
                f"{shape_str(g.shape)}, dtype {g.dtype}; it must return a tensor of the gradient's shape and dtype."
            )
        return new, None, None


def apply_grad_edit(site: str, edit_fn: Callable, value: Any) -> Any:
    """``value`` passed through the gradient edit ``edit_fn`` (identity forward, ``edit_fn`` on its gradient)."""
    if not isinstance(value, torch.Tensor):
        raise EditError(
            f"tdfunc.grad_edit at site {site!r} needs a tensor there, but the site holds a value of type "
            f"{type(value).__name__}; address one tensor of it (e.g. '{site.split(':')[0]}:output.0')."
        )
    if not (value.is_floating_point() or value.is_complex()):
        raise EditError(
            f"tdfunc.grad_edit at site {site!r}: the site's value has dtype {value.dtype}, which carries no "
            "gradient; edit the gradient at a floating-point site."
        )
    try:
        return _GradEdit.apply(value, edit_fn, (here(), site))
    except NotImplementedError as e:  # forward mode reached the edit (a custom jvp would break dynamo's tracing)
        if "jvp" not in str(e):
            raise
        raise EditError(
            f"forward-mode differentiation (torch.func.jvp, jacfwd) reached the tdfunc.grad_edit at site {site!r}, "
            "where it is not defined: the edit changes the backward only, so a forward-mode derivative would "
            "ignore it; use reverse mode (torch.func.grad, vjp, jacrev)."
        ) from e
