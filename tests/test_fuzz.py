"""Hypothesis fuzz of the core call over random models (issue 15, "keep it from coming back").

Random MLP / CNN architectures (in-place activations included), random site subsets and edits
(substitute / callable / delta): capture and edit = a forward-hook reference; ``vmap`` over edits = the
loop; ``intervene`` = ``functional_call``; nothing the caller passed in is written.  A fixed, derandomised
budget so the file runs in well under 40 s on 2 cores.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import vmap

import tdfunc

BUDGET = settings(
    max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None
)
ACTS = [
    lambda: nn.ReLU(),
    lambda: nn.ReLU(inplace=True),
    lambda: nn.Tanh(),
    lambda: nn.GELU(),
    lambda: nn.LeakyReLU(0.1, inplace=True),
]


@st.composite
def models(draw):
    """(model, input): a random MLP or small CNN, float64, eval mode."""
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    if draw(st.booleans()):
        widths = draw(st.lists(st.integers(1, 6), min_size=2, max_size=5))
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers.append(nn.Linear(a, b))
            if draw(st.booleans()):
                layers.append(ACTS[draw(st.integers(0, len(ACTS) - 1))]())
        x = torch.randn(draw(st.integers(1, 3)), widths[0])
    else:
        c = draw(st.integers(1, 3))
        layers = [
            nn.Conv2d(1, c, 3, padding=1),
            ACTS[draw(st.integers(0, len(ACTS) - 1))](),
            nn.Conv2d(c, 2, 3),
            ACTS[draw(st.integers(0, len(ACTS) - 1))](),
            nn.Flatten(),
            nn.Linear(2 * 4 * 4, 3),
        ]
        x = torch.randn(draw(st.integers(1, 3)), 1, 6, 6)
    return nn.Sequential(*layers).double().eval(), x.double()


def _shapes(model, x) -> dict:
    shapes, hs = {}, []
    for name, m in model.named_children():
        hs.append(m.register_forward_hook(lambda mod, a, out, name=name: shapes.__setitem__(name, out.shape)))
    with torch.no_grad():
        model(x.clone())
    for h in hs:
        h.remove()
    return shapes


@st.composite
def cases(draw):
    model, x = draw(models())
    shapes = _shapes(model, x)
    names = list(shapes)
    sites = draw(st.lists(st.sampled_from(names), unique=True, min_size=1, max_size=min(3, len(names))))
    captures = draw(st.lists(st.sampled_from(names), unique=True, max_size=3))
    edits = {}
    for s in sites:
        kind = draw(st.sampled_from(["substitute", "callable", "delta"]))
        t = torch.randn(shapes[s], dtype=torch.float64)
        edits[s] = (kind, t)
    return model, x, edits, captures


def _tdfunc_edits(edits: dict) -> dict:
    out = {}
    for s, (kind, t) in edits.items():
        if kind == "substitute":
            out[s] = t
        elif kind == "callable":
            out[s] = lambda v, t=t: 0.5 * v + t
        else:
            out[s] = tdfunc.delta(t)
    return out


def _reference(model, x, edits: dict, captures: list):
    """The same run with plain forward hooks (clones, so nothing the caller owns is written)."""
    caps, hs = {}, []
    for name, m in model.named_children():

        def hook(mod, a, out, name=name):
            if name in edits:
                kind, t = edits[name]
                out = t.clone() if kind == "substitute" else (0.5 * out + t if kind == "callable" else out + t)
            if name in captures:
                caps[name] = out.clone()
            return out

        hs.append(m.register_forward_hook(hook))
    try:
        y = model(x.clone())
    finally:
        for h in hs:
            h.remove()
    return y, caps


@BUDGET
@given(cases())
def test_capture_and_edit_equal_a_forward_hook_reference(case):
    model, x, edits, captures = case
    x0 = x.clone()
    given_edits = {s: t.clone() for s, (_, t) in edits.items()}
    want_y, want = _reference(model, x, edits, captures)
    y, got = tdfunc.functional_call(model, None, (x,), edits=_tdfunc_edits(edits), capture=captures or [])
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    for s in captures:
        torch.testing.assert_close(got[s], want[s], rtol=1e-12, atol=1e-12)
    # twice: the same (no state carried over, nothing written into the edits or the input)
    y2, got2 = tdfunc.functional_call(model, None, (x,), edits=_tdfunc_edits(edits), capture=captures or [])
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    assert torch.equal(x, x0)
    for s, (_, t) in edits.items():
        assert torch.equal(t, given_edits[s]), f"the edit tensor at {s!r} was written"
    # intervene = functional_call
    yi, goti = tdfunc.intervene(lambda inp: model(inp), model, edits=_tdfunc_edits(edits), capture=captures or [])(x)
    torch.testing.assert_close(yi, y, rtol=0, atol=0)
    for s in captures:
        torch.testing.assert_close(goti[s], got[s], rtol=0, atol=0)


@BUDGET
@given(cases(), st.integers(2, 3))
def test_vmap_over_edits_equals_the_loop(case, n):
    model, x, edits, _ = case
    site = next(iter(edits))
    kind, t = edits[site]
    ts = torch.stack([t + i for i in range(n)])
    if kind == "substitute":
        make = lambda v: v  # noqa: E731
    elif kind == "callable":
        make = lambda v: (lambda h, v=v: 0.5 * h + v)  # noqa: E731
    else:
        make = tdfunc.delta
    run = lambda v: tdfunc.functional_call(model, None, (x,), edits={site: make(v)})  # noqa: E731
    batched = vmap(run)(ts)
    loop = torch.stack([run(v) for v in ts])
    torch.testing.assert_close(batched, loop, rtol=1e-10, atol=1e-12)


def test_the_budget_is_fixed():
    assert BUDGET.max_examples == 30 and BUDGET.deadline is None and BUDGET.derandomize


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
