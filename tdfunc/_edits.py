"""Edit forms beyond plain tensors and callables: additive deltas and module-aware rules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Delta", "Rule", "FromSite", "delta", "rule", "from_site"]


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
