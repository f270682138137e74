"""``tdfunc.latent.generate``: transformers' own ``generate`` (KV cache, attention mask, padding) under edits.

The reference is a cache-free loop: each step reruns the whole sequence with ``functional_call`` and
``steer(v, positions=<absolute positions>)`` (``position_mask`` over the full sequence, a separate code
path) and appends the argmax.  ``generate`` must give the same tokens and the same logits (every step's),
on GPT-2 and a tiny Llama built from configs (eager attention), for positions ``[0, 1]``, ``-1``,
``None`` and ``slice(-1, None)``; a left-padded batch equals each row generated alone; the module, its
hooks and its generation config are unchanged after the call, also when it raises.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tdfunc
from tdfunc.latent import PatchError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

N_NEW = 5


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=64,
        n_positions=32,
        initializer_range=0.3,
        attn_implementation="eager",
    )
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = 0, None, None  # no early stop
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        attn_implementation="eager",
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


MODELS = {"gpt2": (_gpt2, "transformer.h.0"), "llama": (_llama, "model.layers.0")}


@pytest.fixture(scope="module", params=sorted(MODELS))
def lm(request):
    build, block = MODELS[request.param]
    return build(), block


def _absolute(positions, prompt_len: int, total: int) -> list[int]:
    """The positions of a full sequence of ``total`` tokens that ``positions`` names (prompt of ``prompt_len``)."""
    if positions is None:
        return list(range(total))
    if isinstance(positions, slice):
        lo = 0 if positions.start is None else positions.start % prompt_len if positions.start < 0 else positions.start
        hi = total if positions.stop is None else positions.stop
        return list(range(lo, min(hi, total)))
    ps = [positions] if isinstance(positions, int) else list(positions)
    return [p + prompt_len if p < 0 else p for p in ps if (p + prompt_len if p < 0 else p) < total]


def _loop(model, ids, v, site, positions, n):
    """Cache-free reference: rerun the full sequence each step with the edit at the absolute positions."""
    logits = []
    for _ in range(n):
        pos = _absolute(positions, ids.shape[1] - len(logits), ids.shape[1])
        edits = tdfunc.latent.steer({site: v}, 1.0, positions=pos if pos else torch.zeros(ids.shape[1], dtype=bool))
        with torch.no_grad():
            out = tdfunc.functional_call(model, None, (ids,), edits=edits)
        logits.append(out.logits[:, -1])
        ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids, torch.stack(logits, 1)


def _gen(model, ids, v, site, positions, n=N_NEW, **kw):
    out = tdfunc.latent.generate(
        model,
        None,
        ids,
        edits=tdfunc.latent.steer({site: v}, 1.0),
        positions=positions,
        max_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kw,
    )
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("positions", [[0, 1], -1, None, slice(-1, None), [2, 6], range(1, 3)], ids=str)
def test_equals_cache_free_loop(lm, positions):
    model, block = lm
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (2, 5))
    v = 4 * torch.randn(32)
    seq, logits = _gen(model, ids, v, block, positions)
    ref_seq, ref_logits = _loop(model, ids, v, block, positions, N_NEW)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    plain = model.generate(ids, max_new_tokens=N_NEW, output_logits=True, return_dict_in_generate=True)
    assert (torch.stack(plain.logits, 1) - logits).abs().max() > 1e-3  # the edit matters: the comparison can fail


def test_the_old_cache_semantics_differ_from_the_loop(lm):
    """Why positions are resolved against the full sequence: per-forward -1 under the cache is another edit."""
    model, block = lm
    torch.manual_seed(1)
    ids, v = torch.randint(1, 64, (1, 5)), 4 * torch.randn(32)
    edits = tdfunc.latent.steer({block: v}, 1.0, positions=-1)
    out = tdfunc.intervene(
        lambda: model.generate(ids, max_new_tokens=N_NEW, output_logits=True, return_dict_in_generate=True),
        model,
        edits=edits,
    )()
    _, ref_logits = _loop(model, ids, v, block, -1, N_NEW)
    assert (torch.stack(out.logits, 1) - ref_logits).abs().max() > 1e-3
    with pytest.raises(PatchError, match="out of range"):
        edits = tdfunc.latent.steer({block: v}, 1.0, positions=[0, 1])
        tdfunc.intervene(lambda: model.generate(ids, max_new_tokens=2), model, edits=edits)()


@pytest.mark.parametrize("positions", [[0, 1], -1, None, slice(-2, None)], ids=str)
def test_left_padded_batch_equals_each_row_alone(lm, positions):
    model, block = lm
    torch.manual_seed(2)
    rows = [torch.randint(1, 64, (n,)) for n in (6, 3, 4)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    v = 4 * torch.randn(32)
    seq, logits = _gen(model, ids, v, block, positions, attention_mask=mask, pad_token_id=0)
    for i, r in enumerate(rows):
        one_seq, one_logits = _gen(model, r[None], v, block, positions)
        assert torch.equal(seq[i, width:], one_seq[0, len(r) :])
        torch.testing.assert_close(logits[i], one_logits[0], rtol=1e-4, atol=1e-4)
        ref_seq, _ = _loop(model, r[None], v, block, positions, N_NEW)
        assert torch.equal(one_seq, ref_seq)


def test_edit_forms_and_state(lm):
    """Tensor substitutes, callables and deltas are masked alike; a state replaces the weights (as functional_call)."""
    model, block = lm
    torch.manual_seed(3)
    ids = torch.randint(1, 64, (2, 4))
    v = 3 * torch.randn(32)
    forms = {
        "delta": tdfunc.delta(v),
        "callable": lambda h: h + v,
        "tensor": v.expand(2, 1, 32),  # a substitute broadcast over (batch, tokens)
    }
    for name, edit in forms.items():
        got = tdfunc.latent.generate(model, None, ids, edits={block: edit}, positions=[1], max_new_tokens=3)
        if name == "tensor":
            ref, _ = _substitute_loop(model, ids, v, block, 1, 3)
        else:
            ref, _ = _loop(model, ids, v, block, [1], 3)
        assert torch.equal(got, ref), name
    state = {k: p.detach() * 1.5 for k, p in model.named_parameters()}  # a partial state: the parameters
    other = copy.deepcopy(model)
    other.load_state_dict(state, strict=False)
    got = tdfunc.latent.generate(model, state, ids, edits={block: tdfunc.delta(v)}, positions=-1, max_new_tokens=3)
    want = tdfunc.latent.generate(other, None, ids, edits={block: tdfunc.delta(v)}, positions=-1, max_new_tokens=3)
    assert torch.equal(got, want)


def _substitute_loop(model, ids, v, site, pos, n):
    for _ in range(n):

        def sub(h):
            h = h.clone()
            h[:, pos] = v
            return h

        with torch.no_grad():
            out = tdfunc.functional_call(model, None, (ids,), edits={site: sub})
        ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids, None


def test_generation_kwargs_pass_through(lm):
    """Beam search (rows repeated per prompt) and no edits: exactly transformers' result."""
    model, block = lm
    torch.manual_seed(4)
    ids = torch.randint(1, 64, (2, 4))
    plain = tdfunc.latent.generate(model, None, ids, max_new_tokens=4, num_beams=3, do_sample=False)
    assert torch.equal(plain, model.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False))
    v = 4 * torch.randn(32)
    beams = tdfunc.latent.generate(
        model, None, ids, edits=tdfunc.latent.steer({block: v}), positions=-1, max_new_tokens=4, num_beams=3
    )
    one = tdfunc.latent.generate(
        model, None, ids[:1], edits=tdfunc.latent.steer({block: v}), positions=-1, max_new_tokens=4, num_beams=3
    )
    assert torch.equal(beams[:1], one)
    no_cache = tdfunc.latent.generate(
        model, None, ids, edits=tdfunc.latent.steer({block: v}), positions=[0, 1], max_new_tokens=4, use_cache=False
    )
    assert torch.equal(no_cache, _loop(model, ids, v, block, [0, 1], 4)[0])
    static = tdfunc.latent.generate(
        model,
        None,
        ids,
        edits=tdfunc.latent.steer({block: v}),
        positions=slice(-1, None),
        max_new_tokens=4,
        cache_implementation="static",  # a cache (and a 2-D mask) sized beyond the tokens seen so far
    )
    assert torch.equal(static, _loop(model, ids, v, block, slice(-1, None), 4)[0])


