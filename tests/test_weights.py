"""Weight interventions: pruning masks, task vectors, interpolation, SAE / transcoder / LoRA adapters.

References: ``torch.nn.utils.prune`` (global_unstructured, l1_unstructured, ln_structured) on the same
scores; tdhook 0.3.0's ``Pruning`` and ``TaskVectors`` on the same model; TIES from a slow per-entry
re-implementation of the authors' code and hand-made vectors; loops for every vmapped sweep;
hand-written Linear for LoRA; autograd for SNIP.  Error messages are pinned word for word.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from models import CNN, MLP
from tensordict import TensorDict
from torch.func import grad, vmap
from torch.nn.utils import prune

import tdfunc

WEIGHTS = [("fc1", "weight"), ("fc2", "weight"), ("head", "weight")]


def _masks_of(module, names):
    return {n: dict(module.named_buffers())[n + "_mask"].bool() for n in names}


def _key(name):
    return tuple(name.split("."))


# ------------------------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("amount", [0.0, 0.25, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("kind", ["magnitude", "random", "ties"])
def test_global_unstructured_equals_torch_prune(amount, kind):
    net = MLP()
    state = tdfunc.state(net)
    if kind == "magnitude":
        scores = tdfunc.weights.magnitude_scores(state)
    elif kind == "random":
        scores = state.apply(lambda t: torch.randn_like(t))
    else:  # many ties: torch.topk's tie-breaking must be reproduced
        scores = state.apply(lambda t: torch.randint(0, 3, t.shape).to(t.dtype))
    ours = tdfunc.weights.prune_masks(state, scores, amount=amount)
    ref = copy.deepcopy(net)
    params = [(getattr(ref, m), p) for m, p in WEIGHTS]
    imp = {(getattr(ref, m), p): scores[m, p] for m, p in WEIGHTS}
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, importance_scores=imp, amount=amount)
    refm = _masks_of(ref, [f"{m}.{p}" for m, p in WEIGHTS])
    assert sorted(ours.keys(True, True)) == sorted(WEIGHTS)  # default: tensors with >= 2 dims
    for m, p in WEIGHTS:
        assert torch.equal(ours[m, p], refm[f"{m}.{p}"]), (m, p)
    n = sum(state[k].numel() for k in WEIGHTS)
    assert sum(int((~ours[k]).sum()) for k in WEIGHTS) == round(amount * n)


@pytest.mark.parametrize("amount", [0.2, 0.5, 0.75])
def test_per_module_unstructured_equals_l1_unstructured(amount):
    net = MLP()
    state = tdfunc.state(net)
    scores = state.apply(lambda t: torch.randn_like(t))
    ours = tdfunc.weights.prune_masks(
        state, scores, amount=amount, scope="module", include=["fc1", "head.bias", "fc2.weight"]
    )
    ref = copy.deepcopy(net)
    chosen = ["fc1.weight", "fc1.bias", "fc2.weight", "head.bias"]
    for name in chosen:
        mod, p = name.split(".")
        prune.l1_unstructured(getattr(ref, mod), p, amount=amount, importance_scores=scores[mod, p])
    refm = _masks_of(ref, chosen)
    assert sorted(ours.keys(True, True)) == sorted(_key(n) for n in chosen)
    for name in chosen:
        assert torch.equal(ours[_key(name)], refm[name]), name


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("amount", [0.25, 0.5, 0.6])
def test_structured_equals_ln_structured(dim, p, amount):
    net = CNN(c=8).eval()
    state = tdfunc.state(net)
    scores = tdfunc.weights.magnitude_scores(state)
    ours = tdfunc.weights.prune_masks(
        state, scores, amount=amount, scope="module", structured_dim=dim, p=p, include="conv*.weight"
    )
    ref = copy.deepcopy(net)
    for mod in ("conv1", "conv2"):
        prune.ln_structured(
            getattr(ref, mod), "weight", amount=amount, n=p, dim=dim, importance_scores=scores[mod, "weight"]
        )
    refm = _masks_of(ref, ["conv1.weight", "conv2.weight"])
    for mod in ("conv1", "conv2"):
        assert torch.equal(ours[mod, "weight"], refm[f"{mod}.weight"]), mod


def test_pruning_equals_tdhook():
    tdhook = pytest.importorskip("tdhook.weights")
    from tensordict.nn import TensorDictModule

    net = MLP()
    tdm = TensorDictModule(net, in_keys=["x"], out_keys=["y"])
    cb = lambda module_key, parameter_name, parameter: parameter.abs() if parameter_name == "weight" else None
    state = tdfunc.state(net)
    ours = tdfunc.weights.apply_masks(
        state, tdfunc.weights.prune_masks(state, tdfunc.weights.magnitude_scores(state), amount=0.3)
    )
    hook = tdhook.Pruning(cb, amount_to_prune=0.3, skip_modules=tdhook.Pruning.default_skip)
    with hook.prepare(tdm):
        ref = {n: p.detach().clone() for n, p in net.named_parameters()}
    for n, r in ref.items():
        assert torch.equal(ours[_key(n)], r), n
    # structured (tdhook: ln_structured with n=1 per listed module)
    ours = tdfunc.weights.apply_masks(
        state,
        tdfunc.weights.prune_masks(
            state,
            tdfunc.weights.magnitude_scores(state),
            amount=0.5,
            scope="module",
            structured_dim=0,
            p=1,
            include=["fc2.weight"],
        ),
    )
    hook = tdhook.Pruning(cb, modules_to_prune={"fc2": (0, 0.5)})
    with hook.prepare(tdm):
        ref = {n: p.detach().clone() for n, p in net.named_parameters()}
    for n, r in ref.items():
        assert torch.equal(ours[_key(n)], r), n


def test_vmap_over_ten_sparsity_levels_equals_loop():
    net = MLP()
    state, x = tdfunc.state(net), torch.randn(5, 6)
    amounts = [i / 10 for i in range(10)]
    masks = tdfunc.weights.prune_masks(state, tdfunc.weights.magnitude_scores(state), amount=amounts)
    assert masks.batch_size == torch.Size([10]) and masks["fc1", "weight"].dtype == torch.bool
    run = lambda m: tdfunc.functional_call(net, tdfunc.weights.apply_masks(state, m), (x,))
    batched = vmap(run)(masks)
    loop = torch.stack(
        [run(tdfunc.weights.prune_masks(state, tdfunc.weights.magnitude_scores(state), amount=a)) for a in amounts]
    )
    torch.testing.assert_close(batched, loop, rtol=0, atol=1e-6)
    assert torch.equal(state["fc1", "weight"], net.fc1.weight.detach())  # nothing written


def test_apply_masks_is_pure_and_differentiable_in_soft_masks():
    net = MLP().double()
    state, x = tdfunc.state(net), torch.randn(4, 6, dtype=torch.float64)
    before = state["fc1", "weight"].clone()
    soft = TensorDict({("fc1", "weight"): torch.rand(8, 6, dtype=torch.float64)})
    f = lambda m: tdfunc.functional_call(
        net, tdfunc.weights.apply_masks(state, TensorDict({("fc1", "weight"): m})), (x,)
    ).sum()
    g = grad(f)(soft["fc1", "weight"])
    m = soft["fc1", "weight"].clone().requires_grad_(True)
    ref_net = copy.deepcopy(net)
    w = ref_net.fc1.weight.detach() * m
    out = ref_net.head(torch.tanh(ref_net.fc2(torch.tanh(F.linear(x, w, ref_net.fc1.bias))))).sum()
    torch.testing.assert_close(g, torch.autograd.grad(out, m)[0])
    assert torch.equal(state["fc1", "weight"], before)


def test_snip_scores_equal_autograd():
    net = MLP()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    state = tdfunc.state(net)
    scores = tdfunc.weights.snip_scores(lambda s: F.cross_entropy(tdfunc.functional_call(net, s, (x,)), y), state)
    ref = copy.deepcopy(net)
    F.cross_entropy(ref(x), y).backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(scores[_key(n)], (p.grad * p.detach()).abs())
    assert not any(p.grad is not None for p in net.parameters())


# ------------------------------------------------------------------------------------- task vectors


def test_task_vector_arithmetic_and_apply():
    pre, ft1, ft2 = MLP(), MLP(), MLP()
    s0, s1, s2 = tdfunc.state(pre), tdfunc.state(ft1), tdfunc.state(ft2)
    tv1, tv2 = tdfunc.weights.task_vector(s1, s0), tdfunc.weights.task_vector(s2, s0)
    for k in WEIGHTS:
        assert torch.equal(tv1[k], s1[k] - s0[k])
    combo = tdfunc.weights.apply_task_vector(s0, tv1 + (-tv2) * 0.5, 2.0)
    for k in s0.keys(True, True):
        torch.testing.assert_close(combo[k], s0[k] + 2.0 * (s1[k] - s0[k] - 0.5 * (s2[k] - s0[k])))
    back = tdfunc.weights.apply_task_vector(s0, tv1)
    for k in s0.keys(True, True):
        torch.testing.assert_close(back[k], s1[k], rtol=0, atol=1e-6)
    partial = tdfunc.weights.apply_task_vector(s0, TensorDict({("fc1", "weight"): tv1["fc1", "weight"]}), 1.0)
    assert partial["fc2", "weight"] is s0["fc2", "weight"]
    # BatchNorm's integer step counter is not part of a task vector, and is kept by apply
    c0, c1 = CNN(), CNN()
    tv = tdfunc.weights.task_vector(tdfunc.state(c1), tdfunc.state(c0))
    assert ("bn", "num_batches_tracked") not in tv.keys(True, True)
    assert tdfunc.weights.apply_task_vector(tdfunc.state(c0), tv, 0.5)["bn", "num_batches_tracked"].dtype == torch.long


def _ties_reference(tvs: torch.Tensor, density: float, lam: float) -> torch.Tensor:
    """The authors' algorithm (ties_merging/utils: topk_values_mask, resolve_sign, disjoint_merge), per entry."""
    t, d = tvs.shape
    trimmed = torch.zeros_like(tvs)
    k = d - int(d * density)
    for i in range(t):
        mags = sorted(tvs[i].abs().tolist())
        kth = mags[k - 1] if k >= 1 else -1.0
        for j in range(d):
            trimmed[i, j] = tvs[i, j] if abs(tvs[i, j]) >= kth else 0.0
    col = trimmed.sum(0)
    signs = [1.0 if c > 0 else -1.0 if c < 0 else 0.0 for c in col.tolist()]
    total = sum(signs)
    majority = 1.0 if total > 0 else -1.0 if total < 0 else 0.0
    signs = [majority if s == 0 else s for s in signs]
    out = torch.zeros(d, dtype=tvs.dtype)
    for j in range(d):
        picked = [trimmed[i, j].item() for i in range(t) if (trimmed[i, j] > 0 if signs[j] > 0 else trimmed[i, j] < 0)]
        out[j] = lam * sum(picked) / max(len(picked), 1)
    return out


