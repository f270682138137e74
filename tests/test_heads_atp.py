"""Heads as units (einops views) and attribution patching, against hand-written forward-hook references.

Per-head values: the input of GPT-2's ``attn.c_proj`` / Llama's ``self_attn.o_proj`` seen as
``"b t (h d) -> b t h d"`` equals each head's ``softmax(q k^T / sqrt(d) + causal) v`` recomputed by hand
from the attention block's input (a forward pre-hook reads it; RoPE and grouped KV heads for Llama).
Per-head patches and sweeps equal a loop of forward pre-hooks that overwrite one head's slice.
Attribution patching equals the exact sweep for a metric linear in the site, a slow autograd loop
with forward hooks (AtP and GradDrop), and ranks like the exact sweep on transformers (GPT-2, SmolLM2).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.func import grad

import tdfunc
from tdfunc.latent import PatchError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (ties share their average rank: the many exact zeros of unreachable cells)."""
    stats = pytest.importorskip("scipy.stats")
    return float(stats.spearmanr(a.detach().flatten().numpy(), b.detach().flatten().numpy()).statistic)


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=3, n_embd=32, n_head=4, vocab_size=64, n_positions=16, attn_implementation="eager"
    )
    return transformers.GPT2LMHeadModel(cfg).double().eval()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(cfg).double().eval()


def _metric(out):
    return out.logits[0, -1, 3] - out.logits[0, -1, 5]


# ----------------------------------------------------------------------------------- hand references


