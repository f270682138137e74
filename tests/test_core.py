"""Behaviour of the core: state, sites, edit forms, nesting, re-entrancy, threads, in-place ops."""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch
from models import CNN, MLP, Recurrent, TinyTransformer, hook_dicts
from tensordict import TensorDict
from torch import nn
from torch.func import vmap

import tdfunc

# --- state ------------------------------------------------------------------------------------------


def test_state_mirrors_tree_plain_tensors_shared_storage():
    tt = TinyTransformer()
    s = tdfunc.state(tt)
    w = s["blocks", "0", "attn", "qkv", "weight"]
    assert type(w) is torch.Tensor and not w.requires_grad
    assert w.data_ptr() == tt.blocks[0].attn.qkv.weight.data_ptr()  # no copy by default
    as_tuple = lambda k: k if isinstance(k, tuple) else (k,)
    assert {as_tuple(k) for k in s.keys(include_nested=True, leaves_only=True)} == {
        tuple(n.split(".")) for n, _ in list(tt.named_parameters()) + list(tt.named_buffers())
    }
    c = tdfunc.state(tt, copy=True)
    assert c["blocks", "0", "attn", "qkv", "weight"].data_ptr() != w.data_ptr()
    assert (c == s).all()


def test_state_buffers_and_partial_state_fall_back_to_module():
    cnn = CNN().eval()
    s = tdfunc.state(cnn)
    assert ("bn", "running_var") in s.keys(include_nested=True)
    x = torch.randn(2, 1, 6, 6)
    partial = TensorDict({"fc": {"bias": torch.full((5,), 3.0)}}, batch_size=[])
    out = tdfunc.functional_call(cnn, partial, (x,))
    ref = cnn(x) - cnn.fc.bias + 3.0
    torch.testing.assert_close(out, ref)
    flat = {"fc.bias": torch.full((5,), 3.0)}  # a flat mapping with dotted names works too
    torch.testing.assert_close(tdfunc.functional_call(cnn, flat, (x,)), ref)


def test_tied_weights_follow_the_state():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.out = nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, t):
            return self.out(self.emb(t))

    m = Tied()
    s = tdfunc.state(m)
    assert ("out", "weight") not in s.keys(include_nested=True)  # tied tensors appear once
    new = s.apply(torch.zeros_like)
    assert torch.equal(tdfunc.functional_call(m, new, (torch.tensor([1, 2]),)), torch.zeros(2, 7))


def test_stacked_states_from_modules_under_vmap():
    members = [MLP() for _ in range(4)]
    stacked = TensorDict.from_modules(*members).data  # detached stacked view
    x = torch.randn(5, 6)
    out = vmap(lambda s: tdfunc.functional_call(members[0], s, (x,)))(stacked)
    ref = torch.stack([m(x) for m in members])
    torch.testing.assert_close(out, ref)


# --- edit forms ------------------------------------------------------------------------------------


def _mlp_by_hand(m, x, act=None, fc2_in=None):
    a = m.act(m.fc1(x))
    a = act(a) if act else a
    z = m.fc2(fc2_in(a) if fc2_in else a)
    return m.head(m.act2(z))


def test_edit_forms_match_hand_computation():
    m, x = MLP(), torch.randn(4, 6)
    sub = torch.randn(8)
    torch.testing.assert_close(
        tdfunc.functional_call(m, None, (x,), edits={"act": sub}), _mlp_by_hand(m, x, act=lambda a: sub.expand_as(a))
    )
    torch.testing.assert_close(
        tdfunc.functional_call(m, None, (x,), edits={"act": lambda v: -v}), _mlp_by_hand(m, x, act=lambda a: -a)
    )
    d = torch.randn(4, 8)
    torch.testing.assert_close(
        tdfunc.functional_call(m, None, (x,), edits={"act": tdfunc.delta(d)}), _mlp_by_hand(m, x, act=lambda a: a + d)
    )
    torch.testing.assert_close(
        tdfunc.functional_call(m, None, (x,), edits={"fc2:input": lambda v: 2 * v}),
        _mlp_by_hand(m, x, fc2_in=lambda a: 2 * a),
    )
    # several edits at one site apply in mapping order; a capture sees the value after them
    out, caps = tdfunc.functional_call(m, None, (x,), edits={"act": lambda v: v + 1, "*": lambda v: v}, capture=["act"])
    torch.testing.assert_close(caps["act"], m.act(m.fc1(x)) + 1)


