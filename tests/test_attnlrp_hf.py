"""AttnLRP on transformers models: ``tdfunc.lrp(f, td, model, composite="attnlrp")`` (and explicit rules).

* against LXT 2.1's efficient mode (the AttnLRP authors' monkey-patches of transformers' Llama, Qwen2, GPT-2 and
  BERT), through the relevances ``tools/lxt_reference.py`` saved in ``tests/data/attnlrp_lxt_*.pt`` (LXT does
  not import beside transformers 5.x; the script runs in its own environment, see its docstring).  Like for
  like: LXT's efficient mode is the ε → 0 limit of the rules (a linear layer keeps its gradient, each factor of
  a product gets exactly half), so the comparison gives ``nn.Linear`` / ``Conv1D`` ``epsilon(0.0)`` and the
  products ``uniform(0.0)``; the composite's default ε = 1e-6 is checked separately;
* conservation on bias-free tiny Llama (CP-LRP: ΣR = f; AttnLRP: at every rewritten call);
* a slow hand-written AttnLRP of one Llama block (relevance propagated equation by equation, as in the paper)
  and ``d‖R‖²/dθ`` against autograd through it;
* the check that names an operation no rule covers (sdpa attention, a hand-written attention), pinned errors;
* SmolLM2-135M (real weights): a token heatmap for a completion.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torch import nn

import tdfunc
from tdfunc import AttributionError

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

L = tdfunc.lrp_rules
DATA = Path(__file__).parent / "data"
DT = torch.float64
CLASSES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config"),
    "bert": ("BertForSequenceClassification", "BertConfig"),
}
#: like-for-like with LXT's efficient mode: ε → 0 (LXT keeps the linear layers' gradient, halves products' gradients)
LXT_RULES = {
    "llama": {"model.layers.*.self_attn/matmul": L.uniform(0.0), "model.layers.*.mlp/mul": L.uniform(0.0)},
    "qwen2": {"model.layers.*.self_attn/matmul": L.uniform(0.0), "model.layers.*.mlp/mul": L.uniform(0.0)},
    "gpt2": {"transformer.h.*.attn/matmul": L.uniform(0.0), Conv1D: L.epsilon(0.0)},
    "bert": {"bert.encoder.layer.*.attention.self/matmul": L.uniform(0.0)},
}
#: max |tdfunc − LXT| / max |LXT| reached (float64).  Llama / Qwen2: their eager attention takes the softmax in
#: float32 (softmax(..., dtype=torch.float32)) and their RMSNorm in float32 (hidden_states.to(torch.float32)) on
#: both sides, so relevance is float32-rounded there.
#: GPT-2 / BERT: LXT's identity rule divides by (x + 1e-10), tdfunc by x.
TOL = {"llama": 2e-7, "qwen2": 2e-7, "gpt2": 1e-8, "bert": 1e-8}


def _saved(name: str):
    d = torch.load(DATA / f"attnlrp_lxt_{name}.pt", weights_only=True)
    cls, cfg = CLASSES[name]
    model = getattr(transformers, cls)(getattr(transformers, cfg)(**d["config"], attn_implementation="eager"))
    model = model.to(DT).eval()
    model.load_state_dict(d["state"])  # transformers 4.51.3 and 5.x name these models' weights alike
    emb = model.get_input_embeddings()(d["ids"]).detach()
    t = d["targets"]
    if name == "bert":
        f = lambda td: model(inputs_embeds=td["e"]).logits.gather(-1, t[:, None])[:, 0]  # noqa: E731
    else:
        f = lambda td: model(inputs_embeds=td["e"]).logits[:, -1].gather(-1, t[:, None])[:, 0]  # noqa: E731
    return model, f, TensorDict({"e": emb}, batch_size=[2]), d


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach())


@pytest.mark.parametrize("name", list(CLASSES))
def test_equals_lxt_efficient(name):
    model, f, td, d = _saved(name)
    torch.testing.assert_close(f(td), d["logits"], rtol=1e-12, atol=1e-14)  # the same model
    rules = {nn.Linear: L.epsilon(0.0), **LXT_RULES[name]}
    ours = tdfunc.lrp(f, td, model, composite="attnlrp", rules=rules)["attr", "e"]
    assert _rel(ours, d["relevance"]) < TOL[name]
    with torch.no_grad():  # one pass: the same values
        one = tdfunc.lrp(f, td, model, composite="attnlrp", rules=rules)["attr", "e"]
    torch.testing.assert_close(one, ours, rtol=1e-12, atol=1e-15)
    # not a test that cannot fail: the plain gradient is far off, the default ε = 1e-6 close
    assert _rel(tdfunc.input_x_gradient(f, td)["attr", "e"], d["relevance"]) > 0.1
    assert _rel(tdfunc.lrp(f, td, model, composite="attnlrp")["attr", "e"], d["relevance"]) < 1e-2


@pytest.mark.parametrize("name", list(CLASSES))
def test_attnlrp_eps0_composite_equals_lxt(name):
    """tdfunc.lrp_rules.attnlrp(0.0): LXT's ε → 0 limit in one argument (Conv1D, BERT's matmuls included)."""
    model, f, td, d = _saved(name)
    ours = tdfunc.lrp(f, td, model, composite=L.attnlrp(0.0))["attr", "e"]
    assert _rel(ours, d["relevance"]) < TOL[name]


def test_cp_lrp_equals_lxt_cp():
    """softmax="constant": CP-LRP, LXT's cp_LRP map (probabilities and the MLP gate constant) on the same Llama."""
    d = torch.load(DATA / "attnlrp_lxt_llama_cp.pt", weights_only=True)
    model, f, td, _ = _saved("llama")
    torch.testing.assert_close(f(td), d["logits"], rtol=1e-12, atol=1e-14)
    ours = tdfunc.lrp(f, td, model, composite=L.attnlrp(0.0, softmax="constant"))["attr", "e"]
    # transformers' LlamaRMSNorm computes in float32 also in a float64 model; LXT's relevance goes through its
    # float32 gradient there (tdfunc's through the ratio y / x of the recorded values, which conserves exactly)
    assert _rel(ours, d["relevance"]) < 2e-7
    # ... and it conserves (bias-free Llama, every rule conservative): ΣR = f
    torch.testing.assert_close(ours.sum((-1, -2)), f(td), rtol=1e-10, atol=1e-12)
    assert _rel(ours, tdfunc.lrp(f, td, model, composite=L.attnlrp(0.0))["attr", "e"]) > 1e-2