def _gpt2_heads_ref(model, toks, layer):
    """Each head's output z (B, T, H, Dh) of GPT-2 block ``layer``, recomputed from the attention's input."""
    attn = model.transformer.h[layer].attn
    seen = {}
    h = attn.register_forward_pre_hook(
        lambda m, a, k: seen.update(x=a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    try:
        model(toks)
    finally:
        h.remove()
    x = seen["x"]
    b, t, d = x.shape
    n = model.config.n_head
    q, k, v = (z.reshape(b, t, n, d // n).transpose(1, 2) for z in attn.c_attn(x).split(d, dim=2))
    s = q @ k.transpose(-1, -2) / math.sqrt(d // n)
    s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)  # (B, T, H, Dh)


def _llama_heads_ref(model, toks, layer):
    """Each head's output z (B, T, H, Dh) of Llama layer ``layer``: RoPE, grouped KV heads repeated."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = model.model.layers[layer].self_attn
    seen = {}
    h = attn.register_forward_pre_hook(
        lambda m, a, k: seen.update(x=k["hidden_states"], pe=k["position_embeddings"]), with_kwargs=True
    )
    try:
        model(toks)
    finally:
        h.remove()
    x, (cos, sin) = seen["x"], seen["pe"]
    b, t, _ = x.shape
    cfg = model.config
    n, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = cfg.hidden_size // n
    q = attn.q_proj(x).reshape(b, t, n, dh).transpose(1, 2)
    k = attn.k_proj(x).reshape(b, t, nkv, dh).transpose(1, 2)
    v = attn.v_proj(x).reshape(b, t, nkv, dh).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = (z.repeat_interleave(n // nkv, dim=1) for z in (k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(dh)
    s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def _head_hook_loop(model, proj_of, clean, corrupt, layers, n_heads, metric):
    """Slow reference sweep: one forward per (layer, head), a pre-hook overwriting that head's slice."""
    caps = {}
    hs = [
        proj_of(layer).register_forward_pre_hook(lambda m, a, layer=layer: caps.__setitem__(layer, a[0].clone()))
        for layer in layers
    ]
    try:
        model(clean)
    finally:
        for h in hs:
            h.remove()
    rows = []
    for layer in layers:
        row = []
        for head in range(n_heads):

            def pre(m, a, layer=layer, head=head):
                x = a[0].clone()
                dh = x.shape[-1] // n_heads
                x[..., head * dh : (head + 1) * dh] = caps[layer][..., head * dh : (head + 1) * dh]
                return (x, *a[1:])

            h = proj_of(layer).register_forward_pre_hook(pre)
            try:
                row.append(metric(model(corrupt)))
            finally:
                h.remove()
        rows.append(torch.stack(row))
    return torch.stack(rows)


# ------------------------------------------------------------------------------------ per-head views


def test_gpt2_per_head_capture_equals_hand_recomputed_heads(gpt2):
    toks = torch.randint(0, 64, (2, 7))
    heads = tdfunc.latent.units("b t (h d) -> b t h d", h=4)
    _, caps = tdfunc.functional_call(gpt2, None, (toks,), capture=["transformer.h.*.attn.c_proj:input"])
    view = tdfunc.latent.unit_view(caps, heads)
    for layer in range(3):
        z = view[f"transformer.h.{layer}.attn.c_proj:input"]
        assert z.shape == (2, 7, 4, 8)
        torch.testing.assert_close(z, _gpt2_heads_ref(gpt2, toks, layer), rtol=1e-12, atol=1e-12)


def test_llama_per_head_capture_equals_hand_recomputed_heads(llama):
    toks = torch.randint(0, 64, (2, 6))
    heads = tdfunc.latent.units("b t (h d) -> b t h d", h=4)
    _, caps = tdfunc.functional_call(llama, None, (toks,), capture=["model.layers.*.self_attn.o_proj:input"])
    for layer in range(2):  # transformers' eager attention takes its softmax in float32, the reference in float64
        z = tdfunc.latent.unit_view(caps[f"model.layers.{layer}.self_attn.o_proj:input"], heads)
        torch.testing.assert_close(z, _llama_heads_ref(llama, toks, layer), rtol=1e-6, atol=1e-7)


def test_unit_edit_patches_one_head_and_delta_gives_per_head_gradient(gpt2):
    clean, corrupt = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 6))
    site = "transformer.h.1.attn.c_proj:input"
    heads = tdfunc.latent.units("b t (h d) -> b t h d", h=4)
    _, caps = tdfunc.functional_call(gpt2, None, (clean,), capture=[site])
    got = tdfunc.functional_call(
        gpt2,
        None,
        (corrupt,),
        edits={site: tdfunc.latent.unit_edit(heads, tdfunc.latent.unit_view(caps[site], heads), index=2)},
    )
    ref = _head_hook_loop(
        gpt2, lambda layer: gpt2.transformer.h[layer].attn.c_proj, clean, corrupt, [1], 4, lambda o: o.logits
    )[0, 2]
    torch.testing.assert_close(got.logits, ref, rtol=1e-12, atol=1e-12)
    # the same through patch(units="heads"): the head count comes from the model's config
    by_patch = tdfunc.latent.patch(gpt2, None, (corrupt,), caps, site, units="heads", index=2)
    torch.testing.assert_close(by_patch.logits, ref, rtol=0, atol=0)
    # a delta in the view: its gradient is the site's gradient seen per head
    f_view = lambda d: _metric(
        tdfunc.functional_call(
            gpt2,
            None,
            (corrupt,),
            edits={  # noqa: E731
                site: tdfunc.latent.unit_edit(heads, tdfunc.delta(d))
            },
        )
    )
    f_site = lambda d: _metric(tdfunc.functional_call(gpt2, None, (corrupt,), edits={site: tdfunc.delta(d)}))  # noqa: E731
    g_view = grad(f_view)(torch.zeros(1, 6, 4, 8, dtype=torch.float64))
    g_site = grad(f_site)(torch.zeros(1, 6, 32, dtype=torch.float64))
    torch.testing.assert_close(g_view, g_site.reshape(1, 6, 4, 8), rtol=1e-12, atol=1e-12)
    # a callable in the view, on several heads (a boolean mask): zero-ablating heads 0 and 3
    mask = torch.tensor([True, False, False, True])
    abl = tdfunc.functional_call(
        gpt2, None, (corrupt,), edits={site: tdfunc.latent.unit_edit(heads, torch.zeros_like, index=mask)}
    )
    zero = lambda m, a: (torch.cat([torch.zeros(1, 6, 8), a[0][..., 8:24], torch.zeros(1, 6, 8)], -1).double(),)  # noqa: E731
    h = gpt2.transformer.h[1].attn.c_proj.register_forward_pre_hook(zero)
    try:
        torch.testing.assert_close(abl.logits, gpt2(corrupt).logits, rtol=1e-12, atol=1e-12)
    finally:
        h.remove()


# ---------------------------------------------------------------------------------------- head sweeps


def test_gpt2_head_sweep_equals_hook_loop(gpt2):
    clean, corrupt = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 6))
    got = tdfunc.latent.patching_sweep(
        gpt2, None, (clean,), (corrupt,), "transformer.h.*.attn.c_proj:input", _metric, over="heads"
    )
    ref = _head_hook_loop(
        gpt2, lambda layer: gpt2.transformer.h[layer].attn.c_proj, clean, corrupt, range(3), 4, _metric
    )
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    explicit = tdfunc.latent.patching_sweep(
        gpt2,
        None,
        (clean,),
        (corrupt,),
        "transformer.h.*.attn.c_proj:input",
        _metric,
        over=tdfunc.latent.units("b t (h d) -> b t h d", h=4),
        chunk_size=3,
    )
    torch.testing.assert_close(explicit, ref, rtol=1e-12, atol=1e-12)


