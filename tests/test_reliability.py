"""Issue 15, the core part: no silent wrong result, no write into anything the user owns.

Checkpointed forwards recomputed in backward keep the call's edits; what an edit puts into the model
is a fresh dense copy (in-place ops and ``.view`` after a site); train-mode BatchNorm writes neither
the module nor the state (``return_state=True`` returns the new statistics); bad input at the core
boundary raises a clear, pinned error.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import MLP, hook_dicts
from tensordict import TensorDict
from torch import nn
from torch.utils.checkpoint import checkpoint

import tdfunc

# --- 1. torch.utils.checkpoint ----------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.act = nn.Tanh()
        self.out = nn.Linear(d, d)

    def forward(self, x):
        return self.out(self.act(self.lin(x)))


class CkNet(nn.Module):
    """Two blocks, each run through torch.utils.checkpoint (``mode`` = use_reentrant; None: no checkpoint)."""

    def __init__(self, mode):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.mode = mode

    def forward(self, x):
        for b in self.blocks:
            x = b(x) if self.mode is None else checkpoint(b, x, use_reentrant=self.mode)
        return x


def _pair(mode):
    torch.manual_seed(0)
    ref, ck = CkNet(None), CkNet(mode)
    ck.load_state_dict(ref.state_dict())
    return ref, ck


EDITS = {
    "callable": lambda d: {"blocks.0.lin": lambda v: 2 * v, "blocks.1.act:input": lambda v: v - 0.5},
    "substitute+delta": lambda d: {"blocks.0.lin": torch.full((4,), 0.3), "blocks.1.lin": tdfunc.delta(d)},
    "rule": lambda d: {"blocks.1.lin": tdfunc.rule(lambda m, a, k, out: out * m.bias)},
}


@pytest.mark.parametrize("edits", list(EDITS), ids=list(EDITS))
@pytest.mark.parametrize("mode", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpoint_backward_keeps_the_edits(mode, edits):
    ref, ck = _pair(mode)
    x = torch.randn(3, 4, requires_grad=True)
    grads = []
    for net in (ref, ck):
        d = torch.zeros(3, 4, requires_grad=True)
        y, caps = tdfunc.functional_call(
            net, None, (x,), edits=EDITS[edits](d), capture=["blocks.0.act", "blocks.1.out"]
        )
        # reentrant checkpointing runs the region's forward under no_grad: its captures carry no gradient
        (y.square().sum() + (0 if mode else caps["blocks.0.act"].sum())).backward()
        grads.append([p.grad for p in net.parameters()] + [d.grad] + [caps["blocks.0.act"]])
        net.zero_grad()
        x.grad = None
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in ck.modules())


def test_checkpoint_autograd_grad_with_a_state_and_a_delta():
    ref, ck = _pair(False)
    x = torch.randn(3, 4)
    state = tdfunc.state(ref, copy=True).apply(lambda t: (t + 0.1 * torch.randn_like(t)).requires_grad_())
    d = torch.zeros(3, 4, requires_grad=True)
    leaves = [d] + list(state.values(include_nested=True, leaves_only=True))
    grads = []
    for net in (ref, ck):
        y = tdfunc.functional_call(
            net, state, (x,), edits={"blocks.0.act": tdfunc.delta(d), "blocks.1.lin": lambda v: v.sin()}
        )
        grads.append(torch.autograd.grad(y.square().sum(), leaves))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_checkpoint_recompute_sees_the_same_call_indices():
    class Loop(nn.Module):
        def __init__(self, mode):
            super().__init__()
            self.cell, self.act, self.mode = nn.Linear(4, 4), nn.Tanh(), mode

        def step(self, x):
            return self.act(self.cell(x))

        def forward(self, x):
            for _ in range(3):
                x = self.step(x) if self.mode is None else checkpoint(self.step, x, use_reentrant=self.mode)
            return x

    torch.manual_seed(0)
    ref = Loop(None)
    for mode in (True, False):
        ck = Loop(mode)
        ck.load_state_dict(ref.state_dict())
        grads = []
        for net in (ref, ck):
            x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
            edits = {"cell@1": lambda v: 3 * v, "act@2": lambda v: v * v}
            if not mode:  # reentrant: a value recorded in an earlier region carries no gradient
                edits["act@2"] = tdfunc.from_site("cell@0", lambda c: c * c)
            y = tdfunc.functional_call(net, None, (x,), edits=edits)
            y.sum().backward()
            grads.append([p.grad for p in net.parameters()] + [x.grad])
            net.zero_grad(set_to_none=True)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)


def test_checkpoint_inside_intervene_nested_with_functional_call():
    ref, ck = _pair(False)
    x = torch.randn(3, 4, requires_grad=True)
    grads = []
    for net in (ref, ck):
        inner = lambda x: tdfunc.functional_call(net, None, (x,), edits={"blocks.0.act": lambda v: v + 1})
        g = tdfunc.intervene(inner, net, edits={"blocks.0.act": lambda v: v * v, "blocks.1.lin": lambda v: v.cos()})
        (gx,) = torch.autograd.grad(g(x).sum(), x)
        grads.append(gx)
    torch.testing.assert_close(*grads)


def test_gpt2_gradient_checkpointing_enable_keeps_the_edits():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        vocab_size=32,
        n_positions=8,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    ref = transformers.GPT2LMHeadModel(cfg).train()
    ck = copy.deepcopy(ref)
    ck.gradient_checkpointing_enable()
    toks = torch.randint(0, 32, (2, 6))
    hooks = hook_dicts(ck)  # transformers adds its own hooks for checkpointing
    grads = []
    for net in (ref, ck):
        edits = {
            "transformer.h.0.mlp": lambda v: 0.5 * v,
            "transformer.h.1.ln_1": torch.randn(6, 16, generator=torch.Generator().manual_seed(2)),
        }
        out, caps = tdfunc.functional_call(net, None, (toks,), edits=edits, capture=["transformer.h.0.attn"])
        (out.logits.square().mean() + caps["transformer.h.0.attn"].sum()).backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
        net.zero_grad(set_to_none=True)
    assert grads[0]["transformer.h.1.mlp.c_fc.weight"] is not None
    for n in grads[0]:
        assert (grads[0][n] is None) == (grads[1][n] is None), n
        if grads[0][n] is not None:
            torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)
    assert hook_dicts(ck) == hooks


# --- 2. nothing the user passes in is written ------------------------------------------------------


def _inplace_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Identity(), nn.ReLU(inplace=True), nn.Linear(6, 2))


def test_substitute_and_edit_results_are_not_written_by_inplace_ops():
    net, x = _inplace_net(), torch.randn(3, 4)
    sub = torch.randn(3, 6)
    keep = sub.clone()
    runs = [tdfunc.functional_call(net, None, (x,), edits={"1": sub}, capture=["1", "2"]) for _ in range(2)]
    assert torch.equal(sub, keep)
    assert torch.equal(runs[0][1]["1"], runs[1][1]["1"]) and torch.equal(runs[0][1]["1"], keep)
    other = torch.randn(3, 6)
    keep = other.clone()
    tdfunc.functional_call(net, None, (x,), edits={"1": lambda v: other})
    tdfunc.functional_call(net, None, (x,), edits={"1": tdfunc.from_site("0", lambda a: other)})
    assert torch.equal(other, keep)


def test_a_substitute_aliasing_a_parameter_leaves_the_weight():
    net = nn.Sequential(nn.Identity(), nn.ReLU(inplace=True))
    w = nn.Parameter(torch.randn(5))
    holder = nn.Linear(5, 5)
    holder.bias = w
    keep = w.detach().clone()
    with torch.no_grad():
        tdfunc.functional_call(net, None, (torch.randn(2, 5),), edits={"0": holder.bias.detach()})
    assert torch.equal(holder.bias.detach(), keep)


def test_patch_leaves_the_callers_clean_captures():
    net = _inplace_net()
    clean, corrupt = torch.randn(3, 4), torch.randn(3, 4)
    _, caps = tdfunc.functional_call(net, None, (clean,), capture=["1"])
    keep = caps["1"].clone()
    y = tdfunc.latent.patch(net, None, (corrupt,), caps, ["1"])
    assert torch.equal(caps["1"], keep)
    torch.testing.assert_close(y, net(clean))


def test_copies_keep_gradients_flowing_under_grad_and_vmap():
    net, x = _inplace_net(), torch.randn(3, 4)
    f = lambda s: tdfunc.functional_call(net, None, (x,), edits={"1": s}).sum()
    s = torch.randn(3, 6)
    g = torch.func.grad(f)(s)
    torch.testing.assert_close(g, (s > 0).to(s.dtype) * net[3].weight.sum(0))
    subs = torch.randn(4, 3, 6)
    out = torch.func.vmap(f)(subs)
    torch.testing.assert_close(out, torch.stack([f(t) for t in subs]))
    gv = torch.func.vmap(
        torch.func.grad(lambda s: tdfunc.functional_call(net, None, (x,), edits={"1": lambda v: s}).sum())
    )(subs)
    torch.testing.assert_close(gv, torch.stack([torch.func.grad(f)(t) for t in subs]))


# --- 4. broadcast substitutes are materialised ------------------------------------------------------


def test_broadcast_substitute_before_an_inplace_op_and_a_view():
    class Viewer(nn.Module):
        def forward(self, x):
            return x.view(-1)

    net = nn.Sequential(nn.Linear(4, 6), nn.Identity(), nn.ReLU(inplace=True), Viewer())
    x, row = torch.randn(3, 4), torch.randn(6)
    y = tdfunc.functional_call(net, None, (x,), edits={"1": row})
    torch.testing.assert_close(y, row.relu().repeat(3))


def test_gpt2_ln_1_broadcast_substitute():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8, attn_implementation="eager"
    )
    gpt = transformers.GPT2LMHeadModel(cfg).eval()
    toks, sub = torch.randint(0, 32, (2, 5)), torch.randn(5, 16)
    a = tdfunc.functional_call(gpt, None, (toks,), edits={"transformer.h.0.ln_1": sub}).logits
    b = tdfunc.functional_call(gpt, None, (toks,), edits={"transformer.h.0.ln_1": sub.expand(2, 5, 16).clone()}).logits
    torch.testing.assert_close(a, b)


# --- 3. train-mode BatchNorm -------------------------------------------------------------------------


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).train()


def test_train_mode_batchnorm_writes_neither_module_nor_state():
    net, x = _bn_net(), torch.randn(8, 4)
    ref = copy.deepcopy(net)
    y_ref = ref(x)  # the plain call updates ref's running statistics
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for state in (tdfunc.state(net), None, {"3.bias": torch.zeros(2)}):
        kept = state.clone() if isinstance(state, TensorDict) else None
        y, caps, new = tdfunc.functional_call(net, state, (x,), capture="1", return_state=True)
        for k, v in net.state_dict().items():
            assert torch.equal(v, before[k]), k
        if kept is not None:
            assert (state == kept).all()
        if not isinstance(state, dict):
            torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(new["1", "running_mean"], ref[1].running_mean)
        torch.testing.assert_close(new["1", "running_var"], ref[1].running_var)
        assert new["1", "num_batches_tracked"] == 1
        assert set(new.keys(include_nested=True, leaves_only=True)) == set(
            tdfunc.state(net).keys(include_nested=True, leaves_only=True)
        )
    torch.testing.assert_close(tdfunc.functional_call(net, tdfunc.state(net), (x,)), y_ref)
    # threading the state through a loop = the module's own updates
    s = tdfunc.state(ref, copy=True)  # ref after its one plain call
    for _ in range(3):
        _, s = tdfunc.functional_call(net, s, (x,), return_state=True)
        ref(x)
    torch.testing.assert_close(s["1", "running_var"], ref[1].running_var)
    assert s["1", "num_batches_tracked"] == 4


def test_return_state_under_vmap_over_stacked_states():
    net, x = _bn_net(), torch.randn(8, 4)
    refs = [copy.deepcopy(net) for _ in range(3)]
    for i, r in enumerate(refs):
        with torch.no_grad():
            r[0].weight.mul_(i + 1)
    stacked = torch.stack([tdfunc.state(r, copy=True) for r in refs])
    kept = stacked.clone()
    y, new = torch.func.vmap(lambda s: tdfunc.functional_call(net, s, (x,), return_state=True))(stacked)
    assert (stacked == kept).all()
    for i, r in enumerate(refs):
        torch.testing.assert_close(y[i], r(x))
        torch.testing.assert_close(new["1", "running_mean"][i], r[1].running_mean)
        torch.testing.assert_close(new["1", "running_var"][i], r[1].running_var)


def test_eval_mode_buffers_are_not_copied():
    net, x = _bn_net().eval(), torch.randn(8, 4)
    s = tdfunc.state(net)
    _, new = tdfunc.functional_call(net, s, (x,), return_state=True)
    assert new["1", "running_mean"] is s["1", "running_mean"]


# --- 5. errors at the core boundary -------------------------------------------------------------------

X = torch.randn(2, 6)

PINNED = [
    (
        "install_sites_not_a_list",
        lambda: tdfunc.install_sites(MLP(), 3),
        TypeError,
        "tdfunc.install_sites: sites must be a site string or a list of site strings, got int (3); e.g. tdfunc.install_sites(model, ['blocks.*.mlp']), or '**' for every submodule.",
    ),
    (
        "args_as_a_list",
        lambda: tdfunc.functional_call(MLP(), None, [X]),
        TypeError,
        "tdfunc.functional_call: args must be a tuple of positional inputs (or one input that is not a list), got a list of length 1; pass tuple(args), or ([...],) when the module's single input is a list.",
    ),
    (
        "strict_not_a_bool",
        lambda: tdfunc.functional_call(MLP(), None, (X,), capture="act", strict="no"),
        TypeError,
        "tdfunc.functional_call: strict must be True or False, got str ('no').",
    ),
    (
        "intervene_strict_not_a_bool",
        lambda: tdfunc.intervene(lambda: 0, MLP(), strict=0),
        TypeError,
        "tdfunc.intervene: strict must be True or False, got int (0).",
    ),
    (
        "return_state_not_a_bool",
        lambda: tdfunc.functional_call(MLP(), None, (X,), return_state="yes"),
        TypeError,
        "tdfunc.functional_call: return_state must be True or False, got str ('yes').",
    ),
    (
        "state_entry_dtype",
        lambda: tdfunc.functional_call(MLP(), {"fc1.bias": torch.zeros(8, dtype=torch.float64)}, (X,)),
        tdfunc.StateError,
        "tdfunc.functional_call: state entry 'fc1.bias' has dtype torch.float64 on cpu, but MLP's tensor of that name has dtype torch.float32 on cpu, and the call would mix dtypes ['torch.float32', 'torch.float64'] on devices ['cpu']; convert the entry (.to(torch.float32, 'cpu')), or the whole state and the inputs together (state.to(dtype, device)), so the call runs in one dtype on one device.",
    ),
]


@pytest.mark.parametrize("name, call, exc, message", PINNED, ids=[p[0] for p in PINNED])
def test_error_message_is_pinned(name, call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert str(info.value) == message


def test_a_whole_state_in_another_dtype_is_a_consistent_call():
    m = MLP()
    y = tdfunc.functional_call(m, tdfunc.state(m).double(), (X.double(),))
    torch.testing.assert_close(y, MLP.forward(copy.deepcopy(m).double(), X.double()))


def test_a_list_input_passes_inside_a_tuple():
    class Sum(nn.Module):
        def forward(self, xs):
            return sum(xs)

    assert torch.equal(tdfunc.functional_call(Sum(), None, ([X, X],)), 2 * X)


def test_editing_a_module_that_returns_torch_return_types():
    class Max(nn.Module):
        def forward(self, x):
            return torch.max(x, dim=1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.max = Max()

        def forward(self, x):
            v, i = self.max(x)
            return v * 10 + i

    x = torch.randn(3, 5)
    hooks = hook_dicts(Net())
    y = tdfunc.functional_call(Net(), None, (x,), edits={"max": lambda v: 0 * v})
    torch.testing.assert_close(y, x.argmax(1).to(x.dtype))
    y = tdfunc.functional_call(Net(), None, (x,), edits={"max:output.1": lambda i: 0 * i})
    torch.testing.assert_close(y, 10 * x.amax(1))
    assert hook_dicts(Net()) == hooks
