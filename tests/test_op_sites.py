"""Operation sites (``"path/softmax"``), keyword-input sites (``":input.NAME"``) and output-key sites
(``":output.KEY"``), and ``tdfunc.list_sites``.

References: a hand-written forward of the block from values taken with plain forward hooks (the slow,
obvious reference), transformers' own ``output_attentions`` for attention patterns (GPT-2, BERT, Llama),
and forward / pre-forward hooks for keyword inputs and ``ModelOutput`` entries.
"""

from __future__ import annotations

import math
import re
import threading

import pytest
import torch
import torch.nn.functional as F
from cases_sites import Net, OpAttn
from torch import nn

import tdfunc
from tdfunc import EditError, NotReachedError, SiteError


def _tf():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def gpt2(attn="eager", layers=2):
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.GPT2Config(
        n_layer=layers,
        n_head=4,
        n_embd=32,
        vocab_size=100,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn,
    )
    return tf.GPT2LMHeadModel(cfg).eval()


def llama(attn="eager"):
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn,
    )
    return tf.LlamaForCausalLM(cfg).eval()


def bert():
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        vocab_size=100,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    return tf.BertModel(cfg).eval()


IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))


class Hooked:
    """A plain-hook reference: record a module's output (or its inputs, keyword ones included)."""

    def __init__(self, module, pre=False):
        self.values = []
        if pre:
            self.h = module.register_forward_pre_hook(lambda m, a, kw: self.values.append((a, kw)), with_kwargs=True)
        else:
            self.h = module.register_forward_hook(lambda m, a, out: self.values.append(out))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.h.remove()


# --------------------------------------------------------------------------- transformers models


def test_gpt2_softmax_site_is_the_attention_pattern_of_every_layer():
    m = gpt2()
    ref = m(IDS, output_attentions=True).attentions
    out, caps = tdfunc.functional_call(m, None, (IDS,), capture="transformer.h.*.attn/softmax")
    assert sorted(caps.keys()) == ["transformer.h.0.attn/softmax", "transformer.h.1.attn/softmax"]
    for i in range(2):
        torch.testing.assert_close(caps[f"transformer.h.{i}.attn/softmax"], ref[i], rtol=0, atol=0)
    torch.testing.assert_close(out.logits, m(IDS).logits, rtol=0, atol=0)


