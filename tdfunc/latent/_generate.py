"""Generation with edits through the model's own ``generate`` (KV cache, attention mask, padded batches).

``generate`` runs ``module.generate(input_ids, **kwargs)`` inside :func:`tdfunc.intervene` with the
edits, so every decoding strategy, cache and generation keyword of transformers works unchanged.
``positions`` are positions of each row's full sequence (prompt + generated tokens, counted from the
row's first real token): a forward pre-hook on the root module, present only during the call, reads
how many tokens the cache already holds (the 2-D ``attention_mask``, else ``cache_position`` / the
cache's length) and the edits are masked to the addressed positions of the tokens each step runs.
A position therefore gets the same edit in every step, which is what makes the cached keys and
values equal to a cache-free rerun of the full sequence with the same edits.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tensordict import TensorDictBase

from .._call import _intervene as intervene
from .._checks import broadcasts_to, check_module, renamed, type_error
from .._edits import Delta, Rule
from .._errors import public
from .._state import flat_state
from .._types import Edits
from ._common import PatchError, check_input_ids

__all__ = ["generate"]

_POSITIONS = "None, an int, a list / range of ints, a 1-D integer tensor or a slice of ints (step 1)"


def _positions(positions: Any) -> list[int] | slice | None:
    """``positions`` as a list of ints or a slice (ints or None, step 1); None stays None."""
    if positions is None:
        return None
    if isinstance(positions, slice):
        parts = (positions.start, positions.stop)
        if positions.step not in (None, 1) or not all(p is None or _is_int(p) for p in parts):
            raise PatchError(f"positions must be {_POSITIONS}, got {positions!r}.")
        return positions
    if _is_int(positions):
        return [positions]
    if isinstance(positions, torch.Tensor) and not positions.dtype.is_floating_point and positions.dtype != torch.bool:
        if positions.dim() > 1:
            raise PatchError(f"positions must be {_POSITIONS}, got a tensor of shape {tuple(positions.shape)}.")
        return [int(p) for p in positions.reshape(-1).tolist()]
    if isinstance(positions, (Sequence, range)) and not isinstance(positions, str):
        if all(_is_int(p) for p in positions):
            return list(positions)
    raise type_error(PatchError)(
        f"positions must be {_POSITIONS}, got {type(positions).__name__} ({positions!r:.60}); negative "
        "positions count from the end of each row's prompt (-1: its last token)."
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Step:
    """The positions of the tokens the current forward runs, set by the root pre-hook of one call."""

    def __init__(self, lengths: torch.Tensor) -> None:
        self.lengths = lengths  # (B,) prompt lengths (real tokens) of the rows given to generate
        self.pos: torch.Tensor | None = None  # (b, t) positions in each row's full sequence
        self.valid: torch.Tensor | None = None  # (b, t) False at padding

    def record(self, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(x, torch.Tensor):
            x = kwargs.get("inputs_embeds")
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            self.pos = self.valid = None
            return
        b, t = x.shape[0], x.shape[1]
        past = None
        cp = kwargs.get("cache_position")
        if isinstance(cp, torch.Tensor) and cp.numel():
            past = int(cp.reshape(-1)[0])
        else:
            cache = kwargs.get("past_key_values")
            if cache is not None and hasattr(cache, "get_seq_length"):
                past = int(cache.get_seq_length())
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == b and mask.shape[1] >= t:
            if past is not None and mask.shape[1] >= past + t:
                mask = mask[:, : past + t]  # a mask padded beyond the tokens seen so far (static caches)
            real = mask != 0
            self.pos = (real.long().cumsum(1) - 1)[:, -t:]
            self.valid = real[:, -t:]
        else:
            start = past or 0
            self.pos = (start + torch.arange(t, device=x.device)).expand(b, t)
            self.valid = torch.ones(b, t, dtype=torch.bool, device=x.device)


def _mask(site: str, spec: list[int] | slice, step: _Step, value: Any) -> torch.Tensor:
    """Boolean mask (b, t, 1, ..., 1) of the addressed positions among the tokens this forward runs."""
    pos, valid = step.pos, step.valid
    if pos is None or valid is None:
        raise PatchError(
            "positions need the tokens of each forward, but the model was called without a 2-D "
            "input_ids / inputs_embeds; pass positions=None and put the position logic into the edit."
        )
    b, t = pos.shape
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or tuple(value.shape[:2]) != (b, t):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise PatchError(
            f"positions index dims (batch, token) of a site's value, but site {site!r} has shape {got} "
            f"while this forward runs {b} rows of {t} tokens; edit a site whose value is (batch, tokens, ...) "
            "(a block's output, a residual stream), or pass positions=None."
        )
    lengths = step.lengths.to(pos.device)
    if b != lengths.shape[0]:
        if b % lengths.shape[0]:
            raise PatchError(
                f"the model ran {b} rows but input_ids had {lengths.shape[0]}; positions can follow "
                "rows repeated per prompt (beams, num_return_sequences), not other batch changes."
            )
        lengths = lengths.repeat_interleave(b // lengths.shape[0])
    if isinstance(spec, slice):
        lo = lengths.new_zeros(b) if spec.start is None else _absolute(spec.start, lengths).clamp(min=0)
        hi = None if spec.stop is None else _absolute(spec.stop, lengths)
        m = pos >= lo[:, None]
        if hi is not None:
            m = m & (pos < hi[:, None])
    elif spec:
        where = torch.stack([_absolute(p, lengths) for p in spec], 1)  # (b, k)
        m = (pos[:, :, None] == where[:, None, :]).any(-1)
    else:
        m = torch.zeros_like(valid)
    return (m & valid).reshape(b, t, *([1] * (value.dim() - 2)))


def _absolute(p: int, lengths: torch.Tensor) -> torch.Tensor:
    return lengths + p if p < 0 else torch.full_like(lengths, p)


def _masked(site: str, edit: Any, spec: list[int] | slice, step: _Step) -> Any:
    """The edit applied only at the addressed positions (the value elsewhere unchanged)."""
    if not isinstance(edit, (torch.Tensor, Delta)) and (type(edit).__module__ == Rule.__module__ or not callable(edit)):
        raise PatchError(
            f"positions apply to tensor, delta and callable edits, but the edit at site {site!r} is a "
            f"{type(edit).__name__}; pass positions=None and select positions inside it."
        )

    def fits(v: torch.Tensor, new: Any, what: str) -> Any:
        shape = tuple(new.shape) if isinstance(new, torch.Tensor) else None
        if shape is None or not broadcasts_to(shape, v.shape):
            raise PatchError(
                f"{what} at site {site!r} has shape {shape if shape is not None else type(new).__name__} but "
                f"the site's value in this step has shape {tuple(v.shape)}; give an edit that fits the value of "
                "every step (under the KV cache a step runs only the new tokens), e.g. a vector of shape "
                f"({v.shape[-1]},)."
            )
        return new

    def apply(v: Any, new: Any) -> Any:
        return torch.where(_mask(site, spec, step, v), new, v)

    if isinstance(edit, Delta):
        t = edit.tensor
        return lambda v: apply(v, v + fits(v, t, "the delta"))
    if isinstance(edit, torch.Tensor):
        return lambda v: apply(v, fits(v, edit, "the substitute"))
    return lambda v: apply(v, fits(v, edit(v), "the edit function's result"))


@public("tdfunc.latent.generate")
def generate(
    module: torch.nn.Module,
    state: TensorDictBase | Mapping[str, torch.Tensor] | None,
    input_ids: torch.Tensor,
    *,
    edits: Edits | None = None,
    positions: int | Sequence[int] | torch.Tensor | slice | None = None,
    **generate_kwargs: Any,
) -> Any:
    """The model's own ``generate`` (KV cache, attention mask, padded batches, any decoding) with edits.

    .. math::
        h_s \\leftarrow m_{p}\\, e_s(h_s) + (1 - m_p)\\, h_s, \\qquad
        m_p = [\\,p \\in \\text{positions}\\,]

    at every step, where ``p`` is a token's position in its row's full sequence (prompt and
    generated tokens, counted from the row's first real token, as the ``attention_mask`` says).
    Runs ``module.generate(input_ids, **generate_kwargs)`` under the edits, so greedy, sampling,
    beam search, caches and every other transformers generation keyword work as without edits.
    Because a position gets the same edit in every step, the cached keys and values are those of a
    rerun of the full sequence with the same edits: the tokens and logits equal those of a
    cache-free loop (:func:`tdfunc.latent.generate_greedy` with the edits at those positions), and a
    left-padded batch equals each row generated alone.  Negative positions count from the end of
    each row's prompt (``-1``: its last token, the same token in every step); positions past the
    prompt address generated tokens; ``slice(-1, None)`` is the last prompt token and every token
    generated after it.  ``positions=None`` edits every token of every step.

    ``tdfunc.latent.steer(v, scale, positions=...)`` resolves its positions against each forward's
    own tokens (under a cache only the new ones), so it is refused here: give ``steer(v, scale)``
    and the positions to ``generate``.  :func:`tdfunc.latent.generate_greedy` stays for modules
    without a ``generate`` method and for edits that follow the growing end of the sequence (it
    reruns the whole sequence each step, so ``steer(..., positions=-1)`` edits only the newest
    token there; no cache can give that).  With transformers::

        enc = tok(prompts, return_tensors="pt", padding=True)   # tok.padding_side = "left"
        out = tdfunc.latent.generate(model, None, enc.input_ids, attention_mask=enc.attention_mask,
                                     edits=tdfunc.latent.steer(v, 4.0), positions=slice(-1, None),
                                     max_new_tokens=20, do_sample=False)

    Args:
        module: a model with a ``generate`` method (a transformers ``GenerationMixin`` model); never changed.
        state: its (partial) state, or None for its own tensors.
        input_ids: prompt tokens (B, T); left padding marked by ``attention_mask`` (a keyword).
        edits: ``{site: edit}`` (tensors, :func:`tdfunc.delta`, callables; with ``positions=None``
            also :func:`tdfunc.rule` and :func:`tdfunc.from_site`). A site without ``@k`` is edited in
            every step; ``@k`` counts the site's calls over the whole generation.
        positions: None (every token), an int, a list / range of ints, a 1-D integer tensor, or a
            ``slice`` (ints or None, step 1) of positions in each row's full sequence; the edited
            sites' values must be (batch, tokens, ...).
        **generate_kwargs: passed to ``module.generate`` (``attention_mask``, ``max_new_tokens``,
            ``do_sample``, ``num_beams``, ``output_logits``, ``return_dict_in_generate``, ...).

    Returns:
        What ``module.generate`` returns (token ids, or its output object).

    Raises:
        PatchError: a module without ``generate``, ``input_ids`` not a 2-D integer tensor, a bad
            ``positions`` (or one before a row's first token), positions without edits, a
            ``steer(..., positions=...)`` edit, a site whose value is not (batch, tokens, ...).

    Example:
        >>> import torch, tdfunc
        >>> class LM(torch.nn.Sequential):  # stands in for a transformers model (forward + generate)
        ...     def generate(self, input_ids, max_new_tokens=1):  # greedy, no cache
        ...         for _ in range(max_new_tokens):
        ...             input_ids = torch.cat([input_ids, self(input_ids)[:, -1:].argmax(-1)], 1)
        ...         return input_ids
        >>> lm, v = LM(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5)), {"0": torch.ones(4)}
        >>> ids, edits = torch.tensor([[1, 2]]), tdfunc.latent.steer(v, 3.0)
        >>> out = tdfunc.latent.generate(lm, None, ids, edits=edits, positions=-1, max_new_tokens=3)
        >>> loop = tdfunc.latent.generate_greedy(lm, None, ids, 3, edits=tdfunc.latent.steer(v, 3.0, positions=[1]))
        >>> torch.equal(out, loop)  # -1: the last prompt token (position 1) in every step
        True

    Composes with: any edits (steering, patching, ablations) and any transformers decoding; not with
    ``vmap`` / ``grad`` (generation stops on data).
    """
    check_module(module, PatchError, fix="; pass the model itself (the nn.Module to run)")
    gen = getattr(module, "generate", None)
    if not callable(gen):
        raise type_error(PatchError)(
            f"expected a model with a generate method (a transformers GenerationMixin model), got "
            f"{type(module).__name__}, which has none; use tdfunc.latent.generate_greedy for a plain module."
        )
    check_input_ids(input_ids)
    if edits is not None and not isinstance(edits, Mapping):
        raise type_error(PatchError)(
            f"edits must be a mapping {{site: edit}} or None, got {type(edits).__name__} ({edits!r:.60})."
        )
    spec = _positions(positions)
    if spec is not None and not edits:
        raise PatchError(
            f"positions={positions!r} given without edits; pass edits=... (e.g. tdfunc.latent.steer(v, 4.0)) "
            "for the positions to select, or drop positions."
        )
    for site, e in (edits or {}).items():
        per_call = getattr(e, "_tdfunc_steer_positions", None)
        if per_call is not None:
            raise PatchError(
                f"the edit at site {site!r} comes from tdfunc.latent.steer(..., positions="
                f"{per_call!r}), whose positions count the tokens of each forward (under the "
                "KV cache only the new ones); pass steer(v, scale) and positions=... to generate instead."
            )
    mask = generate_kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == input_ids.shape:
        lengths = (mask != 0).sum(1)
    else:
        lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
    step = _Step(lengths)
    if spec is not None and isinstance(spec, list):
        for p in spec:
            short = int(lengths.min()) if lengths.numel() else 0
            if p < -short:
                raise PatchError(
                    f"position {p} is before the first token of a row whose prompt has {short} tokens; "
                    f"negative positions count from the end of each row's prompt: give positions >= {-short}."
                )
    params = flat_state(module, state)
    run = edits
    if spec is not None and edits:
        run = {site: _masked(site, e, spec, step) for site, e in edits.items()}
    owner = threading.get_ident()

    def pre(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if threading.get_ident() == owner:
            step.record(args, kwargs)

    handle = module.register_forward_pre_hook(pre, with_kwargs=True) if spec is not None else None
    try:
        with contextlib.ExitStack() as stack:
            if params:
                stack.enter_context(torch.nn.utils.stateless._reparametrize_module(module, params, tie_weights=True))
            if not run:
                return gen(input_ids, **generate_kwargs)
            with renamed():
                return intervene(lambda: gen(input_ids, **generate_kwargs), module, edits=run)()
    finally:
        if handle is not None:
            handle.remove()
