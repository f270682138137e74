"""``patching_sweep(..., reuse_prefix=True)``: the position sweep of a causal LM that runs only the suffix.

With causal attention a patch at position ``p`` leaves every position before ``p`` as the corrupted
run computed it, in every layer.  So the corrupted prompt runs once with the model's own KV cache
(``use_cache=True``); the patched positions are taken in chunks, and a chunk whose first position is
``a`` runs only the tokens ``a .. T-1`` on a fresh ``DynamicCache`` holding the corrupted keys and
values of ``0 .. a-1`` (the model continues the position ids from the cache's length, so rotary and
learned positions are those of the full run), one ``vmap`` over the chunk's one-hot position masks
at one site: upstream of the site the suffix runs once, unbatched.  The logits the metric sees are
the suffix's, with the corrupted run's before ``a``; with ``kwargs={"logits_to_keep": k}`` (the
model's own option) only at the kept positions.  For a transformers LM (``get_output_embeddings``
and ``base_model_prefix``) the suffix calls stop at the final hidden states (the base model's
``last_hidden_state``, at the kept positions) and the LM head runs once per chunk over every site's
patches: on a CPU the head (vocab x d) is memory-bound on the few rows of one patch.  Under
``vmap`` / ``grad`` / compile, where the check below cannot run, the head stays inside each call.

Before the sweep, one unpatched suffix is compared with the corrupted run (outside transforms and
compile): a model whose cache does not reproduce the full run (bidirectional attention, sliding
windows, position ids that restart) is refused instead of giving wrong numbers.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.func import vmap

from .._call import functional_call
from .._checks import random_op_error, renamed
from .._finite import readable
from .._progress import vmap_chunks
from .._state import flat_state
from ._common import PatchError

__all__ = ["check_prefix_model", "n_prefix_chunks", "prefix_sweep"]

OPTION = "reuse_prefix=True"
HEAD_ELEMENTS = 2**26  # logits per batched LM-head call (256 MB in float32)
KWARGS = ("attention_mask", "position_ids", "logits_to_keep")


def chunk_of(t: int, chunk_size: int | None) -> int:
    """Positions per chunk: ``chunk_size``, or ceil(sqrt(T)).

    A chunk from position ``a`` reruns the layers upstream of the site on ``T - a`` tokens once, and
    wastes the positions before each patched one in the chunk on the layers downstream: about
    sqrt(T) balances the two (measured on a 6-block GPT-2 at T 24: chunks of 5 to 9 alike, 12 slower).
    """
    return chunk_size if chunk_size is not None else min(t, math.isqrt(t - 1) + 1) if t > 1 else 1


def n_prefix_chunks(t: int, chunk_size: int | None) -> int:
    """Chunks of positions per site (the progress bar's ticks)."""
    return -(-t // chunk_of(t, chunk_size))


def check_prefix_model(module: torch.nn.Module, corrupted_args: Any, kwargs: dict) -> torch.Tensor:
    """The causal LM and its one input of token ids, or a PatchError naming ``reuse_prefix``."""
    params: Mapping[str, Any]
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        params = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())  # passes them on
    if not takes_all and ("past_key_values" not in params or "use_cache" not in params):
        raise PatchError(
            f"{OPTION} reuses the corrupted run's keys and values through the model's KV cache, but "
            f"{type(module).__name__}.forward takes no past_key_values / use_cache; pass a transformers causal LM "
            "(e.g. GPT2LMHeadModel, LlamaForCausalLM) or leave reuse_prefix=False."
        )
    flags = [m.is_causal for m in module.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if not flags or not all(flags):
        what = "has no attention module marked is_causal" if not flags else "has non-causal (bidirectional) attention"
        raise PatchError(
            f"{OPTION} needs causal attention (a patch at position p must leave the positions before p as "
            f"the corrupted run computed them), but {type(module).__name__} {what}; leave reuse_prefix=False."
        )
    args = [corrupted_args] if isinstance(corrupted_args, torch.Tensor) else list(corrupted_args)
    if len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() != 2 or args[0].is_floating_point():
        got = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
        raise PatchError(
            f"{OPTION} takes the prompts as one positional tensor of token ids of shape (batch, T) each, "
            f"got {got}; pass clean_args=(clean_ids,), corrupted_args=(corrupted_ids,)."
        )
    other = [k for k in kwargs if k not in KWARGS]
    if other:
        raise PatchError(
            f"{OPTION} knows how to cut the keyword inputs {list(KWARGS)} to the suffix, not {other}; "
            "leave reuse_prefix=False to pass them."
        )
    return args[0]


def _kept(keep: Any, t: int, device: torch.device) -> torch.Tensor:
    """The positions whose logits the model returns under ``logits_to_keep`` (0 or absent: all)."""
    if keep is None or (isinstance(keep, int) and not isinstance(keep, bool) and keep == 0):
        return torch.arange(t, device=device)
    if isinstance(keep, int) and not isinstance(keep, bool) and 0 < keep <= t:
        return torch.arange(t - keep, t, device=device)
    if isinstance(keep, torch.Tensor) and keep.dim() == 1 and not keep.is_floating_point() and keep.dtype != torch.bool:
        if keep.numel() and not bool(((keep >= -t) & (keep < t)).all()):
            raise PatchError(f"logits_to_keep holds positions outside [{-t}, {t}): {keep.tolist()}.")
        return (keep % t).to(device)
    raise PatchError(
        f"with {OPTION}, logits_to_keep must be an int in [0, {t}] or a 1-D integer tensor of positions, "
        f"got {keep!r:.60}; pass e.g. kwargs={{'logits_to_keep': 1}} for the last position."
    )


def _logits(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise PatchError(
            f"{OPTION} rebuilds the metric's output from the logits of the suffix, but the model returned "
            f"{type(out).__name__} with no .logits tensor; return a ModelOutput (return_dict=True) or leave "
            "reuse_prefix=False."
        )
    return logits


def _head(module: torch.nn.Module, state: Any) -> tuple[str, torch.nn.Module, dict] | None:
    """``(site of the final hidden states, LM head, its tensors under state)`` of a transformers LM, or None.

    The head's tensors come from ``state`` under the head's own names or a name tied to them (GPT-2's
    ``lm_head.weight`` is ``transformer.wte.weight``), else they are the module's own.
    """
    get = getattr(module, "get_output_embeddings", None)
    prefix = getattr(module, "base_model_prefix", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Module) or not isinstance(prefix, str) or not prefix:
        return None
    if not isinstance(getattr(module, prefix, None), torch.nn.Module):
        return None
    name = next((n for n, m in module.named_modules() if m is head), None)
    if name is None or name.startswith(prefix + "."):
        return None
    flat = flat_state(module, state)
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    params: dict[str, torch.Tensor] = {}
    for n, own in [*head.named_parameters(), *head.named_buffers()]:
        v = flat.get(f"{name}.{n}")
        if v is None:
            v = next((flat[k] for k in flat if tensors.get(k) is own), own)
        params[n] = v
    return f"{prefix}:output.last_hidden_state", head, params


def _vocab(head: tuple[str, torch.nn.Module, dict]) -> int:
    w = head[2].get("weight")
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else 1


def prefix_sweep(
    module: torch.nn.Module,
    state: Any,
    keys: list[str],
    caps: Any,
    ids: torch.Tensor,
    metric: Callable[[Any], torch.Tensor],
    scalar: Callable[[Any], torch.Tensor],
    *,
    chunk_size: int | None,
    kwargs: dict,
    bar: Any,
    randomness: str,
) -> torch.Tensor:
    """(sites, T) metrics of every (site, position) patch, each chunk of positions running from its first one."""
    b, t = ids.shape
    for k in keys:
        v = caps[k]
        if not isinstance(v, torch.Tensor) or v.dim() < 2 or v.shape[0] != b or v.shape[1] != t:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise PatchError(
                f"{OPTION} patches one position of a per-position site (batch, T, ...), but site {k!r} "
                f"holds {got} for token ids of shape {(b, t)}; sweep per-position sites (block outputs, attention "
                "or MLP outputs, o_proj:input) or leave reuse_prefix=False."
            )
    keep = _kept(kwargs.get("logits_to_keep"), t, ids.device)
    pos_ids = kwargs.get("position_ids")
    with renamed():
        full = functional_call(module, state, (ids,), {**kwargs, "use_cache": True})
    corr_logits = _logits(full)  # (B, len(keep), V)
    cache = getattr(full, "past_key_values", None)
    try:
        kv = [(k_, v_) for k_, v_, *rest in cache if not any(r is not None for r in rest)]  # type: ignore[union-attr]
        ok = type(cache).__name__ == "DynamicCache" and len(kv) == len(cache.layers)  # type: ignore[union-attr]
    except TypeError:
        ok, kv = False, []
    if not ok or any(not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-2] != t for kv_ in kv for x in kv_):
        raise PatchError(
            f"{OPTION} needs the corrupted run's keys and values as a DynamicCache of full-attention layers "
            f"({t} positions each), but {type(module).__name__} returned {type(cache).__name__}; leave "
            "reuse_prefix=False for this model."
        )
    from transformers import DynamicCache  # the model returned one: transformers is installed

    size = chunk_of(t, chunk_size)
    # the head apart only where the check below can compare it with the model's own (not under vmap / grad /
    # compile); None: the LM head runs inside each suffix call, as the model computes it
    head = _head(module, state) if readable(corr_logits) else None

    def run_suffix(a: int, edits: dict) -> torch.Tensor:
        """The suffix ``a .. T-1`` (with ``edits``): its final hidden states at the kept positions from ``a`` on
        (with ``head``), else its logits there."""
        past = DynamicCache([(k_[..., :a, :], v_[..., :a, :]) for k_, v_ in kv]) if a else DynamicCache()
        kw: dict[str, Any] = {"past_key_values": past, "use_cache": True}
        if "attention_mask" in kwargs:
            kw["attention_mask"] = kwargs["attention_mask"]  # past + current: the whole mask
        if pos_ids is not None:
            kw["position_ids"] = pos_ids[..., a:]
        late = keep[keep >= a] - a
        if head is None:
            kw["logits_to_keep"] = late
            with renamed():
                return _logits(functional_call(module, state, (ids[:, a:],), kw, edits=edits))
        kw["logits_to_keep"] = late[:0]  # no logits here: the head runs once over every patch's hidden states
        with renamed():
            _, got = functional_call(module, state, (ids[:, a:],), kw, edits=edits, capture=[head[0]])
        return got[head[0]][:, late.to(got[head[0]].device)]

    def logits_of(a: int, h: torch.Tensor) -> torch.Tensor:
        """Logits at every kept position from what ``run_suffix(a, ...)`` returned: the corrupted ones before ``a``."""
        logits = h if head is None else torch.func.functional_call(head[1], head[2], (h,))
        early = (keep < a).to(corr_logits.device)
        if not bool(early.any()):
            return logits
        merged = torch.cat([corr_logits[:, early], logits.to(corr_logits.device)], dim=1)  # the early ones first
        order = torch.cat([torch.nonzero(early).flatten(), torch.nonzero(~early).flatten()])
        return merged[:, torch.argsort(order)]

    def output_of(full_out: Any, logits: torch.Tensor) -> Any:
        return type(full_out)(logits=logits)  # the metric reads the logits; the suffix's cache is not the run's

    a0 = size if size < t else t // 2
    if a0 > 0 and readable(corr_logits):  # the model's cache (and head) reproduce its full run: once, unpatched
        with torch.no_grad():
            suffix = logits_of(a0, run_suffix(a0, {}))
        err = float((suffix - corr_logits).detach().abs().max())
        scale = float(corr_logits.detach().abs().max()) + 1e-30
        tol = 1e-3 if corr_logits.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
        if err > tol * scale:
            raise PatchError(
                f"{OPTION}: {type(module).__name__} run from position {a0} on its KV cache does not reproduce "
                f"its full run (max |logit difference| {err:.3g}, scale {scale:.3g}): its attention is not causal, "
                "or its positions or cache do not continue; leave reuse_prefix=False for this model."
            )

    def metric_of(a: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda h: scalar(metric(output_of(full, logits_of(a, h))))

    def vmapped(f: Callable, x: torch.Tensor, tick: Any) -> torch.Tensor:
        try:
            return (
                vmap(f, randomness=randomness)(x)
                if tick is None
                else vmap_chunks(f, None, tick, randomness=randomness)(x)
            )
        except RuntimeError as e:
            err_ = random_op_error(e, PatchError, "the model (or metric)")
            if err_ is None:
                raise
            raise err_ from e

    starts = list(range(0, t, size))
    outs: dict[int, list[torch.Tensor]] = {a: [] for a in starts}  # per chunk: each site's (g, ...) results
    for k in keys:
        clean = caps[k]
        for a in starts:
            n = t - a
            g = min(size, n)
            masks = torch.eye(g, n, dtype=torch.bool, device=clean.device)  # masks[i]: position a + i of the suffix
            shape = [n if i == 1 else 1 for i in range(clean.dim())]
            c = clean[:, a:]

            def one(m, k=k, c=c, shape=shape, a=a, n=n):
                def edit(v):
                    if v.dim() < 2 or v.shape[1] != n:
                        raise PatchError(
                            f"with {OPTION} site {k!r} held {tuple(v.shape)} in the suffix run from position "
                            f"{a} ({n} positions expected along dim 1): it is not a per-position site; leave "
                            "reuse_prefix=False."
                        )
                    return torch.where(m.reshape(shape), c, v)

                h = run_suffix(a, {k: edit})
                return h if head is not None else metric_of(a)(h)

            outs[a].append(vmapped(one, masks, bar))
    if head is not None:  # the LM head once per chunk over every site's patches (it is memory-bound on few rows)
        for a in starts:
            h = torch.cat(outs[a])
            per = max(1, HEAD_ELEMENTS // max(1, h[0].numel() // h.shape[-1] * _vocab(head)))
            r = torch.cat([vmapped(metric_of(a), h[i : i + per], None) for i in range(0, h.shape[0], per)])
            outs[a] = list(r.split([len(o) for o in outs[a]]))
    return torch.stack([torch.cat([outs[a][i] for a in starts]) for i in range(len(keys))])