def test_delta_gives_the_activation_gradient_like_a_backward_hook():
    m, x = MLP(), torch.randn(4, 6)
    d0 = torch.zeros(4, 8)
    g = torch.func.grad(lambda d: tdfunc.functional_call(m, None, (x,), edits={"fc2": tdfunc.delta(d)})[:, 1].sum())(d0)
    seen = {}
    h = m.fc2.register_full_backward_hook(lambda mod, gin, gout: seen.update(g=gout[0]))
    m(x)[:, 1].sum().backward()
    h.remove()
    assert torch.equal(g, seen["g"])


def test_rule_sees_substituted_weights():
    m, x = MLP(), torch.randn(4, 6)
    s = tdfunc.state(m, copy=True)
    s["fc2", "weight"] = torch.randn(8, 8)
    seen = {}
    r = tdfunc.rule(lambda mod, a, k, out: (seen.update(w=mod.weight), out)[1])
    tdfunc.functional_call(m, s, (x,), edits={"fc2": r})
    assert torch.equal(seen["w"], s["fc2", "weight"])


def test_tuple_outputs_and_output_elements():
    class Pair(nn.Module):
        def forward(self, x):
            return x + 1, x * 10

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            a, b = self.pair(x)
            return a + b

    x = torch.ones(3)
    out, caps = tdfunc.functional_call(Net(), None, (x,), capture=["pair", "pair:output.1"])
    assert torch.equal(caps["pair"], x + 1) and torch.equal(caps["pair:output.1"], 10 * x)
    out = tdfunc.functional_call(Net(), None, (x,), edits={"pair:output.1": torch.zeros(3)})
    assert torch.equal(out, x + 1)


# --- sites ------------------------------------------------------------------------------------------


def test_glob_capture_keys_and_double_star():
    tt = TinyTransformer(layers=3)
    toks = torch.randint(0, 17, (2, 5))
    _, caps = tdfunc.functional_call(tt, None, (toks,), capture=["blocks.*.mlp", "**.scores"])
    assert set(caps.keys()) == {f"blocks.{i}.mlp" for i in range(3)} | {f"blocks.{i}.attn.scores" for i in range(3)}
    _, one = tdfunc.functional_call(tt, None, (toks,), capture="blocks.1.mlp")
    assert torch.equal(one["blocks.1.mlp"], caps["blocks.1.mlp"])


def test_kth_call_and_all_calls():
    rec, x = Recurrent(), torch.randn(2, 5)
    _, caps = tdfunc.functional_call(rec, None, (x,), capture=["act@0", "act@2", "act@*"])
    h, hs = x, []
    for _ in range(3):
        h = rec.act(rec.cell(h))
        hs.append(h)
    assert torch.equal(caps["act@0"], hs[0]) and torch.equal(caps["act@2"], hs[2])
    assert torch.equal(caps["act@*"], torch.stack(hs))
    # an edit at one call only
    y = tdfunc.functional_call(rec, None, (x,), edits={"act@1": torch.zeros(2, 5)})
    assert torch.equal(y, rec.act(rec.cell(torch.zeros(2, 5))))


def test_tap_exposes_attention_scores():
    tt = TinyTransformer()
    toks = torch.randint(0, 17, (2, 5))
    flat = lambda v: torch.where(torch.isinf(v), v, torch.zeros_like(v))  # uniform attention where allowed
    y, caps = tdfunc.functional_call(
        tt, None, (toks,), edits={"blocks.0.attn.scores": flat}, capture=["blocks.0.attn.scores"]
    )
    assert caps["blocks.0.attn.scores"].shape == (2, 2, 5, 5)
    assert torch.equal(caps["blocks.0.attn.scores"][..., 0, 0], torch.zeros(2, 2))
    assert not torch.equal(y, tt(toks))
    assert torch.equal(tt(toks), tt(toks))  # plain call unaffected


