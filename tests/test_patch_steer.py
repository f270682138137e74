"""Activation patching and steering: against explicit loops, forward-hook references and hand computation.

Models: tests/models.py TinyTransformer (block outputs, the Tap ``blocks.*.resid``, attention scores
with ``-inf``) and a transformers GPT-2 from a small config (eager attention, offline).
"""

from __future__ import annotations

import re

import pytest
import torch
from models import TinyTransformer
from tensordict import TensorDict
from torch.func import grad, vmap

import tdfunc
from tdfunc.latent import PatchError


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TinyTransformer().double().eval()


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


def _hooked(model, module_of, toks, patches):
    """Forward-hook reference: patches = [(module name, position or None, clean value)]."""
    handles = []
    for name, pos, value in patches:

        def hook(mod, args, output, pos=pos, value=value):
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()
            if pos is None:
                h = value.clone()
            else:
                h[:, pos] = value[:, pos]
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handles.append(module_of(name).register_forward_hook(hook))
    try:
        return model(toks)
    finally:
        for h in handles:
            h.remove()


def _tiny_ref(tiny, toks, patches):
    return _hooked(tiny, tiny.get_submodule, toks, patches)


# ------------------------------------------------------------------------------------------------ patch


def test_patch_whole_site_and_positions_match_hook_reference(tiny):
    clean, corrupt = torch.randint(0, 17, (2, 8)), torch.randint(0, 17, (2, 8))
    out, caps = tdfunc.functional_call(tiny, None, (clean,), capture=["blocks.*"])
    # the last block's output, patched whole, makes the corrupted run the clean run
    torch.testing.assert_close(tdfunc.latent.patch(tiny, None, (corrupt,), caps, "blocks.1"), out, rtol=0, atol=0)
    ref = _tiny_ref(tiny, corrupt, [("blocks.0", [2, 5], caps["blocks.0"])])
    by_ints = tdfunc.latent.patch(tiny, None, (corrupt,), caps, "blocks.0", positions=[2, 5])
    mask = torch.zeros(8, dtype=torch.bool)
    mask[[2, 5]] = True
    by_mask = tdfunc.latent.patch(tiny, None, (corrupt,), caps, "blocks.0", positions=mask)
    by_neg = tdfunc.latent.patch(tiny, None, (corrupt,), caps, "blocks.0", positions=torch.tensor([-6, -3]))
    for got in (by_ints, by_mask, by_neg):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_patch_glob_and_patch_fn(tiny):
    clean, corrupt = torch.randint(0, 17, (2, 8)), torch.randint(0, 17, (2, 8))
    _, caps = tdfunc.functional_call(tiny, None, (clean,), capture=["blocks.*.resid"])
    mix = lambda v, c: 0.5 * (v + c)  # noqa: E731
    got = tdfunc.latent.patch(tiny, None, (corrupt,), caps, "blocks.*.resid", positions=3, patch_fn=mix)
    edits = {k: (lambda v, c=caps[k]: torch.cat([v[:, :3], mix(v, c)[:, 3:4], v[:, 4:]], 1)) for k in caps.keys()}
    torch.testing.assert_close(got, tdfunc.functional_call(tiny, None, (corrupt,), edits=edits), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ sweep


def _metric(logits):
    return logits[0, -1, 3] - logits[0, -1, 5]


def _loop(module, clean, corrupt, keys, dim, n_units, metric):
    """Explicit Python loop of single patches, one tdfunc.functional_call each."""
    _, caps = tdfunc.functional_call(module, None, (clean,), capture=keys)
    rows = []
    for k in keys:
        row = []
        for u in range(n_units):

            def edit(v, c=caps[k], u=u):
                idx = [slice(None)] * v.dim()
                idx[dim] = u
                v = v.clone()
                v[tuple(idx)] = c[tuple(idx)]
                return v

            row.append(metric(tdfunc.functional_call(module, None, (corrupt,), edits={k: edit})))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def test_sweep_positions_tiny_equals_loop_and_hooks(tiny):
    clean, corrupt = torch.randint(0, 17, (1, 8)), torch.randint(0, 17, (1, 8))
    sites = ["blocks.*", "blocks.*.resid"]
    keys = ["blocks.0", "blocks.1", "blocks.0.resid", "blocks.1.resid"]
    got = tdfunc.latent.patching_sweep(tiny, None, (clean,), (corrupt,), sites, _metric)
    assert got.shape == (4, 8)
    torch.testing.assert_close(got, _loop(tiny, clean, corrupt, keys, 1, 8, _metric), rtol=1e-12, atol=1e-12)
    _, caps = tdfunc.functional_call(tiny, None, (clean,), capture=keys)
    hook = torch.stack(
        [torch.stack([_metric(_tiny_ref(tiny, corrupt, [(k, p, caps[k])])) for p in range(8)]) for k in keys]
    )
    torch.testing.assert_close(got, hook, rtol=1e-12, atol=1e-12)
    chunked = tdfunc.latent.patching_sweep(tiny, None, (clean,), (corrupt,), sites, _metric, chunk_size=5)
    torch.testing.assert_close(chunked, got, rtol=1e-12, atol=1e-12)
    # patching a position into a later block leaves earlier positions of the metric's row unaffected
    assert not torch.isnan(got).any()


def test_sweep_over_heads_and_query_positions_of_scores(tiny):
    """Units along any dim: heads (dim 1) and query positions (dim -2) of the (B, H, T, T) scores (with -inf)."""
    clean, corrupt = torch.randint(0, 17, (1, 8)), torch.randint(0, 17, (1, 8))
    keys = ["blocks.0.attn.scores", "blocks.1.attn.scores"]
    heads = tdfunc.latent.patching_sweep(tiny, None, (clean,), (corrupt,), "blocks.*.attn.scores", _metric, over=1)
    assert heads.shape == (2, 2)
    torch.testing.assert_close(heads, _loop(tiny, clean, corrupt, keys, 1, 2, _metric), rtol=1e-12, atol=1e-12)
    queries = tdfunc.latent.patching_sweep(tiny, None, (clean,), (corrupt,), keys, _metric, over=-2, chunk_size=3)
    torch.testing.assert_close(queries, _loop(tiny, clean, corrupt, keys, 2, 8, _metric), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(queries).all()


def test_sweep_gpt2_layers_by_positions_equals_loop_and_hooks(gpt2):
    torch.manual_seed(1)
    clean, corrupt = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 6))
    metric = lambda out: _metric(out.logits)  # noqa: E731
    got = tdfunc.latent.patching_sweep(gpt2, None, (clean,), (corrupt,), "transformer.h.*", metric)
    keys = [f"transformer.h.{i}" for i in range(3)]
    assert got.shape == (3, 6)
    torch.testing.assert_close(got, _loop(gpt2, clean, corrupt, keys, 1, 6, metric), rtol=1e-5, atol=1e-5)
    _, caps = tdfunc.functional_call(gpt2, None, (clean,), capture=keys)
    module_of = lambda k: gpt2.transformer.h[int(k.rsplit(".", 1)[1])]  # noqa: E731
    hook = torch.stack(
        [torch.stack([metric(_hooked(gpt2, module_of, corrupt, [(k, p, caps[k])])) for p in range(6)]) for k in keys]
    )
    torch.testing.assert_close(got, hook, rtol=1e-5, atol=1e-5)