def _fingerprint(model):
    hooks = [
        (n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._forward_hooks_with_kwargs))
        for n, m in model.named_modules()
    ]
    tensors = {k: t.clone() for k, t in model.state_dict().items()}
    return hooks, tensors, model.generation_config.to_dict(), sorted(vars(model))


def test_pure_also_when_it_raises(lm):
    model, block = lm
    ids = torch.randint(1, 64, (1, 4))
    before = _fingerprint(model)
    want = model.generate(ids, max_new_tokens=3, do_sample=False)
    tdfunc.latent.generate(
        model, None, ids, edits=tdfunc.latent.steer({block: torch.ones(32)}), positions=-1, max_new_tokens=3
    )
    for bad in (
        {block: lambda h: h[:, :, :3]},  # a wrong shape: EditError from the step
        {block + ".nope": tdfunc.delta(torch.ones(32))},  # an unknown site
    ):
        with pytest.raises(tdfunc.TdfuncError):
            tdfunc.latent.generate(model, None, ids, edits=bad, positions=[0], max_new_tokens=3)

    def boom(h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tdfunc.latent.generate(model, None, ids, edits={block: boom}, positions=[0], max_new_tokens=3)
    after = _fingerprint(model)
    assert before[0] == after[0] and before[2] == after[2] and before[3] == after[3]
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), want)