def test_ties_merge_hand_made_vectors():
    t1 = TensorDict({"w": torch.tensor([1.0, -2.0, 0.1, 3.0])})
    t2 = TensorDict({"w": torch.tensor([2.0, 1.0, -0.2, -1.0])})
    torch.testing.assert_close(
        tdfunc.weights.ties_merge([t1, t2], density=0.5)["w"], torch.tensor([1.5, -2.0, 0.0, 3.0])
    )
    # density 1: no trimming; sign election by sum; disjoint mean
    torch.testing.assert_close(
        tdfunc.weights.ties_merge([t1, t2], density=1.0)["w"], torch.tensor([1.5, -2.0, -0.2, 3.0])
    )
    # three tasks, lambda scales
    t3 = TensorDict({"w": torch.tensor([-4.0, -1.0, 0.5, 1.0])})
    out = tdfunc.weights.ties_merge([t1, t2, t3], density=1.0, lambda_=0.5)["w"]
    torch.testing.assert_close(out, 0.5 * torch.tensor([-4.0, -1.5, 0.3, 2.0]))


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_ties_merge_equals_reference_over_a_tree(density):
    tvs = [TensorDict({"a": {"w": torch.randn(3, 4)}, "b": torch.randn(5)}) for _ in range(3)]
    tvs[1]["b"][0] = -tvs[0]["b"][0]  # an elected sign of exactly 0 (majority rule)
    tvs[2]["b"][0] = 0.0
    ours = tdfunc.weights.ties_merge(tvs, density=density, lambda_=0.7)
    flat = torch.stack([torch.cat([t["a", "w"].flatten(), t["b"]]) for t in tvs])
    ref = _ties_reference(flat, density, 0.7)
    torch.testing.assert_close(torch.cat([ours["a", "w"].flatten(), ours["b"]]), ref)
    torch.testing.assert_close(
        tdfunc.weights.ties_merge(torch.stack(tvs), density=density, lambda_=0.7)["b"], ours["b"]
    )


