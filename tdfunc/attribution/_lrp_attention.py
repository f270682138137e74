"""AttnLRP pieces: ``nn.MultiheadAttention``'s forward recomputed with ε projections and uniform-ε matmuls
(:func:`attention`), and the uniform-ε rule for products of input-dependent values (:func:`uniform`), which
composite ``'attnlrp'`` puts on a transformers model's attention matmuls and gated-MLP product.

* matmul ``O = A B`` (QKᵀ, A·V), uniform ε rule, AttnLRP Prop. 3.3, ``R_A = A ⊙ ((R / stab(2 O)) Bᵀ)``: the
  product-rule Jacobian with the output gradient scaled by ``r = O / stab(2 O)``: ``O − r O + r ⊙ (A B)``;
* ε on a linear map, ``R_in = x ⊙ Wᵀ (R / stab(z))``: ``r = z / stab(z)`` on the bias-free product;
* softmax, Prop. 3.1: its own Jacobian (no rewrite), or constant probabilities (CP-LRP).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import public
from .._rewrite import main_output
from .._types import SoftmaxMode
from ._common import AttributionError
from ._lrp_rules import PRODUCT_OPS, Rule, check_float, stab

__all__ = ["attention", "uniform"]

_SOFTMAX_MODES: tuple[SoftmaxMode, ...] = ("attnlrp", "constant")


@public("tdfunc.lrp_rules.attention")
def attention(eps: float = 1e-6, softmax: SoftmaxMode = "attnlrp") -> Rule:
    """AttnLRP for ``nn.MultiheadAttention``: the module's forward recomputed with every piece rewritten.

    .. math::  q, k, v = x W_{q,k,v}^\\top + b\\ \\ (\\varepsilon),\\quad
        S = \\tfrac{1}{\\sqrt{d}}\\, q k^\\top\\ \\ (\\text{uniform-}\\varepsilon),\\quad
        A = \\mathrm{softmax}(S + M),\\quad O = A v\\ \\ (\\text{uniform-}\\varepsilon),\\quad
        y = O W_o^\\top + b_o\\ \\ (\\varepsilon)

    The projections get the ε rule ``R_in = x ⊙ Wᵀ (R / stab(z))``; both matmuls the uniform-ε rule
    of AttnLRP Prop. 3.3, ``R_A = A ⊙ ((R / stab(2 O)) Bᵀ)`` and ``R_B = B ⊙ (Aᵀ (R / stab(2 O)))``;
    the softmax either its AttnLRP rule (Prop. 3.1, its own Jacobian, ``softmax="attnlrp"``) or
    constant probabilities (``softmax="constant"``: CP-LRP of Ali et al. 2022 — relevance flows through
    the values only, and ``A v`` is then linear in ``v``).  Masks are constants: ``attn_mask`` (bool or
    float, 2-D or per head, causal included), ``key_padding_mask``, ``is_causal``; ``batch_first`` either
    way, unbatched inputs, cross-attention, separate ``kdim`` / ``vdim`` projections, with or without
    bias.  The ratios come from a first forward (two passes), so outer derivatives are exact; the module's
    own output is not used (its CPU flash-attention kernel has no double backward), and with
    ``need_weights=True`` the returned weights keep their plain gradient.

    Args:
        eps: ε of the four projections and the two matmuls (``stab(z) = z + ε sign z``), ``>= 0``.
        softmax: ``"attnlrp"`` (relevance through the softmax) or ``"constant"`` (CP-LRP).

    Returns:
        A :class:`Rule` for ``nn.MultiheadAttention`` (used by ``nn.TransformerEncoderLayer`` /
        ``nn.TransformerDecoderLayer``).

    Raises:
        AttributionError: a bad ``eps`` or ``softmax``; from :func:`tdfunc.lrp`: a module with
            ``add_bias_kv`` or ``add_zero_attn``, in training mode with ``dropout > 0``, or given nested
            tensors.
        TypeError: ``eps`` not a number.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=torch.nn.GELU(),
        ...                                          batch_first=True)
        >>> model = torch.nn.Sequential(layer, torch.nn.Linear(8, 3))
        >>> td = TensorDict({"x": torch.randn(4, 5, 8)}, batch_size=[4])
        >>> rules = {torch.nn.MultiheadAttention: tdfunc.lrp_rules.attention(eps=1e-6, softmax="constant")}
        >>> out = tdfunc.lrp(lambda t: model(t["x"])[:, -1], td, model, rules=rules, composite="attnlrp")
        >>> out["attr", "x"].shape                         # (batch, class, tokens, features)
        torch.Size([4, 3, 5, 8])

    References:
        Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin, Samek. AttnLRP: Attention-Aware
        Layer-Wise Relevance Propagation for Transformers. ICML 2024.
        Ali, Schnake, Eberle, Montavon, Müller, Wolf. XAI for Transformers: Better Explanations through
        Conservative Propagation. ICML 2022.

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward, exact),
    ``torch.compile(fullgraph=True)`` after :func:`tdfunc.install_sites`.
    """
    e = check_float("eps", eps)
    if not isinstance(softmax, str) or softmax not in _SOFTMAX_MODES:
        raise AttributionError(
            f"softmax must be 'attnlrp' (relevance through the softmax, AttnLRP) or 'constant' (attention "
            f"probabilities held constant, CP-LRP), got {softmax!r}."
        )
    return _Attention(e, softmax)


def _mha_call(
    query,
    key,
    value,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    average_attn_weights=True,
    is_causal=False,
):
    """``nn.MultiheadAttention.forward``'s arguments by name."""
    return query, key, value, key_padding_mask, need_weights, attn_mask, is_causal