# -------------------------------------------------------------------------------------------- SmolLM2


def test_smollm2_padded_steered_generation_equals_rows_alone_and_the_loop(smollm2):
    """Real weights: a left-padded batch of two prompts, steered at the last prompt token and after it."""
    model, tok = smollm2
    prompts = ["The capital of France is", "I think the movie was"]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    site = "model.layers.10"
    v = 8.0 * torch.randn(576, generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    edits = tdfunc.latent.steer({site: v})
    out = tdfunc.latent.generate(
        model, None, enc.input_ids, attention_mask=enc.attention_mask, edits=edits, positions=slice(-1, None), **kw
    )
    plain = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert not torch.equal(out.sequences, plain)
    width = enc.input_ids.shape[1]
    for i, p in enumerate(prompts):
        ids = tok(p, return_tensors="pt").input_ids
        seq, logits = _loop(model, ids, v, site, slice(-1, None), 4)
        assert torch.equal(out.sequences[i, width:], seq[0, ids.shape[1] :])
        torch.testing.assert_close(torch.stack(out.logits, 1)[i], logits[0], rtol=1e-4, atol=2e-4)


# ------------------------------------------------------------------------------------------- errors

NET = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5))


class _LM(torch.nn.Sequential):
    def generate(self, input_ids, max_new_tokens=1):
        for _ in range(max_new_tokens):
            input_ids = torch.cat([input_ids, self(input_ids)[:, -1:].argmax(-1)], 1)
        return input_ids