def test_sweep_is_differentiable_wrt_state(tiny):
    clean, corrupt = torch.randint(0, 17, (1, 8)), torch.randint(0, 17, (1, 8))
    s = tdfunc.state(tiny)
    g = grad(lambda s: tdfunc.latent.patching_sweep(tiny, s, (clean,), (corrupt,), "blocks.0", _metric).sum())(s)
    assert torch.isfinite(g["unembed", "weight"]).all() and g["unembed", "weight"].abs().sum() > 0


# ------------------------------------------------------------------------------------------ path patch


def _hook_path_patch(tiny, clean, corrupt, sender, receiver, frozen):
    """Forward-hook reference: capture, then patch the sender with every ``frozen`` module held at its corrupted
    output and record the receiver's output; then patch only the receiver."""
    names = [sender, *frozen]
    _, caps_clean = tdfunc.functional_call(tiny, None, (clean,), capture=[sender])
    _, caps_corr = tdfunc.functional_call(tiny, None, (corrupt,), capture=frozen) if frozen else (None, {})
    seen = {}
    mods = {n: tiny.get_submodule(n) for n in [*names, receiver]}
    handles = [mods[sender].register_forward_hook(lambda m, a, o: caps_clean[sender].clone())]
    handles += [mods[n].register_forward_hook(lambda m, a, o, n=n: caps_corr[n].clone()) for n in frozen]
    handles.append(mods[receiver].register_forward_hook(lambda m, a, o: seen.setdefault("r", o.clone())))
    try:
        tiny(corrupt)
    finally:
        for h in handles:
            h.remove()
    return _tiny_ref(tiny, corrupt, [(receiver, None, seen["r"])])