def test_llama_head_sweep_equals_hook_loop(llama):
    clean, corrupt = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 5))
    got = tdfunc.latent.patching_sweep(
        llama, None, (clean,), (corrupt,), "model.layers.*.self_attn.o_proj:input", _metric, over="heads"
    )
    ref = _head_hook_loop(
        llama, lambda layer: llama.model.layers[layer].self_attn.o_proj, clean, corrupt, range(2), 4, _metric
    )
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_path_patch_one_head(gpt2):
    """Head 1 of layer 0 sent only through layer 2's attention input: the two edited calls by hand."""
    clean, corrupt = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 6))
    send, recv = "transformer.h.0.attn.c_proj:input", "transformer.h.2.ln_1"
    got = tdfunc.latent.path_patch(gpt2, None, (clean,), (corrupt,), send, recv, units="heads", index=1)
    _, caps = tdfunc.functional_call(gpt2, None, (clean,), capture=[send])
    heads = tdfunc.latent.units("b t (h d) -> b t h d", h=4)
    one = tdfunc.latent.unit_edit(heads, tdfunc.latent.unit_view(caps[send], heads), index=1)
    _, seen = tdfunc.functional_call(gpt2, None, (corrupt,), edits={send: one}, capture=[recv])
    ref = tdfunc.functional_call(gpt2, None, (corrupt,), edits={recv: seen[recv]})
    torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=0)
    assert not torch.allclose(got.logits, gpt2(corrupt).logits)


def test_int_over_on_positions_is_refused_and_query_dims_still_work(gpt2):
    clean, corrupt = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 6))
    with pytest.raises(
        PatchError,
        match=re.escape(
            "over=-2 is dim 1 of site 'transformer.h.0.attn.c_proj:input' of "
            "shape (1, 6, 32), its positions, not its heads"
        ),
    ):
        tdfunc.latent.patching_sweep(
            gpt2, None, (clean,), (corrupt,), "transformer.h.*.attn.c_proj:input", _metric, over=-2
        )
    pos = tdfunc.latent.patching_sweep(gpt2, None, (clean,), (corrupt,), "transformer.h.0", _metric, over=1)
    torch.testing.assert_close(
        pos, tdfunc.latent.patching_sweep(gpt2, None, (clean,), (corrupt,), "transformer.h.0", _metric), rtol=0, atol=0
    )


# ------------------------------------------------------------------------------ attribution patching


def _slow_atp(model, site_modules, clean, corrupt, metric, drop_modules=()):
    """AtP (and AtP+GradDrop) by forward hooks and torch.autograd, one backward per dropped layer."""

    def values(x, keep_grad, dropped=None):
        acts, hs = {}, []
        for name, mod in site_modules.items():

            def hook(m, a, out, name=name):
                if keep_grad:
                    out.retain_grad()
                acts[name] = out

            hs.append(mod.register_forward_hook(hook))
        if dropped is not None:  # no gradient through this layer's output (its value unchanged)
            hs.append(dropped.register_forward_hook(lambda m, a, out: out.detach()))
        try:
            y = model(x)
        finally:
            for h in hs:
                h.remove()
        return y, acts

    with torch.no_grad():
        _, c = values(clean, False)

    def est(dropped=None):
        y, a = values(corrupt, True, dropped)
        metric(y).backward()
        g = {n: torch.zeros_like(a[n]) if a[n].grad is None else a[n].grad for n in site_modules}  # None: dropped
        return torch.stack(
            [((c[n] - a[n]) * g[n]).sum(dim=[i for i in range(a[n].dim()) if i != 1]) for n in site_modules]
        )

    if not drop_modules:
        return est()
    return sum(est(d).abs() for d in drop_modules) / (len(drop_modules) - 1)


