"""functional_call(..., stop=True) and cache_activations(..., stop_early=True): the forward ends at the last capture."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torch import nn
from torch.func import grad, vmap

import tdfunc

DT = torch.float64


class Counter(nn.Module):
    """Identity that counts its calls (to see which layers ran)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def _net(n=6):
    torch.manual_seed(0)
    layers = []
    for _ in range(n):
        layers += [nn.Linear(5, 5), nn.Tanh(), Counter()]
    return nn.Sequential(*layers).to(DT)


def _counts(net):
    return [m.calls for m in net if isinstance(m, Counter)]


def test_captures_equal_the_full_call_and_later_layers_never_run():
    net, x = _net(), torch.randn(4, 5, dtype=DT)
    sites = ["4", "1", "3:input"]
    _, ref = tdfunc.functional_call(net, None, (x,), capture=sites)
    before = _counts(net)
    caps = tdfunc.functional_call(net, None, (x,), capture=sites, stop=True)
    assert isinstance(caps, TensorDict) and set(caps.keys()) == set(sites)
    for s in sites:
        assert torch.equal(caps[s], ref[s])
    ran = [a - b for a, b in zip(_counts(net), before)]
    assert ran == [1, 0, 0, 0, 0, 0]  # only the Counter of the first block ran: the forward stopped at layer 4
    assert torch.equal(net(x), tdfunc.functional_call(net, None, (x,)))  # no hook or frame left behind
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_kth_call_edits_and_an_except_exception_in_model_code():
    class Loop(nn.Module):  # a cell run 4 times; model code that catches Exception must not swallow the stop
        def __init__(self):
            super().__init__()
            self.cell = nn.Linear(5, 5)
            self.after = Counter()

        def forward(self, x):
            for _ in range(4):
                try:
                    x = torch.tanh(self.cell(x))
                except Exception:  # noqa: BLE001
                    x = x * 0
            return self.after(x)

    m, x = Loop().to(DT), torch.randn(2, 5, dtype=DT)
    d = torch.randn(5, dtype=DT)
    kw = dict(edits={"cell@0": tdfunc.delta(d)}, capture=["cell@1"])
    caps = tdfunc.functional_call(m, None, (x,), stop=True, **kw)
    assert torch.equal(caps["cell@1"], tdfunc.functional_call(m, None, (x,), **kw)[1]["cell@1"])
    assert m.after.calls == 1  # only the full call reached it
    # a capture without @k is the first call (the forward ends there)
    first = tdfunc.functional_call(m, None, (x,), capture=["cell"], stop=True)["cell"]
    assert torch.equal(first, m.cell(x))


