"""``patching_sweep(..., reuse_prefix=True)``: the suffix-only position sweep of a causal LM.

References: the plain ``patching_sweep`` (every position's full forward) and a loop of forward-hook
patches written with plain PyTorch, on transformers GPT-2 (learned positions) and Llama (rotary
positions: the suffix's position ids must continue from the cache), float64 at 1e-10, float32 at
1e-5 relative; SmolLM2-135M (real weights) as a smoke test. Refusals are pinned.
"""

from __future__ import annotations

import re

import pytest
import torch
from models import TinyTransformer
from torch.func import grad

import tdfunc
from tdfunc.latent import PatchError, patching_sweep

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
FN = "tdfunc.latent.patching_sweep"


def _gpt2(dtype=torch.float64, n_layer=3):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=n_layer, n_embd=32, n_head=4, vocab_size=64, n_positions=32, attn_implementation="eager"
    )
    return transformers.GPT2LMHeadModel(cfg).eval().to(dtype)


def _llama(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(cfg).eval().to(dtype)


@pytest.fixture(scope="module")
def gpt2():
    return _gpt2()


@pytest.fixture(scope="module")
def llama():
    return _llama()


def _prompts(t=9, b=2, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


def last_diff(out):
    return (out.logits[:, -1, 3] - out.logits[:, -1, 5]).mean()


def _hook_loop(model, blocks, clean, corrupt, metric):
    """Plain PyTorch: capture each block's output on the clean run, then one hooked corrupted forward per patch."""
    caps = {}
    handles = [
        b.register_forward_hook(lambda m, a, o, i=i: caps.__setitem__(i, (o[0] if isinstance(o, tuple) else o)))
        for i, b in enumerate(blocks)
    ]
    with torch.no_grad():
        model(clean)
    for h in handles:
        h.remove()
    res = torch.empty(len(blocks), clean.shape[1], dtype=torch.float64)
    for i, b in enumerate(blocks):
        for p in range(clean.shape[1]):

            def hook(m, a, o, i=i, p=p):
                h = (o[0] if isinstance(o, tuple) else o).clone()
                h[:, p] = caps[i][:, p]
                return (h, *o[1:]) if isinstance(o, tuple) else h

            handle = b.register_forward_hook(hook)
            with torch.no_grad():
                res[i, p] = metric(model(corrupt))
            handle.remove()
    return res


# ------------------------------------------------------------------------------------------ equal results


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 9])
def test_gpt2_equals_the_plain_sweep_and_a_hook_loop(gpt2, chunk_size):
    clean, corrupt = _prompts()
    plain = patching_sweep(gpt2, None, (clean,), (corrupt,), "transformer.h.*", last_diff)
    fast = patching_sweep(
        gpt2, None, (clean,), (corrupt,), "transformer.h.*", last_diff, reuse_prefix=True, chunk_size=chunk_size
    )
    loop = _hook_loop(gpt2, gpt2.transformer.h, clean, corrupt, last_diff)
    assert fast.shape == (3, 9)
    torch.testing.assert_close(fast, plain, atol=1e-10, rtol=0)
    torch.testing.assert_close(fast.detach(), loop, atol=1e-10, rtol=0)
    assert float(loop.std()) > 1e-3  # the patches change the metric


def test_logits_to_keep_int_and_positions(gpt2):
    """The LM head only at the kept positions: an int (the last k), or positions in any order (early ones too)."""
    clean, corrupt = _prompts()
    plain = patching_sweep(gpt2, None, (clean,), (corrupt,), "transformer.h.*", last_diff)
    one = patching_sweep(
        gpt2, None, (clean,), (corrupt,), "transformer.h.*", last_diff, reuse_prefix=True, kwargs={"logits_to_keep": 1}
    )
    torch.testing.assert_close(one, plain, atol=1e-10, rtol=0)

    def two_positions(out):  # logits at positions 6 and 2 of a full run
        return out.logits[:, 6, 3].sum() - 2 * out.logits[:, 2, 1].sum()

    ref = patching_sweep(gpt2, None, (clean,), (corrupt,), "transformer.h.*", two_positions)
    kept = patching_sweep(
        gpt2,
        None,
        (clean,),
        (corrupt,),
        "transformer.h.*",
        lambda out: out.logits[:, 0, 3].sum() - 2 * out.logits[:, 1, 1].sum(),
        reuse_prefix=True,
        chunk_size=4,
        kwargs={"logits_to_keep": torch.tensor([6, -7])},
    )
    torch.testing.assert_close(kept, ref, atol=1e-10, rtol=0)
    assert torch.equal(ref[:, 7:], ref[:, 7 : 1 + 7].expand(3, 2))  # patches after both positions change nothing


