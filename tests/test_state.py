"""tdfunc.state and the checks every call makes of a state: names, types, shapes, stacked states."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

import tdfunc


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_stacked_state_outside_vmap_is_refused_with_the_fix():
    net, x = _net(), torch.randn(5, 3)
    s = tdfunc.state(net)
    stacked = torch.stack([s, s])
    with pytest.raises(tdfunc.StateError) as e:
        tdfunc.functional_call(net, stacked, (x,))
    assert str(e.value) == (
        "tdfunc.functional_call: state entry '0.weight' has shape (2, 4, 3), a stack of 2 of Sequential's (4, 3); "
        "a stacked state (an ensemble) runs under torch.func.vmap, e.g. "
        "vmap(lambda s: tdfunc.functional_call(model, s, args))(stacked), or select one member with state[i]."
    )
    out = vmap(lambda st: tdfunc.functional_call(net, st, (x,)))(stacked)  # the fix works
    torch.testing.assert_close(out, torch.stack([net(x), net(x)]))


def test_wrong_shape_is_refused():
    net, x = _net(), torch.randn(5, 3)
    bad = tdfunc.state(net, copy=True).set(("0", "weight"), torch.randn(3, 4))
    with pytest.raises(tdfunc.StateError) as e:
        tdfunc.functional_call(net, bad, (x,))
    assert str(e.value) == (
        "tdfunc.functional_call: state entry '0.weight' has shape (3, 4), but Sequential's tensor of that name has "
        "shape (4, 3); give a tensor of shape (4, 3) (a state built with tdfunc.state(model))."
    )
    # inside a method's f, the call that got the state names itself
    with pytest.raises(tdfunc.StateError, match=r"^tdfunc.functional_call: state entry '0.weight' has shape \(3, 4\)"):
        from tensordict import TensorDict

        tdfunc.saliency(lambda t: tdfunc.functional_call(net, bad, (t["x"],))[:, 0], TensorDict({"x": x}, [5]))


def test_partial_and_mapping_states_are_checked_too():
    net, x = _net(), torch.randn(5, 3)
    with pytest.raises(tdfunc.StateError, match=r"state entry '2.bias' has shape \(3,\)"):
        tdfunc.functional_call(net, {"2.bias": torch.zeros(3)}, (x,))
    y = tdfunc.functional_call(net, {"2.bias": torch.zeros(2)}, (x,))
    torch.testing.assert_close(y, net(x) - net[2].bias)


def test_a_replaced_parameter_is_seen_after_the_first_call():
    net, x = _net(), torch.randn(5, 3)
    tdfunc.functional_call(net, tdfunc.state(net), (x,))  # caches the module's shapes
    net[2] = torch.nn.Linear(4, 6)
    s = tdfunc.state(net)
    assert tdfunc.functional_call(net, s, (x,)).shape == (5, 6)


def test_state_copy_must_be_a_bool():
    with pytest.raises(TypeError) as e:
        tdfunc.state(_net(), copy="no")
    assert str(e.value) == "tdfunc.state: copy must be True or False, got str ('no')."


def test_grad_over_state_and_jacrev_still_pass_the_checks():
    net, x = _net(), torch.randn(5, 3)
    s = tdfunc.state(net)
    g = torch.func.grad(lambda st: tdfunc.functional_call(net, st, (x,)).sum())(s)
    assert g["0", "weight"].shape == (4, 3)