def test_atp_exact_for_a_model_linear_in_the_site():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6), torch.nn.Linear(6, 2)
    ).double()
    clean, corrupt = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    metric = lambda y: (y[:, -1, 0] - y[:, 2, 1]).sum()  # noqa: E731
    base = metric(net(corrupt))
    for over in ("positions", tdfunc.latent.units("b t (h d) -> b t h d", h=3), 2):
        est = tdfunc.latent.attribution_patching(net, None, (clean,), (corrupt,), ["1", "2"], metric, over=over)
        exact = tdfunc.latent.patching_sweep(net, None, (clean,), (corrupt,), ["1", "2"], metric, over=over) - base
        torch.testing.assert_close(est, exact, rtol=1e-10, atol=1e-12)
    slow = _slow_atp(net, {"1": net[1], "2": net[2]}, clean, corrupt, metric)
    torch.testing.assert_close(
        tdfunc.latent.attribution_patching(net, None, (clean,), (corrupt,), ["1", "2"], metric),
        slow,
        rtol=1e-10,
        atol=1e-12,
    )


def test_atp_and_graddrop_equal_slow_hook_reference(gpt2):
    clean, corrupt = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 6))
    mods = {f"transformer.h.{i}.mlp": gpt2.transformer.h[i].mlp for i in range(3)}
    drops = [gpt2.transformer.h[i].attn.c_proj for i in range(3)] + [gpt2.transformer.h[i].mlp for i in range(3)]
    est = tdfunc.latent.attribution_patching(gpt2, None, (clean,), (corrupt,), "transformer.h.*.mlp", _metric)
    torch.testing.assert_close(est, _slow_atp(gpt2, mods, clean, corrupt, _metric), rtol=1e-9, atol=1e-12)
    gd = tdfunc.latent.attribution_patching(
        gpt2,
        None,
        (clean,),
        (corrupt,),
        "transformer.h.*.mlp",
        _metric,
        grad_drop=["transformer.h.*.attn.c_proj", "transformer.h.*.mlp"],
        chunk_size=4,
    )
    torch.testing.assert_close(gd, _slow_atp(gpt2, mods, clean, corrupt, _metric, drops), rtol=1e-9, atol=1e-12)
    assert (gd >= 0).all() and not torch.allclose(gd, est.abs())


def test_atp_ranks_like_the_exact_sweep_on_gpt2(gpt2):
    torch.manual_seed(3)
    clean, corrupt = torch.randint(0, 64, (1, 8)), torch.randint(0, 64, (1, 8))
    base = _metric(gpt2(corrupt))
    for sites, over in (("transformer.h.*", "positions"), ("transformer.h.*.attn.c_proj:input", "heads")):
        est = tdfunc.latent.attribution_patching(gpt2, None, (clean,), (corrupt,), sites, _metric, over=over)
        exact = tdfunc.latent.patching_sweep(gpt2, None, (clean,), (corrupt,), sites, _metric, over=over) - base
        assert est.shape == exact.shape
        assert _spearman(est, exact) > 0.9, (sites, _spearman(est, exact))


# ------------------------------------------------------------------------------------ AtP*'s QK fix


def test_qk_fix_is_exact_when_the_metric_is_linear_in_the_attention_pattern():
    """Patching a query or key only changes the pattern; with the rest linear in it the fix is exact, AtP is not."""
    from cases_atp import Net

    torch.manual_seed(0)
    net = Net().double()
    clean, corrupt = 2 * torch.randn(2, 5, 3, dtype=torch.float64), 2 * torch.randn(2, 5, 3, dtype=torch.float64)
    metric = lambda y: (y[:, -1, 0] - y[:, 2, 1]).sum()  # noqa: E731
    base = metric(net(corrupt))
    atp = tdfunc.latent.attribution_patching
    for site, over in (
        ("attn.q_proj", "positions"),
        ("attn.q_proj", tdfunc.latent.units("b t (h d) -> b t h d", h=4)),
        ("attn.k_proj", "positions"),
        ("attn.k_proj", tdfunc.latent.units("b t (h d) -> b t h d", h=2)),  # grouped KV heads: 2 of the 4
    ):
        exact = tdfunc.latent.patching_sweep(net, None, (clean,), (corrupt,), site, metric, over=over) - base
        fixed = atp(net, None, (clean,), (corrupt,), site, metric, over=over, qk_fix=True)
        plain = atp(net, None, (clean,), (corrupt,), site, metric, over=over)
        torch.testing.assert_close(fixed, exact, rtol=1e-9, atol=1e-12)
        assert (plain - exact).abs().max() > 1e-3 * exact.abs().max()  # the linear estimate is not exact here
    # sites that are not queries or keys keep the plain estimate in the same call
    both = atp(net, None, (clean,), (corrupt,), ["attn.q_proj", "attn.o_proj"], metric, qk_fix=True)
    torch.testing.assert_close(both[1], atp(net, None, (clean,), (corrupt,), "attn.o_proj", metric)[0])