def test_other_per_position_sites(gpt2):
    """Attention and MLP outputs (a tuple element), a block's input, the embeddings."""
    clean, corrupt = _prompts(t=7)
    sites = ["transformer.h.*.attn:output.0", "transformer.h.1.mlp", "transformer.h.2:input", "transformer.wte"]
    for s in sites:
        plain = patching_sweep(gpt2, None, (clean,), (corrupt,), s, last_diff)
        fast = patching_sweep(gpt2, None, (clean,), (corrupt,), s, last_diff, reuse_prefix=True, chunk_size=3)
        torch.testing.assert_close(fast, plain, atol=1e-10, rtol=0)


def test_llama_rotary_positions_continue(llama):
    """Rotary positions: the suffix's position ids continue from the cache (a restart would differ)."""
    clean, corrupt = _prompts(t=10)
    plain = patching_sweep(llama, None, (clean,), (corrupt,), "model.layers.*", last_diff)
    fast = patching_sweep(llama, None, (clean,), (corrupt,), "model.layers.*", last_diff, reuse_prefix=True)
    loop = _hook_loop(llama, llama.model.layers, clean, corrupt, last_diff)
    torch.testing.assert_close(fast, plain, atol=1e-10, rtol=0)
    torch.testing.assert_close(fast.detach(), loop, atol=1e-10, rtol=0)
    heads = "model.layers.*.self_attn.o_proj:input"
    torch.testing.assert_close(
        patching_sweep(llama, None, (clean,), (corrupt,), heads, last_diff, reuse_prefix=True, chunk_size=4),
        patching_sweep(llama, None, (clean,), (corrupt,), heads, last_diff),
        atol=1e-10,
        rtol=0,
    )


def test_llama_attention_mask_and_position_ids(llama):
    """An attention mask (keys 3 and 4 of row 1 masked; with left padding this eager Llama returns NaN itself)
    and explicit position ids are cut to the suffix as the model expects."""
    clean, corrupt = _prompts(t=8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 3:5] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    for kw in ({"attention_mask": mask}, {"attention_mask": mask, "position_ids": pos}):
        plain = patching_sweep(llama, None, (clean,), (corrupt,), "model.layers.*", last_diff, kwargs=kw)
        fast = patching_sweep(
            llama, None, (clean,), (corrupt,), "model.layers.*", last_diff, kwargs=kw, reuse_prefix=True, chunk_size=3
        )
        torch.testing.assert_close(fast, plain, atol=1e-10, rtol=0)


def test_float32_within_1e_5_relative():
    model = _gpt2(torch.float32, n_layer=4)
    clean, corrupt = _prompts(t=12, b=3)
    plain = patching_sweep(model, None, (clean,), (corrupt,), "transformer.h.*", last_diff)
    fast = patching_sweep(
        model, None, (clean,), (corrupt,), "transformer.h.*", last_diff, reuse_prefix=True, kwargs={"logits_to_keep": 1}
    )
    assert float((fast - plain).detach().abs().max() / plain.detach().abs().max()) < 1e-5


def test_grad_through_the_sweep_equals_the_plain_sweeps(gpt2):
    clean, corrupt = _prompts(t=6)
    state = tdfunc.state(gpt2)

    def total(st, reuse):
        r = patching_sweep(gpt2, st, (clean,), (corrupt,), "transformer.h.*", last_diff, reuse_prefix=reuse)
        return (r * torch.arange(1.0, 19.0, dtype=r.dtype).reshape(3, 6)).sum()

    g_fast, g_plain = grad(total)(state, True), grad(total)(state, False)
    for k in state.keys(True, True):
        torch.testing.assert_close(g_fast[k], g_plain[k], atol=1e-10, rtol=0)
    assert float(g_plain["transformer", "h", "2", "mlp", "c_fc", "weight"].abs().sum()) > 0