LM = _LM(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5))
IDS = torch.tensor([[1, 2, 3]])
GEN = "tdfunc.latent.generate"
ERRORS = [
    (
        "module",
        lambda: tdfunc.latent.generate("lm", None, IDS),
        f"{GEN}: expected an nn.Module as the module, got str ('lm'); pass the model itself (the nn.Module to run).",
    ),
    (
        "no generate",
        lambda: tdfunc.latent.generate(NET, None, IDS),
        f"{GEN}: expected a model with a generate method (a transformers GenerationMixin model), got Sequential, "
        "which has none; use tdfunc.latent.generate_greedy for a plain module.",
    ),
    (
        "ids",
        lambda: tdfunc.latent.generate(LM, None, IDS.float()),
        f"{GEN}: input_ids must be a 2-D integer tensor (B, T) of tokens, got shape (1, 3) dtype torch.float32.",
    ),
    (
        "positions type",
        lambda: tdfunc.latent.generate(LM, None, IDS, edits={"0": tdfunc.delta(torch.ones(4))}, positions=1.5),
        f"{GEN}: positions must be None, an int, a list / range of ints, a 1-D integer tensor or a slice of ints "
        "(step 1), got float (1.5); negative positions count from the end of each row's prompt (-1: its last token).",
    ),
    (
        "positions slice step",
        lambda: tdfunc.latent.generate(
            LM, None, IDS, edits={"0": tdfunc.delta(torch.ones(4))}, positions=slice(0, None, 2)
        ),
        f"{GEN}: positions must be None, an int, a list / range of ints, a 1-D integer tensor or a slice of ints "
        "(step 1), got slice(0, None, 2).",
    ),
    (
        "positions before the prompt",
        lambda: tdfunc.latent.generate(LM, None, IDS, edits={"0": tdfunc.delta(torch.ones(4))}, positions=-4),
        f"{GEN}: position -4 is before the first token of a row whose prompt has 3 tokens; negative positions count "
        "from the end of each row's prompt: give positions >= -3.",
    ),
    (
        "positions without edits",
        lambda: tdfunc.latent.generate(LM, None, IDS, positions=[0]),
        f"{GEN}: positions=[0] given without edits; pass edits=... (e.g. tdfunc.latent.steer(v, 4.0)) for the "
        "positions to select, or drop positions.",
    ),
    (
        "steer positions",
        lambda: tdfunc.latent.generate(LM, None, IDS, edits=tdfunc.latent.steer({"0": torch.ones(4)}, positions=-1)),
        f"{GEN}: the edit at site '0' comes from tdfunc.latent.steer(..., positions=-1), whose positions count the "
        "tokens of each forward (under the KV cache only the new ones); pass steer(v, scale) and positions=... to "
        "generate instead.",
    ),
    (
        "rule with positions",
        lambda: tdfunc.latent.generate(LM, None, IDS, edits={"0": tdfunc.rule(lambda m, a, k, o: o)}, positions=[0]),
        f"{GEN}: positions apply to tensor, delta and callable edits, but the edit at site '0' is a Rule; pass "
        "positions=None and select positions inside it.",
    ),
    (
        "edits type",
        lambda: tdfunc.latent.generate(LM, None, IDS, edits=[("0", torch.ones(4))]),
        f"{GEN}: edits must be a mapping {{site: edit}} or None, got list ([('0', tensor([1., 1., 1., 1.]))]).",
    ),
]


@pytest.mark.parametrize("case", ERRORS, ids=lambda c: c[0])
def test_errors_are_pinned(case):
    _, call, message = case
    with pytest.raises(tdfunc.TdfuncError) as e:
        call()
    assert str(e.value) == message


def test_site_whose_value_is_not_batch_tokens_is_refused():
    lm = _LM(torch.nn.Embedding(5, 4), torch.nn.Flatten(0, 1), torch.nn.Linear(4, 5))
    with pytest.raises(PatchError) as e:
        tdfunc.latent.generate(lm, None, IDS, edits={"1": tdfunc.delta(torch.ones(4))}, positions=[0])
    assert str(e.value) == (
        "tdfunc.latent.generate: positions index dims (batch, token) of a site's value, but site '1' has shape (3, 4) "
        "while this forward runs 1 rows of 3 tokens; edit a site whose value is (batch, tokens, ...) (a block's "
        "output, a residual stream), or pass positions=None."
    )


def test_encoder_decoder_positions_are_refused():
    """The root forward of an encoder-decoder's decoding steps gets no input_ids: positions cannot be read."""
    torch.manual_seed(0)
    cfg = transformers.BartConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
    )
    bart = transformers.BartForConditionalGeneration(cfg).eval()
    edits = {"model.decoder.layers.0": tdfunc.delta(torch.ones(32))}
    with pytest.raises(PatchError) as e:
        tdfunc.latent.generate(bart, None, torch.randint(3, 64, (1, 6)), edits=edits, positions=[0], max_new_tokens=2)
    assert str(e.value) == (
        "tdfunc.latent.generate: positions need the tokens of each forward, but the model was called without a 2-D "
        "input_ids / inputs_embeds; pass positions=None and put the position logic into the edit."
    )
    plain = tdfunc.latent.generate(bart, None, torch.randint(3, 64, (1, 6)), edits=edits, max_new_tokens=2)
    assert plain.shape[0] == 1  # without positions the edits apply to every decoder step