def _gpt2_attn_by_hand(attn, h, pattern_edit):
    """GPT-2's attention block written out from its weights: the slow reference."""
    b, t, d = h.shape
    nh = attn.num_heads
    q, k, v = attn.c_attn(h).split(d, dim=2)
    q, k, v = (z.view(b, t, nh, d // nh).transpose(1, 2) for z in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(d // nh)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    s = s.masked_fill(~causal, torch.finfo(s.dtype).min)
    p = pattern_edit(torch.softmax(s, -1))
    z = (p @ v).transpose(1, 2).reshape(b, t, d)
    return attn.c_proj(z)


def test_gpt2_pattern_edit_equals_hand_written_attention_and_vmap_equals_loop():
    m = gpt2()
    attn = m.transformer.h[0].attn
    scales = torch.tensor([[1.0, 0.0, 2.0, 1.0], [0.5, 1.0, 1.0, 0.0]])

    def run(sc):
        _, caps = tdfunc.functional_call(
            m,
            None,
            (IDS,),
            edits={"transformer.h.0.attn/softmax": lambda p: p * sc[:, None, None]},
            capture=["transformer.h.0.attn:output.0", "transformer.h.0.ln_1"],
        )
        return caps["transformer.h.0.attn:output.0"], caps["transformer.h.0.ln_1"]

    with Hooked(m.transformer.h[0].ln_1) as ln:  # the reference's input: a plain forward hook
        m(IDS)
    for sc in scales:
        got, h = run(sc)
        torch.testing.assert_close(h, ln.values[0])
        ref = _gpt2_attn_by_hand(attn, ln.values[0], lambda p: p * sc[:, None, None])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    batched = torch.func.vmap(lambda sc: run(sc)[0])(scales)
    torch.testing.assert_close(batched, torch.stack([run(sc)[0] for sc in scales]), rtol=1e-6, atol=1e-6)


def test_gpt2_delta_on_the_pattern_gives_the_gradient_at_the_pattern():
    m = gpt2()
    site = "transformer.h.1.attn/softmax"
    _, caps = tdfunc.functional_call(m, None, (IDS,), capture=site)
    d0 = torch.zeros_like(caps[site])
    g = torch.func.grad(
        lambda d: tdfunc.functional_call(m, None, (IDS,), edits={site: tdfunc.delta(d)}).logits[:, -1, 3].sum()
    )(d0)
    # reference: central finite differences of the edited call
    eps = 1e-3
    e = torch.zeros_like(d0)
    e[1, 2, 6, 4] = eps
    f = lambda d: tdfunc.functional_call(m, None, (IDS,), edits={site: tdfunc.delta(d)}).logits[:, -1, 3].sum()
    fd = (f(e) - f(-e)) / (2 * eps)
    torch.testing.assert_close(g[1, 2, 6, 4], fd.detach(), rtol=2e-2, atol=2e-4)
    # the last layer's pattern reaches the last position's logits through its last query row only (which sees every key)
    assert g[:, :, :6].abs().max() == 0 and g[:, :, 6].abs().min() > 0


def test_gpt2_compile_fullgraph_pattern_edit_without_recompiling():
    m = gpt2()
    site = "transformer.h.0.attn/softmax"
    tdfunc.install_sites(m, [site, "transformer.h.1.attn/softmax"])
    try:
        torch._dynamo.reset()

        def f(sc):
            out, caps = tdfunc.functional_call(
                m, None, (IDS,), edits={site: lambda p: p * sc}, capture="transformer.h.1.attn/softmax"
            )
            return out.logits, caps["transformer.h.1.attn/softmax"]

        from torch._dynamo.testing import CompileCounter

        cnt = CompileCounter()
        cf = torch.compile(f, fullgraph=True, backend=cnt)
        for v in (2.0, 3.0):
            sc = torch.tensor(v)
            for a, b in zip(cf(sc), f(sc)):
                torch.testing.assert_close(a, b)
        assert cnt.frame_count == 1
    finally:
        tdfunc.remove_sites(m)
        torch._dynamo.reset()
    assert not any(mm._forward_hooks or mm._forward_pre_hooks for mm in m.modules())


def test_bert_softmax_site_is_the_attention_pattern():
    m = bert()
    mask = torch.ones_like(IDS)
    mask[1, 5:] = 0
    ref = m(IDS, attention_mask=mask, output_attentions=True).attentions
    _, caps = tdfunc.functional_call(
        m, None, (IDS,), {"attention_mask": mask}, capture="encoder.layer.*.attention.self/softmax"
    )
    for i in range(2):
        torch.testing.assert_close(caps[f"encoder.layer.{i}.attention.self/softmax"], ref[i], rtol=0, atol=0)


def test_llama_gated_mlp_product_keyword_inputs_and_model_output_keys():
    m = llama()
    mlp = m.model.layers[0].mlp
    with (
        Hooked(mlp.gate_proj) as g,
        Hooked(mlp.up_proj) as u,
        Hooked(m.model.layers[1], pre=True) as pre,
        Hooked(m.model) as body,
        Hooked(mlp.down_proj, pre=True) as down,
    ):
        ref_out = m(IDS)
    sites = [
        "model.layers.0.mlp/mul",
        "model.layers.1:input.hidden_states",
        "model.layers.1:input.position_embeddings",
        "model:output.last_hidden_state",
        "model.layers.0.self_attn/softmax",
    ]
    out, caps = tdfunc.functional_call(m, None, (IDS,), capture=sites)
    torch.testing.assert_close(caps["model.layers.0.mlp/mul"], F.silu(g.values[0]) * u.values[0], rtol=0, atol=0)
    torch.testing.assert_close(caps["model.layers.0.mlp/mul"], down.values[0][0][0], rtol=0, atol=0)
    a, kw = pre.values[0]
    hs = kw["hidden_states"] if "hidden_states" in kw else a[0]
    torch.testing.assert_close(caps["model.layers.1:input.hidden_states"], hs, rtol=0, atol=0)
    torch.testing.assert_close(
        caps["model.layers.1:input.position_embeddings"], torch.stack(kw["position_embeddings"]), rtol=0, atol=0
    ) if isinstance(caps["model.layers.1:input.position_embeddings"], torch.Tensor) else None
    torch.testing.assert_close(caps["model:output.last_hidden_state"], body.values[0].last_hidden_state, rtol=0, atol=0)
    ref_attn = m(IDS, output_attentions=True).attentions[0]
    torch.testing.assert_close(caps["model.layers.0.self_attn/softmax"], ref_attn, rtol=0, atol=0)
    assert type(out) is type(ref_out)

    # edits: a delta on the gated product = a pre-hook adding it to down_proj's input; a keyword input
    # edited by name = a pre-hook editing that keyword; a ModelOutput key = a forward hook on the body
    d = torch.randn_like(caps["model.layers.0.mlp/mul"])
    h1 = m.model.layers[1].register_forward_pre_hook(
        lambda mod, a, kw: ((a[0] + d,) + a[1:], kw) if a else (a, {**kw, "hidden_states": kw["hidden_states"] + 0}),
        with_kwargs=True,
    )
    h1.remove()
    ref = m.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda mod, a: (a[0] + d,))
    try:
        want = m(IDS).logits
    finally:
        ref.remove()
    got = tdfunc.functional_call(m, None, (IDS,), edits={"model.layers.0.mlp/mul": tdfunc.delta(d)}).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    e = torch.randn(2, 7, 32)

    def add_e(mod, a, kw):
        if "hidden_states" in kw:
            return a, {**kw, "hidden_states": kw["hidden_states"] + e}
        return (a[0] + e,) + a[1:], kw

    ref = m.model.layers[1].register_forward_pre_hook(add_e, with_kwargs=True)
    try:
        want = m(IDS).logits
    finally:
        ref.remove()
    got = tdfunc.functional_call(m, None, (IDS,), edits={"model.layers.1:input.hidden_states": tdfunc.delta(e)}).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    ref = m.model.register_forward_hook(
        lambda mod, a, out: type(out)(**{**out, "last_hidden_state": out.last_hidden_state * 0.5})
    )
    try:
        want = m(IDS).logits
    finally:
        ref.remove()
    got = tdfunc.functional_call(m, None, (IDS,), edits={"model:output.last_hidden_state": lambda v: v * 0.5})
    torch.testing.assert_close(got.logits, want, rtol=1e-5, atol=1e-6)
    assert type(got) is type(ref_out)


def test_sdpa_attention_output_site_and_pattern_error():
    m = llama("sdpa")
    attn = m.model.layers[0].self_attn
    with Hooked(attn.o_proj, pre=True) as o:
        m(IDS)
    _, caps = tdfunc.functional_call(m, None, (IDS,), capture="model.layers.0.self_attn/scaled_dot_product_attention")
    z = caps["model.layers.0.self_attn/scaled_dot_product_attention"]
    torch.testing.assert_close(z.transpose(1, 2).reshape(2, 7, -1), o.values[0][0][0], rtol=0, atol=0)
    with pytest.raises(NotReachedError, match=re.escape("attn_implementation='eager'")):
        tdfunc.functional_call(m, None, (IDS,), capture="model.layers.0.self_attn/softmax")


def test_list_sites_on_gpt2_lists_the_pattern_and_leaves_no_hook():
    m = gpt2()
    sites = tdfunc.list_sites(m, (IDS,))
    assert sites["transformer.h.0.attn/softmax"] == (2, 4, 7, 7)
    assert sites["transformer.h.1.attn/matmul@0"] == (2, 4, 7, 7)
    assert sites["transformer.h.0"] == sites["transformer.h.0.attn:output.0"] == (2, 7, 32)
    assert sites["transformer:output.last_hidden_state"] == (2, 7, 32)
    assert sites["transformer.h.1:input.hidden_states"] == (2, 7, 32)  # passed positionally, listed by name
    assert "transformer.h.0.attn.c_attn:input.input" not in sites  # leaves: outputs only
    assert sites["transformer.h.0.ln_1/layer_norm"] == (2, 7, 32)
    assert "transformer.h.0.mlp.act/tanh" in sites and "transformer.h.0.mlp/tanh" not in sites
    assert not any(mm._forward_hooks or mm._forward_pre_hooks for mm in m.modules())
    # every listed site is addressable
    _, caps = tdfunc.functional_call(m, None, (IDS,), capture=[s for s in sites if "/" in s or ":output." in s])
    assert {k: tuple(v.shape) for k, v in caps.items() if isinstance(v, torch.Tensor)} == {
        k: v for k, v in sites.items() if k in caps.keys() and isinstance(v, tuple)
    }
    assert "transformer.h.0.attn/softmax" not in tdfunc.list_sites(m, (IDS,), ops=False)


# --------------------------------------------------------------------------- small models


def test_op_site_scope_is_the_modules_own_code_and_calls_count_per_site():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 3, 4)
    # OpAttn's q is a Linear (its F.linear belongs to 'attn.q', not to 'attn')
    with pytest.raises(NotReachedError, match="linear was never called under 'attn'"):
        tdfunc.functional_call(net, None, (x,), capture="attn/linear")
    _, caps = tdfunc.functional_call(net, None, (x,), capture=["attn.q/linear", "attn/matmul", "attn/mul@*"])
    torch.testing.assert_close(caps["attn.q/linear"], net.attn.q(x), rtol=0, atol=0)
    q = net.attn.q(x)
    torch.testing.assert_close(caps["attn/matmul"], q @ x.transpose(-1, -2), rtol=0, atol=0)
    assert caps["attn/mul@*"].shape == (1, 2, 3, 4)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = OpAttn()

        def forward(self, x):
            return self.a(self.a(x))

    tw = Twice()
    _, caps = tdfunc.functional_call(tw, None, (x,), capture=["a/softmax@*", "a/softmax@1"])
    h = tw.a(x)
    ref = torch.softmax(tw.a.q(h) @ h.transpose(-1, -2) / 2.0, -1)
    torch.testing.assert_close(caps["a/softmax@1"], ref, rtol=0, atol=0)
    assert caps["a/softmax@*"].shape == (2, 2, 3, 3)