def test_progress_bar_ticks_per_chunk(gpt2, capsys):
    clean, corrupt = _prompts(t=9)
    r = patching_sweep(
        gpt2, None, (clean,), (corrupt,), "transformer.h.*", last_diff, reuse_prefix=True, chunk_size=4, progress=True
    )
    assert r.shape == (3, 9)
    assert "9/9" in capsys.readouterr().err  # 3 sites x 3 chunks


# ------------------------------------------------------------------------------------------ refusals


def _pinned(match, fn_call):
    with pytest.raises(PatchError, match=re.escape(match)):
        fn_call()


def test_refuses_a_model_without_a_kv_cache():
    net = TinyTransformer().double().eval()
    x = torch.randint(0, 17, (2, 6))
    _pinned(
        f"{FN}: reuse_prefix=True reuses the corrupted run's keys and values through the model's KV cache, but "
        "TinyTransformer.forward takes no past_key_values / use_cache; pass a transformers causal LM",
        lambda: patching_sweep(net, None, (x,), (x,), "blocks.*", lambda y: y.sum(), reuse_prefix=True),
    )


def test_refuses_bidirectional_attention():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    bert = transformers.BertForMaskedLM(cfg).eval()
    x = torch.randint(0, 64, (1, 6))
    call = lambda: patching_sweep(  # noqa: E731
        bert, None, (x,), (x,), "bert.encoder.layer.*", lambda o: o.logits[0, 0, 0], reuse_prefix=True
    )
    _pinned(
        f"{FN}: reuse_prefix=True needs causal attention (a patch at position p must leave the positions before p "
        "as the corrupted run computed them), but BertForMaskedLM has non-causal (bidirectional) attention; leave "
        "reuse_prefix=False.",
        call,
    )


def test_refuses_heads_and_other_units(gpt2):
    clean, corrupt = _prompts()
    _pinned(
        f"{FN}: reuse_prefix=True skips the positions before each patched position, so it sweeps positions only, "
        "got over='heads' (a unit that spans every position has no prefix to reuse)",
        lambda: patching_sweep(
            gpt2,
            None,
            (clean,),
            (corrupt,),
            "transformer.h.*.attn.c_proj:input",
            last_diff,
            over="heads",
            reuse_prefix=True,
        ),  # fmt: skip
    )


def test_refuses_a_site_that_is_not_per_position(gpt2):
    clean, corrupt = _prompts()
    _pinned(
        f"{FN}: reuse_prefix=True patches one position of a per-position site (batch, T, ...), but site "
        "'lm_head' holds (2, 1, 64) for token ids of shape (2, 9)",
        lambda: patching_sweep(
            gpt2, None, (clean,), (corrupt,), "lm_head", last_diff, reuse_prefix=True, kwargs={"logits_to_keep": 1}
        ),
    )


def test_refuses_inputs_it_cannot_cut(gpt2):
    clean, corrupt = _prompts()
    _pinned(
        f"{FN}: reuse_prefix=True knows how to cut the keyword inputs ['attention_mask', 'position_ids', "
        "'logits_to_keep'] to the suffix, not ['token_type_ids']",
        lambda: patching_sweep(
            gpt2,
            None,
            (clean,),
            (corrupt,),
            "transformer.h.*",
            last_diff,
            reuse_prefix=True,
            kwargs={"token_type_ids": torch.zeros_like(clean)},
        ),  # fmt: skip
    )
    emb = gpt2.transformer.wte(clean)
    _pinned(
        f"{FN}: reuse_prefix=True takes the prompts as one positional tensor of token ids of shape (batch, T) each, "
        "got [(2, 9, 32)]",
        lambda: patching_sweep(gpt2, None, (emb,), (emb,), "transformer.h.*", last_diff, reuse_prefix=True),
    )
    _pinned(
        f"{FN}: with reuse_prefix=True, logits_to_keep must be an int in [0, 9] or a 1-D integer tensor of "
        "positions, got 10",
        lambda: patching_sweep(
            gpt2,
            None,
            (clean,),
            (corrupt,),
            "transformer.h.*",
            last_diff,
            reuse_prefix=True,
            kwargs={"logits_to_keep": 10},
        ),  # fmt: skip
    )
    with pytest.raises(TypeError, match=re.escape(f"{FN}: reuse_prefix must be")):
        patching_sweep(gpt2, None, (clean,), (corrupt,), "transformer.h.*", last_diff, reuse_prefix="yes")