def test_inplace_op_after_site_does_not_corrupt_capture():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    x = torch.randn(8, 4)
    _, caps = tdfunc.functional_call(net, None, (x,), capture=["0"])
    torch.testing.assert_close(caps["0"], net[0](x))
    assert (caps["0"] < 0).any()


# --- nesting, re-entrancy, threads ------------------------------------------------------------------


def test_nesting_order_inner_first_then_outer():
    m, x = MLP(), torch.randn(3, 6)
    inner = lambda x: tdfunc.functional_call(m, None, (x,), edits={"act": lambda v: v + 1.0}, capture="act")
    g = tdfunc.intervene(inner, m, edits={"act": lambda v: 2.0 * v}, capture="act")
    (y, inner_caps), outer_caps = g(x)
    a = m.act(m.fc1(x))
    torch.testing.assert_close(inner_caps["act"], a + 1.0)  # inner capture: after the inner edit
    torch.testing.assert_close(outer_caps["act"], 2.0 * (a + 1.0))  # outer: after both
    torch.testing.assert_close(y, _mlp_by_hand(m, x, act=lambda a: 2.0 * (a + 1.0)))


def test_intervene_counts_calls_over_the_whole_function():
    m = MLP()
    x1, x2 = torch.randn(2, 6), torch.randn(2, 6)
    g = tdfunc.intervene(lambda: m(x1) + m(x2), m, edits={"act@1": torch.zeros(8)}, capture=["fc1@*"])
    y, caps = g()
    torch.testing.assert_close(y, m(x1) + _mlp_by_hand(m, x2, act=lambda a: torch.zeros_like(a)))
    torch.testing.assert_close(caps["fc1@*"], torch.stack([m.fc1(x1), m.fc1(x2)]))


def test_reentrant_edit_that_runs_the_same_model():
    m, x = MLP(), torch.randn(3, 6)

    def edit(v):
        plain = m(x)  # runs plain: the enclosing call's edits do not apply in here
        nested = tdfunc.functional_call(m, None, (x,), edits={"act": torch.zeros(8)})
        assert torch.equal(plain, _mlp_by_hand(m, x))
        assert torch.equal(nested, _mlp_by_hand(m, x, act=lambda a: torch.zeros_like(a)))
        return v * 0 + plain.sum()

    y = tdfunc.functional_call(m, None, (x,), edits={"act": edit})
    torch.testing.assert_close(y, _mlp_by_hand(m, x, act=lambda a: torch.full_like(a, m(x).sum().item())))


def test_two_threads_different_edits_no_leaks():
    m = MLP()
    x = torch.randn(2, 6)
    n = 1000
    scales = {0: 0.0, 1: 3.0}
    expected = {k: _mlp_by_hand(m, x, act=lambda a, s=s: a * s) for k, s in scales.items()}
    bad = {0: 0, 1: 0}
    barrier = threading.Barrier(2)

    def worker(k):
        barrier.wait()
        for _ in range(n):
            y = tdfunc.functional_call(m, None, (x,), edits={"act": lambda v: v * scales[k]})
            bad[k] += not torch.equal(y, expected[k])
            bad[k] += not torch.equal(m(x), expected_plain)  # plain calls in between stay plain

    expected_plain = m(x)
    threads = [threading.Thread(target=worker, args=(k,)) for k in scales]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == {0: 0, 1: 0}


# --- module hygiene -------------------------------------------------------------------------------


def test_installed_sites_are_inert_and_survive_deepcopy_save_and_compile():
    m, x = MLP(), torch.randn(3, 6)
    ref = m(x)
    tdfunc.install_sites(m, "**")
    assert torch.equal(m(x), ref)
    m2 = copy.deepcopy(m)
    assert torch.equal(m2(x), ref)
    # the copy's sites address the copy, not the original
    _, caps = tdfunc.functional_call(m2, None, (x,), capture="act", edits={"fc1": torch.zeros(3, 8)})
    assert torch.equal(caps["act"], torch.zeros(3, 8))
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m3 = torch.load(buf, weights_only=False)
    assert torch.equal(m3(x), ref)
    assert m.state_dict().keys() == MLP().state_dict().keys()
    torch._dynamo.reset()
    assert torch.equal(torch.compile(m, fullgraph=True, backend="aot_eager")(x), ref)
    assert tdfunc.remove_sites(m) == 5  # every submodule; the root has no site
    assert not any(mm._forward_hooks or mm._forward_pre_hooks for mm in m.modules())
    torch._dynamo.reset()


