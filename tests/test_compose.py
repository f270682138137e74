"""The composition table: every public function under vmap, grad (incl. double backward) and compile.

Each case is a pure function ``fn(*args) -> Tensor`` of one example built from tdfunc's public
API on a float64 model.  Every case must satisfy, with no per-case special-casing:

* ``vmap(fn, in_dims)`` equals the stacked for-loop;
* ``gradcheck`` and ``gradgradcheck`` (double backward) w.r.t. its differentiable arguments, and
  ``torch.func.grad`` / ``jacrev`` / ``vjp`` equal autograd;
* ``torch.compile(fn, fullgraph=True)`` equals eager;
* purity: the module's tensors, flags, modes and plain outputs are bit-identical afterwards,
  also when the call raises mid-forward (checked by wrapping the case in a raising intervene).

Method families add rows in ``tests/cases_<family>.py`` (a ``cases() -> list[Case]`` function).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from compose_case import B, Case
from models import CNN, MLP, Recurrent, TinyTransformer, assert_same_snapshot, snapshot
from tensordict import TensorDict
from torch.func import grad, jacrev, vjp, vmap

import tdfunc


def _example(case: Case, i: int) -> tuple:
    return tuple(a[i] if d == 0 else a for a, d in zip(case.args, case.in_dims))


def _cases() -> list[Case]:
    torch.manual_seed(0)
    dt = torch.float64
    cases = []

    mlp = MLP().to(dt)
    s_mlp = tdfunc.state(mlp)
    x6 = torch.randn(B, 6, dtype=dt)

    def call_state(x, w):
        return tdfunc.functional_call(mlp, s_mlp.copy().set(("fc1", "weight"), w), (x,))

    cases.append(
        Case("call:state", mlp, call_state, (x6, s_mlp["fc1", "weight"].clone()), (0, None), (0, 1), "fc1", probe=x6)
    )

    def call_substitute(x, sub):
        return tdfunc.functional_call(mlp, s_mlp, (x,), edits={"act": sub})

    cases.append(
        Case(
            "call:substitute",
            mlp,
            call_substitute,
            (x6[0], torch.randn(B, 8, dtype=dt)),
            (None, 0),
            (1,),
            "fc1",
            probe=x6,
        )
    )

    def call_mask(x, mask):
        return tdfunc.functional_call(
            mlp, s_mlp, (x,), edits={"act": lambda v: v * mask, "fc2:input": lambda v: v + 0.1}
        )

    cases.append(
        Case("call:mask-closure", mlp, call_mask, (x6, torch.rand(B, 8, dtype=dt)), (0, 0), (0, 1), "head", probe=x6)
    )

    cnn = CNN().to(dt).eval()
    s_cnn = tdfunc.state(cnn)
    img = torch.randn(B, 1, 6, 6, dtype=dt)

    def call_delta_capture(x, d):
        y, caps = tdfunc.functional_call(
            cnn, s_cnn, (x[None],), edits={"conv2": tdfunc.delta(d)}, capture=["relu@0", "pool", "relu@*"]
        )
        return torch.cat([y.flatten(), caps["relu@0"].flatten(), caps["pool"].flatten(), caps["relu@*"].flatten()])

    cases.append(
        Case(
            "call:delta+capture",
            cnn,
            call_delta_capture,
            (img, torch.zeros(B, 1, 4, 6, 6, dtype=dt)),
            (0, 0),
            (0, 1),
            "conv1",
            "inductor",
            probe=img,
        )
    )

    def call_rule(x):
        twice = tdfunc.rule(lambda m, a, k, out: F.linear(a[0], 2 * m.weight, m.bias))
        return tdfunc.functional_call(mlp, s_mlp, (x,), edits={"fc2": twice})

    cases.append(Case("call:rule", mlp, call_rule, (x6,), (0,), (0,), "fc2", probe=x6))

    def call_from_site(x, w):  # a transcoder: fc2's output from act's value, weights vmapped
        return tdfunc.functional_call(mlp, s_mlp, (x,), edits={"fc2": tdfunc.from_site("act", lambda a: a @ w)})

    cases.append(
        Case(
            "call:from-site", mlp, call_from_site, (x6, torch.randn(B, 8, 8, dtype=dt)), (0, 0), (0, 1), "act", probe=x6
        )
    )

    tt = TinyTransformer().to(dt)
    s_tt = tdfunc.state(tt)
    emb = torch.randn(B, 5, 16, dtype=dt)

    def intervene_nested(h, d):
        inner = lambda h: tdfunc.functional_call(tt, s_tt, (h,), edits={"blocks.0.mlp": lambda v: 0.5 * v})
        g = tdfunc.intervene(inner, tt, edits={"blocks.0.mlp": tdfunc.delta(d)}, capture=["blocks.*.attn.scores"])
        y, caps = g(h)
        return torch.cat([y.flatten(), caps["blocks.1.attn.scores"].nan_to_num(neginf=0.0).flatten()])

    cases.append(
        Case(
            "intervene:nested+tap",
            tt,
            intervene_nested,
            (emb, torch.zeros(B, 5, 16, dtype=dt)),
            (0, 0),
            (0, 1),
            "blocks.1",
            probe=emb,
        )
    )

    stacked = torch.stack([tdfunc.state(MLP().to(dt)) for _ in range(B)])

    def ensemble(state, x):
        return tdfunc.functional_call(mlp, state, (x,), capture="fc2")[1]["fc2"]

    cases.append(Case("call:stacked-state", mlp, ensemble, (stacked, x6[0]), (0, None), (1,), "fc2", probe=x6))

    rec = Recurrent().to(dt)

    def call_index(x, d):
        y, caps = tdfunc.functional_call(
            rec, None, (x,), edits={"cell@1": tdfunc.delta(d)}, capture=["act@*", "cell:input@2"]
        )
        return torch.cat([y, caps["act@*"].flatten(), caps["cell:input@2"]])

    x5 = torch.randn(B, 5, dtype=dt)
    cases.append(
        Case("call:k-th-call", rec, call_index, (x5, torch.zeros(B, 5, dtype=dt)), (0, 0), (0, 1), "cell", probe=x5)
    )

    def input_x_gradient(x):
        out = lambda x: tdfunc.functional_call(mlp, s_mlp, (x,), edits={"act2": lambda v: v * 0.9})[0]
        return x * grad(out)(x)

    cases.append(Case("attr:input-x-gradient", mlp, input_x_gradient, (x6,), (0,), (0,), "fc1", probe=x6))

    # train mode: BatchNorm updates running statistics in place; the call must write neither the module
    # (the purity check) nor the state (clones; the new statistics come back with return_state=True).
    # Under vmap the written buffers must be batched: here the vmap is over stacked states (an ensemble).
    def bn_net(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
        )

    bn = bn_net(0).to(dt).train()
    s_bn = torch.stack([tdfunc.state(bn_net(i).to(dt)) for i in range(B)])

    def train_batchnorm(state, x):
        y, caps, new = tdfunc.functional_call(bn, state, (x,), capture="1", return_state=True)
        return torch.cat([y.flatten(), caps["1"].flatten()])

    cases.append(Case("call:train-batchnorm", bn, train_batchnorm, (s_bn, x6), (0, None), (1,), "1", probe=x6))
    return cases


def _all_cases() -> list[Case]:
    import importlib
    import pathlib

    cases = _cases()
    if os.environ.get("TDFUNC_CORE_ONLY"):  # the core rows alone (the tensordict 0.14.3 run)
        return cases
    for path in sorted(pathlib.Path(__file__).parent.glob("cases_*.py")):  # one module per method family
        cases += importlib.import_module(path.stem).cases()
    return cases


CASES = _all_cases()
IDS = [c.name for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vmap_equals_loop(case):
    loop = torch.stack([case.fn(*_example(case, i)) for i in range(B)])
    batched = vmap(case.fn, in_dims=case.in_dims)(*case.args)
    torch.testing.assert_close(batched, loop, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grad_jacrev_vjp_match_autograd(case):
    args = _example(case, 0)
    for k in case.diff:

        def f(t, k=k):
            a = list(args)
            a[k] = t
            return case.fn(*a)

        t = args[k].detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(f, (t,))
        assert torch.autograd.gradgradcheck(f, (t,))  # double backward
        ref = torch.autograd.functional.jacobian(f, args[k])
        torch.testing.assert_close(jacrev(f)(args[k]), ref)
        torch.testing.assert_close(
            grad(lambda t: f(t).square().sum())(args[k]), 2 * torch.einsum("o,o...->...", f(args[k]), ref)
        )
        out, pull = vjp(f, args[k])
        cot = torch.randn_like(out)
        torch.testing.assert_close(pull(cot)[0], torch.einsum("o,o...->...", cot, ref))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compile_fullgraph_equals_eager(case):
    tdfunc.install_sites(case.module, "**")
    try:
        torch._dynamo.reset()
        compiled = torch.compile(case.fn, fullgraph=True, backend=case.backend)
        for i in range(2):  # a second example must not recompile into a graph break
            args = _example(case, i)
            torch.testing.assert_close(compiled(*args), case.fn(*args), rtol=1e-10, atol=1e-10)
    finally:
        tdfunc.remove_sites(case.module)
        torch._dynamo.reset()


# The compile column again under torch.compile's default backend (inductor, CPU), one row per family
# (inductor compiles slowly: these 11 rows take ~40 s on 2 cores with a warm inductor cache, ~70 s
# cold, so a subset, the cheaper row of
# each family). call:delta+capture already runs under inductor above; call:substitute adds a core
# call with a vmapped edit value. Gradient attribution: attr:saliency-label; layer:
# layer:grad-cam-state; noise/guided: noise:smoothgrad-saliency-K and guided:mlp-targets (guided
# backprop's rules); perturbation: perturb:occlusion-baseline; LRP: lrp:mlp-targets-alpha_beta;
# latent: latent:patch-vmapped-clean, latent:steer-scale, latent:probe-linear; weights: weights:lora.
# (tests/test_inductor.py has the upstream max-pool bug this column would not catch: no row pools.)
INDUCTOR_ROWS = [
    "call:substitute",
    "attr:saliency-label",
    "layer:grad-cam-state",
    "noise:smoothgrad-saliency-K",
    "guided:mlp-targets",
    "perturb:occlusion-baseline",
    "lrp:mlp-targets-alpha_beta",
    "latent:patch-vmapped-clean",
    "latent:steer-scale",
    "latent:probe-linear",
    "weights:lora",
    "sites:op-softmax-delta+capture",  # operation sites: the TorchFunctionMode under inductor
]
_BY_NAME = {c.name: c for c in CASES}
INDUCTOR_CASES = [_BY_NAME[n] for n in INDUCTOR_ROWS if n in _BY_NAME]  # TDFUNC_CORE_ONLY: core rows only


@pytest.mark.parametrize("case", INDUCTOR_CASES, ids=[c.name for c in INDUCTOR_CASES])
def test_compile_inductor_equals_eager(case):
    tdfunc.install_sites(case.module, "**")
    try:
        torch._dynamo.reset()
        compiled = torch.compile(case.fn, fullgraph=True)  # the default backend
        for i in range(2):
            args = _example(case, i)
            torch.testing.assert_close(compiled(*args), case.fn(*args), rtol=1e-10, atol=1e-10)
    finally:
        tdfunc.remove_sites(case.module)
        torch._dynamo.reset()


def test_inductor_rows_name_table_rows():
    assert os.environ.get("TDFUNC_CORE_ONLY") or len(INDUCTOR_CASES) == len(INDUCTOR_ROWS)


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_purity(case):
    module = case.module
    plain = module(case.probe).detach().clone()
    before = snapshot(module)  # after the plain call: in train mode that call itself updates BatchNorm's buffers
    args = _example(case, 0)
    case.fn(*args)
    vmap(case.fn, in_dims=case.in_dims)(*case.args)
    jacrev(case.fn, argnums=case.diff[0])(*args)

    def boom(v):
        raise _Boom("edit raised mid-forward")

    raising = tdfunc.intervene(case.fn, module, edits={case.raise_site: boom})
    with pytest.raises(_Boom):
        raising(*args)
    assert_same_snapshot(before, snapshot(module))
    assert torch.equal(module(case.probe), plain)  # (train mode: batch statistics, same output)
    tdfunc.remove_sites(module)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())
    assert torch.equal(module(case.probe), plain)


def test_double_backward_attribution_penalty_matches_autograd():
    """grad wrt parameters of a loss with an input x gradient term == autograd with create_graph=True."""
    torch.manual_seed(1)
    mlp = MLP().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))

    def loss(params: TensorDict) -> torch.Tensor:
        out = lambda x: tdfunc.functional_call(mlp, params, (x,), capture=["act"])
        logits, _ = out(x)
        sel = lambda x: out(x)[0].gather(-1, y[:, None]).sum()
        attribution = x * grad(sel)(x)
        return F.cross_entropy(logits, y) + attribution.square().sum()

    s = tdfunc.state(mlp)
    g = grad(loss)(s)

    ref_model = MLP().double()
    ref_model.load_state_dict(mlp.state_dict())
    xr = x.clone().requires_grad_(True)
    logits = ref_model(xr)
    (gx,) = torch.autograd.grad(logits.gather(-1, y[:, None]).sum(), xr, create_graph=True)
    ref_loss = F.cross_entropy(logits, y) + (xr * gx).square().sum()
    ref = torch.autograd.grad(ref_loss, list(ref_model.parameters()))
    for (name, _), r in zip(ref_model.named_parameters(), ref):
        torch.testing.assert_close(g[tuple(name.split("."))], r, rtol=1e-10, atol=1e-12)


# Public functions with no row, and why: loops over data, file I/O or scikit-learn, or integer results
# (each has its own tests and pinned errors). Anything else public must appear in a row.
NO_ROW = {
    "latent.cache_activations": "a loop over a dataset writing a (memory-mapped) cache",
    "latent.cache_attributions": "a loop over a dataset running an attribution method per batch (which has rows)",
    "latent.generate_greedy": "a token-by-token loop with data-dependent stopping",
    "latent.generate": "transformers' generate under edits: a token-by-token loop with data-dependent stopping",
    "latent.probe_fit": "an optimisation loop over epochs (probe_init / probe_apply / probe_evaluate have rows)",
    "latent.fit_probes": "many probe_fit loops with a train/test split",
    "latent.fit_sklearn_probes": "scikit-learn estimators (not torch functions)",
    "latent.stream_probes": "a loop over a dataset driving probe_stream_update (which has rows)",
    "latent.local_pca_dimension": "returns integer dimension counts",
    "latent.ca_pca_dimension": "returns integer dimension counts",
    "list_sites": "a discovery helper: one eager forward under temporary hooks, returning site names and shapes",
}


@pytest.mark.skipif(os.environ.get("TDFUNC_CORE_ONLY") == "1", reason="the full table only")
def test_every_public_function_has_a_composition_row():
    import inspect
    import re
    from pathlib import Path

    here = Path(__file__).resolve().parent
    src = (
        "".join(p.read_text() for p in sorted(here.glob("cases_*.py")))
        + Path(__file__).read_text().split("NO_ROW = {")[0]
    )
    used = set(re.findall(r"tdfunc\.((?:latent\.|weights\.|lrp_rules\.|attribution\.)?\w+)", src))
    used |= {"attribution." + n for n in used if n in tdfunc.attribution.__all__}  # top-level re-exports
    public = [n for n in tdfunc.__all__ if inspect.isfunction(getattr(tdfunc, n))]
    for space in ("attribution", "latent", "weights", "lrp_rules"):
        module = getattr(tdfunc, space)
        public += [f"{space}.{n}" for n in module.__all__ if inspect.isfunction(getattr(module, n))]
    missing = [n for n in public if n not in used and n not in NO_ROW]
    assert not missing, f"public functions with no composition row: {missing}"
    stale = [n for n in NO_ROW if n in used or n not in public]
    assert not stale, f"NO_ROW entries that have a row now or are not public: {stale}"