class _RestartingPositions(torch.nn.Module):
    """A causal LM whose forward restarts the position ids at 0 on a cache: the suffix is not the full run."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, past_key_values=None, use_cache=None, logits_to_keep=0):
        pos = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        return self.inner(
            input_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_ids=pos,
            logits_to_keep=logits_to_keep,
        )


class _Wrapped(torch.nn.Module):
    """A causal LM without get_output_embeddings: the LM head runs inside each suffix call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, past_key_values=None, use_cache=None, logits_to_keep=0):
        return self.inner(
            input_ids, past_key_values=past_key_values, use_cache=use_cache, logits_to_keep=logits_to_keep
        )


def test_the_head_inside_each_call_when_the_model_does_not_name_it(gpt2):
    """Without get_output_embeddings / base_model_prefix the suffix calls return logits themselves."""
    model = _Wrapped(gpt2)
    clean, corrupt = _prompts()
    plain = patching_sweep(gpt2, None, (clean,), (corrupt,), "transformer.h.*", last_diff)
    first_kept = lambda o: (o.logits[:, 0, 3] - o.logits[:, 0, 5]).mean()  # noqa: E731  # position 8 = T - 1
    for kw, metric in (
        ({}, last_diff),
        ({"logits_to_keep": 1}, last_diff),
        ({"logits_to_keep": torch.tensor([8, 1])}, first_kept),
    ):
        fast = patching_sweep(
            model, None, (clean,), (corrupt,), "inner.transformer.h.*", metric, reuse_prefix=True, kwargs=kw
        )
        torch.testing.assert_close(fast, plain, atol=1e-10, rtol=0)


def test_refuses_a_model_whose_cache_does_not_reproduce_its_run(gpt2):
    model = _RestartingPositions(gpt2)
    clean, corrupt = _prompts()
    _pinned(
        f"{FN}: reuse_prefix=True: _RestartingPositions run from position 3 on its KV cache does not reproduce "
        "its full run (max |logit difference|",
        lambda: patching_sweep(
            model, None, (clean,), (corrupt,), "inner.transformer.h.*", last_diff, reuse_prefix=True
        ),
    )


def test_refuses_a_model_whose_logits_are_more_than_its_head():
    """A forward that scales the head's logits (as soft-capping models do): the head run apart would miss it."""

    class Scaled(transformers.GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 2.0 * out.logits
            return out

    model = Scaled(_gpt2().config).eval().double()
    clean, corrupt = _prompts()
    _pinned(
        f"{FN}: reuse_prefix=True: Scaled run from position 3 on its KV cache does not reproduce its full run",
        lambda: patching_sweep(model, None, (clean,), (corrupt,), "transformer.h.*", last_diff, reuse_prefix=True),
    )


# ------------------------------------------------------------------------------------------ SmolLM2


def test_smollm2_equals_the_plain_sweep(smollm2):
    """Real weights (Llama, GQA, rotary): 'The capital of France is' vs '... Italy is', logit Paris - Rome."""
    model, tok = smollm2
    clean = tok("The capital of France is", return_tensors="pt").input_ids
    corrupt = tok("The capital of Italy is", return_tensors="pt").input_ids
    paris, rome = tok(" Paris").input_ids[0], tok(" Rome").input_ids[0]
    sites = ["model.layers.0", "model.layers.12", "model.layers.29"]

    def metric(out):
        return out.logits[0, -1, paris] - out.logits[0, -1, rome]

    with torch.no_grad():
        plain = patching_sweep(model, None, (clean,), (corrupt,), sites, metric)
        fast = patching_sweep(
            model, None, (clean,), (corrupt,), sites, metric, reuse_prefix=True, kwargs={"logits_to_keep": 1}
        )
    assert float((fast - plain).abs().max() / plain.abs().max()) < 1e-5
    assert float(plain[0].max() - plain[0].min()) > 1.0  # patching the country's position moves the answer
