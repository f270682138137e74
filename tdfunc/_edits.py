"""Edit forms beyond plain tensors and callables: additive deltas and module-aware rules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._errors import public

__all__ = ["Delta", "Rule", "FromSite", "GradEdit", "delta", "rule", "from_site", "grad_edit"]


@dataclass(frozen=True)
class Delta:
    """Add ``tensor`` to the value at a site. Build it with :func:`tdfunc.delta`."""

    tensor: torch.Tensor


@dataclass(frozen=True)
class Rule:
    """Replace a module's output with ``fn(module, args, kwargs, output)``. Build it with :func:`tdfunc.rule`."""

    fn: Callable[[torch.nn.Module, tuple, dict, Any], Any]


@dataclass(frozen=True)
class FromSite:
    """Set a site's value from another site's value in the same call. Build it with :func:`tdfunc.from_site`."""

    source: str
    fn: Callable[[Any], Any] | None


@dataclass(frozen=True)
class GradEdit:
    """Keep a site's value, apply ``fn`` to the gradient flowing back through it: :func:`tdfunc.grad_edit`."""

    fn: Callable[[torch.Tensor], torch.Tensor]


@public("tdfunc.delta")
def delta(t: torch.Tensor) -> Delta:
    """An additive edit: the site's value becomes ``value + t``.

    Differentiating with respect to a zero ``t`` gives the gradient at the activation, with no
    backward hook:  ``d out / d value = d out / d t`` at ``t = 0``.

    Args:
        t: a tensor broadcastable to the site's value (same dtype and device).

    Returns:
        An edit for the ``edits`` mapping of :func:`tdfunc.functional_call` or :func:`tdfunc.intervene`.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> x, d = torch.randn(2, 3), torch.zeros(2, 4)
        >>> g = torch.func.grad(lambda d: tdfunc.functional_call(
        ...     net, None, (x,), edits={"1": tdfunc.delta(d)}).sum())(d)
        >>> g.shape
        torch.Size([2, 4])

    Composes with: ``vmap`` (over ``t``), ``grad``, ``torch.compile``.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"tdfunc.delta: expected a torch.Tensor, got {type(t).__name__} ({t!r:.60}); "
            "wrap the value with torch.as_tensor(...) first."
        )
    return Delta(t)


@public("tdfunc.rule")
def rule(fn: Callable[[torch.nn.Module, tuple, dict, Any], Any]) -> Rule:
    """A module-aware edit: the output of the site's module becomes ``fn(module, args, kwargs, output)``.

    ``module`` carries the call's substituted parameters (``module.weight`` is the state's weight), so
    a rule can rewrite how the layer computes, e.g. LRP rules that keep the value and change the
    Jacobian.  Rules apply to module outputs only (not to ``:input`` sites).  At an operation site
    (``"blocks.0.attn/softmax"``) ``module`` is the torch function called there and ``args`` / ``kwargs``
    its arguments, so ``fn`` can call it again on rewritten inputs.

    Example:
        >>> import torch, tdfunc
        >>> lin = torch.nn.Sequential(torch.nn.Linear(3, 2))
        >>> no_bias = tdfunc.rule(lambda m, args, kwargs, out: out - m.bias)
        >>> x = torch.randn(4, 3)
        >>> y = tdfunc.functional_call(lin, None, (x,), edits={"0": no_bias})
        >>> torch.allclose(y, x @ lin[0].weight.T)
        True
    """
    if not callable(fn):
        raise TypeError(
            f"tdfunc.rule: expected a callable fn(module, args, kwargs, output), got {type(fn).__name__} ({fn!r:.60})."
        )
    return Rule(fn)


@public("tdfunc.from_site")
def from_site(source: str, fn: Callable[[Any], Any] | None = None) -> FromSite:
    """An edit that computes a site's value from the value at an earlier ``source`` site.

    In ``edits={"b": tdfunc.from_site("a", fn)}`` the value at site ``b`` becomes ``fn(value at a)``
    (or the value at ``a`` itself when ``fn`` is None), where ``a`` ran earlier in the same forward
    (its latest call, after the call's own edits at ``a``).  This is how a transcoder replaces a
    layer's output with a map of that layer's input, or how a skip connection is rerouted.

    Args:
        source: a site string without globs, reached before the edited site.
        fn: a function of the source value giving a tensor of the edited site's shape.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
        >>> x = torch.randn(4, 3)
        >>> y = tdfunc.functional_call(net, None, (x,), edits={"1": tdfunc.from_site("0:input")})
        >>> torch.allclose(y, net[2](x))  # the Linear+Tanh block bypassed
        True

    Composes with: ``vmap``, ``grad``, ``torch.compile`` (as every edit).
    """
    if not isinstance(source, str):
        raise TypeError(
            f"tdfunc.from_site: source must be a site string, got {type(source).__name__} ({source!r:.60})."
        )
    if fn is not None and not callable(fn):
        raise TypeError(f"tdfunc.from_site: fn must be callable or None, got {type(fn).__name__} ({fn!r:.60}).")
    return FromSite(source, fn)


@public("tdfunc.grad_edit")
def grad_edit(fn: Callable[[torch.Tensor], torch.Tensor]) -> GradEdit:
    """A gradient edit: the site's value is unchanged, the gradient flowing back through it becomes ``fn(g)``.

    .. math::  E(v) = v,\\qquad \\frac{\\partial L}{\\partial v} \\leftarrow
        \\mathrm{fn}\\Big(\\frac{\\partial L}{\\partial E(v)}\\Big)

    As a tensor hook or tdhook's ``output_grad_callbacks`` / ``set_grad`` do, but as edit data: it
    composes with ``vmap``, ``grad`` and ``torch.compile``, and with every gradient-based method, LRP
    included (there the gradient at a site times its value is the relevance, so masking the gradient
    of a layer's channels keeps the relevance of one concept: concept relevance propagation, CRP).
    ``g`` is the gradient w.r.t. the value the forward continues with at the site, after every value
    edit there (a rule, a substitute, a delta, of this call or of an enclosing one); ``fn``'s result
    flows on into whatever produced that value.  ``fn`` runs during the backward pass, with the
    gradient of one example under ``vmap``, and must return a tensor of ``g``'s shape and dtype.

    Higher derivatives: the site is an operation ``E`` with ``E(v) = v`` whose vector-Jacobian product
    is ``fn`` in every backward pass, also in the ones differentiating a first-order result, and ``fn``
    is differentiated as written (w.r.t. ``g`` and the tensors it closes over).  For
    ``fn = lambda g: g * m`` the site is the straight-through map ``stop(v) + m * (v - stop(v))`` in
    every order.  So the derivative of a first-order result (a saliency or relevance map) w.r.t. the
    tensors ``fn`` closes over and w.r.t. inputs or parameters after the site is exact; w.r.t. inputs or
    parameters *before* the site it is that of the straight-through map, not the finite-difference
    derivative of the map, wherever the layers after the site are nonlinear (their curvature reaches
    the earlier ones through ``fn`` too).

    Args:
        fn: a function of the gradient at the site returning its replacement, e.g. ``lambda g: g * mask``.

    Returns:
        An edit for the ``edits`` mapping of :func:`tdfunc.functional_call` or :func:`tdfunc.intervene`.

    Raises:
        TypeError: ``fn`` is not callable.
        EditError (during the call / backward): the site holds no floating-point tensor, or ``fn``
            returned something that is not a tensor of the gradient's shape and dtype.
        EditError: forward-mode differentiation (``jvp``, ``jacfwd``) reaching the site (not defined: the
            edit changes the backward only; use ``grad`` / ``vjp`` / ``jacrev``).

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> x, mask = torch.randn(2, 3), torch.tensor([1.0, 0.0, 0.0, 1.0])
        >>> f = lambda x, e: tdfunc.functional_call(net, None, (x,), edits=e).sum()
        >>> g = torch.func.grad(f)(x, {"1": tdfunc.grad_edit(lambda g: g * mask)})
        >>> torch.equal(f(x, {"1": tdfunc.grad_edit(lambda g: g * mask)}), f(x, {}))  # same value
        True
        >>> ref = torch.func.grad(lambda x: (net[2](net[1](net[0](x)) * mask)).sum())(x)
        >>> torch.allclose(g, ref)  # only units 0 and 3 pass gradient
        True

    Composes with: ``vmap`` (over inputs and over tensors ``fn`` closes over), ``grad`` (double
    backward as above), ``torch.compile(fullgraph=True)``, every attribution method.
    """
    if not callable(fn):
        raise TypeError(
            f"tdfunc.grad_edit: expected a callable fn(grad) -> grad, got {type(fn).__name__} ({fn!r:.60}); "
            "e.g. tdfunc.grad_edit(lambda g: g * mask)."
        )
    return GradEdit(fn)
