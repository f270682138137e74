"""Finishing a frame: every edit applied, every capture found once, and the errors that say why not."""

from __future__ import annotations

import torch
from tensordict import TensorDict

from ._errors import NotReachedError
from ._plan import Frame, _Op
from ._sites import ALL_CALLS


def _times(n: int) -> str:
    return {0: "never ran", 1: "ran once"}.get(n, f"ran {n} times")


def _calls(frame: Frame, op: _Op) -> int:
    for m, entry in frame.plan.entries.items():
        if op in entry.inputs:
            return frame.counts[entry.counter]
        if op in entry.outputs:
            return frame.counts[entry.counter + 1]
    for oes in frame.plan.ops.values():
        for oe in oes:
            if op in oe.inputs or op in oe.outputs:
                return frame.counts[oe.counter]
    return 0


def _ran(frame: Frame, op: _Op) -> str:
    """How often the site's module (or operation) ran in this call, for a NotReachedError."""
    n = _calls(frame, op)
    if op.opname is None:
        return f"the module {_times(n)} in this call"
    path = op.key.split("/")[0]
    calls = {0: "was never called", 1: "was called once"}.get(n, f"was called {n} times")
    return f"{op.opname} {calls} under {path!r} in this call"


def _op_hint(op: _Op) -> str:
    if op.opname != "softmax":
        return ""
    return (
        " A model whose attention runs torch's scaled_dot_product_attention (transformers' default, "
        "attn_implementation='sdpa') never forms the attention pattern: load it with attn_implementation='eager' "
        "to address the softmax, or use the site '…/scaled_dot_product_attention' for the attention output."
    )


def finish(frame: Frame) -> TensorDict:
    """Check every edit was applied and every capture found once; return the captures."""
    for op in frame.plan.edits:
        if frame.hits[op.slot] == 0 and frame.plan.strict:
            raise NotReachedError(
                f"the edit at site {op.key!r} was never applied: {_ran(frame, op)}"
                + (f", so it has no call {op.call}" if op.call not in (None, ALL_CALLS) else "")
                + ". Check that the forward reaches this module (and with these inputs), or remove the edit."
                + _op_hint(op)
            )
    out = {}
    for op in frame.plan.captures:
        if op.hidden:
            continue
        vals = frame.values[op.slot]
        if not vals and not frame.plan.strict:
            continue
        if not vals:
            raise NotReachedError(
                f"nothing was captured at site {op.key!r}: {_ran(frame, op)}"
                + (f", so it has no call {op.call}" if op.call not in (None, ALL_CALLS) else "")
                + ". Capture a site the forward reaches."
                + _op_hint(op)
            )
        if op.call is None and len(vals) > 1:
            raise NotReachedError(
                f"site {op.key!r} ran {len(vals)} times in this call, so a single capture is ambiguous; "
                f"capture '{op.key}@0' … '{op.key}@{len(vals) - 1}' for one call, or '{op.key}@*' for all of them "
                "stacked on a new leading dimension."
            )
        if op.call == ALL_CALLS:
            shapes = {tuple(v.shape) for v in vals if isinstance(v, torch.Tensor)}
            if len(shapes) > 1:
                raise NotReachedError(
                    f"site {op.key!r} gave values of different shapes {sorted(shapes)} over its "
                    f"{len(vals)} calls and cannot be stacked; capture each call with '@k'."
                )
            out[op.key] = torch.stack(vals)
        else:
            out[op.key] = vals[0]
    return TensorDict(out, batch_size=[])