def test_sites_installed_only_where_used_and_only_during_the_call():
    m = MLP()
    seen = []

    def look(v):
        seen.append([n for n, mm in m.named_modules() if mm._forward_hooks or mm._forward_pre_hooks])
        return v

    tdfunc.functional_call(m, None, (torch.randn(1, 6),), edits={"act": look}, capture="fc2")
    assert seen == [["act", "fc2"]]
    assert not any(mm._forward_hooks or mm._forward_pre_hooks for mm in m.modules())


def test_compiled_call_no_recompile_for_new_edit_values():
    m, x = MLP(), torch.randn(3, 6)
    tdfunc.install_sites(m, ["act", "fc2"])
    torch._dynamo.reset()
    f = torch.compile(
        lambda x, d: tdfunc.functional_call(m, None, (x,), edits={"act": tdfunc.delta(d)}, capture="fc2"),
        fullgraph=True,
        backend="aot_eager",
    )
    f(x, torch.zeros(3, 8))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(3):
            y, caps = f(x + i, torch.randn(3, 8))
    tdfunc.remove_sites(m)
    torch._dynamo.reset()


def test_tensordict_inputs_are_not_mutated():
    from tensordict.nn import TensorDictModule

    tdm = TensorDictModule(nn.Linear(3, 2), in_keys=["x"], out_keys=["y"])
    td = TensorDict({"x": torch.randn(4, 3)}, batch_size=[4])
    out = tdfunc.functional_call(tdm, tdfunc.state(tdm), (td,))
    assert "y" in out.keys() and "y" not in td.keys()