def test_op_sites_nest_innermost_first_and_edits_run_plain():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 3, 4)
    inner = lambda x: tdfunc.functional_call(net, None, (x,), edits={"attn/softmax": lambda p: p + 1.0})
    outer = tdfunc.intervene(inner, net, edits={"attn/softmax": lambda p: p * 3.0}, capture="attn/softmax")
    y, caps = outer(x)
    _, plain = tdfunc.functional_call(net, None, (x,), capture="attn/softmax")
    torch.testing.assert_close(caps["attn/softmax"], (plain["attn/softmax"] + 1.0) * 3.0)
    ref = tdfunc.functional_call(net, None, (x,), edits={"attn/softmax": lambda p: (p + 1.0) * 3.0})
    torch.testing.assert_close(y, ref)

    # an edit that runs the model (with its own operation site) sees a plain forward, edited by its own call only
    def edit(p):
        _, c = tdfunc.functional_call(net, None, (x,), capture="attn/softmax")
        return p * 0 + c["attn/softmax"].flip(0)

    _, caps = tdfunc.functional_call(net, None, (x,), edits={"attn/softmax": edit}, capture="attn/softmax")
    torch.testing.assert_close(caps["attn/softmax"], plain["attn/softmax"].flip(0))


def test_no_torch_function_mode_without_operation_sites():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch._C._len_torch_function_stack())
            return x * 2

    net = nn.Sequential(Probe(), nn.Linear(2, 2))
    x = torch.randn(3, 2)
    tdfunc.functional_call(net, None, (x,), capture=["0", "1"], edits={"0:input": lambda v: v + 1})
    tdfunc.functional_call(net, None, (x,), capture=["0/mul"])
    assert seen == [0, 1]
    assert torch._C._len_torch_function_stack() == 0