def _sweep_setup():
    pre, ft = MLP(), MLP()
    x, x_ctl = torch.randn(32, 6), torch.randn(32, 6)
    target = ft(x).detach()
    base_ctl = pre(x_ctl).detach()
    tv = tdfunc.weights.task_vector(tdfunc.state(ft), tdfunc.state(pre))
    score = lambda s: -(tdfunc.functional_call(pre, s, (x,)) - target).square().mean()
    control = lambda s: (tdfunc.functional_call(pre, s, (x_ctl,)) - base_ctl).square().mean()
    return pre, ft, tv, score, control


def test_task_vector_sweep_equals_loop_and_picks_constrained_best():
    pre, ft, tv, score, control = _sweep_setup()
    s0 = tdfunc.state(pre)
    alphas = torch.linspace(0, 1.5, 7)
    limit = control(tdfunc.weights.apply_task_vector(s0, tv, 0.6))
    out = tdfunc.weights.task_vector_sweep(pre, s0, tv, alphas, score, constraint=lambda s: control(s) <= limit)
    loop = torch.stack([score(tdfunc.weights.apply_task_vector(s0, tv, float(a))) for a in alphas])
    torch.testing.assert_close(out["metric"], loop)
    feasible = torch.stack([control(tdfunc.weights.apply_task_vector(s0, tv, float(a))) <= limit for a in alphas])
    assert torch.equal(out["feasible"], feasible)
    assert float(out["best_alpha"]) == pytest.approx(0.5) and int(out["best_index"]) == 2
    free = tdfunc.weights.task_vector_sweep(pre, s0, tv, alphas, score, chunk_size=3)
    assert float(free["best_alpha"]) == pytest.approx(1.0)
    none = tdfunc.weights.task_vector_sweep(pre, s0, tv, [0.5, 1.0], score, constraint=lambda s: control(s) < 0)
    assert torch.isnan(none["best_alpha"]) and int(none["best_index"]) == -1


