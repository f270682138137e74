"""torch.compile's default backend (inductor, CPU): a silent upstream miscompilation and tdfunc's guard.

torch 2.13's inductor returns an all-zero input gradient for ``vmap(grad(f))`` when ``f`` is
conv -> relu -> max pool and a tensor used *after* the pool requires grad (so the compiled graph is a
training graph).  Eager, ``aot_eager`` and ``aot_eager_decomp_partition`` are right; so is inductor
without the vmap, under ``torch.no_grad()``, with an average pool, without the relu or without the
conv.  Cause (from the generated code): the batched ``max_pool2d_with_indices_backward`` becomes
``zeros.scatter_add(indices, grad_out)``; inductor fuses the zero fill with the relu-backward
``where`` that reads it, while the ``scatter_reduce_`` fallback that fills it runs afterwards, so
``convolution_backward`` sees zeros.  tdfunc's attribution core raises ``MiscompileError`` at trace
time in that situation (inductor + vmap + a max pool in the graph + grad enabled) instead of
returning the zero map.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn
from torch.func import grad, vmap

import tdfunc
from tdfunc.attribution._common import MiscompileError


def _pure_repro():
    torch.manual_seed(0)
    w = torch.randn(4, 1, 3, 3)  # the conv weight need not require grad
    v = torch.randn(64, requires_grad=True)  # a tensor after the pool that requires grad
    f = lambda xi: F.max_pool2d(F.relu(F.conv2d(xi[None], w, padding=1)), 2).flatten() @ v
    fn = lambda x: vmap(grad(f))(x)
    return fn, torch.randn(2, 1, 8, 8)


@pytest.mark.xfail(strict=True, reason="torch 2.13 inductor: vmapped max-pool backward gives zeros (upstream)")
def test_upstream_inductor_vmap_grad_max_pool_equals_eager():
    """Fails while the upstream bug lasts; when it passes, drop tdfunc's MiscompileError guard."""
    fn, x = _pure_repro()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(fn, fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    assert fn(x).abs().max() > 0
    torch.testing.assert_close(compiled, fn(x))


def test_upstream_inductor_is_right_under_no_grad():
    """The same graph compiled as an inference graph is right (tdfunc's guard lets it through)."""
    fn, x = _pure_repro()
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            compiled = torch.compile(fn, fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, fn(x))


def _pool_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3))
    return net, torch.randn(2, 1, 8, 8)


def _saliency_one(net):
    def one(xi):  # one example; the caller vmaps
        td = TensorDict({"x": xi[None]}, batch_size=[1])
        return tdfunc.saliency(lambda t: net(t["x"])[:, 0], td)["attr", "x"][0]

    return one


MESSAGE = (
    "tdfunc.saliency: torch.compile with the default backend (inductor) silently returns an all-zero gradient "
    "through a max pool under vmap when parameters downstream of it require grad (a torch 2.13 bug: the "
    "scatter_add of the batched max-pool backward is scheduled after its reader). Compile with "
    'backend="aot_eager", call under torch.no_grad() (or with parameters that do not require '
    "grad), or call without vmap."
)


def test_vmapped_saliency_under_inductor_raises_instead_of_zeros():
    net, x = _pool_net()
    fn = lambda x: vmap(_saliency_one(net))(x)
    torch._dynamo.reset()
    try:
        # dynamo wraps an exception raised while tracing ("Observed exception"); the message is ours
        with pytest.raises(Exception, match=re.escape(MESSAGE)) as info:
            torch.compile(fn, fullgraph=True)(x)
        assert "raised exception MiscompileError(" in str(info.value)
        # the suggested fixes give eager's result
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x), fn(x))
        torch._dynamo.reset()
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x), fn(x))
    finally:
        torch._dynamo.reset()
    assert fn(x).abs().max() > 0  # eager: no check, no change


def test_miscompile_error_is_a_tdfunc_error():
    assert issubclass(MiscompileError, tdfunc.TdfuncError) and issubclass(MiscompileError, RuntimeError)


def test_batched_saliency_without_vmap_under_inductor_equals_eager():
    """No vmap (one vjp over the batch, K targets sequential on the CPU): inductor is right, no error."""
    net, x = _pool_net()

    def fn(x):
        td = TensorDict({"x": x}, batch_size=[x.shape[0]])
        return tdfunc.saliency(lambda t: net(t["x"]), td)["attr", "x"]

    torch._dynamo.reset()
    try:
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x), fn(x))
    finally:
        torch._dynamo.reset()