def _slow_qk_fix(model, layer, role, clean, corrupt, n_units, block, metric):
    """AtP*'s QK fix from its definition, with forward hooks on Llama's q_proj / k_proj and output_attentions.

    g = d metric / d pattern at the corrupted run (a zero delta at the softmax); for each unit, the pattern of
    the corrupted run with that unit's (position, head) blocks of the projection taken from the clean run, as
    the model itself computes it (RoPE, repeated KV heads, scale, mask); estimate = sum g * (patched - corrupted).
    """
    attn = model.model.layers[layer].self_attn
    proj = attn.q_proj if role == "q" else attn.k_proj
    seen = {}
    h = proj.register_forward_hook(lambda m, a, out: seen.__setitem__("clean", out.detach().clone()))
    try:
        model(clean)
    finally:
        h.remove()
    site = f"model.layers.{layer}.self_attn/softmax"
    _, caps = tdfunc.functional_call(model, None, (corrupt,), capture=[site])
    g = grad(lambda d: metric(tdfunc.functional_call(model, None, (corrupt,), edits={site: tdfunc.delta(d)})))(
        torch.zeros_like(caps[site])
    )
    base = model(corrupt, output_attentions=True).attentions[layer].detach()
    rows = []
    for u in range(n_units):

        def patch(m, a, out, u=u):
            out = out.clone()
            keep = block(u, out.shape)
            out[keep] = seen["clean"][keep]
            return out

        h = proj.register_forward_hook(patch)
        try:
            patched = model(corrupt, output_attentions=True).attentions[layer].detach()
        finally:
            h.remove()
        rows.append((g * (patched - base)).sum())
    return torch.stack(rows)


def test_qk_fix_equals_the_slow_hook_reference_on_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.4,  # sharp attention: AtP's linear estimate through the softmax is off
        attn_implementation="eager",
    )
    llama = transformers.LlamaForCausalLM(cfg).double().eval()
    clean, corrupt = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 6))
    atp = tdfunc.latent.attribution_patching
    dh = 8

    def pos(u, shape):
        m = torch.zeros(shape, dtype=torch.bool)
        m[:, u] = True
        return m

    def head(u, shape):
        m = torch.zeros(shape, dtype=torch.bool)
        m[..., u * dh : (u + 1) * dh] = True
        return m

    for role, over, n, block in (
        ("q", "positions", 6, pos),
        ("k", "positions", 6, pos),
        ("q", "heads", 4, head),
        ("k", tdfunc.latent.units("b t (h d) -> b t h d", h=2), 2, head),
    ):
        site = f"model.layers.0.self_attn.{role}_proj"
        got = atp(llama, None, (clean,), (corrupt,), site, _metric, over=over, qk_fix=True)[0]
        want = _slow_qk_fix(llama, 0, role, clean, corrupt, n, block, _metric)
        # Llama computes its softmax in float32 (also in a float64 model): both sides carry float32 patterns
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, check_dtype=False)
        assert (want - atp(llama, None, (clean,), (corrupt,), site, _metric, over=over)[0]).abs().max() > 1e-2


def test_qk_fix_with_graddrop_is_nonnegative_and_refuses_what_it_cannot_fix():
    from cases_atp import Net

    torch.manual_seed(1)
    net = Net().double()
    clean, corrupt = torch.randn(1, 5, 3, dtype=torch.float64), torch.randn(1, 5, 3, dtype=torch.float64)
    m = lambda y: y[0, -1, 0]  # noqa: E731
    atp = tdfunc.latent.attribution_patching
    gd = atp(net, None, (clean,), (corrupt,), "attn.k_proj", m, grad_drop=["attn", "out"], qk_fix=True)
    assert gd.shape == (1, 5) and (gd >= 0).all()
    capped = Net(cap=0.5).double()
    with pytest.raises(PatchError, match=r"not such a function of the product \(fitted s = "):
        atp(capped, None, (clean,), (corrupt,), "attn.q_proj", m, qk_fix=True)
    with pytest.raises(PatchError, match="covers part of a head"):
        atp(net, None, (clean,), (corrupt,), "attn.q_proj", m, over=2, qk_fix=True)