def test_path_patch_matches_two_step_hook_reference(tiny):
    torch.manual_seed(2)
    clean, corrupt = torch.randint(0, 17, (2, 8)), torch.randint(0, 17, (2, 8))
    for freeze in (None, "blocks.*.mlp"):
        frozen = [] if freeze is None else ["blocks.0.mlp", "blocks.1.mlp"]
        got = tdfunc.latent.path_patch(tiny, None, (clean,), (corrupt,), "blocks.0.attn", "blocks.1.ln1", freeze=freeze)
        want = _hook_path_patch(tiny, clean, corrupt, "blocks.0.attn", "blocks.1.ln1", frozen)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the frozen MLPs change the result: the paths through them are cut
    a = tdfunc.latent.path_patch(tiny, None, (clean,), (corrupt,), "blocks.0.attn", "blocks.1.ln1")
    b = tdfunc.latent.path_patch(
        tiny, None, (clean,), (corrupt,), "blocks.0.attn", "blocks.1.ln1", freeze="blocks.*.mlp"
    )
    assert (a - b).abs().max() > 1e-6


def test_path_patch_limits_equal_plain_patch_and_corrupted_run(tiny):
    clean, corrupt = torch.randint(0, 17, (1, 8)), torch.randint(0, 17, (1, 8))
    _, caps = tdfunc.functional_call(tiny, None, (clean,), capture=["blocks.0.attn"])
    # every path from the sender runs through ln_f: path patching is plain patching
    for positions in (None, [1, 6]):
        got = tdfunc.latent.path_patch(tiny, None, (clean,), (corrupt,), "blocks.0.attn", "ln_f", positions=positions)
        want = tdfunc.latent.patch(tiny, None, (corrupt,), caps, "blocks.0.attn", positions=positions)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a receiver upstream of the sender receives nothing: the corrupted output
    got = tdfunc.latent.path_patch(tiny, None, (clean,), (corrupt,), "blocks.1.attn", "blocks.0.mlp")
    torch.testing.assert_close(got, tiny(corrupt), rtol=0, atol=0)
    # a patch_fn acts on the sender (here: keep the corrupted value, so nothing changes)
    got = tdfunc.latent.path_patch(tiny, None, (clean,), (corrupt,), "blocks.0.attn", "ln_f", patch_fn=lambda v, c: v)
    torch.testing.assert_close(got, tiny(corrupt), rtol=0, atol=0)


def test_path_patch_gpt2_heads_to_later_block_and_grad(gpt2):
    torch.manual_seed(3)
    clean, corrupt = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 6))
    kw = dict(freeze="transformer.h.*.mlp")
    got = tdfunc.latent.path_patch(
        gpt2, None, (clean,), (corrupt,), "transformer.h.0.attn:output.0", "transformer.h.2.ln_1", **kw
    )
    assert torch.isfinite(got.logits).all()
    assert (got.logits - gpt2(corrupt).logits).abs().max() > 1e-4  # the path carries an effect
    s = tdfunc.state(gpt2)
    g = grad(
        lambda s: tdfunc.latent.path_patch(
            gpt2, s, (clean,), (corrupt,), "transformer.h.0.attn:output.0", "transformer.h.2.ln_1", **kw
        ).logits[0, -1, 0]
    )(s)
    assert (
        torch.isfinite(g["transformer", "wte", "weight"]).all()
        and g["transformer", "h", "2", "ln_1", "weight"].abs().sum() > 0
    )


# --------------------------------------------------------------------------------------------- steering


def test_steering_vector_mean_difference_pooled_and_per_position():
    pos, neg = torch.randn(5, 4, 3), torch.randn(5, 4, 3)
    torch.testing.assert_close(tdfunc.latent.steering_vector(pos, neg), pos.mean((0, 1)) - neg.mean((0, 1)))
    torch.testing.assert_close(tdfunc.latent.steering_vector(pos, neg, pooled=False), pos.mean(0) - neg.mean(0))
    torch.testing.assert_close(
        tdfunc.latent.steering_vector(pos[:, 0], neg[:, 0]), pos[:, 0].mean(0) - neg[:, 0].mean(0)
    )
    td = tdfunc.latent.steering_vector(TensorDict({"a": pos, "b": pos[:, 0]}, [5]), {"a": neg, "b": neg[:, 0]})
    assert isinstance(td, TensorDict) and td.batch_size == torch.Size([]) and td["a"].shape == (3,)
    torch.testing.assert_close(td["b"], pos[:, 0].mean(0) - neg[:, 0].mean(0))