def test_attnlrp_constructor_errors():
    with pytest.raises(AttributionError) as err:
        L.attnlrp(softmax="cp")
    assert str(err.value) == (
        "tdfunc.lrp_rules.attnlrp: softmax must be 'attnlrp' (relevance through the softmax, AttnLRP) or 'constant' "
        "(attention probabilities held constant, CP-LRP), got 'cp'."
    )
    with pytest.raises(
        AttributionError, match=r"^tdfunc\.lrp_rules\.attnlrp: eps must be a finite number >= 0, got -1\.0\.$"
    ):
        L.attnlrp(-1.0)
    with pytest.raises(TypeError, match=r"^tdfunc\.lrp_rules\.attnlrp: eps must be a float, got str \('x'\)\.$"):
        L.attnlrp("x")


def test_composite_puts_the_uniform_rule_on_attention_and_gated_mlp():
    model, f, td, _ = _saved("llama")
    default = tdfunc.lrp(f, td, model, composite="attnlrp")["attr", "e"]
    spelled = {"model.layers.*.self_attn/matmul": L.uniform(1e-6), "model.layers.*.mlp/mul": L.uniform(1e-6)}
    torch.testing.assert_close(
        tdfunc.lrp(f, td, model, composite="attnlrp", rules=spelled)["attr", "e"], default, rtol=0, atol=0
    )
    for key in spelled:  # each of the two is in effect
        other = {**spelled, key: L.gradient()}
        assert _rel(tdfunc.lrp(f, td, model, composite="attnlrp", rules=other)["attr", "e"], default) > 1e-3
    # the RMSNorm modules (LlamaRMSNorm is not nn.RMSNorm) get the norm rule: their gradient differs
    norm_grad = {transformers.models.llama.modeling_llama.LlamaRMSNorm: L.gradient()}
    assert _rel(tdfunc.lrp(f, td, model, composite="attnlrp", rules=norm_grad)["attr", "e"], default) > 1e-3


