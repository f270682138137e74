"""Edits inside ``torch.utils.checkpoint`` regions: recompute the region's forward under the call's frames.

A checkpointed region (torch.utils.checkpoint, reentrant or not; transformers'
gradient_checkpointing_enable) runs its forward again during backward, after the call that
edited it has returned.  Recomputed without the call's frames (and with the module's own
parameters instead of the call's state), it would give the backward other values than the
forward: a silently wrong gradient.  So the first hook that applies an op inside such a region
finds the region on the Python stack and wraps its recompute function: the recomputation runs
under copies of the frames as they were when the region began (counters and recorded values, so
'@k' and from_site see the same calls), the same substituted state, with the sites installed.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch

from . import _runtime
from ._errors import here, public
from ._plan import Frame
from ._sites import acquire, release


def _wrap_recompute(owner: Any, attr: str, frames: list[Frame]) -> None:
    fn = getattr(owner, attr, None)
    if fn is None or getattr(fn, "_tdfunc_replay", False):
        return
    snaps = [f.snapshot() for f in reversed(frames)]  # push order: outermost first

    def recompute(*args, **kwargs):
        return _replay(snaps, fn, args, kwargs)

    # the recompute runs in a backward after the call returned: its errors name the call that ran the region
    named = public(here())(recompute)
    named._tdfunc_replay = True  # type: ignore[attr-defined]
    setattr(owner, attr, named)


def _replay(snaps: list[Frame], fn, args, kwargs):
    n_frames = len(snaps)  # read by watch_checkpoints: the frames this function pushed  # noqa: F841
    frames = [s.snapshot() for s in snaps]  # every recomputation (one per backward) starts afresh
    with contextlib.ExitStack() as stack:
        for f in frames:
            if f.reparam is not None:
                module, params, fresh = f.reparam
                params = {k: (v.clone() if k in fresh else v) for k, v in params.items()} if fresh else params
                stack.enter_context(torch.nn.utils.stateless._reparametrize_module(module, params, tie_weights=True))
        held = []
        try:
            for f in frames:
                held.append(acquire(f.plan.sites))
            for f in frames:
                _runtime.push(f)
            try:
                return _runtime.call_with_ops(any(f.plan.ops for f in frames), fn, args, kwargs)
            finally:
                for _ in frames:
                    _runtime.pop()
        finally:
            for h in held:
                release(h)


_CODES: tuple | None = None


def _codes() -> tuple:
    global _CODES
    if _CODES is None:
        import inspect

        import torch.utils.checkpoint as ckpt

        _CODES = (
            inspect.unwrap(ckpt.checkpoint).__code__,
            ckpt.CheckpointFunction.forward.__code__,
            _runtime.run_frame.__code__,
            _replay.__code__,
        )
    return _CODES


def watch_checkpoints(frames: list[Frame]) -> None:
    """Wrap the recompute function of every checkpoint region entered inside ``frames``' calls."""
    if torch.compiler.is_compiling():  # compiled checkpoints are traced, not recomputed by these functions
        return
    free, reentrant, call, replay = _codes()
    n, passed = len(frames), 0
    f = sys._getframe(2)
    while f is not None and passed < n:
        code = f.f_code
        if code is call:
            passed += 1  # frames[passed:] were pushed before anything further up the stack
        elif code is replay:
            passed += f.f_locals["n_frames"]
        elif code is free:  # use_reentrant=False: the region's _CheckpointFrame lives in the generator
            gen = f.f_locals.get("gen")
            gi = getattr(gen, "gi_frame", None)
            ck = gi.f_locals.get("new_frame") if gi is not None else None
            if ck is not None:
                _wrap_recompute(ck, "recompute_fn", frames[passed:])
        elif code is reentrant:  # use_reentrant=True: backward calls ctx.run_function again
            ctx = f.f_locals.get("ctx")
            if ctx is not None:
                _wrap_recompute(ctx, "run_function", frames[passed:])
        f = f.f_back  # type: ignore[assignment]  # None ends the loop