def test_task_vectors_equal_tdhook():
    tdhook = pytest.importorskip("tdhook.weights")
    from tensordict.nn import TensorDictModule

    pre, ft, tv, score, control = _sweep_setup()
    s0 = tdfunc.state(pre)
    tdm = TensorDictModule(pre, in_keys=["x"], out_keys=["y"])
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
    limit = float(control(tdfunc.weights.apply_task_vector(s0, tv, 0.6)))
    # tdhook calls its callbacks with the module carrying the applied weights
    weights = lambda mod: tdfunc.state(pre)
    acc = lambda mod: float(score(weights(mod)))
    ok = lambda mod: float(control(weights(mod))) <= limit
    with tdhook.TaskVectors(alphas, acc, ok).prepare(tdm) as hooked:
        ref_tv = hooked.get_task_vector(ft)
        ref_alpha = hooked.hooking_context.compute_alpha(ref_tv)
    for k in tv.keys(True, True):
        torch.testing.assert_close(tv[k], ref_tv[k])
    ours = tdfunc.weights.task_vector_sweep(pre, s0, tv, alphas, score, constraint=lambda s: control(s) <= limit)
    assert float(ours["best_alpha"]) == ref_alpha == 0.5


def test_interpolate_path_loss_vmapped_equals_loop():
    a, b = MLP(), MLP()
    sa, sb = tdfunc.state(a), tdfunc.state(b)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    alphas = torch.linspace(-0.5, 1.5, 9)
    path = tdfunc.weights.interpolate(sa, sb, alphas)
    assert path.batch_size == torch.Size([9])
    loss = lambda s: F.cross_entropy(tdfunc.functional_call(a, s, (x,)), y)
    batched = vmap(loss)(path)
    loop = torch.stack([loss(sa.apply(lambda u, v: (1 - al) * u + al * v, sb)) for al in alphas.tolist()])
    torch.testing.assert_close(batched, loop)
    assert torch.equal(path[2]["fc1", "weight"], sa["fc1", "weight"]) and torch.equal(
        path[6]["head", "bias"], sb["head", "bias"]
    )
    soup = torch.stack([sa, sb]).mean(0)  # a uniform soup with plain TensorDict ops
    torch.testing.assert_close(soup["fc1", "weight"], tdfunc.weights.interpolate(sa, sb, [0.5])[0]["fc1", "weight"])


# ---------------------------------------------------------------------------------------- adapters