def _tiny_llama(seed: int = 0, layers: int = 1):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=11,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg).to(DT).eval()
    with torch.no_grad():  # norm weights away from 1: the norm rule must use them
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_conservation_bias_free_llama():
    model = _tiny_llama(1, layers=2)  # Llama has no biases
    e = torch.randn(3, 5, 8, dtype=DT)
    td = TensorDict({"e": e}, batch_size=[3])
    f = lambda t: model(inputs_embeds=t["e"]).logits[:, -1, 4]  # noqa: E731
    # CP-LRP (probabilities constant, A·V linear in V) with ε = 0: every rule conserves, ΣR = f
    cp = {
        "model.layers.*.self_attn/softmax": L.ignore(),
        "model.layers.*.self_attn/matmul": L.gradient(),
        "model.layers.*.mlp/mul": L.uniform(0.0),
        nn.Linear: L.epsilon(0.0),
    }
    r = tdfunc.lrp(f, td, model, composite="attnlrp", rules=cp)["attr", "e"]
    torch.testing.assert_close(r.sum((-1, -2)), f(td), rtol=1e-10, atol=1e-12)
    # AttnLRP: the softmax rule is not conservative, every rewritten call is (checked call by call)
    rules = {**LXT_RULES["llama"], nn.Linear: L.epsilon(0.0)}
    tdfunc.lrp(f, td, model, composite="attnlrp", rules=rules, check_conservation=(1e-9, 1e-7))


def _rot_t(y: torch.Tensor) -> torch.Tensor:
    """The transpose of transformers' rotate_half (cat(-x2, x1)): cat(y2, -y1)."""
    h = y.shape[-1] // 2
    return torch.cat([y[..., h:], -y[..., :h]], -1)