def test_concurrent_first_use_installs_each_site_once():
    for _ in range(20):
        m = MLP()
        barrier = threading.Barrier(4)
        inside = threading.Barrier(4, timeout=30)
        counts = []

        def meet(v):  # all four threads are inside the forward here, holding the same two sites
            inside.wait()
            counts.append((len(m.act._forward_hooks), len(m.fc2._forward_pre_hooks)))
            return v

        def use():
            barrier.wait()
            tdfunc.functional_call(m, None, (torch.randn(1, 6),), edits={"act": meet}, capture=["act", "fc2"])

        threads = [threading.Thread(target=use) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert counts == [(1, 1)] * 4
        assert not any(mm._forward_hooks or mm._forward_pre_hooks for mm in m.modules())  # the last one removed them


def test_from_site_reads_an_earlier_site_in_the_same_call():
    m, x = MLP(), torch.randn(3, 6)
    w = torch.randn(8, 8)
    # a "transcoder": fc2's output computed from act's value (after act's own edit in this call)
    y, caps = tdfunc.functional_call(
        m, None, (x,), edits={"act": lambda v: 2 * v, "fc2": tdfunc.from_site("act", lambda a: a @ w)}, capture="fc2"
    )
    a = 2 * m.act(m.fc1(x))
    torch.testing.assert_close(caps["fc2"], a @ w)
    torch.testing.assert_close(y, m.head(m.act2(a @ w)))
    # differentiable with respect to the transcoder weights, and vmappable over them
    g = torch.func.grad(
        lambda w: tdfunc.functional_call(m, None, (x,), edits={"fc2": tdfunc.from_site("act", lambda a: a @ w)}).sum()
    )(w)
    assert g.shape == w.shape and g.abs().sum() > 0
    ws = torch.randn(4, 8, 8)
    out = vmap(
        lambda w: tdfunc.functional_call(m, None, (x,), edits={"fc2": tdfunc.from_site("act", lambda a: a @ w)})
    )(ws)
    torch.testing.assert_close(out, torch.stack([m.head(m.act2(m.act(m.fc1(x)) @ w)) for w in ws]))


def test_non_strict_skips_unreached_sites():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.a(x)

    m, x = Skip(), torch.randn(3, 2)
    y, caps = tdfunc.functional_call(
        m, None, (x,), edits={"unused": torch.zeros(2), "a": lambda v: -v}, capture=["unused", "a"], strict=False
    )
    assert torch.equal(y, -m.a(x)) and set(caps.keys()) == {"a"}
    g = tdfunc.intervene(lambda: m(x), m, edits={"unused": torch.zeros(2)}, strict=False)
    assert torch.equal(g(), m(x))
    with pytest.raises(tdfunc.NotReachedError):
        tdfunc.functional_call(m, None, (x,), edits={"unused": torch.zeros(2)})


# --- nothing left on the user's module ------------------------------------------------------------


def _user_hooks(m):
    """Hooks of the user's own on every submodule, registered in an order tdfunc must keep."""
    calls = []
    m.fc1.register_forward_hook(lambda mod, a, o: calls.append("fc1 post"))
    m.act.register_forward_pre_hook(lambda mod, a: calls.append("act pre"))
    m.act.register_forward_hook(lambda mod, a, k, o: calls.append("act post kw"), with_kwargs=True)
    m.act.register_forward_hook(lambda mod, a, o: calls.append("act post first"), prepend=True)
    m.fc2.register_forward_pre_hook(lambda mod, a, k: calls.append("fc2 pre kw"), with_kwargs=True)
    return calls


def test_hook_dicts_identical_after_every_kind_of_call():
    m, x = MLP(), torch.randn(4, 6)
    calls = _user_hooks(m)
    before = hook_dicts(m)
    m(x)
    order = list(calls)
    assert order == ["fc1 post", "act pre", "act post first", "act post kw", "fc2 pre kw"]

    tdfunc.functional_call(m, None, (x,), edits={"act": lambda v: -v}, capture=["fc2:input", "**"])
    assert hook_dicts(m) == before
    g = tdfunc.intervene(lambda x: m(x).sum(), m, edits={"fc2": tdfunc.delta(torch.zeros(8))}, capture="act")
    assert hook_dicts(m) == before  # building the transform installs nothing
    g(x)
    assert hook_dicts(m) == before
    td = TensorDict({"x": x}, batch_size=[4])
    tdfunc.grad_cam(lambda t: m(t["x"])[:, 0], td, m, "fc2")
    assert hook_dicts(m) == before

    def boom(v):
        raise RuntimeError("edit raised mid-forward")

    with pytest.raises(RuntimeError, match="mid-forward"):
        tdfunc.functional_call(m, None, (x,), edits={"act": boom}, capture="fc2")
    assert hook_dicts(m) == before
    with pytest.raises(tdfunc.NotReachedError):  # raised after the forward, by the checks
        tdfunc.functional_call(m, None, (x,), capture="act@3")
    assert hook_dicts(m) == before
    calls.clear()
    m(x)
    assert calls == order  # the user's hooks still run, in their order


def _encoder_layer():
    return nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True).eval()


def test_transformer_encoder_layer_fast_path_taken_again_after_a_call(monkeypatch):
    fast = []
    real = torch._transformer_encoder_layer_fwd

    def spy(*args, **kwargs):
        fast.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", spy)
    layer, x = _encoder_layer(), torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = layer(x)
        assert len(fast) == 1  # the fast path, before tdfunc ever saw the layer
        y, caps = tdfunc.functional_call(layer, None, (x,), capture=["linear1"])
        assert len(fast) == 1 and caps["linear1"].shape == (2, 5, 32)  # the call itself runs the slow path
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(layer(x), ref) and len(fast) == 2  # taken again
        tdfunc.intervene(lambda: layer(x), layer, edits={"norm2": lambda v: v})()
        layer(x)
        assert len(fast) == 3
        tdfunc.install_sites(layer, "linear1")  # a pinned site stays, and torch sees its hooks
        layer(x)
        assert len(fast) == 3
        tdfunc.remove_sites(layer)
        layer(x)
        assert len(fast) == 4


