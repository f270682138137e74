"""tdfunc._rewrite.record_then_rewrite, the two-pass helper behind tdfunc.lrp and tdfunc.guided_backprop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tdfunc
from tdfunc._errors import public
from tdfunc._rewrite import Rewrite, record_then_rewrite


class Double(Rewrite):
    """Value kept, Jacobian doubled: ``c + 2 (out − c)`` with ``c`` the recorded output."""

    def record(self, module, args, kwargs, out):
        return out.clone()

    def rewrite(self, module, args, kwargs, out, c):
        return c + 2 * (out - c)


def test_record_then_rewrite_two_passes_one_pass_and_mismatch():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3, dtype=torch.float64)
    net = nn.Sequential(lin, nn.Tanh())
    runs = []

    def f(x):  # the shared Linear runs twice per call: records replay in call order
        runs.append(x.shape)
        return net(lin(x)).sum()

    x = torch.randn(4, 3, dtype=torch.float64)
    g_plain = torch.func.grad(f)(x)
    assert record_then_rewrite(f, net, {}, (x,)) is f  # no site: f itself

    runs.clear()
    two = record_then_rewrite(f, net, {"0": Double()}, (x,))
    assert runs == [x.shape]  # the first pass ran now
    assert torch.equal(two(x), f(x))
    torch.testing.assert_close(torch.func.grad(two)(x), 4 * g_plain, rtol=0, atol=1e-12)  # 2 x 2: both calls doubled

    runs.clear()
    with torch.no_grad():
        one = record_then_rewrite(f, net, {"0": Double()}, (x,))
    assert runs == []  # one pass: nothing runs ahead
    with torch.no_grad():
        assert torch.equal(one(x), f(x))
    torch.testing.assert_close(torch.func.grad(one)(x), 4 * g_plain, rtol=0, atol=1e-12)

    msg = (
        "tdfunc.x: f called the Linear module '0' more often, or with other shapes, than in the first of its two "
        "forwards; f must be deterministic (put dropout layers in eval())."
    )
    with pytest.raises(tdfunc.NotReachedError) as e:  # the public function running it adds its name
        public("tdfunc.x")(two)(torch.randn(5, 3, dtype=torch.float64))  # another shape
    assert str(e.value) == msg
    twice = [False]
    flaky = record_then_rewrite(lambda x: net(lin(x) if twice[0] else x).sum(), net, {"0": Double()}, (x,))
    twice[0] = True  # the Linear now runs twice, once more than recorded
    with pytest.raises(tdfunc.NotReachedError) as e:
        public("tdfunc.x")(flaky)(x)
    assert str(e.value) == msg
