"""Activation steering: mean-difference vectors, steering edits, and greedy generation with edits.

``steering_vector`` is data in, vectors out; ``steer`` turns vectors into an edits mapping for
``functional_call`` (so a scale sweep is a ``vmap`` over ``scale``, and the vector is differentiable).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, overload

import torch
from tensordict import TensorDict, TensorDictBase

from .._call import functional_call
from .._checks import check_int, check_module, renamed
from .._edits import delta
from .._errors import public
from .._finite import check_finite
from .._types import Edits
from ._common import PatchError, check_input_ids, position_mask

__all__ = ["steering_vector", "steer", "generate_greedy"]


def _diff(pos: Any, neg: Any, pooled: bool, what: str) -> torch.Tensor:
    for name, x in (("acts_pos", pos), ("acts_neg", neg)):
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
            got = f"shape {tuple(x.shape)} dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise PatchError(f"{name}{what} must be a floating tensor (N, ..., D) of activations, got {got}.")
    if pos.shape[0] != neg.shape[0]:
        raise PatchError(
            f"acts_pos{what} has N={pos.shape[0]} rows but acts_neg{what} has N={neg.shape[0]}; "
            "give paired examples (one negative per positive, the same N in both)."
        )
    if pos.shape[1:] != neg.shape[1:]:
        raise PatchError(
            f"acts_pos{what} has shape {tuple(pos.shape)} but acts_neg{what} has shape "
            f"{tuple(neg.shape)}; give activations of one shape (pad or pool positions first)."
        )
    if pos.shape[0] == 0:
        raise PatchError(
            f"acts_pos{what} and acts_neg{what} hold no examples (N=0, shape {tuple(pos.shape)}); "
            "the mean difference of an empty set is undefined: pass at least one pair of activations."
        )
    for name, x in (("acts_pos", pos), ("acts_neg", neg)):
        check_finite(f"{name}{what}", x, PatchError, "replace them (e.g. torch.nan_to_num) or drop those examples")
    v = (pos - neg).mean(0)
    return v.mean(tuple(range(v.dim() - 1))) if pooled and v.dim() > 1 else v


# TensorDict first: mypy sees TensorDict (which has an untyped base) as compatible with Tensor
@overload
def steering_vector(
    acts_pos: TensorDictBase | Mapping[str, torch.Tensor],
    acts_neg: TensorDictBase | Mapping[str, torch.Tensor],
    *,
    pooled: bool = ...,
) -> TensorDict: ...
@overload
def steering_vector(acts_pos: torch.Tensor, acts_neg: torch.Tensor, *, pooled: bool = ...) -> torch.Tensor: ...


@public("tdfunc.latent.steering_vector")
def steering_vector(acts_pos: Any, acts_neg: Any, *, pooled: bool = True) -> torch.Tensor | TensorDict:
    """Mean-difference steering vector(s) from paired positive / negative activations.

    .. math::
        v = \\frac{1}{N} \\sum_{n=1}^{N} \\big(a^{+}_n - a^{-}_n\\big)
        \\quad (\\text{also averaged over positions when pooled})

    Args:
        acts_pos: activations (N, ..., D) of the positive examples, or a TensorDict / mapping
            ``{site: (N, ..., D)}`` (e.g. captures).
        acts_neg: the paired negative activations, same shapes and keys.
        pooled: average over every dim between N and D (positions) too, giving (D,); with
            ``pooled=False`` a per-position vector (..., D) is returned.

    Returns:
        A tensor, or a TensorDict ``{site: vector}`` (batch size ``[]``) for TensorDict input.

    Raises:
        PatchError: different N, shapes or keys; non-float or 1-D activations; no examples (N=0);
            NaN or infinite activations.

    Example:
        >>> import torch, tdfunc
        >>> pos, neg = torch.ones(4, 3, 2), torch.zeros(4, 3, 2)
        >>> tdfunc.latent.steering_vector(pos, neg)
        tensor([1., 1.])
        >>> tdfunc.latent.steering_vector(pos, neg, pooled=False).shape
        torch.Size([3, 2])

    Composes with: ``vmap`` (over stacked activation sets), ``grad`` (w.r.t. the activations).
    """
    if isinstance(acts_pos, (Mapping, TensorDictBase)) or isinstance(acts_neg, (Mapping, TensorDictBase)):
        if not (isinstance(acts_pos, (Mapping, TensorDictBase)) and isinstance(acts_neg, (Mapping, TensorDictBase))):
            raise PatchError(
                f"acts_pos is a {type(acts_pos).__name__} but acts_neg is a "
                f"{type(acts_neg).__name__}; pass two tensors or two TensorDicts with the same sites."
            )
        kp, kn = sorted(acts_pos.keys()), sorted(acts_neg.keys())
        if kp != kn:
            raise PatchError(f"acts_pos has sites {kp} but acts_neg has sites {kn}; give both the same sites.")
        return TensorDict(
            {k: _diff(acts_pos[k], acts_neg[k], pooled, f"[{k!r}]") for k in acts_pos.keys()}, batch_size=[]
        )
    return _diff(acts_pos, acts_neg, pooled, "")


@public("tdfunc.latent.steer")
def steer(
    vectors: TensorDictBase | Mapping[str, torch.Tensor],
    scale: float | torch.Tensor = 1.0,
    *,
    positions: Any = None,
) -> dict[str, Any]:
    """An edits mapping that adds ``scale * v`` at each site (``functional_call(..., edits=steer(v))``).

    .. math::
        h_s \\leftarrow h_s + \\alpha\\, m \\odot v_s

    with ``m`` selecting ``positions`` along dim 1 (every position when None). Without positions
    the edits are ``tdfunc.delta(scale * v)``; with positions they are callables that build the mask
    from the value's dim 1 at call time (so they follow a growing sequence in
    :func:`tdfunc.latent.generate_greedy`). Under a KV cache a forward runs only the new tokens, so
    for :func:`tdfunc.latent.generate` give ``steer(v, scale)`` and ``positions=`` to ``generate``
    (which refuses steering edits built with positions).

    Args:
        vectors: ``{site: vector}``, e.g. from ``steering_vector``; each broadcastable to its site.
        scale: a number or a tensor (vmap over it for a scale sweep; differentiable).
        positions: None, an int / list of ints (negative counts from the end, e.g. -1: the last
            token) or a boolean mask of shape (T,) along dim 1.

    Returns:
        A dict ``{site: edit}`` to pass as ``edits``.

    Raises:
        PatchError: vectors not a mapping of tensors; out-of-range positions (when the edit runs).

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        >>> x, v = torch.randn(2, 3), {"0": torch.ones(4)}
        >>> out = tdfunc.functional_call(net, None, (x,), edits=tdfunc.latent.steer(v, 2.0))
        >>> torch.allclose(out, net(x) + 2.0 * net[1].weight.sum(1))
        True

    Composes with: ``vmap`` (over scales or vectors), ``grad`` (w.r.t. the vector or scale), ``compile``.
    """
    if not isinstance(vectors, (Mapping, TensorDictBase)) or not all(
        isinstance(k, str) and isinstance(vectors[k], torch.Tensor) for k in vectors.keys()
    ):
        raise PatchError(
            f"vectors must be a mapping {{site: tensor}} (e.g. from tdfunc.latent.steering_vector), got "
            f"{type(vectors).__name__}; wrap a single vector as {{'site': v}}."
        )
    edits: dict[str, Any] = {}
    for site in vectors.keys():
        v = scale * vectors[site]
        if positions is None:
            edits[site] = delta(v)
        else:

            def edit(h, v=v, site=site):
                v = v.to(h.device)  # a model across devices: the vector goes to its site (a copy), as delta's do
                return h + torch.where(position_mask(site, positions, h), v, torch.zeros_like(v))

            named = public("tdfunc.latent.steer")(edit)  # its errors, raised inside a call, name steer
            named._tdfunc_steer_positions = positions  # type: ignore[attr-defined]  # generate refuses these
            edits[site] = named
    return edits


@public("tdfunc.latent.generate_greedy")
def generate_greedy(
    module: torch.nn.Module,
    state: TensorDictBase | None,
    input_ids: torch.Tensor,
    n_tokens: int,
    *,
    edits: Edits | None = None,
) -> torch.Tensor:
    """Greedy decoding with edits: each step reruns the full sequence (no cache) and appends the argmax.

    .. math::
        x_{t+1} = \\arg\\max_w \\text{logits}(x_{1..t};\\ \\text{edits})_{t, w}

    For transformers models use :func:`tdfunc.latent.generate`: the model's own ``generate`` (KV
    cache, attention mask, padded batches, sampling, beams) with positions of the full sequence; it
    gives the same tokens as this loop for edits at fixed positions. This loop remains for any module
    returning logits (no ``generate`` method needed) and for edits resolved against the growing
    sequence at every step: with ``steer(v, positions=-1)`` here only the newest token is edited in
    each step, which no KV cache can reproduce (the cached keys and values of earlier tokens were
    computed with the edit). Its cost is quadratic in the length.

    Args:
        module: a causal LM returning logits (B, T, V) or an output with ``.logits``.
        state: its (partial) state, or None.
        input_ids: prompt tokens (B, T).
        n_tokens: how many tokens to append (>= 0).
        edits: edits applied at every step (e.g. ``tdfunc.latent.steer(v, 4.0)``).

    Returns:
        Tokens (B, T + n_tokens).

    Raises:
        PatchError: ``input_ids`` not a 2-D integer tensor, or a bad ``n_tokens``.

    Example:
        >>> import torch, tdfunc
        >>> lm = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5))
        >>> tdfunc.latent.generate_greedy(lm, None, torch.tensor([[1, 2]]), 3).shape
        torch.Size([1, 5])

    Composes with: any edits (steering, patching, ablations); fine for short sequences (quadratic cost).
    """
    check_module(module, PatchError, fix="; pass the model itself (the nn.Module to run)")
    check_input_ids(input_ids)
    check_int("n_tokens", n_tokens, PatchError, lo=0)
    ids = input_ids
    for _ in range(n_tokens):
        with renamed():
            out = functional_call(module, state, (ids,), edits=dict(edits) if edits else None)
        logits = out.logits if hasattr(out, "logits") else out
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True).to(ids.dtype)], dim=1)
    return ids