def test_pinned_sites_survive_calls_until_remove_sites():
    m, x = MLP(), torch.randn(3, 6)
    tdfunc.install_sites(m, ["act", "fc2"])
    pinned = hook_dicts(m)
    assert tdfunc.functional_call(m, None, (x,), capture="act")[1]["act"].shape == (3, 8)
    tdfunc.functional_call(m, None, (x,), edits={"fc1": lambda v: v, "act": lambda v: v})
    assert hook_dicts(m) == pinned  # the pinned ones stay; fc1's (unpinned) went with its call
    tdfunc.install_sites(m, "act")  # pinning twice installs nothing more
    assert hook_dicts(m) == pinned
    assert tdfunc.remove_sites(m) == 2
    assert not any(mm._forward_hooks or mm._forward_pre_hooks for mm in m.modules())
    assert tdfunc.functional_call(m, None, (x,), capture="act")[1]["act"].shape == (3, 8)  # reinstalled per call
    assert not any(mm._forward_hooks or mm._forward_pre_hooks for mm in m.modules())


def test_remove_sites_during_a_call_removes_pinned_and_unpinned():
    m, x = MLP(), torch.randn(3, 6)
    tdfunc.install_sites(m, "fc1")

    def remove(v):
        assert tdfunc.remove_sites(m) == 3  # fc1 (pinned), act and fc2 (this call's)
        return v

    tdfunc.functional_call(m, None, (x,), edits={"act": remove, "fc2": lambda v: v}, strict=False)
    assert not any(mm._forward_hooks or mm._forward_pre_hooks for mm in m.modules())
    # a site installed again by a later call is not removed by the end of the earlier one
    tdfunc.install_sites(m, "act")
    tdfunc.functional_call(m, None, (x,), capture="act")
    assert tdfunc.remove_sites(m) == 1


def test_two_threads_share_a_site_and_one_finishes_first():
    m, x = MLP(), torch.randn(2, 6)
    a_inside, b_done = threading.Event(), threading.Event()
    result, errors = {}, []

    def hold(v):  # thread A waits inside the forward (after act, before fc2) until B has returned
        a_inside.set()
        if not b_done.wait(30):
            errors.append("B never finished")
        result["hooks while A waits"] = (len(m.act._forward_hooks), len(m.fc2._forward_hooks))
        return 2 * v

    def thread_a():
        try:
            result["a"] = tdfunc.functional_call(
                m, None, (x,), edits={"act": hold, "fc2": lambda v: v + 1.0}, capture="fc2"
            )
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    def thread_b():
        try:
            if not a_inside.wait(30):
                errors.append("A never got inside")
            result["b"] = tdfunc.functional_call(
                m, None, (x,), edits={"act": lambda v: 3 * v, "fc2": lambda v: v - 1.0}
            )
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert result["hooks while A waits"] == (1, 1)  # B's end left A's sites in place
    a = 2 * m.act(m.fc1(x))
    y, caps = result["a"]
    torch.testing.assert_close(caps["fc2"], m.fc2(a) + 1.0)  # A's fc2 edit, after B finished, still applied
    torch.testing.assert_close(y, m.head(m.act2(m.fc2(a) + 1.0)))
    torch.testing.assert_close(result["b"], m.head(m.act2(m.fc2(3 * m.act(m.fc1(x))) - 1.0)))
    assert not any(mm._forward_hooks or mm._forward_pre_hooks for mm in m.modules())


def test_nested_calls_keep_the_site_until_the_outer_one_ends():
    m, x = MLP(), torch.randn(3, 6)
    seen = {}

    def f(x):
        _, inner = tdfunc.functional_call(m, None, (x,), capture="act")  # inner call shares 'act'
        seen["installed after inner"] = tdfunc._sites.is_installed(m.act)
        return inner["act"], m(x)  # a later plain call inside f: the outer edit must still apply

    g = tdfunc.intervene(f, m, edits={"act": lambda v: 2 * v})
    inner_act, y = g(x)
    assert seen["installed after inner"]
    torch.testing.assert_close(inner_act, m.act(m.fc1(x)))  # innermost first: before the outer edit
    torch.testing.assert_close(y, _mlp_by_hand(m, x, act=lambda a: 2 * a))
    assert not any(mm._forward_hooks or mm._forward_pre_hooks for mm in m.modules())
    # re-entrant: a call inside an edit of a call on the same module
    tdfunc.functional_call(
        m, None, (x,), edits={"act": lambda v: v + 0 * tdfunc.functional_call(m, None, (x,), capture="act")[1]["act"]}
    )
    assert not any(mm._forward_hooks or mm._forward_pre_hooks for mm in m.modules())