def _rot(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


def _stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def _reference(model, w: dict, e: torch.Tensor, target: int, eps: float) -> torch.Tensor:
    """AttnLRP of a one-block Llama, relevance propagated equation by equation (AttnLRP, Achtibat et al. 2024):
    ε on the linear maps, uniform-ε on q kᵀ, A v and act(gate) ⊙ up, the softmax rule x ⊙ (R − s ΣR), identity on
    SiLU and on the RMSNorms (1 / rms held constant), LRP-0 (proportional split) on residual sums, the rotary map
    and the mask sum.  ``w``: the weights, so that autograd through this function gives d‖R‖²/dθ."""
    cfg = model.config
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    B, T, D = e.shape
    rms = lambda x, g: g * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)  # noqa: E731
    eps_lin = lambda x, W, z, R: x * ((R / _stab(z, eps)) @ W)  # noqa: E731
    heads = lambda t, h: t.view(B, T, h, hd).transpose(1, 2)  # noqa: E731
    lay = "model.layers.0."
    x0 = e
    h1 = rms(x0, w[lay + "input_layernorm.weight"])
    q, k, v = (h1 @ w[lay + f"self_attn.{p}_proj.weight"].T for p in "qkv")
    qh, kh, vh = heads(q, nh), heads(k, nkv), heads(v, nkv)
    cos, sin = model.model.rotary_emb(e, torch.arange(T)[None])
    cos, sin = cos[:, None], sin[:, None]
    qr, kr = qh * cos + _rot(qh) * sin, kh * cos + _rot(kh) * sin
    rep = nh // nkv
    krep, vrep = kr.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
    S = qr @ krep.transpose(-1, -2)
    Ss = S * hd**-0.5
    masked = torch.ones(T, T, dtype=torch.bool).triu(1)
    Sm = Ss.masked_fill(masked, torch.finfo(DT).min)
    A = torch.softmax(Sm, -1, dtype=torch.float32).to(DT)  # as transformers' eager attention
    O = A @ vrep
    o = O.transpose(1, 2).reshape(B, T, D)
    a = o @ w[lay + "self_attn.o_proj.weight"].T
    x1 = x0 + a
    h2 = rms(x1, w[lay + "post_attention_layernorm.weight"])
    g, u = h2 @ w[lay + "mlp.gate_proj.weight"].T, h2 @ w[lay + "mlp.up_proj.weight"].T
    sg = torch.nn.functional.silu(g)
    p = sg * u
    d = p @ w[lay + "mlp.down_proj.weight"].T
    x2 = x1 + d
    h3 = rms(x2, w["model.norm.weight"])
    logits = h3 @ w["lm_head.weight"].T
    R = torch.zeros_like(logits)
    R[:, -1, target] = logits[:, -1, target]
    # backwards, relevance by relevance
    R_x2 = eps_lin(h3, w["lm_head.weight"], logits, R)  # identity through the norm
    R_x1, R_d = x1 * R_x2 / x2, d * R_x2 / x2
    R_p = eps_lin(p, w[lay + "mlp.down_proj.weight"], d, R_d)
    c = R_p / _stab(2 * p, eps)
    R_g, R_u = sg * c * u, u * c * sg  # uniform on sg ⊙ u, identity through SiLU
    R_x1 = (
        R_x1 + eps_lin(h2, w[lay + "mlp.gate_proj.weight"], g, R_g) + eps_lin(h2, w[lay + "mlp.up_proj.weight"], u, R_u)
    )
    R_x0, R_a = x0 * R_x1 / x1, a * R_x1 / x1
    R_O = eps_lin(o, w[lay + "self_attn.o_proj.weight"], a, R_a).view(B, T, nh, hd).transpose(1, 2)
    c = R_O / _stab(2 * O, eps)
    R_A, R_vrep = A * (c @ vrep.transpose(-1, -2)), vrep * (A.transpose(-1, -2) @ c)
    R_Sm = Sm * (R_A - A * R_A.sum(-1, keepdim=True))  # the softmax rule (Prop. 3.1)
    R_S = torch.where(masked, 0.0, R_Sm)  # the mask (a constant) takes the rest of the masked entries' (zero) sum
    c = R_S / _stab(2 * S, eps)
    R_qr, R_krep = qr * (c @ krep), krep * (c.transpose(-1, -2) @ qr)
    R_kr = R_krep.view(B, nkv, rep, T, hd).sum(2)
    R_v = R_vrep.view(B, nkv, rep, T, hd).sum(2)
    R_q = qh * ((R_qr / qr) * cos + _rot_t((R_qr / qr) * sin))  # the rotary map is linear: LRP-0
    R_k = kh * ((R_kr / kr) * cos + _rot_t((R_kr / kr) * sin))
    flat = lambda t: t.transpose(1, 2).reshape(B, T, -1)  # noqa: E731
    for name, z, Rz in (("q", q, flat(R_q)), ("k", k, flat(R_k)), ("v", v, flat(R_v))):
        R_x0 = R_x0 + eps_lin(h1, w[lay + f"self_attn.{name}_proj.weight"], z, Rz)
    return R_x0


def test_llama_block_equals_hand_written_reference_and_its_weight_gradient():
    model = _tiny_llama(2)
    state = tdfunc.state(model)
    e = torch.randn(2, 5, 8, dtype=DT)
    td = TensorDict({"e": e}, batch_size=[2])
    w = {k: v for k, v in model.state_dict().items()}
    ref = _reference(model, w, e, 3, 1e-6)
    f = lambda t: model(inputs_embeds=t["e"]).logits[:, -1, 3]  # noqa: E731
    ours = tdfunc.lrp(f, td, model, composite="attnlrp")["attr", "e"]
    # the softmax is taken in float32 by transformers' eager attention (on both sides): its Jacobian is float32 there
    assert _rel(ours, ref) < 1e-6
    keys = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight", "model.norm.weight"]

    def ours_loss(ws):
        s = state.update({tuple(k.split(".")): v for k, v in ws.items()}, inplace=False)
        g = lambda t: tdfunc.functional_call(model, s, (), {"inputs_embeds": t["e"]}).logits[:, -1, 3]  # noqa: E731
        return tdfunc.lrp(g, td, model, composite="attnlrp")["attr", "e"].pow(2).sum()

    ws = {k: w[k].clone().requires_grad_(True) for k in keys}
    (ga,) = [torch.autograd.grad(ours_loss(ws), list(ws.values()))]
    ws2 = {k: w[k].clone().requires_grad_(True) for k in keys}
    (gb,) = [torch.autograd.grad(_reference(model, {**w, **ws2}, e, 3, 1e-6).pow(2).sum(), list(ws2.values()))]
    for k, a, b in zip(keys, ga, gb):
        assert _rel(a, b) < 1e-5, k


