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


# ------------------------------------------------------------------ wrapped models: DDP, DataParallel, compile


def _bn_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


@pytest.fixture
def gloo():
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_wrapped_models_give_the_inner_models_state_and_run_it(gloo):
    from torch.nn.parallel import DistributedDataParallel

    net, x = _bn_net().eval(), torch.randn(5, 3)
    inner = tdfunc.state(net)
    for wrapped in (
        DistributedDataParallel(net),
        torch.nn.DataParallel(net),
        torch.compile(net),
        torch.compile(DistributedDataParallel(net)),
    ):
        s = tdfunc.state(wrapped)
        assert sorted(s.keys(True, True)) == sorted(inner.keys(True, True))  # no module. / _orig_mod. prefix
        assert all(s[k].data_ptr() == inner[k].data_ptr() for k in inner.keys(True, True))
        out, caps = tdfunc.functional_call(wrapped, s, (x,), capture="1")  # the inner model's sites too
        torch.testing.assert_close(out, net(x), rtol=0, atol=0)
        torch.testing.assert_close(caps["1"], net[:2](x), rtol=0, atol=0)
        out, caps = tdfunc.intervene(net, wrapped, edits={"2": torch.zeros(5, 4)}, capture="2")(x)
        torch.testing.assert_close(out, net[3].bias.expand(5, 2), rtol=0, atol=0)


def test_gradient_methods_inside_a_ddp_training_loop(gloo):
    """Before: saliency through a DDP model failed in DDP's buffer broadcast ("Cannot access data pointer of Tensor
    that doesn't have storage"). Now tdfunc runs the inner model: no broadcast, no gradient hooks, so the training
    steps around it are those of a loop without tdfunc calls."""
    import copy

    from tensordict import TensorDict
    from torch.nn.parallel import DistributedDataParallel

    net = _bn_net()  # training mode: BatchNorm writes its running statistics
    ref = copy.deepcopy(net)
    ddp, ref_ddp = DistributedDataParallel(net), DistributedDataParallel(ref)
    opt, ref_opt = torch.optim.SGD(ddp.parameters(), lr=0.1), torch.optim.SGD(ref_ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(8, 3, generator=g)
        for model, o in ((ddp, opt), (ref_ddp, ref_opt)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
        td = TensorDict({"x": x}, [8])
        got = tdfunc.saliency(lambda t: tdfunc.functional_call(ddp, None, (t["x"],))[:, 0], td)
        want = tdfunc.saliency(lambda t: tdfunc.functional_call(net, None, (t["x"],))[:, 0], td)
        torch.testing.assert_close(got["attr", "x"], want["attr", "x"], rtol=0, atol=0)
        ddp.eval()  # vmap-based methods need eval-mode BatchNorm (README Limitations), as outside DDP
        ig = tdfunc.integrated_gradients(lambda t: tdfunc.functional_call(ddp, None, (t["x"],))[:, 1], td, n_steps=8)
        ig_ref = tdfunc.integrated_gradients(
            lambda t: tdfunc.functional_call(net, None, (t["x"],))[:, 1], td, n_steps=8
        )
        ddp.train()
        torch.testing.assert_close(ig["attr", "x"], ig_ref["attr", "x"], rtol=0, atol=0)
        weights = tdfunc.state(ddp).select(("0", "weight"), ("3", "weight"))
        gw = torch.func.grad(lambda s: tdfunc.functional_call(ddp, s, (x,)).sum())(weights)
        gw_ref = torch.func.grad(lambda s: tdfunc.functional_call(net, s, (x,)).sum())(weights)
        torch.testing.assert_close(gw, gw_ref, rtol=0, atol=0)
    # the tdfunc calls changed nothing: parameters, running statistics and gradients equal the plain loop's
    for (k, a), (_, b) in zip(tdfunc.state(ddp).items(True, True), tdfunc.state(ref_ddp).items(True, True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=str(k))
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_fsdp2_sharded_model_with_a_state_is_refused_and_left_intact(gloo):
    """Before: a DTensor state ran once, then every call (a plain one too) failed with 'mixed torch.Tensor and
    DTensor' (the module left broken), and a later gradient over the state came back all zeros."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    net, x = _net(), torch.randn(5, 3)
    ref = _net()
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(net[0], mesh=mesh)
    fully_shard(net, mesh=mesh)
    fix = (
        "gather the full state (torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
        "options=StateDictOptions(full_state_dict=True))) and run tdfunc on the model built without fully_shard "
        "with it loaded (load_state_dict), or call with state=None (the sharded model's own forward)."
    )

    def msg(fn, key):
        return (
            f"{fn}: FSDPSequential is sharded with FSDP2 (fully_shard): its tensor {key!r} is a DTensor. A "
            "functional call with a state would swap its parameters under FSDP's own unshard / reshard hooks "
            f"(all-zero gradients, a module left broken), so tdfunc refuses it; {fix}"
        )

    with pytest.raises(tdfunc.StateError) as e:
        tdfunc.state(net)
    assert str(e.value) == msg("tdfunc.state", "0.weight")
    sharded = {k: v for k, v in net.state_dict().items()}
    assert isinstance(sharded["0.weight"], DTensor)
    for state in (sharded, {"2.bias": torch.zeros(2)}):  # a DTensor state, a plain partial state
        with pytest.raises(tdfunc.StateError) as e:
            tdfunc.functional_call(net, state, (x,))
        assert str(e.value) == msg("tdfunc.functional_call", "0.weight")
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)  # the module still works
    # state=None runs the sharded model's own forward: captures and gradients are right
    out, caps = tdfunc.functional_call(net, None, (x,), capture="0")
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)
    torch.testing.assert_close(caps["0"], ref[0](x), rtol=0, atol=0)
    from tensordict import TensorDict

    td = TensorDict({"x": x}, [5])
    got = tdfunc.saliency(lambda t: tdfunc.functional_call(net, None, (t["x"],))[:, 0], td)
    want = tdfunc.saliency(lambda t: ref(t["x"])[:, 0], td)
    torch.testing.assert_close(got["attr", "x"], want["attr", "x"], rtol=0, atol=0)
    torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)
