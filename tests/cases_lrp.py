"""Composition-table rows for tdfunc.lrp (rules as two-pass rewrites of module outputs: Linear / Conv2d, norms, attention, softmax, activations)."""

from __future__ import annotations

import torch
from compose_case import B, Case
from tensordict import TensorDict
from torch import nn

import tdfunc


class _ReluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(5, 6), nn.ReLU()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.act1(self.fc1(x)))


class _ReluCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(-3))


def cases() -> list[Case]:
    torch.manual_seed(0)
    dt = torch.float64
    mlp = _ReluMLP().to(dt)
    s_mlp = tdfunc.state(mlp)
    x5 = torch.randn(B, 5, dtype=dt)
    onehot = torch.eye(3, dtype=dt)
    rows = []

    def mlp_weights(x, weight):  # every class; d(relevance)/d(weights): the two-pass rewrite
        s = s_mlp.update({("fc1", "weight"): weight}, inplace=False)
        td = TensorDict({"x": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(mlp, s, (t["x"],))
        return tdfunc.lrp(f, td, mlp, composite="epsilon", rules={"fc1": tdfunc.lrp_rules.gamma(0.25)})["attr", "x"][
            0
        ].flatten()

    rows.append(
        Case(
            "lrp:mlp-K-weights",
            mlp,
            mlp_weights,
            (x5, s_mlp["fc1", "weight"].clone()),
            (0, None),
            (0, 1),
            "fc1",
            probe=x5,
        )
    )

    def site_weights(x, weight):  # relevance at sites (captum's LayerLRP), every class; d/d(fc1 weight)
        s = s_mlp.update({("fc1", "weight"): weight}, inplace=False)
        td = TensorDict({"x": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(mlp, s, (t["x"],))
        r = tdfunc.lrp(f, td, mlp, composite="epsilon", site=["fc1", "head:input"])["attr"]
        return torch.cat([r["fc1"][0].flatten(), r["head:input"][0].flatten()])

    rows.append(
        Case(
            "lrp:site-weights",
            mlp,
            site_weights,
            (x5, s_mlp["fc1", "weight"].clone()),
            (0, None),
            (0, 1),
            "fc1",
            probe=x5,
        )
    )

    def deconvnet_beta_smooth_weights(x, weight):  # zennit's DeconvNet / BetaSmooth composites; d/d(fc1 weight)
        s = s_mlp.update({("fc1", "weight"): weight}, inplace=False)
        td = TensorDict({"x": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(mlp, s, (t["x"],))
        a = tdfunc.lrp(f, td, mlp, composite="deconvnet")["attr", "x"]
        b = tdfunc.lrp(f, td, mlp, composite=None, rules={nn.ReLU: tdfunc.lrp_rules.beta_smooth(2.0)})["attr", "x"]
        c = tdfunc.lrp(f, td, mlp, composite=None, rules={nn.ReLU: tdfunc.lrp_rules.deconvnet()})["attr", "x"]
        return torch.cat([a.flatten(), b.flatten(), c.flatten()])

    rows.append(
        Case(
            "lrp:deconvnet-beta_smooth-weights",
            mlp,
            deconvnet_beta_smooth_weights,
            (x5, s_mlp["fc1", "weight"].clone()),
            (0, None),
            (0, 1),
            "fc1",
            probe=x5,
        )
    )

    def mlp_targets(x, w):  # vmap over targets: a one-hot target weight vector
        td = TensorDict({"x": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(mlp, s_mlp, (t["x"],)) @ w
        return tdfunc.lrp(f, td, mlp, rules={nn.Linear: tdfunc.lrp_rules.alpha_beta(2, 1)})["attr", "x"][0].flatten()

    rows.append(
        Case("lrp:mlp-targets-alpha_beta", mlp, mlp_targets, (x5[0], onehot), (None, 0), (0,), "head", probe=x5)
    )

    cnn = _ReluCNN().to(dt)
    s_cnn = tdfunc.state(cnn)
    img = torch.randn(B, 1, 3, 3, dtype=dt)

    def cnn_plus(x, weight):  # z+ on the conv, ε on the dense layer (epsilon_plus), every class
        s = s_cnn.update({("conv", "weight"): weight}, inplace=False)
        td = TensorDict({"img": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(cnn, s, (t["img"],))
        return tdfunc.lrp(f, td, cnn, composite="epsilon_plus")["attr", "img"][0].flatten()

    rows.append(
        Case(
            "lrp:cnn-epsilon_plus-weights",
            cnn,
            cnn_plus,
            (img, s_cnn["conv", "weight"].clone()),
            (0, None),
            (0, 1),
            "conv",
            probe=img,
        )
    )

    def rules_zbox_flat_wsquare_pass(x):  # every rule constructor, each on its own site pattern
        td = TensorDict({"x": x[None]}, batch_size=[1])
        rules = {"fc1": tdfunc.lrp_rules.zbox(-3.0, 3.0), "head": tdfunc.lrp_rules.epsilon(1e-3, zero_params="bias")}
        a = tdfunc.lrp(lambda t: tdfunc.functional_call(mlp, s_mlp, (t["x"],)), td, mlp, rules=rules)
        rules = {"fc1": tdfunc.lrp_rules.flat(), "head": tdfunc.lrp_rules.zplus()}
        b = tdfunc.lrp(lambda t: tdfunc.functional_call(mlp, s_mlp, (t["x"],)), td, mlp, rules=rules)
        rules = {"fc1": tdfunc.lrp_rules.wsquare(), "head": tdfunc.lrp_rules.gradient()}
        c = tdfunc.lrp(lambda t: tdfunc.functional_call(mlp, s_mlp, (t["x"],)), td, mlp, rules=rules)
        return torch.cat([a["attr", "x"].flatten(), b["attr", "x"].flatten(), c["attr", "x"].flatten()])

    x5_nonzero = x5.sign() * (x5.abs() + 0.1)  # flat / w^2 / zbox divide by the input
    rows.append(
        Case("lrp:rule-constructors", mlp, rules_zbox_flat_wsquare_pass, (x5_nonzero,), (0,), (0,), "fc1", probe=x5)
    )
    x5_zeros = x5.clamp(min=0)  # exact zeros: flat / w^2 / zbox give them relevance through a probe per call
    rows.append(
        Case(
            "lrp:rule-constructors-zero-inputs",
            mlp,
            rules_zbox_flat_wsquare_pass,
            (x5_zeros,),
            (0,),
            (0,),
            "fc1",
            probe=x5,
        )
    )

    bn_net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(dt).eval()
    with torch.no_grad():
        bn_net[1].running_mean.normal_()
        bn_net[1].running_var.uniform_(0.5, 2.0)
    s_bn = tdfunc.state(bn_net)

    def merge_batchnorm_lrp(x, w):  # a BN canonizer on a state that is itself vmapped / differentiated
        state = s_bn.copy().set(("0", "weight"), w)
        merged = tdfunc.lrp_rules.merge_batchnorm(bn_net, state)
        td = TensorDict({"x": x[None]}, batch_size=[1])
        out = tdfunc.lrp(lambda t: tdfunc.functional_call(bn_net, merged, (t["x"],)), td, bn_net, composite="epsilon")
        return torch.cat([out["attr", "x"].flatten(), tdfunc.functional_call(bn_net, merged, (x[None],)).flatten()])

    ws = s_bn["0", "weight"] + 0.1 * torch.randn(B, 6, 5, dtype=dt)
    rows.append(Case("lrp:merge-batchnorm", bn_net, merge_batchnorm_lrp, (x5, ws), (0, 0), (0, 1), "0", probe=x5))
    return rows + conv_cases(dt) + transformer_cases(dt) + hf_attnlrp_cases(dt)


class _Conv1dNet(nn.Module):
    """Conv1d, an unmerged BatchNorm, Tanh (both passed), a ConvTranspose1d decoder and a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(3), nn.Tanh()
        self.up, self.head = nn.ConvTranspose1d(3, 2, 2, stride=2), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.up(self.act(self.bn(self.conv(x)))).flatten(-2))


def conv_cases(dt) -> list[Case]:
    net = _Conv1dNet().to(dt).eval()
    s_net = tdfunc.state(net)
    x = torch.randn(B, 2, 4, dtype=dt)

    def conv1d_alpha2_beta1_weights(x, weight):  # zennit's composite name; d(relevance)/d(ConvTranspose1d weight)
        s = s_net.update({("up", "weight"): weight}, inplace=False)
        td = TensorDict({"x": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(net, s, (t["x"],))
        a = tdfunc.lrp(f, td, net, composite="EpsilonAlpha2Beta1")["attr", "x"]
        b = tdfunc.lrp(
            f,
            td,
            net,
            composite=tdfunc.lrp_rules.epsilon_gamma_box(-4.0, 4.0),
            rules={nn.Tanh: tdfunc.lrp_rules.passthrough()},
        )["attr", "x"]
        return torch.cat([a.flatten(), b.flatten()])

    rows = [
        Case(
            "lrp:conv1d-convT-epsilon_alpha2_beta1-gamma_box",
            net,
            conv1d_alpha2_beta1_weights,
            (x, s_net["up", "weight"].clone()),
            (0, None),
            (0, 1),
            "up",
            probe=x,
        )
    ]

    def output_relevance_weights(x, weight):  # zennit's attr_output as a function of the output; d/d(conv weight)
        s = s_net.update({("conv", "weight"): weight}, inplace=False)
        td = TensorDict({"x": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(net, s, (t["x"],))
        out = tdfunc.lrp(
            f,
            td,
            net,
            composite="epsilon_plus",
            output_relevance=lambda y: y.softmax(-1),
            check_conservation=(1e3, 1e3),
        )  # the check runs eagerly only (skipped inside transforms)
        return out["attr", "x"].flatten()

    rows.append(
        Case(
            "lrp:output_relevance-weights",
            net,
            output_relevance_weights,
            (x, s_net["conv", "weight"].clone()),
            (0, None),
            (0, 1),
            "conv",
            probe=x,
        )
    )

    plain = (
        nn.Sequential(
            nn.ConvTranspose1d(2, 2, 2, stride=2, bias=False),
            nn.BatchNorm1d(2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16, 3),
        )
        .to(dt)
        .eval()
    )
    with torch.no_grad():
        plain[1].running_mean.normal_()
        plain[1].running_var.uniform_(0.5, 2.0)
    biased = tdfunc.lrp_rules.with_zero_biases(plain)  # a bias-free transposed conv absorbs the BatchNorm
    s_b = tdfunc.state(biased)

    def merge_batchnorm_conv_transpose(x, weight):
        merged = tdfunc.lrp_rules.merge_batchnorm(biased, s_b.update({("0", "weight"): weight}, inplace=False))
        td = TensorDict({"x": x[None]}, batch_size=[1])
        out = tdfunc.lrp(lambda t: tdfunc.functional_call(biased, merged, (t["x"],)), td, biased)
        return out["attr", "x"].flatten()

    rows.append(
        Case(
            "lrp:with_zero_biases-merge_batchnorm-convT",
            biased,
            merge_batchnorm_conv_transpose,
            (x, s_b["0", "weight"].clone()),
            (0, None),
            (0, 1),
            "0",
            probe=x,
        )
    )
    return rows


# ------------------------------------------------------------------ transformer rules (AttnLRP)


class _Encoder(nn.Module):
    """One nn.TransformerEncoderLayer (GELU module, causal mask) and a linear head on the last token."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, activation=nn.GELU(), batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[-2], dtype=x.dtype)
        return self.head(self.layer(x, src_mask=mask, is_causal=True)[..., -1, :])


class _CrossAttention(nn.Module):
    """nn.MultiheadAttention, sequence-first, cross-attention with a key padding mask and need_weights=True."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, kdim=3, vdim=3)
        self.head = nn.Linear(4, 3)

    def forward(self, x, mem=None):  # x (L, N, 4), mem (S, N, 3) with S = 3
        mem = x[:3, :, :3] if mem is None else mem
        pad = torch.tensor([[False, False, True]]).expand(x.shape[1], 3)
        return self.head(self.attn(x, mem, mem, key_padding_mask=pad)[0][-1, 0])


class _HandAttention(nn.Module):
    """Attention written with modules: Linear projections, nn.Softmax, RMSNorm, a GELU MLP."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.softmax, self.norm = nn.Softmax(-1), nn.RMSNorm(4)
        self.fc, self.act, self.head = nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)

    def forward(self, x):
        s = self.q(x) @ self.k(x).transpose(-1, -2) / 2.0
        h = x + self.softmax(s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))) @ self.v(x)
        h = self.norm(h)
        return self.head((h + self.act(self.fc(h)))[..., -1, :])


def transformer_cases(dt) -> list[Case]:
    rows = []
    enc = _Encoder().to(dt).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorm affine parameters
        for p in enc.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    s_enc = tdfunc.state(enc)
    x = torch.randn(B, 3, 4, dtype=dt)

    def encoder_attnlrp(x, bias):  # every class; d(relevance)/d(attention's in-projection bias)
        s = s_enc.update({("layer", "self_attn", "in_proj_bias"): bias}, inplace=False)
        td = TensorDict({"x": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(enc, s, (t["x"],))
        return tdfunc.lrp(f, td, enc, composite="attnlrp")["attr", "x"][0].flatten()

    bias = s_enc["layer", "self_attn", "in_proj_bias"].clone()
    rows.append(
        Case(
            "lrp:encoder-attnlrp-weights",
            enc,
            encoder_attnlrp,
            (x, bias),
            (0, None),
            (0, 1),
            "layer.self_attn",
            probe=x,
        )
    )

    cross = _CrossAttention().to(dt).eval()
    s_cross = tdfunc.state(cross)
    xs, mem = torch.randn(B, 3, 1, 4, dtype=dt), torch.randn(3, 1, 3, dtype=dt)

    def cross_constant_targets(x, w):  # vmap over targets; CP-LRP (constant probabilities), sequence-first
        td = TensorDict({"x": x, "mem": mem}, batch_size=[])
        f = lambda t: tdfunc.functional_call(cross, s_cross, (t["x"], t["mem"])) @ w
        rules = {"attn": tdfunc.lrp_rules.attention(eps=1e-3, softmax="constant")}
        out = tdfunc.lrp(f, td, cross, rules=rules, composite="attnlrp")
        return torch.cat([out["attr", "x"].flatten(), out["attr", "mem"].flatten()])

    rows.append(
        Case(
            "lrp:cross-attention-constant-targets",
            cross,
            cross_constant_targets,
            (xs[0], torch.eye(3, dtype=dt)),
            (None, 0),
            (0,),
            "attn",
            probe=xs[0],
        )
    )

    hand = _HandAttention().to(dt)
    s_hand = tdfunc.state(hand)
    xh = torch.randn(B, 3, 4, dtype=dt)

    def softmax_identity_ignore_norm(x):  # each module rule by type or pattern
        td = TensorDict({"x": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(hand, s_hand, (t["x"],))
        rules = {
            nn.Softmax: tdfunc.lrp_rules.softmax(),
            nn.GELU: tdfunc.lrp_rules.identity(),
            "norm": tdfunc.lrp_rules.norm(),
            nn.Linear: tdfunc.lrp_rules.epsilon(0.01),
        }
        a = tdfunc.lrp(f, td, hand, rules=rules, composite=None)
        rules = {
            "softmax": tdfunc.lrp_rules.ignore(),
            nn.GELU: tdfunc.lrp_rules.gradient(),
            "norm": tdfunc.lrp_rules.identity(),
        }
        b = tdfunc.lrp(f, td, hand, rules=rules, composite="epsilon")
        return torch.cat([a["attr", "x"].flatten(), b["attr", "x"].flatten()])

    rows.append(
        Case(
            "lrp:softmax-identity-ignore-norm",
            hand,
            softmax_identity_ignore_norm,
            (xh,),
            (0,),
            (0,),
            "softmax",
            probe=xh,
        )
    )
    return rows


class _Logits(nn.Module):
    """A transformers language model as ``embeddings -> logits`` (a plain tensor in, a tensor out)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, e):
        return self.lm(inputs_embeds=e).logits


def hf_attnlrp_cases(dt) -> list[Case]:
    """composite 'attnlrp' on a transformers GPT-2 (Conv1D projections; the uniform rule on its attention matmuls
    as operation sites).  GPT-2, not Llama: Llama's eager attention takes its softmax in float32, which no float64
    gradcheck can see through."""
    try:
        import transformers
    except ImportError:  # transformers is a dev dependency; without it there is no row
        return []
    torch.manual_seed(5)
    cfg = transformers.GPT2Config(
        vocab_size=7, n_embd=4, n_layer=1, n_head=2, n_positions=8, n_inner=6, attn_implementation="eager"
    )
    gpt2 = _Logits(transformers.GPT2LMHeadModel(cfg)).to(dt).eval()
    s_gpt2 = tdfunc.state(gpt2)
    e = torch.randn(B, 3, 4, dtype=dt)
    key = ("lm", "transformer", "h", "0", "attn", "c_attn", "weight")

    def gpt2_attnlrp_weights(x, weight):  # d(relevance)/d(c_attn weight): through the uniform rule on q kᵀ and A v
        s = s_gpt2.update({key: weight}, inplace=False)
        td = TensorDict({"e": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(gpt2, s, (t["e"],))[:, -1, 2]
        rules = {"lm.transformer.h.*.attn/matmul": tdfunc.lrp_rules.uniform(1e-2)}
        comp = tdfunc.lrp_rules.attnlrp(1e-3)
        return tdfunc.lrp(f, td, gpt2, composite=comp, rules=rules)["attr", "e"][0].flatten()

    return [
        Case(
            "lrp:hf-gpt2-attnlrp-weights",
            gpt2,
            gpt2_attnlrp_weights,
            (e, s_gpt2[key].clone()),
            (0, None),
            (0, 1),
            "lm.transformer.h.0.attn",
            probe=e,
        )
    ]