# -------------------------------------------------------------------------------------------- SmolLM2


def test_smollm2_heads_and_atp(smollm2):
    """Real weights: per-head capture = hand heads; head sweep = hook loop; AtP ranks the heads like the sweep."""
    model, tok = smollm2
    clean = tok("The capital of France is", return_tensors="pt").input_ids
    corrupt = tok("The capital of Italy is", return_tensors="pt").input_ids
    paris, rome = tok(" Paris").input_ids[0], tok(" Rome").input_ids[0]
    metric = lambda out: out.logits[0, -1, paris] - out.logits[0, -1, rome]  # noqa: E731
    heads = tdfunc.latent.units("b t (h d) -> b t h d", h=9)
    with torch.no_grad():
        _, caps = tdfunc.functional_call(model, None, (clean,), capture=["model.layers.3.self_attn.o_proj:input"])
        torch.testing.assert_close(
            tdfunc.latent.unit_view(caps["model.layers.3.self_attn.o_proj:input"], heads),
            _llama_heads_ref(model, clean, 3),
            rtol=1e-4,
            atol=1e-5,
        )
        layers = [14, 15]
        sites = [f"model.layers.{i}.self_attn.o_proj:input" for i in layers]
        sweep = tdfunc.latent.patching_sweep(model, None, (clean,), (corrupt,), sites, metric, over="heads")
        ref = _head_hook_loop(
            model, lambda i: model.model.layers[i].self_attn.o_proj, clean, corrupt, layers, 9, metric
        )
    torch.testing.assert_close(sweep, ref, rtol=1e-4, atol=1e-4)
    est = tdfunc.latent.attribution_patching(model, None, (clean,), (corrupt,), sites, metric, over="heads")
    exact = sweep - metric(model(corrupt)).detach()
    assert _spearman(est.detach(), exact) > 0.8


def test_smollm2_qk_fix_where_attention_saturates(smollm2):
    """Real weights, layers 8-9 (where AtP's query / key estimates are furthest off): the fix is closer to the sweep."""
    model, tok = smollm2
    clean = tok("The capital of France is", return_tensors="pt").input_ids
    corrupt = tok("The capital of Italy is", return_tensors="pt").input_ids
    paris, rome = tok(" Paris").input_ids[0], tok(" Rome").input_ids[0]
    metric = lambda out: out.logits[0, -1, paris] - out.logits[0, -1, rome]  # noqa: E731
    with torch.no_grad():
        base = metric(model(corrupt))
    atp = tdfunc.latent.attribution_patching
    for role, h in (("q", 9), ("k", 3)):
        sites = [f"model.layers.{i}.self_attn.{role}_proj" for i in (8, 9)]
        over = tdfunc.latent.units("b t (h d) -> b t h d", h=h)
        with torch.no_grad():
            exact = tdfunc.latent.patching_sweep(model, None, (clean,), (corrupt,), sites, metric, over=over) - base
        plain = atp(model, None, (clean,), (corrupt,), sites, metric, over=over).detach()
        fixed = atp(model, None, (clean,), (corrupt,), sites, metric, over=over, qk_fix=True).detach()
        err_plain, err_fixed = (plain - exact).abs().max(), (fixed - exact).abs().max()
        assert err_fixed < 0.3 * err_plain, (role, err_plain, err_fixed)  # measured: 0.37 -> 0.03 (q), 0.40 -> 0.07 (k)
        assert _spearman(fixed, exact) > _spearman(plain, exact) - 0.01


# ------------------------------------------------------------------------------------------- errors