def test_op_sites_in_two_threads_do_not_mix():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 3, 4)
    want = {
        s: tdfunc.functional_call(net, None, (x,), edits={"attn/softmax": lambda p, s=s: p * s}) for s in (0.0, 2.0)
    }
    bad = []

    def work(s):
        for _ in range(30):
            y = tdfunc.functional_call(net, None, (x,), edits={"attn/softmax": lambda p: p * s})
            if not torch.equal(y, want[s]):
                bad.append(s)

    ts = [threading.Thread(target=work, args=(s,)) for s in (0.0, 2.0)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad


def test_rms_norm_layer_norm_bmm_and_sub_ops():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(4)
            self.ln = nn.LayerNorm(4)

        def forward(self, x):
            h = self.norm(x)
            return torch.bmm(self.ln(h), h.transpose(1, 2)) - 1.0

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = M()

        def forward(self, x):
            return self.m(x)

    net = Outer()
    x = torch.randn(2, 3, 4)
    _, caps = tdfunc.functional_call(
        net, None, (x,), capture=["m.norm/rms_norm", "m.ln/layer_norm", "m/bmm", "m/sub", "m/bmm:input.1"]
    )
    h = F.rms_norm(x, (4,), net.m.norm.weight, net.m.norm.eps)
    torch.testing.assert_close(caps["m.norm/rms_norm"], h, rtol=0, atol=0)
    torch.testing.assert_close(caps["m.ln/layer_norm"], net.m.ln(h), rtol=0, atol=0)
    torch.testing.assert_close(caps["m/bmm"], torch.bmm(net.m.ln(h), h.transpose(1, 2)), rtol=0, atol=0)
    torch.testing.assert_close(caps["m/sub"], net(x), rtol=0, atol=0)
    torch.testing.assert_close(caps["m/bmm:input.1"], h.transpose(1, 2), rtol=0, atol=0)
    y = tdfunc.functional_call(net, None, (x,), edits={"m/bmm:input.1": torch.zeros(2, 4, 3)})
    torch.testing.assert_close(y, torch.full((2, 3, 3), -1.0))


PINNED = [
    (
        "unknown_op",
        lambda: tdfunc.functional_call(Net(), None, (torch.randn(2, 3, 4),), capture="attn/softmx"),
        SiteError,
        "tdfunc.functional_call: bad site 'attn/softmx': unknown operation 'softmx' after '/' (did you mean 'softmax'?); operation sites name one of ['add', 'baddbmm', 'bmm', 'cat', 'div', 'einsum', 'exp', 'gelu', 'group_norm', 'layer_norm', 'linear', 'log_softmax', 'matmul', 'mul', 'relu', 'rms_norm', 'scaled_dot_product_attention', 'sigmoid', 'silu', 'softmax', 'sub', 'tanh']. Sites look like 'blocks.0.mlp', 'blocks.0.mlp:input', 'blocks.0.mlp:output.1', 'blocks.0.mlp@2', 'blocks.0.mlp@*' or 'blocks.*.mlp'.",
    ),
    (
        "bad_element",
        lambda: tdfunc.functional_call(Net(), None, (torch.randn(2, 3, 4),), capture="attn:input.a-b"),
        SiteError,
        "tdfunc.functional_call: bad site 'attn:input.a-b': the element after 'input.' must be an integer or a name (a keyword input, an output key), got 'a-b'. Sites look like 'blocks.0.mlp', 'blocks.0.mlp:input', 'blocks.0.mlp:output.1', 'blocks.0.mlp@2', 'blocks.0.mlp@*' or 'blocks.*.mlp'.",
    ),
    (
        "op_not_reached",
        lambda: tdfunc.functional_call(Net(), None, (torch.randn(2, 3, 4),), capture="blk/softmax"),
        NotReachedError,
        "tdfunc.functional_call: nothing was captured at site 'blk/softmax': softmax was never called under 'blk' in this call. Capture a site the forward reaches. A model whose attention runs torch's scaled_dot_product_attention (transformers' default, attn_implementation='sdpa') never forms the attention pattern: load it with attn_implementation='eager' to address the softmax, or use the site '…/scaled_dot_product_attention' for the attention output.",
    ),
    (
        "op_edit_not_reached",
        lambda: tdfunc.functional_call(Net(), None, (torch.randn(2, 3, 4),), edits={"attn/softmax@1": lambda p: p}),
        NotReachedError,
        "tdfunc.functional_call: the edit at site 'attn/softmax@1' was never applied: softmax was called once under 'attn' in this call, so it has no call 1. Check that the forward reaches this module (and with these inputs), or remove the edit. A model whose attention runs torch's scaled_dot_product_attention (transformers' default, attn_implementation='sdpa') never forms the attention pattern: load it with attn_implementation='eager' to address the softmax, or use the site '…/scaled_dot_product_attention' for the attention output.",
    ),
    (
        "op_input_out_of_range",
        lambda: tdfunc.functional_call(Net(), None, (torch.randn(2, 3, 4),), capture="attn/einsum:input.5"),
        SiteError,
        "tdfunc.functional_call: site 'attn/einsum:input.5': the operation's positional inputs are a value of type tuple of length 3, with no element 5; the call of einsum has 3 positional inputs; use ':input.N' with N below that.",
    ),
    (
        "keyword_input_absent",
        lambda: tdfunc.functional_call(Net(), None, (torch.randn(2, 3, 4),), capture="attn:input.scale"),
        SiteError,
        "tdfunc.functional_call: site 'attn:input.scale': the module's forward received no input named 'scale' in this call (it has no such argument, or the argument took its default); name an argument the caller passes.",
    ),
    (
        "positional_index_of_keyword_input",
        lambda: tdfunc.functional_call(Net(), None, (torch.randn(2, 3, 4),), capture="blk:input.1"),
        SiteError,
        "tdfunc.functional_call: site 'blk:input.1': the module's positional inputs are a value of type tuple of length 1, with no element 1; it also received ['scale'] by keyword: address one by name, e.g. 'blk:input.scale'.",
    ),
    (
        "output_key_absent",
        lambda: tdfunc.functional_call(Net(), None, (torch.randn(2, 3, 4),), capture="blk:output.z"),
        SiteError,
        "tdfunc.functional_call: site 'blk:output.z': the module's output is a value of type dict with keys ['y', 'h'], with no key 'z'; use one of its keys.",
    ),
    (
        "dict_output_without_key",
        lambda: tdfunc.functional_call(Net(), None, (torch.randn(2, 3, 4),), capture="blk"),
        SiteError,
        "tdfunc.functional_call: site 'blk': the module's output is a dict with keys ['y', 'h']; address one entry by key, e.g. 'blk:output.y'.",
    ),
    (
        "rule_at_op_input",
        lambda: tdfunc.functional_call(
            Net(), None, (torch.randn(2, 3, 4),), edits={"attn/softmax:input": tdfunc.rule(lambda *a: a[-1])}
        ),
        EditError,
        "tdfunc.functional_call: tdfunc.rule edits rewrite a module's output, but site 'attn/softmax:input' is an input; use the output site 'attn' or a plain callable edit.",
    ),
    (
        "list_sites_module",
        lambda: tdfunc.list_sites("net", (torch.randn(2),)),
        TypeError,
        "tdfunc.list_sites: expected an nn.Module as the module, got str ('net').",
    ),
    (
        "list_sites_ops",
        lambda: tdfunc.list_sites(Net(), (torch.randn(2, 3, 4),), ops=1),
        TypeError,
        "tdfunc.list_sites: ops must be True or False, got int (1).",
    ),
]


@pytest.mark.parametrize("name,call,err,msg", PINNED, ids=[p[0] for p in PINNED])
def test_pinned_errors(name, call, err, msg):
    with pytest.raises(err) as info:
        call()
    assert str(info.value) == msg


def test_op_site_edit_inside_a_checkpointed_region_gives_the_unchecked_gradient():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    attn = OpAttn()

    class Wrap(nn.Module):
        def __init__(self, ck):
            super().__init__()
            self.attn, self.ck = attn, ck

        def forward(self, x):
            return checkpoint(self.attn, x, use_reentrant=False) if self.ck else self.attn(x)

    x = torch.randn(2, 3, 4)
    d = torch.randn(2, 3, 3) / 4

    def grad_of(model):
        f = lambda d: tdfunc.functional_call(model, None, (x,), edits={"attn/softmax": tdfunc.delta(d)}).pow(2).sum()
        d0 = d.clone().requires_grad_(True)
        return torch.autograd.grad(f(d0), d0)[0]

    g_ck, g_ref = grad_of(Wrap(True)), grad_of(Wrap(False))
    assert g_ref.abs().max() > 0
    torch.testing.assert_close(g_ck, g_ref, rtol=0, atol=0)