def _adam(loss, params, steps, lr):
    """Adam written with torch.func.grad over a TensorDict of parameters."""
    m = params.apply(torch.zeros_like)
    v = params.apply(torch.zeros_like)
    b1, b2, eps = 0.9, 0.999, 1e-8
    g_fn = grad(loss)
    for t in range(1, steps + 1):
        g = g_fn(params)
        m = m * b1 + g * (1 - b1)
        v = v * b2 + g.apply(torch.square) * (1 - b2)
        params = params.apply(lambda p, mi, vi: p - lr * (mi / (1 - b1**t)) / ((vi / (1 - b2**t)).sqrt() + eps), m, v)
    return params


def test_sae_trains_on_captured_activations():
    net = MLP(d_hidden=16)
    x = torch.randn(256, 6)
    _, caps = tdfunc.functional_call(net, tdfunc.state(net), (x,), capture=["act"])
    acts = caps["act"]
    sae = tdfunc.weights.sae_init(16, 64, generator=torch.Generator().manual_seed(0))
    recon = lambda s: (tdfunc.weights.sae_edit(s)(acts) - acts).square().sum(-1).mean()
    loss = lambda s: recon(s) + 1e-3 * tdfunc.weights.sae_encode(s, acts).abs().sum(-1).mean()
    r0 = float(recon(sae))
    trained = _adam(loss, sae, 100, 1e-2)
    r1 = float(recon(trained))
    assert r1 < 0.1 * r0, (r0, r1)
    assert torch.equal(
        sae["W_enc"], tdfunc.weights.sae_init(16, 64, generator=torch.Generator().manual_seed(0))["W_enc"]
    )
    # spliced into the model, the trained SAE keeps the output close to the plain one
    y = tdfunc.functional_call(net, None, (x,), edits={"act": tdfunc.weights.sae_edit(trained)})
    y0 = tdfunc.functional_call(net, None, (x,), edits={"act": tdfunc.weights.sae_edit(sae)})
    plain = net(x)
    assert (y - plain).square().mean() < 0.1 * (y0 - plain).square().mean()


def test_sae_edit_is_decode_of_encode_and_grads_flow():
    net = MLP().double()
    sae = tdfunc.weights.sae_init(8, 12, dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64)
    y, caps = tdfunc.functional_call(net, None, (x,), edits={"act": tdfunc.weights.sae_edit(sae)}, capture="act")
    h = torch.tanh(net.fc1(x)).detach()
    ref = torch.relu(h @ sae["W_enc"] + sae["b_enc"]) @ sae["W_dec"] + sae["b_dec"]
    torch.testing.assert_close(caps["act"], ref)
    g = grad(lambda s: tdfunc.functional_call(net, None, (x,), edits={"act": tdfunc.weights.sae_edit(s)}).sum())(sae)
    assert g["W_enc"].shape == (8, 12) and g["W_dec"].abs().sum() > 0


