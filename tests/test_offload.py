"""accelerate offload: what works on an offloaded model, and a tdfunc error (not a failure deep inside accelerate,
not a raw TypeError) for what cannot work.  Tiny models; accelerate's cpu_offload / disk offload / dispatch_model."""

from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict

import tdfunc

accelerate = pytest.importorskip("accelerate")

FN = "tdfunc.functional_call"
WORKS = "captures, edits, patch / path_patch, cache_activations and generate_greedy (no torch.func transform)"


def _base():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


X = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
TD = TensorDict({"x": X}, [5])


def _sal(net):
    return tdfunc.saliency(lambda t: tdfunc.functional_call(net, None, (t["x"],))[:, 0], TD)["attr", "x"]


def _dispatched(tmp_path, offload: bool):
    net = _base()
    device_map = {"0": "cpu", "1": "cpu", "2": "disk" if offload else "cpu"}
    return accelerate.dispatch_model(
        net, device_map=device_map, offload_dir=str(tmp_path), main_device="cpu", force_hooks=True
    )


def test_dispatched_with_offload_refuses_gradient_methods_and_runs_the_rest(tmp_path):
    ref, net = _base(), _dispatched(tmp_path, offload=True)
    with pytest.raises(tdfunc.StateError) as e:
        _sal(net)
    assert str(e.value) == (
        f"{FN}: Sequential is dispatched by accelerate with offloaded modules (submodule '2': weights loaded from "
        "'cpu' / 'disk' during its forward), and this call runs inside a torch.func transform (grad, vjp, vmap: every "
        "gradient method, vmap sweeps such as patching_sweep). accelerate's hooks read the data pointers of the "
        "tensors they move, which tensors inside a transform do not have, so it would fail inside accelerate. What "
        f"works on offloaded models: {WORKS}. For gradient methods load the model without offload (a device_map "
        "without 'cpu' / 'disk'), or offload with accelerate.cpu_offload(model), whose hooks hold no tied-parameter "
        "map."
    )
    out, caps = tdfunc.functional_call(net, None, (X,), capture="0", edits={"1": lambda v: 2 * v})
    torch.testing.assert_close(out, ref[2](2 * ref[1](ref[0](X))), rtol=0, atol=0)
    torch.testing.assert_close(caps["0"], ref[0](X), rtol=0, atol=0)
    cache = tdfunc.latent.cache_activations(net, None, [TD[:3], TD[3:]], "2", input_key="x", progress=False)
    torch.testing.assert_close(cache["2"], torch.cat([ref(X[:3]), ref(X[3:])]), rtol=0, atol=0)
    torch.testing.assert_close(net(X), ref(X), rtol=0, atol=0)  # the model still works


def test_dispatched_without_offload_runs_gradient_methods(tmp_path):
    ref, net = _base(), _dispatched(tmp_path, offload=False)
    want = tdfunc.saliency(lambda t: ref(t["x"])[:, 0], TD)["attr", "x"]
    torch.testing.assert_close(_sal(net), want, rtol=0, atol=0)
    w = tdfunc.state(net).select(("0", "weight"))
    got = torch.func.grad(lambda s: tdfunc.functional_call(net, s, (X,)).sum())(w)
    torch.testing.assert_close(got, torch.func.grad(lambda s: tdfunc.functional_call(ref, s, (X,)).sum())(w))


def test_cpu_offload_runs_gradient_methods_but_refuses_a_state():
    ref = _base()
    net = accelerate.cpu_offload(copy.deepcopy(ref), execution_device=torch.device("cpu"))
    want = tdfunc.saliency(lambda t: ref(t["x"])[:, 0], TD)["attr", "x"]
    torch.testing.assert_close(_sal(net), want, rtol=0, atol=0)  # no tied-parameter map: transforms work
    for state in (tdfunc.state(net), tdfunc.state(ref)):  # meta placeholders, or real tensors: both refused
        with pytest.raises(tdfunc.StateError) as e:
            tdfunc.functional_call(net, state, (X,))
        assert str(e.value) == (
            f"{FN}: Sequential is offloaded by accelerate (submodule '0'): its tensor '0.weight' lives on the meta "
            "device and accelerate's hooks load it only during the forward, so a state cannot replace it (accelerate "
            f"fails with a TypeError). Call with state=None: {WORKS} work; for a state (gradients over the weights, "
            "weight edits) load the model without offload."
        )
    torch.testing.assert_close(net(X), ref(X), rtol=0, atol=0)
