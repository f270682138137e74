"""Stop early: a forward that ends once every captured site has been captured (``functional_call(..., stop=True)``).

A :class:`StopFrame` is a frame that knows which captures it still waits for.  The runtime tells it of
each capture it records (``_runtime._apply``); once the hook that recorded the last one has run every
active call's ops there, :func:`stop_if_done` raises :class:`Stop`, a ``BaseException`` (model code's
``except Exception`` cannot swallow it), which leaves the model's forward at once and is caught by the
call that pushed the frame.  The captures are the result; there is no output.
"""

from __future__ import annotations

from typing import Any

from ._errors import SiteError, TdfuncTypeError
from ._plan import Frame, Plan, _Op
from ._sites import ALL_CALLS

__all__ = ["Stop", "StopFrame", "check_stop", "stop_if_done"]


class Stop(BaseException):
    """Raised inside the forward of a ``stop=True`` call once every capture has been recorded (``args[0]``: the
    frame; no ``__init__`` of its own, which dynamo could not trace)."""


class StopFrame(Frame):
    __slots__ = ("left",)

    def __init__(self, plan: Plan, reparam: Any = None):
        super().__init__(plan, reparam)
        self.left = {op.slot for op in plan.captures if not op.hidden}

    def captured(self, op: _Op) -> None:
        """Called after ``op`` recorded a value: one capture fewer to wait for."""
        self.left.discard(op.slot)


def stop_if_done(frames: list) -> None:
    """At the end of a hook: raise :class:`Stop` for the innermost stop frame with nothing left to capture."""
    for frame in frames:
        if type(frame) is StopFrame and not frame.left:
            raise Stop(frame)


def check_stop(plan: Plan | None, capture: Any, return_state: bool) -> None:
    """What ``stop=True`` needs: captures, each of one call (not ``@*``), and no ``return_state``."""
    if plan is None or not any(not op.hidden for op in plan.captures):
        raise SiteError(
            f"stop=True ends the forward once every captured site has been reached, but capture is "
            f"{capture!r}; name the sites to capture (capture=['layers.2']), or drop stop=True."
        )
    for op in plan.captures:
        if op.call == ALL_CALLS and not op.hidden:
            raise SiteError(
                f"stop=True cannot tell when the forward has made its last call of capture {op.key!r} ('@*' "
                f"captures every call); capture the calls you need as '@0', '@1', …, or drop stop=True."
            )
    if return_state:
        raise TdfuncTypeError(
            "stop=True ends the forward early, so there is no state after the call; "
            "drop return_state=True or stop=True."
        )