def test_transcoder_edit_replaces_target_from_source():
    net = MLP().double()
    tc = tdfunc.weights.transcoder_init(8, 10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = torch.randn(5, 6, dtype=torch.float64)
    y = tdfunc.functional_call(net, None, (x,), edits={"fc2": tdfunc.weights.transcoder_edit(tc, "fc2:input")})
    h = torch.tanh(net.fc1(x)).detach()
    ref = net.head(torch.tanh(tdfunc.weights.sae_decode(tc, tdfunc.weights.sae_encode(tc, h))))
    torch.testing.assert_close(y, ref)
    # train the transcoder to imitate fc2 from its input
    target = net.fc2(h).detach()
    loss = lambda s: (tdfunc.weights.sae_decode(s, tdfunc.weights.sae_encode(s, h)) - target).square().mean()
    trained = _adam(loss, tc, 60, 2e-2)
    assert float(loss(trained)) < 0.2 * float(loss(tc))


def test_lora_equals_hand_written_linear_and_trains():
    net = MLP()
    state = tdfunc.state(net)
    lora = tdfunc.weights.lora_init(state, ["fc1", "head.weight"], rank=2, generator=torch.Generator().manual_seed(0))
    assert lora["fc1", "weight", "A"].shape == (2, 6) and lora["head", "weight", "B"].shape == (3, 2)
    assert torch.equal(
        tdfunc.weights.apply_lora(state, lora, 0.5)["fc1", "weight"], state["fc1", "weight"]
    )  # B = 0 at init
    lora = lora.apply(lambda t: torch.randn_like(t))
    new = tdfunc.weights.apply_lora(state, lora, 0.5)
    x = torch.randn(7, 6)
    w1 = net.fc1.weight + 0.5 * lora["fc1", "weight", "B"] @ lora["fc1", "weight", "A"]
    wh = net.head.weight + 0.5 * lora["head", "weight", "B"] @ lora["head", "weight", "A"]
    ref = F.linear(torch.tanh(net.fc2(torch.tanh(F.linear(x, w1, net.fc1.bias)))), wh, net.head.bias)
    torch.testing.assert_close(tdfunc.functional_call(net, new, (x,)), ref)
    # training: only the adapter moves, the base state is untouched
    y = torch.randint(0, 3, (7,))
    lora0 = tdfunc.weights.lora_init(state, ["fc1", "head"], rank=2, generator=torch.Generator().manual_seed(0))
    loss = lambda l: F.cross_entropy(tdfunc.functional_call(net, tdfunc.weights.apply_lora(state, l, 1.0), (x,)), y)
    trained = _adam(loss, lora0, 40, 5e-2)
    assert float(loss(trained)) < 0.5 * float(loss(lora0))
    assert torch.equal(state["fc1", "weight"], net.fc1.weight.detach())


# ------------------------------------------------------------------------------------------ errors


def _raises(exc, msg, f, *a, **k):
    with pytest.raises(exc, match="^" + re.escape(msg) + "$"):
        f(*a, **k)


def test_error_messages():
    net = MLP()
    s = tdfunc.state(net)
    sc = tdfunc.weights.magnitude_scores(s)
    W = tdfunc.weights.WeightError
    _raises(
        W,
        "tdfunc.weights.apply_masks: masks has entry 'fc3.weight', which is not in the state. Did you mean 'fc2.weight', "
        "'fc1.weight', 'head.weight'? Masks must mirror the state's tree (build them with tdfunc.weights.prune_masks(state, ...)).",
        tdfunc.weights.apply_masks,
        s,
        TensorDict({("fc3", "weight"): torch.ones(8, 6, dtype=torch.bool)}),
    )
    _raises(
        W,
        "tdfunc.weights.apply_masks: mask for 'fc1.weight' has shape (6, 8) but the state entry has shape (8, 6); masks "
        "must mirror the state's tree and shapes (to apply stacked masks, vmap over them: "
        "torch.func.vmap(tdfunc.weights.apply_masks, in_dims=(None, 0))).",
        tdfunc.weights.apply_masks,
        s,
        TensorDict({("fc1", "weight"): torch.ones(6, 8, dtype=torch.bool)}),
    )
    _raises(
        W,
        "tdfunc.weights.prune_masks: amount must be a fraction in [0, 1], got 1.5; e.g. amount=0.3 prunes 30% of the "
        "selected entries (unlike torch.nn.utils.prune, an int is not a count).",
        tdfunc.weights.prune_masks,
        s,
        sc,
        amount=1.5,
    )
    _raises(
        W,
        "tdfunc.weights.prune_masks: amount must be a fraction in [0, 1], got -0.1; e.g. amount=0.3 prunes 30% of the "
        "selected entries (unlike torch.nn.utils.prune, an int is not a count).",
        tdfunc.weights.prune_masks,
        s,
        sc,
        amount=[0.5, -0.1],
    )
    _raises(
        W,
        "tdfunc.weights.prune_masks: structured_dim=2 is out of range for 'fc1.weight' of shape (8, 6); give a dim in "
        "[-2, 1] (0: output units of a Linear/Conv weight).",
        tdfunc.weights.prune_masks,
        s,
        sc,
        amount=0.5,
        scope="module",
        structured_dim=2,
    )
    _raises(
        W,
        "tdfunc.weights.prune_masks: structured pruning (structured_dim=0) ranks slices within each tensor; pass scope='module'.",
        tdfunc.weights.prune_masks,
        s,
        sc,
        amount=0.5,
        structured_dim=0,
    )
    _raises(
        W,
        "tdfunc.weights.prune_masks: include entry 'fc9' matches no entry of the state. Did you mean 'fc2', "
        "'fc1'? Use dotted names as in the state ('fc1.weight'), a module name ('fc1') or globs "
        "('**.weight').",
        tdfunc.weights.prune_masks,
        s,
        sc,
        amount=0.5,
        include=["fc9"],
    )
    _raises(
        W,
        "tdfunc.weights.prune_masks: scores for 'fc1.weight' have shape (6, 8) but the state entry has shape (8, 6); "
        "give one score per weight.",
        tdfunc.weights.prune_masks,
        s,
        TensorDict({("fc1", "weight"): torch.ones(6, 8)}),
        amount=0.5,
        include="fc1.weight",
    )
    _raises(
        W,
        "tdfunc.weights.interpolate: alphas must be 1-D and non-empty, got shape (2, 2); pass e.g. torch.linspace(0, 1, 11) "
        "(one state per alpha).",
        tdfunc.weights.interpolate,
        s,
        s,
        torch.zeros(2, 2),
    )
    tv = tdfunc.weights.task_vector(s, s)
    _raises(
        W,
        "tdfunc.weights.task_vector_sweep: alphas must be 1-D and non-empty, got shape (); pass e.g. torch.linspace(0, 1, 11) "
        "(one state per alpha).",
        tdfunc.weights.task_vector_sweep,
        net,
        s,
        tv,
        torch.tensor(0.5),
        lambda s: s["fc1", "bias"].sum(),
    )
    _raises(
        tdfunc.StateError,
        "tdfunc.weights.task_vector_sweep: unknown state key 'fc3.weight': MLP has no parameter or buffer "
        "of that name. Did you mean 'fc2.weight', 'fc1.weight', 'head.weight'? Build the state with tdfunc.state(model) or select from it.",
        tdfunc.weights.task_vector_sweep,
        net,
        s,
        TensorDict({("fc3", "weight"): torch.ones(8, 6)}),
        [0.5],
        lambda s: s["fc1", "bias"].sum(),
    )
    _raises(
        W,
        "tdfunc.weights.task_vector: entry 'head.weight' has shape (3, 8) in finetuned but (4, 8) in pretrained; both must "
        "come from the same architecture.",
        tdfunc.weights.task_vector,
        s,
        tdfunc.state(MLP(d_out=4)),
    )
    _raises(
        W,
        "tdfunc.weights.ties_merge: density must be a fraction in (0, 1], got 0; e.g. density=0.2 keeps the top 20%.",
        tdfunc.weights.ties_merge,
        [tv, tv],
        density=0,
    )
    sae = tdfunc.weights.sae_init(16, 4)
    _raises(
        tdfunc.EditError,
        "tdfunc.weights.sae_edit: the adapter reads width d_in=16, but the value at the edited site has "
        "shape (2, 8); build the adapter for that width (last dim) or use it at a site of width 16.",
        tdfunc.functional_call,
        net,
        None,
        (torch.randn(2, 6),),
        edits={"act": tdfunc.weights.sae_edit(sae)},
    )
    _raises(
        W,
        "tdfunc.weights.sae_edit: the adapter state lacks ['b_dec'] (has ['W_dec', 'W_enc', 'b_enc']); build it with "
        "tdfunc.weights.sae_init(d_in, d_hidden) or tdfunc.weights.transcoder_init(d_in, d_hidden, d_out).",
        tdfunc.weights.sae_edit,
        sae.exclude("b_dec"),
    )
    _raises(
        W,
        "tdfunc.weights.lora_init: unknown key 'fc3': the state has no such entry. Did you mean 'fc2', 'fc1'? "
        "Name Linear weights as in the state ('fc1.weight') or by module ('fc1').",
        tdfunc.weights.lora_init,
        s,
        ["fc3"],
        2,
    )
    _raises(
        W,
        "tdfunc.weights.lora_init: 'fc1.bias' has shape (8,) and dtype torch.float32; LoRA adapts floating-point 2-D (Linear) "
        "weights of shape (out, in).",
        tdfunc.weights.lora_init,
        s,
        "fc1.bias",
        2,
    )
    lora = tdfunc.weights.lora_init(s, "fc1", 2)
    lora["fc1", "weight", "A"] = torch.zeros(2, 5)
    _raises(
        W,
        "tdfunc.weights.apply_lora: LoRA factors for 'fc1.weight' have B (8, 2) and A (2, 5), but the weight has shape "
        "(8, 6); expected B (out, r) and A (r, in) with (out, in) = (8, 6).",
        tdfunc.weights.apply_lora,
        s,
        lora,
        1.0,
    )
