"""tdfunc.lrp on transformers.

* the zᴮ (box) input rule against zennit 0.5.1;
* the LayerNorm (LN) rule of Ali et al. 2022 against a slow hand-written reference (gradient × input
  with the normaliser held constant);
* the AttnLRP rules (Achtibat et al., ICML 2024) — softmax, uniform-ε matmul inside
  ``nn.MultiheadAttention``, identity, LN / RMSNorm, ε on residual sums — each alone and in a
  two-layer ``nn.TransformerEncoderLayer`` model, against LXT 2.1 (the AttnLRP authors' library; only
  ``lxt.explicit.functional``, which propagates relevance through autograd: the input's ``.grad`` is
  the relevance) and against a slow reference written from the paper's equations, with its
  relevance's gradient w.r.t. every parameter compared to autograd of that reference.

LXT's ``_stabilize`` adds ``+ε`` (not sign-aware) where tdfunc adds ``ε sign(z)``: the comparisons use
ε = 1e-12 on both sides (the difference is then below 1e-9); the slow reference uses tdfunc's
convention, so there the comparison is to rounding.  LXT is installed ``--no-deps`` and is a
test-only oracle (its code is not copied).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from test_lrp import ours, zennit_lrp  # the shared zennit-per-class and tdfunc calls
from torch import nn

import tdfunc
from tdfunc.attribution._common import AttributionError
from tdfunc.attribution._lrp import lrp
from tdfunc.lrp_rules import attention as lrp_attention
from tdfunc.lrp_rules import epsilon as lrp_epsilon
from tdfunc.lrp_rules import gradient as lrp_pass
from tdfunc.lrp_rules import identity as lrp_identity
from tdfunc.lrp_rules import ignore as lrp_ignore
from tdfunc.lrp_rules import norm as lrp_norm
from tdfunc.lrp_rules import softmax as lrp_softmax


@pytest.fixture(scope="module")
def lf():
    """LXT's explicit functional rules (AttnLRP reference, test-only)."""
    return pytest.importorskip("lxt.explicit.functional")


lrp_zbox = tdfunc.lrp_rules.zbox

DT = torch.float64