def test_sdpa_and_uncovered_products_are_named():
    torch.manual_seed(3)
    cfg = transformers.BertConfig(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=8,
        attn_implementation="sdpa",
    )
    bert = transformers.BertModel(cfg).to(DT).eval()
    td = TensorDict({"e": torch.randn(2, 4, 8, dtype=DT)}, batch_size=[2])
    f = lambda t: bert(inputs_embeds=t["e"]).last_hidden_state[:, 0].sum(-1)  # noqa: E731
    msg = (
        "tdfunc.lrp: composite 'attnlrp' cannot reach inside the 'scaled_dot_product_attention' called by "
        "'encoder.layer.0.attention.self' (BertSelfAttention): the attention matmuls and softmax run in one fused "
        "kernel. Load the model with eager attention (transformers: from_pretrained(..., attn_implementation='eager'), "
        "or model.set_attn_implementation('eager')), whose matmuls the rules reach."
    )
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode), pytest.raises(AttributionError) as err:
            tdfunc.lrp(f, td, bert, composite="attnlrp")
        assert str(err.value) == msg
    bert.set_attn_implementation("eager")  # then it runs (the attention matmuls get the uniform rule)
    assert tdfunc.lrp(f, td, bert, composite="attnlrp")["attr", "e"].isfinite().all()

    class Attn(nn.Module):  # a hand-written attention: no q_proj / k_proj / v_proj for the composite to recognise
        def __init__(self):
            super().__init__()
            self.qk = nn.Linear(4, 8)

        def forward(self, x):
            q, k = self.qk(x).chunk(2, -1)
            return torch.softmax(q @ k.transpose(-1, -2), -1) @ x

    net = nn.Sequential(Attn(), nn.Flatten(), nn.Linear(12, 2)).to(DT)
    tx = TensorDict({"x": torch.randn(2, 3, 4, dtype=DT)}, batch_size=[2])
    with pytest.raises(AttributionError) as err:
        tdfunc.lrp(lambda t: net(t["x"]), tx, net, composite="attnlrp")
    assert str(err.value) == (
        "tdfunc.lrp: composite 'attnlrp' has no rule for the 'matmul' called by '0' (Attn) (2 calls), a product of "
        "two tensors (AttnLRP: the uniform rule); its plain gradient would be used silently. Give it a rule, e.g. "
        "rules={'0/matmul': tdfunc.lrp_rules.uniform()}, or tdfunc.lrp_rules.gradient() there to keep the plain "
        "gradient on purpose."
    )
    r = tdfunc.lrp(lambda t: net(t["x"]), tx, net, composite="attnlrp", rules={"0/matmul": L.uniform()})
    kept = tdfunc.lrp(lambda t: net(t["x"]), tx, net, composite="attnlrp", rules={"0/matmul": L.gradient()})
    assert _rel(r["attr", "x"], kept["attr", "x"]) > 1e-3