def test_vmap_grad_and_compile():
    net, x = _net(), torch.randn(4, 5, dtype=DT)

    def cap(x):
        return tdfunc.functional_call(net, None, (x,), capture=["3"], stop=True)["3"]

    def full(x):
        return tdfunc.functional_call(net, None, (x,), capture=["3"])[1]["3"]

    torch.testing.assert_close(vmap(cap)(x), full(x), rtol=0, atol=0)
    torch.testing.assert_close(grad(lambda x: cap(x).sin().sum())(x), grad(lambda x: full(x).sin().sum())(x))
    torch.testing.assert_close(vmap(grad(lambda x: cap(x).sum()))(x), vmap(grad(lambda x: full(x).sum()))(x))
    tdfunc.install_sites(net, ["3"])
    try:
        for backend in ("aot_eager", "inductor"):
            torch._dynamo.reset()
            c = torch.compile(cap, fullgraph=True, backend=backend)
            torch.testing.assert_close(c(x), full(x), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(c(x + 1), full(x + 1), rtol=1e-12, atol=1e-12)
    finally:
        tdfunc.remove_sites(net)
        torch._dynamo.reset()


def test_nested_stop_calls_stop_their_own_forward():
    net, x = _net(), torch.randn(4, 5, dtype=DT)
    inner = lambda x: tdfunc.functional_call(net, None, (x,), capture=["1"], stop=True)["1"]  # noqa: E731
    outer = tdfunc.functional_call(net, None, (x,), capture=["7"], stop=True)
    assert torch.equal(inner(x), torch.tanh(net[0](x)))
    g = tdfunc.intervene(lambda x: inner(x) + tdfunc.functional_call(net, None, (x,))[0], net, capture=["4"])
    out, caps = g(x)
    assert torch.equal(caps["4"], tdfunc.functional_call(net, None, (x,), capture=["4"])[1]["4"])
    assert torch.equal(outer["7"], tdfunc.functional_call(net, None, (x,), capture=["7"])[1]["7"])


def test_errors():
    net, x = _net(), torch.randn(4, 5, dtype=DT)
    with pytest.raises(TypeError, match=r"tdfunc\.functional_call: stop must be True or False, got str \('yes'\)"):
        tdfunc.functional_call(net, None, (x,), capture=["1"], stop="yes")  # type: ignore[call-overload]
    with pytest.raises(
        tdfunc.SiteError,
        match=r"tdfunc\.functional_call: stop=True ends the forward once every captured site has been reached, "
        r"but capture is None; name the sites to capture",
    ):
        tdfunc.functional_call(net, None, (x,), stop=True)  # type: ignore[call-overload]
    with pytest.raises(tdfunc.SiteError, match=r"stop=True cannot tell when the forward has made its last call of "):
        tdfunc.functional_call(net, None, (x,), capture=["1@*"], stop=True)
    with pytest.raises(TypeError, match=r"stop=True ends the forward early, so there is no state after the call"):
        tdfunc.functional_call(net, None, (x,), capture=["1"], stop=True, return_state=True)  # type: ignore[call-overload]
    with pytest.raises(tdfunc.NotReachedError, match=r"the edit at site '10' was never applied"):
        tdfunc.functional_call(net, None, (x,), edits={"10": lambda v: v}, capture=["1"], stop=True)


def test_cache_activations_stop_early():
    net = _net()
    data = [TensorDict({"input": torch.randn(3, 5, dtype=DT)}, batch_size=[3]) for _ in range(3)]
    ref = tdfunc.latent.cache_activations(net, None, data, ["1", "4"], progress=False)
    before = _counts(net)
    got = tdfunc.latent.cache_activations(net, None, data, ["1", "4"], progress=False, stop_early=True)
    assert [a - b for a, b in zip(_counts(net), before)] == [3, 0, 0, 0, 0, 0]
    for k in ("1", "4"):
        assert torch.equal(got[k], ref[k])
    with pytest.raises(tdfunc.latent.CacheError, match=r"stop_early must be True or False, got int \(1\)"):
        tdfunc.latent.cache_activations(net, None, data, ["1"], progress=False, stop_early=1)  # type: ignore[arg-type]
    with pytest.raises(
        tdfunc.latent.CacheError, match=r"stop_early=True cannot tell when the forward has made its last"
    ):
        tdfunc.latent.cache_activations(net, None, data, ["1@*"], progress=False, stop_early=True)


def test_compiled_graph_holds_only_the_layers_before_the_stop():
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(30)])
    x = torch.randn(2, 8)
    counts = {}

    def counting(name):
        def backend(gm, example_inputs):
            counts[name] = sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_module", "call_method"))
            return gm.forward

        return backend

    tdfunc.install_sites(net, ["2"])
    try:
        for name, stop in (("stop", True), ("full", False)):
            torch._dynamo.reset()
            if stop:
                f = lambda x: tdfunc.functional_call(net, None, (x,), capture=["2"], stop=True)["2"]  # noqa: E731
            else:
                f = lambda x: tdfunc.functional_call(net, None, (x,), capture=["2"])[1]["2"]  # noqa: E731
            torch.testing.assert_close(torch.compile(f, fullgraph=True, backend=counting(name))(x), net[:3](x))
    finally:
        tdfunc.remove_sites(net)
        torch._dynamo.reset()
    assert counts["stop"] * 5 <= counts["full"], counts  # 3 blocks of 30 traced (6 vs 60 ops)


def test_intervene_stop():
    net, x = _net(), torch.randn(4, 5, dtype=DT)
    after = []

    def f(x):  # any function calling the model; what follows the model never runs once the stop fires
        y = net(x * 2.0)
        after.append(1)
        return y

    g = tdfunc.intervene(f, net, edits={"0": lambda v: v + 1.0}, capture=["1", "3:input"], stop=True)
    before = _counts(net)
    caps = g(x)
    assert [a - b for a, b in zip(_counts(net), before)] == [1, 0, 0, 0, 0, 0] and after == []
    _, ref = tdfunc.intervene(f, net, edits={"0": lambda v: v + 1.0}, capture=["1", "3:input"])(x)
    for k in ("1", "3:input"):
        assert torch.equal(caps[k], ref[k])
    torch.testing.assert_close(vmap(lambda x: g(x)["1"])(x), ref["1"])
    with pytest.raises(TypeError, match=r"tdfunc\.intervene: stop must be True or False, got int \(1\)"):
        tdfunc.intervene(f, net, capture=["1"], stop=1)  # type: ignore[call-overload]
    with pytest.raises(tdfunc.SiteError, match=r"tdfunc\.intervene: stop=True ends the forward once every captured"):
        tdfunc.intervene(f, net, stop=True)  # type: ignore[call-overload]