class Single(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("bounds", ["float", "tensor"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_zbox_matches_zennit(zennit, kind, bounds):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = nn.Linear(5, 4), torch.rand(3, 5) * 2 - 1
        lo, hi = (-1.0, 1.0) if bounds == "float" else (-1 - torch.rand(1, 5, dtype=DT), 1 + torch.rand(1, 5, dtype=DT))
    else:
        layer, x = nn.Conv2d(2, 2, 3, padding=1), torch.rand(2, 2, 3, 3) * 2 - 1
        lo, hi = (
            (-1.0, 1.0)
            if bounds == "float"
            else (
                torch.tensor([-1.0, -2.0], dtype=DT).view(1, 2, 1, 1),
                torch.tensor([1.5, 1.0], dtype=DT).view(1, 2, 1, 1),
            )
        )
    m, x = Single(layer.to(DT)), x.to(DT)
    comp = zennit.core.Composite(
        module_map=lambda ctx, n, mod: zennit.rules.ZBox(lo, hi) if isinstance(mod, (nn.Linear, nn.Conv2d)) else None
    )
    want = zennit_lrp(zennit, m, x, comp)
    got = ours(m, x, rules={type(layer): lrp_zbox(lo, hi)}, composite=None)
    torch.testing.assert_close(got, want.to(DT), rtol=0, atol=1e-12)


def test_zbox_first_layer_of_mlp_matches_zennit(zennit):
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT)
    x = torch.rand(5, 4, dtype=DT)
    comp = zennit.core.Composite(
        module_map=lambda ctx, n, mod: (zennit.rules.ZBox(0.0, 1.0) if n == "0" else zennit.rules.Epsilon())
        if isinstance(mod, nn.Linear)
        else None
    )
    want = zennit_lrp(zennit, m, x, comp)
    got = ours(m, x, rules={"0": lrp_zbox(0.0, 1.0)}, composite="epsilon")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_zbox_bad_arguments():
    with pytest.raises(
        AttributionError,
        match=r"^tdfunc\.lrp_rules\.zbox: low must be <= high everywhere \(the box the inputs lie in\), got low > high\.$",
    ):
        lrp_zbox(1.0, 0.0)
    with pytest.raises(AttributionError, match=r"^tdfunc\.lrp_rules\.zbox: low must be <= high everywhere"):
        lrp_zbox(torch.tensor([0.0, 2.0]), 1.0)
    with pytest.raises(
        TypeError, match=r"^tdfunc\.lrp_rules\.zbox: low must be a float or a floating-point tensor, got str \('a'\)\.$"
    ):
        lrp_zbox("a", 1.0)
    with pytest.raises(
        TypeError,
        match=r"^tdfunc\.lrp_rules\.zbox: high must be a float or a floating-point tensor, got a torch\.int64 tensor\.$",
    ):
        lrp_zbox(0.0, torch.tensor([1]))
    with pytest.raises(AttributionError, match=r"^tdfunc\.lrp_rules\.zbox: high must be finite, got inf\.$"):
        lrp_zbox(0.0, float("inf"))
    with pytest.raises(
        AttributionError, match=r"^tdfunc\.lrp_rules\.zbox: stabilizer must be a finite number >= 0, got -1\.0\.$"
    ):
        lrp_zbox(0.0, 1.0, stabilizer=-1.0)


# ------------------------------------------------------------------ the LN rule (Ali et al., 2022)


class LNNet(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(5, 6, bias=bias)
        self.ln = nn.LayerNorm(6, bias=bias)
        self.head = nn.Linear(6, 3, bias=bias)
        with torch.no_grad():  # non-trivial affine part
            self.ln.weight.uniform_(0.5, 1.5)
            if bias:
                self.ln.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.head(self.ln(self.fc1(x)))


def slow_ln_rule(m: LNNet, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Gradient × input of ``head(γ (h − mean h) · s + β)`` with ``h = fc1(x')`` and ``s = 1 / std(fc1(x))`` a
    constant in ``x'`` (still a function of the weights); one example and one class at a time, plain loops."""
    out = []
    for b in range(x.shape[0]):
        h0 = m.fc1(x[b])
        c0 = h0 - h0.mean()
        s = 1 / torch.sqrt((c0 * c0).mean() + m.ln.eps)
        rows = []
        for k in range(3):
            xp = x[b].detach().clone().requires_grad_(True)
            h = m.fc1(xp)
            y = m.head((h - h.mean()) * s * m.ln.weight + (0 if m.ln.bias is None else m.ln.bias))
            (g,) = torch.autograd.grad(y[k], xp, create_graph=create_graph)
            rows.append(x[b] * g)
        out.append(torch.stack(rows))
    return torch.stack(out)


def test_ln_rule_matches_slow_reference():
    torch.manual_seed(4)
    m, x = LNNet().to(DT), torch.randn(4, 5, dtype=DT)
    got = ours(m, x, rules={nn.Linear: lrp_epsilon(0.0)}, composite="epsilon")
    torch.testing.assert_close(got, slow_ln_rule(m, x), rtol=0, atol=1e-12)
    plain = ours(m, x, composite=None)  # no composite: LayerNorm keeps its gradient, and that differs
    assert (got - plain).abs().max() > 1e-3


def test_ln_rule_conserves_without_bias():
    torch.manual_seed(5)
    m, x = LNNet(bias=False).to(DT), torch.randn(6, 5, dtype=DT)
    got = ours(m, x, rules={nn.Linear: lrp_epsilon(0.0)}, composite="epsilon")
    torch.testing.assert_close(got.sum(-1), m(x), rtol=0, atol=1e-11)


def test_ln_rule_second_order_matches_reference():
    torch.manual_seed(6)
    m, x = LNNet().to(DT), torch.randn(3, 5, dtype=DT)
    params = list(m.parameters())
    td = TensorDict({"x": x}, batch_size=[3])
    r = lrp(lambda t: m(t["x"]), td, m, rules={nn.Linear: lrp_epsilon(0.0)}, composite="epsilon")["attr", "x"]
    got = torch.autograd.grad((r**2).sum(), params, allow_unused=True)
    want = torch.autograd.grad((slow_ln_rule(m, x, create_graph=True) ** 2).sum(), params, allow_unused=True)
    for p, g, w in zip(params, got, want):  # None: R does not depend on p (e.g. the head's bias)
        g, w = (torch.zeros_like(p) if t is None else t for t in (g, w))
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
    assert want[0].abs().max() > 1e-3  # fc1.weight, through 1 / std among others


# ------------------------------------------------------------------ AttnLRP: the slow reference from the paper


def _stab(z, eps):
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z)


def r_linear(x, w, b, R, eps):
    """ε rule (AttnLRP Eq. 8): ``R_i = x_i Σ_j w_ji R_j / stab(z_j)``; R may carry leading (class) dims."""
    z = x @ w.T + (0 if b is None else b)
    return x * ((R / _stab(z, eps)) @ w)


def r_matmul(a, b, R, eps):
    """Uniform-ε rule for ``O = a @ b`` (Prop. 3.3): each product term's share, half to each factor."""
    n = R / _stab(2 * (a @ b), eps)
    return a * (n @ b.transpose(-1, -2)), b * (a.transpose(-1, -2) @ n)


def r_softmax(x, s, R):
    """Prop. 3.1: ``R_i = x_i (R_i − s_i Σ_j R_j)``, 0 at masked (``-inf``) scores."""
    return torch.where(torch.isinf(x), torch.zeros_like(x), x) * (R - s * R.sum(-1, keepdim=True))


def r_add(a, b, R):
    """ε rule on a sum, ε → 0: ``R_a = a R / (a + b)``."""
    return a * R / (a + b), b * R / (a + b)


def r_layernorm(x, norm, R):
    """LN rule: ``R_in = x ⊙ (I − 11ᵀ/n)(s γ ⊙ R / y)`` with ``s = 1 / std(x)`` a constant."""
    y = norm(x)
    c = x - x.mean(-1, keepdim=True)
    s = 1 / torch.sqrt((c * c).mean(-1, keepdim=True) + norm.eps)
    u = s * norm.weight * R / y
    return x * (u - u.mean(-1, keepdim=True))


def _causal(t, dtype=DT):
    return torch.full((t, t), float("-inf"), dtype=dtype).triu(1)


def r_self_attention(a: nn.MultiheadAttention, h, R, eps, mode):
    """Relevance of the input h (T, E) of causal self-attention for relevance R (K, T, E) at its output."""
    n_heads, (t, e) = a.num_heads, h.shape
    hd = e // n_heads
    wq, wk, wv = a.in_proj_weight.chunk(3)
    bq, bk, bv = (None,) * 3 if a.in_proj_bias is None else a.in_proj_bias.chunk(3)
    heads = lambda u: u.view(t, n_heads, hd).transpose(0, 1)
    merge = lambda u: u.transpose(-3, -2).reshape(*u.shape[:-3], t, e)
    lin = lambda w, b: h @ w.T + (0 if b is None else b)
    q, k, v = heads(lin(wq, bq)) / math.sqrt(hd), heads(lin(wk, bk)), heads(lin(wv, bv))
    scores = q @ k.transpose(-1, -2) + _causal(t)
    p = torch.softmax(scores, -1)
    o = p @ v
    R_o = r_linear(o.transpose(0, 1).reshape(t, e), a.out_proj.weight, a.out_proj.bias, R, eps)
    R_o = R_o.view(*R.shape[:-2], t, n_heads, hd).transpose(-3, -2)
    if mode == "constant":  # CP-LRP: p a constant, p v linear in v (LRP-0)
        R_v = v * (p.transpose(-1, -2) @ (R_o / o))
        R_q = R_k = torch.zeros_like(R_v)
    else:
        R_p, R_v = r_matmul(p, v, R_o, eps)
        R_q, R_kt = r_matmul(q, k.transpose(-1, -2), r_softmax(scores, p, R_p), eps)
        R_k = R_kt.transpose(-1, -2)
    return (
        r_linear(h, wq, bq, merge(R_q), eps)
        + r_linear(h, wk, bk, merge(R_k), eps)
        + r_linear(h, wv, bv, merge(R_v), eps)
    )


def r_feed_forward(layer, h, R, eps):
    """linear1 (ε) → GELU (identity, Prop. 3.4) → linear2 (ε)."""
    u = h @ layer.linear1.weight.T + layer.linear1.bias
    return r_linear(
        h,
        layer.linear1.weight,
        layer.linear1.bias,
        r_linear(F.gelu(u), layer.linear2.weight, layer.linear2.bias, R, eps),
        eps,
    )


def slow_attnlrp(m, x, eps=1e-6, mode="attnlrp"):
    """Every class's relevance (K, T, E) of one example x (T, E), propagated layer by layer from ``R = f_k e_k``."""

    def sa(layer, h):
        return layer.self_attn(h, h, h, attn_mask=_causal(h.shape[0]), need_weights=True)[0]

    def ff(layer, h):
        return layer.linear2(F.gelu(layer.linear1(h)))

    hs, parts = [x], []
    for layer in m.layers:  # forward, keeping what the backward pass needs
        h = hs[-1]
        if layer.norm_first:
            n1 = layer.norm1(h)
            s = sa(layer, n1)
            n2 = layer.norm2(h + s)
            f = ff(layer, n2)
            parts.append((n1, s, n2, f))
            hs.append(h + s + f)
        else:
            s = sa(layer, h)
            h1 = layer.norm1(h + s)
            f = ff(layer, h1)
            parts.append((s, h1, f))
            hs.append(layer.norm2(h1 + f))
    y = m.head(hs[-1][-1])
    k = y.shape[0]
    R = torch.zeros(k, *hs[-1].shape, dtype=x.dtype)
    R[:, -1] = r_linear(hs[-1][-1], m.head.weight, m.head.bias, torch.diag(y), eps)
    for layer, h, part in zip(reversed(m.layers), reversed(hs[:-1]), reversed(parts)):
        if layer.norm_first:
            n1, s, n2, f = part
            R_h1, R_f = r_add(h + s, f, R)
            R_h1 = R_h1 + r_layernorm(h + s, layer.norm2, r_feed_forward(layer, n2, R_f, eps))
            R_h, R_s = r_add(h, s, R_h1)
            R = R_h + r_layernorm(h, layer.norm1, r_self_attention(layer.self_attn, n1, R_s, eps, mode))
        else:
            s, h1, f = part
            R_h1, R_f = r_add(h1, f, r_layernorm(h1 + f, layer.norm2, R))
            R_h, R_s = r_add(h, s, r_layernorm(h + s, layer.norm1, R_h1 + r_feed_forward(layer, h1, R_f, eps)))
            R = R_h + r_self_attention(layer.self_attn, h, R_s, eps, mode)
    return R


# ------------------------------------------------------------------ AttnLRP: the LXT reference


class _GeluIdentity(torch.autograd.Function):
    """GELU whose backward passes relevance unchanged (the identity rule, LXT style)."""

    @staticmethod
    def forward(ctx, x):
        return F.gelu(x)

    @staticmethod
    def backward(ctx, r):
        return r


class _ConstantLeft(torch.autograd.Function):
    """``p @ v`` with ``p`` a constant: ε rule on ``v`` only (CP-LRP), LXT's ``+ε`` convention."""

    @staticmethod
    def forward(ctx, p, v, eps):
        out = p @ v
        ctx.save_for_backward(p, v, out)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, r):
        p, v, out = ctx.saved_tensors
        return None, v * (p.transpose(-1, -2) @ (r / (out + ctx.eps))), None


def lxt_attention(lf, a: nn.MultiheadAttention, q_in, k_in, v_in, mask, eps, mode="attnlrp"):
    """nn.MultiheadAttention's forward from LXT rules; inputs (N, L, E), ``mask`` additive (N, H, L, S) or None."""
    n_heads, (n, t, e) = a.num_heads, q_in.shape
    hd = e // n_heads
    if a._qkv_same_embed_dim:
        ws = a.in_proj_weight.chunk(3)
    else:
        ws = (a.q_proj_weight, a.k_proj_weight, a.v_proj_weight)
    bs = (None,) * 3 if a.in_proj_bias is None else a.in_proj_bias.chunk(3)
    q, k, v = (
        lf.linear_epsilon(u, w, b, eps).view(n, -1, n_heads, hd).transpose(1, 2)
        for u, w, b in zip((q_in, k_in, v_in), ws, bs)
    )
    scores = lf.mul2(lf.matmul(q, k.transpose(-1, -2), epsilon=eps), 1 / math.sqrt(hd))
    if mask is not None:  # ε rule on the sum with a constant: the mask takes its share, as a bias does
        scores = lf.add2(scores, mask.expand_as(scores), epsilon=eps)
    p = lf.softmax(scores, -1)
    o = _ConstantLeft.apply(p.detach(), v, eps) if mode == "constant" else lf.matmul(p, v, epsilon=eps)
    return lf.linear_epsilon(o.transpose(1, 2).reshape(n, t, e), a.out_proj.weight, a.out_proj.bias, eps)


def lxt_relevance(forward, x, n_cls):
    """Every class's relevance from an LXT forward: seed ``R = f_k e_k``, read the inputs' ``.grad``.

    ``x`` is a tensor (returns its maps) or a tuple of tensors (returns a tuple); maps are
    ``(*batch, K, *features)`` with the batch the leading dims of the output before its last.
    """
    xs = x if isinstance(x, tuple) else (x,)
    maps = [[] for _ in xs]
    for k in range(n_cls):
        xr = [u.detach().clone().requires_grad_(True) for u in xs]
        y = forward(*xr)
        y.backward((y * F.one_hot(torch.tensor(k), n_cls).to(y)).detach())
        for out, u in zip(maps, xr):
            out.append(torch.zeros_like(u) if u.grad is None else u.grad)  # None: no relevance reaches u
    nb = y.dim() - 1
    res = tuple(torch.stack(mm, nb) for mm in maps)
    return res if isinstance(x, tuple) else res[0]


# ------------------------------------------------------------------ AttnLRP: rules alone


class Softmaxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.softmax = nn.Softmax(-1)

    def forward(self, x):
        return self.softmax(x)


def test_softmax_rule_matches_lxt_and_paper(lf):
    torch.manual_seed(10)
    x = torch.randn(3, 5, dtype=DT)
    x[0, 3] = x[2, 0] = float("-inf")  # masked scores
    m = Softmaxed()
    got = ours(m, x, rules={nn.Softmax: lrp_softmax()}, composite=None)
    assert not got.isnan().any() and (got[0, :, 3] == 0).all()
    want = lxt_relevance(lambda t: lf.softmax(t, -1), x, 5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    s = torch.softmax(x, -1)
    slow = r_softmax(x[:, None], s[:, None], torch.diag_embed(s))  # R_out = s_k e_k for class k
    torch.testing.assert_close(got, slow, rtol=0, atol=1e-15)
    # not conservative: Σ R_in = Σ x R − (Σ x s) Σ R, with x_i = 0 at masked entries
    xz = x.nan_to_num(neginf=0.0)
    torch.testing.assert_close(
        got.sum(-1),
        xz[:, None, :].mul(torch.diag_embed(s)).sum(-1) - (xz * s).sum(-1, keepdim=True) * s,
        rtol=0,
        atol=1e-14,
    )
    torch.testing.assert_close(ours(m, x, composite="attnlrp"), got, rtol=0, atol=0)  # the composite's choice


class Normalize(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=-1)


class Act(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act

    def forward(self, x):
        return self.act(x)


@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU(), nn.Sigmoid(), nn.Tanh()], ids=lambda a: type(a).__name__)
def test_identity_rule_passes_relevance_unchanged(act):
    torch.manual_seed(11)
    x = torch.randn(3, 4, dtype=DT)
    x[1, 2] = 0.0  # an exact zero gets relevance 0 (it cannot be written as x ⊙ g)
    m = Act(act)
    got = ours(m, x, rules={type(act): lrp_identity()}, composite=None)
    want = torch.diag_embed(act(x))  # R_in = R_out = f_k e_k
    want[1, :, 2] = 0.0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    if not isinstance(act, nn.Sigmoid):  # σ(0) = 0: the composite gives the same
        torch.testing.assert_close(ours(m, x, composite="attnlrp"), got, rtol=0, atol=0)


def test_identity_rule_matches_lxt_normalize(lf):
    torch.manual_seed(12)
    m, x = Act(Normalize()), torch.randn(2, 5, dtype=DT)
    got = ours(m, x, rules={"act": lrp_identity()}, composite=None)
    want = lxt_relevance(lambda t: lf.normalize(t, dim=-1), x, 5)  # LXT's identity rule on F.normalize
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


def test_identity_rule_in_mlp_conserves():
    torch.manual_seed(13)
    m = nn.Sequential(nn.Linear(4, 6, bias=False), nn.SiLU(), nn.Linear(6, 3, bias=False)).to(DT)
    x = torch.randn(5, 4, dtype=DT)
    got = ours(m, x, rules={nn.Linear: lrp_epsilon(0.0), nn.SiLU: lrp_identity()}, composite=None)
    h = m[0](x)
    R_h = torch.diag_embed(m(x)) / m[2](m[1](h))[:, None, :] @ m[2].weight * m[1](h)[:, None, :]  # ε=0 at the head
    want = (R_h / h[:, None, :]) @ m[0].weight * x[:, None, :]  # identity at SiLU, ε=0 at the first layer
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.sum(-1), m(x), rtol=0, atol=1e-12)


def test_rmsnorm_rule_is_lxt_identity(lf):
    torch.manual_seed(14)
    m = Act(nn.RMSNorm(6, eps=1e-6)).to(DT)
    with torch.no_grad():
        m.act.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 6, dtype=DT)
    got = ours(m, x, composite="epsilon")  # every composite gives RMSNorm the norm rule
    want = lxt_relevance(lambda t: lf.rms_norm_identity(t, m.act.weight, 1e-6), x, 6)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # LXT computes RMSNorm's value in float32
    torch.testing.assert_close(got, torch.diag_embed(m(x)), rtol=0, atol=1e-15)  # R_in = R_out = f_k e_k
    torch.testing.assert_close(ours(m, x, rules={nn.RMSNorm: lrp_norm()}, composite=None), got, rtol=0, atol=0)


def test_layernorm_rule_matches_lxt(lf):
    torch.manual_seed(15)
    m = LNNet().to(DT)
    x = torch.randn(4, 5, dtype=DT)
    got = ours(m, x, rules={nn.Linear: lrp_epsilon(1e-12), nn.LayerNorm: lrp_norm()}, composite=None)

    def lxt_forward(t):
        h = lf.linear_epsilon(t, m.fc1.weight, m.fc1.bias, 1e-12)
        h = lf.layer_norm_grad_fn.apply(h, m.ln.weight, m.ln.bias, m.ln.eps, 1e-12)
        return lf.linear_epsilon(h, m.head.weight, m.head.bias, 1e-12)

    torch.testing.assert_close(got, lxt_relevance(lxt_forward, x, 3), rtol=0, atol=1e-9)
    passed = ours(m, x, rules={nn.Linear: lrp_epsilon(1e-12), nn.LayerNorm: lrp_pass()}, composite="epsilon")
    torch.testing.assert_close(
        passed, ours(m, x, rules={nn.Linear: lrp_epsilon(1e-12)}, composite=None), rtol=0, atol=0
    )


class Attn(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(**kw)

    def forward(self, q, k, v, **kw):
        return self.attn(q, k, v, **kw)[0]


def _mha_config(name):
    """(MHA kwargs, call kwargs builder, query/key/value shapes in (N, L, E) layout, self-attention?)."""
    n, t, s, e = 2, 4, 3, 6
    bool_causal = torch.ones(t, t, dtype=torch.bool).triu(1)
    if name == "self-causal-float-is_causal":  # what nn.TransformerEncoderLayer passes
        return (
            dict(embed_dim=e, num_heads=2, batch_first=True),
            dict(attn_mask=_causal(t), is_causal=True, need_weights=False),
            (n, t, t),
            True,
        )
    if name == "self-bool-seq_first-weights":
        return (
            dict(embed_dim=e, num_heads=3),
            dict(attn_mask=bool_causal, need_weights=True, average_attn_weights=False),
            (n, t, t),
            True,
        )
    if name == "cross-kdim-vdim-padding":
        kpm = torch.tensor([[False, False, True], [False, False, False]])
        return (
            dict(embed_dim=e, num_heads=2, kdim=3, vdim=5, batch_first=True),
            dict(key_padding_mask=kpm),
            (n, t, s),
            False,
        )
    if name == "nobias-3d-float-mask":
        am = 0.5 * torch.randn(n * 2, t, s, dtype=DT)
        am[:, :, 0] = float("-inf")
        kpm = torch.zeros(n, s, dtype=DT)
        kpm[0, 1] = -0.7
        return (
            dict(embed_dim=e, num_heads=2, bias=False, batch_first=True),
            dict(attn_mask=am, key_padding_mask=kpm),
            (n, t, s),
            False,
        )
    if name == "unbatched-causal":
        return dict(embed_dim=e, num_heads=2), dict(attn_mask=bool_causal, is_causal=True), (0, t, t), True
    raise AssertionError(name)


def _reference_mask(call, n, h, t, s):
    """The additive mask (N, H, L, S) nn.MultiheadAttention applies, written out for the reference."""
    am, kpm = call.get("attn_mask"), call.get("key_padding_mask")
    if call.get("is_causal") and kpm is None and not call.get("need_weights", True):
        am = torch.ones(t, s, dtype=torch.bool).triu(1)
    add = torch.zeros(n, h, t, s, dtype=DT)
    if am is not None:
        am = torch.zeros(am.shape, dtype=DT).masked_fill(am, float("-inf")) if am.dtype == torch.bool else am
        add = add + (am.view(n, h, t, s) if am.dim() == 3 else am)
    if kpm is not None:
        kpm = torch.zeros(kpm.shape, dtype=DT).masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else kpm
        add = add + kpm.view(n, 1, 1, s)
    return add


CONFIGS = [
    "self-causal-float-is_causal",
    "self-bool-seq_first-weights",
    "cross-kdim-vdim-padding",
    "nobias-3d-float-mask",
    "unbatched-causal",
]


@pytest.mark.parametrize("mode", ["attnlrp", "constant"])
@pytest.mark.parametrize("config", CONFIGS)
def test_attention_rule_matches_lxt(lf, config, mode):
    torch.manual_seed(16)
    mk, call, (n, t, s), self_attn = _mha_config(config)
    m = Attn(**mk).to(DT).eval()
    with torch.no_grad():
        for p in m.parameters():  # non-zero biases, larger weights
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.3 * torch.randn_like(p))
    a = m.attn
    unbatched, nb = n == 0, max(n, 1)
    # inputs in (N, L, E) layout; to_mod / from_mod convert to and from the module's layout
    to_mod = (lambda u: u[0]) if unbatched else (lambda u: u) if a.batch_first else (lambda u: u.transpose(0, 1))
    from_mod = (lambda u: u[None]) if unbatched else (lambda u: u) if a.batch_first else (lambda u: u.transpose(0, 1))
    q = torch.randn(nb, t, a.embed_dim, dtype=DT)
    k = q if self_attn else torch.randn(nb, s, a.kdim, dtype=DT)
    v = q if self_attn else torch.randn(nb, s, a.vdim, dtype=DT)
    mask = _reference_mask(call, nb, a.num_heads, t, k.shape[1])

    def ref(qq, kk, vv):  # every feature of the last query
        return lxt_attention(lf, a, qq, kk, vv, mask, 1e-12, mode)[:, -1]

    plain = from_mod(m(to_mod(q), to_mod(k), to_mod(v), **call))[:, -1]
    torch.testing.assert_close(ref(q, k, v), plain, rtol=0, atol=1e-13)  # the reference computes the module's forward
    rules = {nn.MultiheadAttention: lrp_attention(eps=1e-12, softmax=mode)}
    if self_attn:
        td = TensorDict({"x": q}, batch_size=[nb])
        got = lrp(lambda u: from_mod(m(*(to_mod(u["x"]),) * 3, **call))[:, -1], td, m, rules=rules, composite=None)
        want = lxt_relevance(lambda x_: ref(x_, x_, x_), q, a.embed_dim)
        torch.testing.assert_close(got["attr", "x"], want, rtol=0, atol=1e-9)
        assert want.abs().max() > 0.1
    else:
        td = TensorDict({"q": q, "k": k, "v": v}, batch_size=[nb])
        f = lambda u: from_mod(m(to_mod(u["q"]), to_mod(u["k"]), to_mod(u["v"]), **call))[:, -1]
        got = lrp(f, td, m, rules=rules, composite=None)
        want = lxt_relevance(ref, (q, k, v), a.embed_dim)
        for key, w in zip("qkv", want):
            torch.testing.assert_close(got["attr", key], w, rtol=0, atol=1e-9)
        if mode == "constant":  # CP-LRP: no relevance through the probabilities
            assert (got["attr", "q"] == 0).all() and (got["attr", "k"] == 0).all()


class HandAttention(nn.Module):
    """nn.MultiheadAttention's causal self-attention written with modules (Linear projections, nn.Softmax)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e, self.h = mha.embed_dim, mha.num_heads
        self.q, self.k, self.v, self.out = (nn.Linear(e, e, dtype=mha.in_proj_weight.dtype) for _ in range(4))
        self.softmax = nn.Softmax(-1)
        with torch.no_grad():
            for lin, w, b in zip((self.q, self.k, self.v), mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)):
                lin.weight.copy_(w), lin.bias.copy_(b)
            self.out.weight.copy_(mha.out_proj.weight), self.out.bias.copy_(mha.out_proj.bias)

    def forward(self, x):
        n, t, e = x.shape
        heads = lambda u: u.view(n, t, self.h, e // self.h).transpose(1, 2)
        s = heads(self.q(x)) @ heads(self.k(x)).transpose(-1, -2) / math.sqrt(e // self.h) + _causal(t)
        return self.out((self.softmax(s) @ heads(self.v(x))).transpose(1, 2).reshape(n, t, e))[:, -1]


def test_ignore_on_softmax_is_cp_lrp():
    """lrp_ignore on the nn.Softmax of a hand-written attention = lrp_attention(softmax='constant') on the module."""
    torch.manual_seed(17)
    m = Attn(embed_dim=6, num_heads=2, batch_first=True).to(DT).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    hand = HandAttention(m.attn)
    x = torch.randn(2, 4, 6, dtype=DT)
    td = TensorDict({"x": x}, batch_size=[2])
    torch.testing.assert_close(hand(x), m(x, x, x, attn_mask=_causal(4))[:, -1], rtol=0, atol=1e-14)
    want = lrp(
        lambda u: m(u["x"], u["x"], u["x"], attn_mask=_causal(4))[:, -1],
        td,
        m,
        composite="attnlrp",
        rules={nn.MultiheadAttention: lrp_attention(softmax="constant")},
    )["attr", "x"]
    got = lrp(lambda u: hand(u["x"]), td, hand, composite="attnlrp", rules={"softmax": lrp_ignore()})["attr", "x"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    plain = lrp(lambda u: hand(u["x"]), td, hand, composite="attnlrp")["attr", "x"]  # softmax rule, plain matmuls
    assert (plain - want).abs().max() > 1e-2


# ------------------------------------------------------------------ AttnLRP: a small transformer


class TinyTransformer(nn.Module):
    """Two nn.TransformerEncoderLayers (post-norm, then pre-norm; GELU modules; causal) and a head on the last token."""

    def __init__(self, d=8, heads=2, ff=16, n_cls=3, bias=True):
        super().__init__()
        layer = lambda nf: nn.TransformerEncoderLayer(
            d, heads, ff, dropout=0.0, activation=nn.GELU(), batch_first=True, norm_first=nf, bias=bias
        )
        self.layers = nn.ModuleList([layer(False), layer(True)])
        self.head = nn.Linear(d, n_cls, bias=bias)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[-2], dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.head(x[..., -1, :])


def tiny(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    m = TinyTransformer(bias=bias).to(DT).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine maps and biases (the defaults are 1 and 0)
        for n, p in m.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=DT))
            elif p.dim() == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=DT))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT) / math.sqrt(p.shape[-1]))
    return m, torch.randn(2, 5, 8, generator=g, dtype=DT)


def lxt_tiny(lf, m, x, eps, add_eps=None):
    """TinyTransformer's forward from LXT rules (ε on residual sums: ``add2`` with ``add_eps``)."""
    add_eps = eps if add_eps is None else add_eps

    def ln(norm, h):
        return lf.layer_norm_grad_fn.apply(h, norm.weight, norm.bias, norm.eps, eps)

    def ff(layer, h):
        u = _GeluIdentity.apply(lf.linear_epsilon(h, layer.linear1.weight, layer.linear1.bias, eps))
        return lf.linear_epsilon(u, layer.linear2.weight, layer.linear2.bias, eps)

    def sa(layer, h):
        return lxt_attention(lf, layer.self_attn, h, h, h, _causal(h.shape[1]), eps)

    for layer in m.layers:
        if layer.norm_first:
            x = lf.add2(x, sa(layer, ln(layer.norm1, x)), epsilon=add_eps)
            x = lf.add2(x, ff(layer, ln(layer.norm2, x)), epsilon=add_eps)
        else:
            x = ln(layer.norm1, lf.add2(x, sa(layer, x), epsilon=add_eps))
            x = ln(layer.norm2, lf.add2(x, ff(layer, x), epsilon=add_eps))
    return lf.linear_epsilon(x[:, -1], m.head.weight, m.head.bias, eps)


def attnlrp(m, x, rules=None):
    """Every class's relevance of the TinyTransformer under composite 'attnlrp'."""
    td = TensorDict({"x": x}, batch_size=[x.shape[0]])
    return lrp(lambda t: m(t["x"]), td, m, composite="attnlrp", rules=rules)["attr", "x"]


TINY_EPS = {nn.Linear: lrp_epsilon(1e-12), nn.MultiheadAttention: lrp_attention(eps=1e-12)}


def test_transformer_matches_lxt(lf):
    m, x = tiny()
    torch.testing.assert_close(lxt_tiny(lf, m, x, 1e-12), m(x), rtol=0, atol=1e-13)  # same forward
    got = attnlrp(m, x, TINY_EPS)
    want = lxt_relevance(lambda u: lxt_tiny(lf, m, u, 1e-12), x, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    assert want.abs().max() > 0.5


def test_residual_sums_are_the_eps_to_zero_limit_of_lxt_add2(lf):
    """Residual sums keep their gradient: LXT with add2's ε differs by O(ε), linearly, and → 0."""
    m, x = tiny()
    got = attnlrp(m, x, TINY_EPS)
    diff = {
        e: (got - lxt_relevance(lambda u: lxt_tiny(lf, m, u, 1e-12, add_eps=e), x, 3)).abs().max().item()
        for e in (1e-7, 1e-8)
    }
    assert 9.5 < diff[1e-7] / diff[1e-8] < 10.5, diff  # first order in ε
    assert 1e-8 < diff[1e-8] < 1e-5, diff  # at LXT's default ε for add2 (1e-8): visible, small


@pytest.mark.parametrize("mode", ["attnlrp", "constant"])
def test_transformer_matches_slow_reference(mode):
    m, x = tiny(1)
    got = attnlrp(m, x, rules={nn.MultiheadAttention: lrp_attention(softmax=mode)})
    want = torch.stack([slow_attnlrp(m, x[b], 1e-6, mode) for b in range(2)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_transformer_conserves_without_bias_under_cp_lrp():
    """Bias-free, ε = 0, constant attention probabilities: every rule conserves, so Σ R = f_k(x)."""
    m, x = tiny(2, bias=False)
    rules = {nn.Linear: lrp_epsilon(0.0), nn.MultiheadAttention: lrp_attention(eps=0.0, softmax="constant")}
    R = attnlrp(m, x, rules)
    torch.testing.assert_close(R.sum((-2, -1)), m(x), rtol=0, atol=1e-11)
    rules[nn.MultiheadAttention] = lrp_attention(eps=0.0)  # the softmax rule is not conservative
    R = attnlrp(m, x, rules)
    assert (R.sum((-2, -1)) - m(x)).abs().max() > 1e-3


def test_transformer_per_class_maps_one_call_equal_loop():
    m, x = tiny(3)
    td = TensorDict({"x": x}, batch_size=[2])
    allk = lrp(lambda t: m(t["x"]), td, m, composite="attnlrp")["attr", "x"]
    for k in range(3):
        one = lrp(lambda t: m(t["x"])[:, k], td, m, composite="attnlrp")["attr", "x"]
        torch.testing.assert_close(one, allk[:, k], rtol=0, atol=1e-15)


def test_transformer_relevance_gradient_matches_slow_reference():
    """d‖R‖²/dθ for every parameter: tdfunc's two passes vs autograd through the slow reference."""
    m, x = tiny(4)
    params = list(m.parameters())
    R = attnlrp(m, x)
    got = torch.autograd.grad((R**2).sum(), params, allow_unused=True)
    want = torch.autograd.grad(sum((slow_attnlrp(m, x[b]) ** 2).sum() for b in range(2)), params, allow_unused=True)
    for p, g, w in zip(params, got, want):
        g, w = (torch.zeros_like(p) if t is None else t for t in (g, w))
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
    assert min(w.abs().max().item() for w in want if w is not None) > 1e-5  # every parameter matters


def test_encoder_layer_fast_path_is_not_taken(monkeypatch):
    """nn.TransformerEncoderLayer's fused eval path skips its submodules; tdfunc's site hooks on them disable it."""
    calls = []
    fused = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a, **k: calls.append(1) or fused(*a, **k))
    torch.manual_seed(18)
    model = (
        nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), nn.Linear(8, 3))
        .to(DT)
        .eval()
    )
    x = torch.randn(2, 4, 8, dtype=DT)
    with torch.no_grad():  # the fast path exists: a plain no-grad eval call takes it
        model(x)
    assert calls == [1]
    state = tdfunc.state(model)  # plain tensors (no requires_grad), eval: the fast path's conditions
    td = TensorDict({"x": x}, batch_size=[2])
    got = lrp(lambda t: tdfunc.functional_call(model, state, (t["x"],))[:, -1], td, model, composite="attnlrp")[
        "attr", "x"
    ]
    assert calls == [1]
    want = lrp(lambda t: model(t["x"])[:, -1], td, model, composite="attnlrp")["attr", "x"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


# ------------------------------------------------------------------ AttnLRP: errors


def test_transformer_errors():
    with pytest.raises(
        AttributionError,
        match=r"^tdfunc\.lrp_rules\.attention: softmax must be 'attnlrp' \(relevance through the softmax, AttnLRP\) or 'constant' \(attention probabilities held constant, CP-LRP\), got 'cp'\.$",
    ):
        lrp_attention(softmax="cp")
    with pytest.raises(
        AttributionError, match=r"^tdfunc\.lrp_rules\.attention: eps must be a finite number >= 0, got -1\.0\.$"
    ):
        lrp_attention(eps=-1.0)
    with pytest.raises(TypeError, match=r"^tdfunc\.lrp_rules\.attention: eps must be a float, got str \('1e-6'\)\.$"):
        lrp_attention(eps="1e-6")
    x = torch.randn(2, 3, 4, dtype=DT)
    td = TensorDict({"x": x}, batch_size=[2])

    def run(m, **kw):
        return lrp(lambda t: m(t["x"], t["x"], t["x"]), td, m, **kw)

    for kw, what in ((dict(add_bias_kv=True), "add_bias_kv=True"), (dict(add_zero_attn=True), "add_zero_attn=True")):
        m = Attn(embed_dim=4, num_heads=2, batch_first=True, **kw).to(DT).eval()
        with pytest.raises(
            AttributionError,
            match=rf"^tdfunc\.lrp: nn\.MultiheadAttention 'attn' has {what}, which tdfunc\.lrp_rules\.attention does not support; build it without, or give it tdfunc\.lrp_rules\.gradient\(\) \(its plain gradient\)\.$",
        ):
            run(m, composite="attnlrp")
    m = Attn(embed_dim=4, num_heads=2, batch_first=True, dropout=0.1).to(DT)  # training mode
    before = [p.clone() for p in m.parameters()]
    with pytest.raises(
        AttributionError,
        match=r"^tdfunc\.lrp: nn\.MultiheadAttention 'attn' is in training mode with dropout=0\.1; f runs twice and must be deterministic: call \.eval\(\) on the model \(or build it with dropout=0\.0\)\.$",
    ):
        run(m, composite="attnlrp")
    assert m.training and all(torch.equal(a, b) for a, b in zip(before, m.parameters()))  # nothing changed
    with pytest.raises(
        AttributionError,
        match=r"^tdfunc\.lrp: rules pattern 'attn\.out_proj' matches 'attn\.out_proj', the output projection of nn\.MultiheadAttention 'attn', which uses its weight directly \(the submodule never runs\); give the attention module a rule instead, e\.g\. rules=\{'attn': tdfunc\.lrp_rules\.attention\(eps=0\.1\)\}\.$",
    ):
        run(m.eval(), rules={"attn.out_proj": lrp_epsilon(0.1)})
    with pytest.raises(
        AttributionError,
        match=r"^tdfunc\.lrp: rules gives Linear the rule tdfunc\.lrp_rules\.attention\(eps=1e-06, softmax='attnlrp'\), which applies to nn\.MultiheadAttention only; give Linear a rule that applies to it \(tdfunc\.lrp_rules\.gradient\(\) and tdfunc\.lrp_rules\.ignore\(\) apply to any module\), or remove that entry\.$",
    ):
        run(m, rules={nn.Linear: lrp_attention()})
    with pytest.raises(
        AttributionError,
        match=r"^tdfunc\.lrp: rules pattern 'attn' matches 'attn' \(MultiheadAttention\), but tdfunc\.lrp_rules\.identity\(\) applies to elementwise modules \(not nn\.Linear, nn\.ConvNd, nn\.MultiheadAttention or nn\.Softmax\) only; narrow the pattern to those modules\.$",
    ):
        run(m, rules={"attn": lrp_identity()})


def test_identity_and_layer_errors():
    x = torch.randn(2, 4, dtype=DT)
    td = TensorDict({"x": x}, batch_size=[2])
    m = nn.Sequential(nn.Linear(4, 4), nn.SiLU(inplace=True), nn.Linear(4, 2)).to(DT)
    with pytest.raises(
        AttributionError,
        match=r"^tdfunc\.lrp: tdfunc\.lrp_rules\.identity\(\) at '1' needs the input of SiLU\(inplace=True\), which the module overwrites; build it with inplace=False, or give it tdfunc\.lrp_rules\.gradient\(\)\.$",
    ):
        lrp(lambda t: m(t["x"]), td, m, composite="attnlrp")
    m = nn.Sequential(nn.Linear(4, 4), nn.AdaptiveAvgPool1d(2)).to(DT)
    with pytest.raises(
        AttributionError,
        match=r"^tdfunc\.lrp: tdfunc\.lrp_rules\.identity\(\) at '1' \(AdaptiveAvgPool1d\) needs an elementwise module whose output has its input's shape, got input \(2, 4\) and output \(2, 2\); use tdfunc\.lrp_rules\.gradient\(\) or tdfunc\.lrp_rules\.ignore\(\) there\.$",
    ):
        lrp(lambda t: m(t["x"]), td, m, rules={"1": lrp_identity()})
    layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, activation="gelu", batch_first=True)
    with pytest.raises(
        AttributionError,
        match=r"^tdfunc\.lrp: composite 'attnlrp' gives activation modules the identity rule, but TransformerEncoderLayer '0' calls its activation as a function \('gelu'\), which no rule can reach; build the layer with a module, e\.g\. activation=nn\.GELU\(\)\.$",
    ):
        lrp(lambda t: layer(t["x"][:, None]).sum((1, 2)), td, nn.Sequential(layer), composite="attnlrp")


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_nested_tensor_input_error():
    torch.manual_seed(19)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2).to(DT).eval()
    state = tdfunc.state(enc)
    kpm = torch.tensor([[False, False, False, True], [False, False, True, True]])
    td = TensorDict({"x": torch.randn(2, 4, 8, dtype=DT)}, batch_size=[2])
    f = lambda t: tdfunc.functional_call(enc, state, (t["x"],), {"src_key_padding_mask": kpm})[:, 0]
    with pytest.raises(
        AttributionError,
        match=r"^tdfunc\.lrp: module 'layers\.0\.self_attn' received a nested tensor: nn\.TransformerEncoder converts its input to one \(its fast path\) in eval mode when given a src_key_padding_mask and nothing requires grad; build the encoder with enable_nested_tensor=False\.$",
    ):
        lrp(f, td, enc, composite="attnlrp")
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False
    )
    enc = enc.to(DT).eval()
    R = lrp(lambda t: enc(t["x"], src_key_padding_mask=kpm)[:, 0], td, enc, composite="attnlrp")["attr", "x"]
    assert R.isfinite().all() and (R[1, :, 2:] == 0).all()  # padded keys get no relevance


def test_rewrite_mismatch_error():
    m = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)).to(DT)
    td = TensorDict({"x": torch.randn(2, 4, dtype=DT)}, batch_size=[2])
    calls = []

    def f(t):  # runs the GELU once in the first forward, twice in the second
        calls.append(1)
        h = m[1](m[0](t["x"]))
        return m[2](m[1](h) if len(calls) > 1 else h)

    with pytest.raises(
        tdfunc.NotReachedError,
        match=r"^tdfunc\.lrp: f called the GELU module '1' more often, or with other shapes, than in the first of its two forwards; f must be deterministic \(put dropout layers in eval\(\)\)\.$",
    ):
        lrp(f, td, m, composite="attnlrp")


@pytest.mark.parametrize("mode", ["attnlrp", "constant"])
def test_transformer_one_pass_under_no_grad_equals_two_passes(mode):
    m, x = tiny(3)
    rules = {nn.MultiheadAttention: lrp_attention(softmax=mode)}
    two = attnlrp(m, x, rules)
    with torch.no_grad():
        one = attnlrp(m, x, rules)
    torch.testing.assert_close(one, two, rtol=0, atol=1e-12)
