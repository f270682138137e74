"""randomness= on smooth_grad, infidelity, sensitivity_max and layer_integrated_gradients (issue 15): torch.func.vmap's
flag for random ops in f (train-mode dropout) under each method's own vmap; the default keeps torch's "error", turned
into the family's error naming the method (pinned word for word)."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torch import nn

import tdfunc
from tdfunc import AttributionError

DROP = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 4)).train()
TD = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
F = lambda t: DROP(t["x"])[:, 0]  # noqa: E731
SAL = tdfunc.saliency(lambda t: DROP.eval()(t["x"])[:, 0], TD)
DROP.train()

CALLS = {
    "smooth_grad": lambda **kw: tdfunc.smooth_grad(tdfunc.saliency, F, TD, stdevs=0.1, **kw),
    "infidelity": lambda **kw: tdfunc.infidelity(F, TD, SAL, **kw),
    "sensitivity_max": lambda **kw: tdfunc.sensitivity_max(tdfunc.saliency, F, TD, **kw),
    "layer_integrated_gradients": lambda **kw: tdfunc.layer_integrated_gradients(F, TD, DROP, "1", n_steps=3, **kw),
}


def random_op(name: str) -> str:
    return (
        f"tdfunc.{name}: f calls a random operation (train-mode Dropout, a sampling policy, torch.rand...) inside "
        "the vmap this method runs, where torch's default randomness='error' forbids it; pass "
        "randomness='different' (independent draws per vmapped input) or randomness='same' (one draw shared by "
        "all), or make f deterministic (model.eval())."
    )


@pytest.mark.parametrize("name", list(CALLS))
def test_random_f_raises_by_default_and_runs_with_the_flag(name):
    with pytest.raises(AttributionError) as info:
        CALLS[name]()
    assert str(info.value) == random_op(name)
    for flag in ("different", "same"):
        out = CALLS[name](randomness=flag)
        t = (
            out.get(("attr", "x"))
            if name == "smooth_grad"
            else out.get(("attr", "1"))
            if name.startswith("layer")
            else out
        )
        assert torch.isfinite(t).all()
    with pytest.raises(AttributionError) as info:
        CALLS[name](randomness="differnt")
    assert str(info.value) == (
        f"tdfunc.{name}: randomness must be 'error', 'different' or 'same' (torch.func.vmap's flag), got 'differnt'."
    )


def test_same_shares_one_draw_across_samples_different_does_not():
    """No input noise: with one dropout mask for all samples ("same") every sample's saliency is the same (VarGrad 0);
    with independent masks ("different") they differ."""
    torch.manual_seed(0)
    same = tdfunc.smooth_grad(
        tdfunc.saliency, F, TD, stdevs=0.0, nt_samples=6, nt_type="vargrad", randomness="same", abs=False
    )
    assert same["attr", "x"].abs().max() < 1e-12  # (rounding of mean(a^2) - mean(a)^2)
    diff = tdfunc.smooth_grad(
        tdfunc.saliency, F, TD, stdevs=0.0, nt_samples=6, nt_type="vargrad", randomness="different", abs=False
    )
    assert diff["attr", "x"].abs().max() > 1e-3


def test_flag_reaches_a_method_that_takes_it():  # smooth_grad / sensitivity_max over integrated gradients
    with pytest.raises(AttributionError) as info:
        tdfunc.smooth_grad(tdfunc.integrated_gradients, F, TD, stdevs=0.1, n_steps=2)
    assert str(info.value) == random_op("integrated_gradients")
    out = tdfunc.smooth_grad(tdfunc.integrated_gradients, F, TD, stdevs=0.1, n_steps=2, randomness="different")
    assert torch.isfinite(out["attr", "x"]).all()
    assert torch.isfinite(
        tdfunc.sensitivity_max(tdfunc.integrated_gradients, F, TD, n_steps=2, randomness="same")
    ).all()