def _errors():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(1, 5, 3)
    heads = tdfunc.latent.units("b t (h d) -> b t h d", h=2)
    _, caps = tdfunc.functional_call(net, None, (x,), capture=["1"])
    m = lambda y: y.sum()  # noqa: E731
    atp = tdfunc.latent.attribution_patching
    from cases_atp import Net

    qnet, qx = Net().double(), torch.randn(1, 5, 3, dtype=torch.float64)
    sdpa = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_implementation="sdpa",
        )
    ).eval()
    ids = torch.randint(0, 64, (1, 5))
    return [
        (
            "units arrow",
            lambda: tdfunc.latent.units("b t (h d)", h=2),
            "tdfunc.latent.units: pattern must be an einops rearrange pattern 'left -> right', got 'b t (h d)'; e.g. "
            "'b t (h d) -> b t h d' with h=12.",
        ),
        (
            "units composite view",
            lambda: tdfunc.latent.units("b t h d -> b t (h d)", h=2),
            "tdfunc.latent.units: the right side of the pattern (the view) must list distinct plain axis names (and '...'), "
            "got 'b t (h d)'; put the composition on the left, e.g. 'b t (h d) -> b t h d'.",
        ),
        (
            "units size",
            lambda: tdfunc.latent.units("b t (h d) -> b t h d", h=0),
            "tdfunc.latent.units: the size of axis 'h' must be a positive int, got 0.",
        ),
        (
            "units which",
            lambda: tdfunc.latent.units("b t (h d) -> b t h d", h=2, d=2),
            "tdfunc.latent.units: give unit= (one of ['b', 't', 'h', 'd']) when not exactly one axis size is given, got "
            "sizes {'h': 2, 'd': 2}; e.g. units('b t (h d) -> b t h d', h=12) or unit='h'.",
        ),
        (
            "units unknown",
            lambda: tdfunc.latent.units("b t (h d) -> b t h d", unit="k", h=2),
            "tdfunc.latent.units: unit axis 'k' is not an axis of the view 'b t h d'; name one of ['b', 't', 'h', 'd'].",
        ),
        (
            "view not units",
            lambda: tdfunc.latent.unit_view(x, "b t (h d) -> b t h d"),
            "tdfunc.latent.unit_view: units must be a tdfunc.latent.units(...) view, got str ('b t (h d) -> b t h d'); build "
            "one with tdfunc.latent.units('b t (h d) -> b t h d', h=H).",
        ),
        (
            "view shape",
            lambda: tdfunc.latent.unit_view(torch.randn(1, 5, 3), heads),
            "tdfunc.latent.unit_view: site 'value' of shape (1, 5, 3) does not fit the unit pattern 'b t (h d) -> b t h d' "
            "with sizes {'h': 2} (einops: Shape mismatch, can't divide axis of length 3 in chunks of 2); give a "
            "pattern that matches the site's value (for heads, the (B, T, H * Dh) input of the output projection).",
        ),
        (
            "edit type",
            lambda: tdfunc.latent.unit_edit(heads, 3),
            "tdfunc.latent.unit_edit: edit must be a tensor of view values, a tdfunc.delta(t) or a callable fn(view) -> "
            "view, got int (3).",
        ),
        (
            "edit index range",
            lambda: tdfunc.functional_call(
                net, None, (x,), edits={"1": tdfunc.latent.unit_edit(heads, torch.zeros_like, index=5)}
            ),
            "tdfunc.latent.unit_edit: unit 5 is out of range for 2 units along axis 'h'; give units in [-2, 2).",
        ),
        (
            "over -2",
            lambda: tdfunc.latent.patching_sweep(net, None, (x,), (x,), "1", m, over=-2),
            "tdfunc.latent.patching_sweep: over=-2 is dim 1 of site '1' of shape (1, 5, 4), its positions, not its heads "
            "(an int over indexes the dims of the value as captured, and a (B, T, H * Dh) value has no head dim); pass "
            "over='heads' or over=tdfunc.latent.units('b t (h d) -> b t h d', h=H) to sweep heads, or "
            "over='positions' to sweep positions.",
        ),
        (
            "heads no config",
            lambda: tdfunc.latent.patching_sweep(net, None, (x,), (x,), "1", m, over="heads"),
            "tdfunc.latent.patching_sweep: over='heads' reads the number of heads from module.config.num_attention_heads, "
            "which Sequential does not have; pass over=tdfunc.latent.units('b t (h d) -> b t h d', h=H) with your model's "
            "head count H.",
        ),
        (
            "over bad",
            lambda: tdfunc.latent.patching_sweep(net, None, (x,), (x,), "1", m, over="head"),
            "tdfunc.latent.patching_sweep: over must be 'positions', 'heads', a tdfunc.latent.units(...) view or an int dim "
            "of the sites' values, got 'head'.",
        ),
        (
            "patch index without units",
            lambda: tdfunc.latent.patch(net, None, (x,), caps, "1", index=1),
            "tdfunc.latent.patch: index=1 selects units of a unit view, but units is None; pass units='heads' or "
            "units=tdfunc.latent.units(...) with it.",
        ),
        (
            "patch units without index",
            lambda: tdfunc.latent.patch(net, None, (x,), caps, "1", units=heads),
            "tdfunc.latent.patch: units=Units(pattern='b t (h d) -> b t h d', unit='h', sizes={'h': 2}) needs index= (the "
            "units to patch, e.g. index=3 for head 3); leave units=None to patch the whole site.",
        ),
        (
            "atp metric",
            lambda: atp(net, None, (x,), (x,), "1", lambda y: y[0, -1]),
            "tdfunc.latent.attribution_patching: metric must return a scalar (0-dim) tensor, got shape (2,); reduce it "
            "inside metric (e.g. logits[0, -1, a] - logits[0, -1, b], or .mean()).",
        ),
        (
            "atp site",
            lambda: atp(net, None, (x,), (x,), "5", m),
            "tdfunc.latent.attribution_patching: unknown site '5': Sequential has no submodule '5'. List the names with "
            "[n for n, _ in model.named_modules()].",
            tdfunc.SiteError,
        ),
        (
            "atp graddrop one",
            lambda: atp(net, None, (x,), (x,), "1", m, grad_drop="0"),
            "tdfunc.latent.attribution_patching: grad_drop must match at least two sites (the layers whose gradients are "
            "dropped one at a time, averaged over L - 1), got ['0']; pass e.g. 'model.layers.*.mlp'.",
        ),
        (
            "atp shapes",
            lambda: atp(net, None, (x,), (x[:, :3],), "1", m),
            "tdfunc.latent.attribution_patching: clean_args and corrupted_args must have the same shapes (one run's values "
            "are patched into the other), got [(1, 5, 3)] and [(1, 3, 3)]; pad or truncate the inputs to one shape.",
        ),
        (
            "atp units count",
            lambda: atp(net, None, (x,), (x,), ["1", "2"], m, over=2),
            "tdfunc.latent.attribution_patching: the sites have different numbers of units ({'1': 4, '2': 2}); estimate "
            "sites of one unit count per call.",
        ),
        (
            "atp qk_fix type",
            lambda: atp(qnet, None, (qx,), (qx,), "attn.q_proj", m, qk_fix=1),
            "tdfunc.latent.attribution_patching: qk_fix must be True or False, got int (1).",
        ),
        (
            "atp qk_fix no query or key",
            lambda: atp(qnet, None, (qx,), (qx,), "attn.o_proj", m, qk_fix=True),
            "tdfunc.latent.attribution_patching: qk_fix applies to query / key projection sites (a module named k / "
            "k_proj / key / q / q_proj / query inside an attention module, e.g. 'model.layers.*.self_attn.k_proj'), but "
            "none of the sites ['attn.o_proj'] is one; add them, or pass qk_fix=False.",
        ),
        (
            "atp qk_fix part of a head",
            lambda: atp(qnet, None, (qx,), (qx,), "attn.q_proj", m, over=2, qk_fix=True),
            "tdfunc.latent.attribution_patching: qk_fix patches whole (position, head) blocks of a query / key, but a "
            "unit of over at site 'attn.q_proj' covers part of a head; sweep over='positions', 'heads' or units('b t (h "
            "d) -> b t h d', h=H).",
        ),
        (
            "atp qk_fix sdpa",
            lambda: atp(
                sdpa, None, (ids,), (ids,), "model.layers.0.self_attn.k_proj", lambda o: o.logits.sum(), qk_fix=True
            ),
            "tdfunc.latent.attribution_patching: qk_fix recomputes the attention pattern of 'model.layers.0.self_attn' "
            "from its q @ k^T matmul and softmax, but this forward reaches no "
            "'model.layers.0.self_attn/matmul:input.0@0': load the model with attn_implementation='eager' (sdpa never "
            "materialises the pattern), or pass qk_fix=False.",
        ),
    ]


@pytest.mark.parametrize("case", _errors(), ids=lambda c: c[0])
def test_errors_are_pinned(case):
    _, call, message, *cls = case
    with pytest.raises(cls[0] if cls else PatchError) as e:
        call()
    assert str(e.value) == message
