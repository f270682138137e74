"""The core call on the model kinds users bring: TensorDictModule / TensorDictSequential and a
transformers GPT-2 (built from a small config, offline)."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule, TensorDictSequential
from torch import nn
from torch.func import vmap

import tdfunc


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.act = nn.Tanh()

    def forward(self, x, y):
        return self.act(self.a(x) + self.b(y))


def test_tensordict_sequential_two_inputs_capture_and_edit():
    seq = TensorDictSequential(
        TensorDictModule(TwoInputs(), in_keys=["x", "y"], out_keys=["h"]),
        TensorDictModule(nn.Linear(4, 2), in_keys=["h"], out_keys=["out"]),
    )
    td = TensorDict({"x": torch.randn(5, 3), "y": torch.randn(5, 2)}, batch_size=[5])
    names = [n for n, _ in seq.named_modules()]
    assert "module.0.module.act" in names
    out, caps = tdfunc.functional_call(seq, tdfunc.state(seq), (td,), capture=["module.0.module.act", "module.0"])
    ref = seq(td.clone())
    assert torch.equal(out["out"], ref["out"])
    assert torch.equal(caps["module.0.module.act"], ref["h"])
    assert isinstance(caps["module.0"], TensorDict) and torch.equal(caps["module.0"]["h"], ref["h"])
    zeroed = tdfunc.functional_call(seq, None, (td,), edits={"module.0.module.act": torch.zeros(4)})
    torch.testing.assert_close(zeroed["out"], seq.module[1].module.bias.expand(5, 2))
    assert "out" not in td.keys()  # the caller's TensorDict is not written to


def test_tensordict_module_gradients_wrt_both_inputs():
    tdm = TensorDictModule(TwoInputs(), in_keys=["x", "y"], out_keys=["h"])
    x, y = torch.randn(5, 3), torch.randn(5, 2)

    def f(x, y):
        td = TensorDict({"x": x, "y": y}, batch_size=x.shape[:1])
        return tdfunc.functional_call(tdm, None, (td,))["h"].sum()

    gx, gy = torch.func.grad(f, argnums=(0, 1))(x, y)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    tdm.module(xr, yr).sum().backward()
    torch.testing.assert_close(gx, xr.grad)
    torch.testing.assert_close(gy, yr.grad)


@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=3,
        n_embd=32,
        n_head=4,
        vocab_size=64,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_capture_residual_stream_matches_hidden_states(gpt2):
    toks = torch.randint(0, 64, (2, 7))
    out, caps = tdfunc.functional_call(
        gpt2, tdfunc.state(gpt2), (toks,), {"output_hidden_states": True}, capture=["transformer.h.*"]
    )
    for i in range(3):
        torch.testing.assert_close(
            caps[f"transformer.h.{i}"], out.hidden_states[i + 1], rtol=0, atol=0
        ) if i < 2 else None
    torch.testing.assert_close(out.logits, gpt2(toks).logits, rtol=0, atol=0)


def _patched_by_hook(model, toks, block, pos, value):
    def hook(mod, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        h[:, pos] = value[:, pos]
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = model.transformer.h[block].register_forward_hook(hook)
    try:
        return model(toks).logits
    finally:
        handle.remove()


def test_gpt2_patch_residual_stream_one_position_equals_hook_reference(gpt2):
    clean, corrupt = torch.randint(0, 64, (2, 7)), torch.randint(0, 64, (2, 7))
    site = "transformer.h.1"
    _, caps = tdfunc.functional_call(gpt2, None, (clean,), capture=[site])
    value = caps[site]
    pos = 4
    mask = torch.zeros(7, 1)
    mask[pos] = 1.0
    patched = tdfunc.functional_call(gpt2, None, (corrupt,), edits={site: lambda v: v * (1 - mask) + value * mask})
    torch.testing.assert_close(patched.logits, _patched_by_hook(gpt2, corrupt, 1, pos, value), rtol=1e-6, atol=1e-6)
    # patching every position of the residual stream makes the corrupted run the clean run
    full = tdfunc.functional_call(gpt2, None, (corrupt,), edits={site: value})
    torch.testing.assert_close(full.logits, gpt2(clean).logits, rtol=1e-6, atol=1e-6)


def test_gpt2_patch_sweep_over_positions_with_vmap_equals_loop(gpt2):
    clean, corrupt = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 6))
    site = "transformer.h.0"
    value = tdfunc.functional_call(gpt2, None, (clean,), capture=[site])[1][site]
    masks = torch.eye(6)[:, :, None]  # one mask per position

    def metric(mask):
        out = tdfunc.functional_call(gpt2, None, (corrupt,), edits={site: lambda v: v * (1 - mask) + value * mask})
        return out.logits[0, -1, 3] - out.logits[0, -1, 5]

    swept = vmap(metric)(masks)
    loop = torch.stack([metric(m) for m in masks])
    torch.testing.assert_close(swept, loop, rtol=1e-5, atol=1e-5)


def test_gpt2_gradient_at_a_block_through_inputs_embeds(gpt2):
    toks = torch.randint(0, 64, (1, 5))
    emb = gpt2.transformer.wte(toks).detach()

    def f(emb, d):
        out = tdfunc.functional_call(gpt2, None, (), {"inputs_embeds": emb}, edits={"transformer.h.1": tdfunc.delta(d)})
        return out.logits[0, -1, 7]

    g_emb, g_d = torch.func.grad(f, argnums=(0, 1))(emb, torch.zeros(1, 5, 32))
    e = emb.clone().requires_grad_()
    store = {}
    h = gpt2.transformer.h[1].register_forward_hook(lambda m, a, o: store.update(h=o[0] if isinstance(o, tuple) else o))
    try:
        logit = gpt2(inputs_embeds=e).logits[0, -1, 7]
    finally:
        h.remove()
    ref_e, ref_h = torch.autograd.grad(logit, [e, store["h"]])
    torch.testing.assert_close(g_emb, ref_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_d, ref_h, rtol=1e-5, atol=1e-6)