def test_steer_edits_scale_sweep_vmap_equals_loop_and_grad(tiny):
    toks = torch.randint(0, 17, (2, 8))
    v = TensorDict({"blocks.0.resid": torch.randn(16, dtype=torch.float64)}, [])

    def run(scale):
        return tdfunc.functional_call(tiny, None, (toks,), edits=tdfunc.latent.steer(v, scale))

    scales = torch.linspace(-4, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(vmap(run)(scales), torch.stack([run(a) for a in scales]), rtol=1e-12, atol=1e-12)
    plain = tdfunc.functional_call(
        tiny, None, (toks,), edits={"blocks.0.resid": lambda h: h + 2.0 * v["blocks.0.resid"]}
    )
    torch.testing.assert_close(run(torch.tensor(2.0, dtype=torch.float64)), plain, rtol=0, atol=0)
    # only the last position steered
    last = tdfunc.functional_call(tiny, None, (toks,), edits=tdfunc.latent.steer(v, 2.0, positions=-1))
    ref = tdfunc.functional_call(
        tiny,
        None,
        (toks,),
        edits={"blocks.0.resid": lambda h: torch.cat([h[:, :-1], h[:, -1:] + 2.0 * v["blocks.0.resid"]], 1)},
    )
    torch.testing.assert_close(last, ref, rtol=0, atol=0)
    # grad w.r.t. the vector = grad w.r.t. a zero delta at the site, summed over batch and positions
    f = lambda u: tdfunc.functional_call(tiny, None, (toks,), edits=tdfunc.latent.steer({"blocks.0.resid": u}))[
        :, -1, 3
    ].sum()  # noqa: E731
    h = lambda d: tdfunc.functional_call(tiny, None, (toks,), edits={"blocks.0.resid": tdfunc.delta(d)})[:, -1, 3].sum()  # noqa: E731
    torch.testing.assert_close(
        grad(f)(torch.zeros(16, dtype=torch.float64)), grad(h)(torch.zeros(2, 8, 16, dtype=torch.float64)).sum((0, 1))
    )


def test_generate_greedy_with_steering_changes_gpt2_tokens(gpt2):
    torch.manual_seed(2)
    prompt = torch.randint(0, 64, (1, 5))
    site = "transformer.h.1"
    with torch.no_grad():
        plain = tdfunc.latent.generate_greedy(gpt2, None, prompt, 6)
        ids = prompt
        for _ in range(6):  # reference: plain greedy loop on the module itself
            ids = torch.cat([ids, gpt2(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(plain, ids)
        a = tdfunc.functional_call(gpt2, None, (torch.randint(0, 64, (4, 5)),), capture=[site])[1]
        b = tdfunc.functional_call(gpt2, None, (torch.randint(0, 64, (4, 5)),), capture=[site])[1]
        v = tdfunc.latent.steering_vector(a, b)
        v = TensorDict({site: v[site] / v[site].norm()}, [])
        assert torch.equal(
            tdfunc.latent.generate_greedy(gpt2, None, prompt, 6, edits=tdfunc.latent.steer(v, 0.0)), plain
        )
        steered = tdfunc.latent.generate_greedy(gpt2, None, prompt, 6, edits=tdfunc.latent.steer(v, 50.0))
    assert steered.shape == (1, 11) and torch.equal(steered[:, :5], prompt)
    assert not torch.equal(steered, plain)


# ----------------------------------------------------------------------------------------------- errors


def _mlp_caps():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(1, 5, 3)
    return net, x, tdfunc.functional_call(net, None, (x,), capture=["0", "1"])[1]


def _errors():
    net, x, caps = _mlp_caps()
    return [
        (
            "sites not in captures",
            lambda: tdfunc.latent.patch(net, None, (x,), caps, "2"),
            "tdfunc.latent.patch: site '2' matches no entry of clean_captures (entries ['0', '1']); capture it in the clean "
            "run: functional_call(..., capture=['2']).",
        ),
        (
            "position out of range",
            lambda: tdfunc.latent.patch(net, None, (x,), caps, "1", positions=[1, 7]),
            "tdfunc.latent.patch: position 7 is out of range for site '1' with 5 positions along dim 1; give positions in [-5, 5).",
        ),
        (
            "bad mask shape",
            lambda: tdfunc.latent.patch(net, None, (x,), caps, "1", positions=torch.ones(4, dtype=torch.bool)),
            "tdfunc.latent.patch: the boolean positions mask has shape (4,) but site '1' has 5 positions along dim 1; give a "
            "mask of shape (5,).",
        ),
        (
            "metric shape",
            lambda: tdfunc.latent.patching_sweep(net, None, (x,), (x,), "0", lambda y: y[0, -1]),
            "tdfunc.latent.patching_sweep: metric must return a scalar (0-dim) tensor per patch, got shape (2,); reduce it "
            "inside metric (e.g. logits[0, -1, a] - logits[0, -1, b], or .mean()).",
        ),
        (
            "sweep over",
            lambda: tdfunc.latent.patching_sweep(net, None, (x,), (x,), "0", lambda y: y.sum(), over="rows"),
            "tdfunc.latent.patching_sweep: over must be 'positions', 'heads', a tdfunc.latent.units(...) view or an int dim "
            "of the sites' values, got 'rows'.",
        ),
        (
            "path overlap",
            lambda: tdfunc.latent.path_patch(net, None, (x,), (x,), ["0", "1"], "1"),
            "tdfunc.latent.path_patch: site(s) ['1'] are both senders and receivers; a receiver must be a later site than the "
            "senders (e.g. senders='blocks.0.attn', receivers='blocks.2.attn:input').",
        ),
        (
            "path receivers",
            lambda: tdfunc.latent.path_patch(net, None, (x,), (x,), "0", []),
            "tdfunc.latent.path_patch: sites must be a site string or a non-empty list of them, got []; pass e.g. 'blocks.*' or "
            "['blocks.0', 'blocks.1.attn'].",
        ),
        (
            "patch_fn",
            lambda: tdfunc.latent.patch(net, None, (x,), caps, "1", patch_fn=3),
            "tdfunc.latent.patch: patch_fn must be None or a callable patch_fn(corrupted_value, clean_value) -> value, got int (3).",
        ),
        (
            "steer N",
            lambda: tdfunc.latent.steering_vector(torch.randn(3, 4), torch.randn(4, 4)),
            "tdfunc.latent.steering_vector: acts_pos has N=3 rows but acts_neg has N=4; give paired examples (one negative "
            "per positive, the same N in both).",
        ),
        (
            "steer N td",
            lambda: tdfunc.latent.steering_vector({"a": torch.randn(3, 4)}, {"a": torch.randn(2, 4)}),
            "tdfunc.latent.steering_vector: acts_pos['a'] has N=3 rows but acts_neg['a'] has N=2; give paired examples (one "
            "negative per positive, the same N in both).",
        ),
        (
            "steer keys",
            lambda: tdfunc.latent.steering_vector({"a": torch.randn(3, 4)}, {"b": torch.randn(3, 4)}),
            "tdfunc.latent.steering_vector: acts_pos has sites ['a'] but acts_neg has sites ['b']; give both the same sites.",
        ),
        (
            "steer vectors",
            lambda: tdfunc.latent.steer(torch.randn(4)),
            "tdfunc.latent.steer: vectors must be a mapping {site: tensor} (e.g. from tdfunc.latent.steering_vector), got Tensor; "
            "wrap a single vector as {'site': v}.",
        ),
        (
            "steer positions",
            lambda: tdfunc.functional_call(
                net, None, (x,), edits=tdfunc.latent.steer({"1": torch.ones(4)}, positions=9)
            ),
            "tdfunc.latent.steer: position 9 is out of range for site '1' with 5 positions along dim 1; give positions in [-5, 5).",
        ),
    ]


@pytest.mark.parametrize("name,call,message", _errors(), ids=[e[0] for e in _errors()])
def test_error_message_is_pinned(name, call, message):
    with pytest.raises(PatchError, match="^" + re.escape(message) + "$"):
        call()


def test_patch_error_is_a_value_error():
    assert issubclass(PatchError, tdfunc.TdfuncError) and issubclass(PatchError, ValueError)