def _float_mask(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = masked) as an additive ``-inf`` mask; float masks as given."""
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
    return m


def _mha_inputs(m: nn.MultiheadAttention, args, kwargs):
    """Query, key and value in ``(N, L, E)`` layout, and the layout to return to."""
    q, k, v, *_ = _mha_call(*args, **kwargs)
    batched = q.dim() == 3
    if not batched:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    elif not m.batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    return (q, k, v), (batched, m.batch_first)


def _mha_mask(m: nn.MultiheadAttention, args, kwargs, n: int, tgt: int, src: int, dtype, device):
    """The additive mask torch applies (``attn_mask`` + ``key_padding_mask``), broadcasting to ``(N, H, L, S)``."""
    _, _, _, kpm, need_weights, am, is_causal = _mha_call(*args, **kwargs)
    if is_causal and kpm is None and not need_weights:  # torch then ignores attn_mask and masks causally
        am = torch.ones(tgt, src, dtype=torch.bool, device=device).tril().logical_not()
    mask = None
    if am is not None:
        am = _float_mask(am, dtype)
        mask = am.view(n, m.num_heads, tgt, src) if am.dim() == 3 else am
    if kpm is not None:
        kpm = _float_mask(kpm, dtype).view(n, 1, 1, src)
        mask = kpm if mask is None else mask + kpm
    return mask


def _mha_weights(m: nn.MultiheadAttention):
    ws = m.in_proj_weight.chunk(3) if m._qkv_same_embed_dim else (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
    bs = (None,) * 3 if m.in_proj_bias is None else m.in_proj_bias.chunk(3)
    return ws, bs


def _eps_record(x, w, b, eps):
    """ε rule on ``x Wᵀ + b``: the output, the ratio ``z / stab(z)`` and ``S = r ⊙ x Wᵀ``."""
    lin = F.linear(x, w)
    z = lin if b is None else lin + b
    ratio = z / stab(z, eps)
    return z, ratio, ratio * lin


def _eps_apply(rec, x, w):
    z, ratio, s = rec
    return z - s + ratio * F.linear(x, w)


def _uniform_record(a, b, eps):
    """Uniform-ε rule on ``a @ b``: the product, the ratio ``z / stab(2 z)`` and ``S = r ⊙ z``."""
    z = a @ b
    ratio = z / stab(2 * z, eps)
    return z, ratio, ratio * z


def _uniform_apply(rec, a, b):
    z, ratio, s = rec
    return z - s + ratio * (a @ b)


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """``(N, L, E) -> (N, H, L, E / H)``."""
    return t.unflatten(-1, (h, t.shape[-1] // h)).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).flatten(-2)


def _mha_layout(y: torch.Tensor, layout) -> torch.Tensor:
    batched, batch_first = layout
    if not batched:
        return y[0]
    return y if batch_first else y.transpose(0, 1)


class _Attention(Rule):
    modules, targets, _public = (nn.MultiheadAttention,), "nn.MultiheadAttention", "attention"

    def __init__(self, eps: float, softmax: str):
        self.eps, self.softmax = eps, softmax

    def check(self, name, m):
        flags = (("add_bias_kv=True", m.bias_k is not None), ("add_zero_attn=True", m.add_zero_attn))
        bad = [what for what, on in flags if on]
        if bad:
            return (
                f"nn.MultiheadAttention {name!r} has {' and '.join(bad)}, which tdfunc.lrp_rules.attention does not "
                "support; build it without, or give it tdfunc.lrp_rules.gradient() (its plain gradient)."
            )
        if m.training and m.dropout > 0:
            return (
                f"nn.MultiheadAttention {name!r} is in training mode with dropout={m.dropout}; f runs twice "
                "and must be deterministic: call .eval() on the model (or build it with dropout=0.0)."
            )
        return None

    def record(self, m, args, kwargs, out):
        eps, const = self.eps, self.softmax == "constant"
        (q, k, v), layout = _mha_inputs(m, args, kwargs)
        mask = _mha_mask(m, args, kwargs, q.shape[0], q.shape[1], k.shape[1], q.dtype, q.device)
        (wq, wk, wv), (bq, bk, bv) = _mha_weights(m)
        h = m.num_heads
        scale = math.sqrt(1.0 / (q.shape[-1] // h))  # torch scales q by 1 / sqrt(head_dim) before q kᵀ
        rv = _eps_record(v, wv, bv, eps)
        if const:  # q and k reach the output only through the constant probabilities: no ratios needed
            rq = rk = rs = None
            qh, kt = _heads(F.linear(q, wq, bq), h) * scale, _heads(F.linear(k, wk, bk), h).transpose(-2, -1)
            zs = qh @ kt
        else:
            rq, rk = _eps_record(q, wq, bq, eps), _eps_record(k, wk, bk, eps)
            rs = _uniform_record(_heads(rq[0], h) * scale, _heads(rk[0], h).transpose(-2, -1), eps)
            zs = rs[0]
        probs = torch.softmax(zs if mask is None else zs + mask, -1)
        vh = _heads(rv[0], h)
        ro = (probs @ vh, None, None) if const else _uniform_record(probs, vh, eps)
        ry = _eps_record(_merge(ro[0]), m.out_proj.weight, m.out_proj.bias, eps)
        # the first forward continues with this value, not the module's: equal, and twice differentiable (the module's
        # CPU flash-attention kernel has no double backward)
        value = _mha_layout(ry[0], layout)
        return {"q": rq, "k": rk, "v": rv, "s": rs, "p": probs, "o": ro, "y": ry, "mask": mask, "value": value}

    def recorded_output(self, out, constants):
        return constants["value"]

    def rewrite(self, m, args, kwargs, out, rec):
        (q, k, v), layout = _mha_inputs(m, args, kwargs)
        (wq, wk, wv), _ = _mha_weights(m)
        h = m.num_heads
        vh = _heads(_eps_apply(rec["v"], v, wv), h)
        if self.softmax == "constant":  # A from the first forward: a constant here, A v linear in v
            o = rec["p"] @ vh
        else:
            scale = math.sqrt(1.0 / (q.shape[-1] // h))
            qh, kh = _heads(_eps_apply(rec["q"], q, wq), h) * scale, _heads(_eps_apply(rec["k"], k, wk), h)
            s = _uniform_apply(rec["s"], qh, kh.transpose(-2, -1))
            o = _uniform_apply(rec["o"], torch.softmax(s if rec["mask"] is None else s + rec["mask"], -1), vh)
        return _mha_layout(_eps_apply(rec["y"], _merge(o), m.out_proj.weight), layout)


class _Uniform(Rule):
    modules, ops, _public = (), PRODUCT_OPS, "uniform"
    targets = "operation sites of products of two tensors (matmul, bmm, mul, einsum)"

    def __init__(self, eps: float):
        self.eps = eps

    def record(self, module, args, kwargs, out):
        ts = [a for a in (args[1:] if args and isinstance(args[0], str) else args) if isinstance(a, torch.Tensor)]
        if len(ts) == 1 and isinstance(args[-1], (list, tuple)):  # einsum("...", [a, b])
            ts = [a for a in args[-1] if isinstance(a, torch.Tensor)]
        if len(ts) != 2:
            raise AttributionError(
                f"needs a product of two tensors, got {len(ts)} tensor operand(s); give that operation "
                "tdfunc.lrp_rules.gradient() (a product with a constant is linear: its gradient is the rule)."
            )
        z = main_output(out)
        # z / stab(2 z): each factor gets half the relevance (ε absorbs some); ε = 0: exactly 1/2, also where z = 0
        if self.eps == 0:
            return 0.5, 0.5 * z
        ratio = z / stab(2 * z, self.eps)
        return ratio, z - ratio * z

    def rewrite(self, module, args, kwargs, out, constants):
        ratio, c = constants  # c = z − r ⊙ z: value z, Jacobian ratio ⊙ (the op's own Jacobian), nothing recomputed
        return c + ratio * main_output(out)


@public("tdfunc.lrp_rules.uniform")
def uniform(eps: float = 1e-6) -> Rule:
    """The uniform-ε rule of AttnLRP (Prop. 3.3) for a product of two tensors at an operation site.

    .. math::  O = A B:\\quad R_A = A ⊙ \\big((R / \\mathrm{stab}(2 O))\\, B^\\top\\big),\\quad
        R_B = B ⊙ \\big(A^\\top (R / \\mathrm{stab}(2 O))\\big),\\qquad \\mathrm{stab}(z) = z + ε\\,\\mathrm{sign}\\,z

    Each factor gets half of the product's relevance (``ε`` absorbs a little, as in the ε rule).  In the
    input × gradient form that is the product's own Jacobian scaled by ``r = O / stab(2 O)``: the rewrite is
    ``O − r ⊙ O₁ + r ⊙ O`` (``O₁``, ``r`` from the first forward), so nothing is recomputed.  It applies to
    operation sites — ``matmul`` (``@``), ``bmm``, ``einsum`` with two operands and elementwise ``mul``
    (``*``) — named in ``rules`` as ``"path/op"`` (every call of ``op`` by that module's forward), e.g. the
    attention matmuls ``"model.layers.*.self_attn/matmul"`` (QKᵀ and A·V) or the gated-MLP product
    ``"model.layers.*.mlp/mul"``; composite ``'attnlrp'`` puts it there on transformers models.  With
    ``eps=0`` the ratio is exactly ``1/2`` (LXT's efficient mode, which halves the gradient).  A product
    with a constant (``x * 0.5``, a rotary ``q * cos``) is linear: keep its gradient.

    Args:
        eps: the stabilizer ``ε >= 0``.

    Returns:
        A :class:`Rule` for operation sites of ``matmul``, ``bmm``, ``mul`` and ``einsum``.

    Raises:
        AttributionError: a negative or non-finite ``eps``; from :func:`tdfunc.lrp`: a call of the operation
            that is not a product of two tensors.
        TypeError: ``eps`` not a number.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> class Gated(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Linear(3, 4, bias=False), torch.nn.Linear(3, 4, bias=False)
        ...     def forward(self, x):
        ...         return (self.a(x) * self.b(x)).sum(-1)
        >>> net = torch.nn.Sequential(Gated()).double()
        >>> td = TensorDict({"x": torch.randn(5, 3, dtype=torch.float64)}, batch_size=[5])
        >>> rules = {"0/mul": tdfunc.lrp_rules.uniform(0.0), torch.nn.Linear: tdfunc.lrp_rules.epsilon(0.0)}
        >>> r = tdfunc.lrp(lambda t: net(t["x"]), td, net, rules=rules, composite=None)["attr", "x"]
        >>> torch.allclose(r.sum(-1), net(td["x"]))          # conserved: half the relevance through each factor
        True

    References:
        Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin, Samek. AttnLRP: Attention-Aware
        Layer-Wise Relevance Propagation for Transformers. ICML 2024 (Prop. 3.3).

    Composes with: ``vmap``, ``grad`` (double backward, exact), ``torch.compile(fullgraph=True)`` after
    :func:`tdfunc.install_sites` with the operation sites.
    """
    return _Uniform(check_float("eps", eps))