def test_operation_site_rules_pinned_errors():
    model = _tiny_llama(4)
    td = TensorDict({"e": torch.randn(1, 3, 8, dtype=DT)}, batch_size=[1])
    f = lambda t: model(inputs_embeds=t["e"]).logits[:, -1, 0]  # noqa: E731
    cases = {
        "model.layers.*.self_attn/matmul@1": (
            L.uniform(),
            "tdfunc.lrp: rules key 'model.layers.*.self_attn/matmul@1' is not an operation site 'path/op' (every call "
            "of op by the module's forward), e.g. 'model.layers.*.self_attn/matmul'; rules takes no ':input', "
            "':output' or '@k' suffix.",
        ),
        "model.layers.*.self_attn/matmull": (
            L.uniform(),
            "tdfunc.lrp: rules key 'model.layers.*.self_attn/matmull' names the operation 'matmull', which is not one "
            "tdfunc sees; choose one of softmax, log_softmax, matmul, bmm, baddbmm, einsum, "
            "scaled_dot_product_attention, mul, add, sub, div, layer_norm, rms_norm, group_norm, linear, gelu, silu, "
            "relu, tanh, sigmoid, exp, cat. Did you mean 'matmul', 'mul'?",
        ),
        "model.layers.*.self_attn/softmax": (
            L.epsilon(),
            "tdfunc.lrp: rules gives the operation site 'model.layers.*.self_attn/softmax' the rule "
            "tdfunc.lrp_rules.epsilon(eps=1e-06), which rewrites modules (nn.Linear and nn.ConvNd / nn.ConvTransposeNd), "
            "not operations; give it a rule for that "
            "operation (tdfunc.lrp_rules.uniform() for products, identity() for elementwise non-linearities, "
            "gradient() or ignore() for any).",
        ),
        "model.layers.*.attn/matmul": (
            L.uniform(),
            "tdfunc.lrp: rules key 'model.layers.*.attn/matmul': pattern 'model.layers.*.attn' matches no submodule "
            "of LlamaForCausalLM. Did you mean 'model.layers.0.self_attn', 'model.layers.0', 'model.layers'? Its "
            "submodules are ['model', 'model.embed_tokens', 'model.layers', 'model.layers.0', "
            "'model.layers.0.self_attn', 'model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj', "
            "'model.layers.0.self_attn.v_proj', 'model.layers.0.self_attn.o_proj', 'model.layers.0.mlp', "
            "'model.layers.0.mlp.gate_proj', 'model.layers.0.mlp.up_proj', ...].",
        ),
    }
    for key, (rule, msg) in cases.items():
        with pytest.raises(AttributionError) as err:
            tdfunc.lrp(f, td, model, composite="attnlrp", rules={key: rule})
        assert str(err.value) == msg
    with pytest.raises(AttributionError) as err:
        tdfunc.lrp(f, td, model, rules={nn.Linear: L.uniform()}, composite=None)
    assert "rules gives Linear the rule tdfunc.lrp_rules.uniform(eps=1e-06), which applies to operation sites" in str(
        err.value
    )
    # a product with a constant at a uniform-rule site (the attention's scaling multiply)
    with pytest.raises(AttributionError) as err:
        tdfunc.lrp(f, td, model, composite="attnlrp", rules={"model.layers.0.self_attn/mul": L.uniform()})
    assert str(err.value).startswith(
        "tdfunc.lrp: tdfunc.lrp_rules.uniform(eps=1e-06) at 'model.layers.0.self_attn/mul' (mul) needs a product of "
        "two tensors, got 1 tensor operand(s)"
    ), str(err.value)
    with pytest.raises(
        AttributionError, match=r"^tdfunc\.lrp_rules\.uniform: eps must be a finite number >= 0, got -1\.0\.$"
    ):
        L.uniform(-1.0)
    with pytest.raises(TypeError, match=r"^tdfunc\.lrp_rules\.uniform: eps must be a float, got str \('a'\)\.$"):
        L.uniform("a")


def test_gpt2_conv1d_gets_epsilon():
    model, f, td, d = _saved("gpt2")
    base = tdfunc.lrp(f, td, model, composite="attnlrp")["attr", "e"]
    explicit = tdfunc.lrp(f, td, model, composite="attnlrp", rules={Conv1D: L.epsilon(1e-6)})["attr", "e"]
    torch.testing.assert_close(explicit, base, rtol=0, atol=0)
    zplus = tdfunc.lrp(f, td, model, composite="attnlrp", rules={Conv1D: L.zplus()})["attr", "e"]
    assert _rel(zplus, base) > 1e-3


def test_smollm2_token_heatmap(smollm2):
    """Real weights: the relevance of each prompt token for the completion ' Paris'."""
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    paris = tok(" Paris").input_ids[0]
    td = TensorDict({"e": model.get_input_embeddings()(ids).detach()}, batch_size=[1])
    f = lambda t: model(inputs_embeds=t["e"]).logits[:, -1, paris]  # noqa: E731
    with torch.no_grad():
        r = tdfunc.lrp(f, td, model, composite="attnlrp")["attr", "e"]
        y = f(td)
    heat = r.sum(-1)[0]
    assert r.isfinite().all() and heat.shape == (ids.shape[1],)
    assert 0.1 < float(heat.sum() / y) < 1.5  # the softmax rule is not conservative; the sum stays of f's order
    words = tok.convert_ids_to_tokens(ids[0])
    assert heat[words.index("ĠFrance")] > heat[words.index("Ġof")]  # the country matters more than 'of'
