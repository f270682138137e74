"""Composition-table rows for operation sites, keyword-input sites and output-key sites (see test_compose.py).

A tiny float64 attention block whose forward calls ``torch.softmax``, ``@``, ``torch.einsum``,
``F.layer_norm`` and ``*`` itself (no submodule computes them), a block that takes a keyword input and
returns a dict: operation sites edited with a delta (vmapped, differentiated), a rule and a from_site
edit, an ``@k`` capture; a keyword input edited by name and a dict output captured and edited by key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from compose_case import B, Case

import tdfunc


class OpAttn(torch.nn.Module):
    def __init__(self, d: int = 4):
        super().__init__()
        self.q = torch.nn.Linear(d, d)
        self.ln = torch.nn.Parameter(torch.ones(d))

    def forward(self, x, scale=None):
        q = self.q(x)
        a = torch.softmax(q @ x.transpose(-1, -2) / 2.0, -1)
        h = torch.einsum("...ts,...sd->...td", a, x)
        h = F.layer_norm(h, h.shape[-1:], self.ln)
        return h * (x if scale is None else scale)


class Dict(torch.nn.Module):
    def __init__(self, d: int = 4):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x, *, scale):
        h = self.lin(x)
        return {"y": h * scale, "h": torch.tanh(h)}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = OpAttn()
        self.blk = Dict()

    def forward(self, x):
        h = self.attn(x)
        return self.blk(h, scale=x.sum(-1, keepdim=True))["y"]


def cases() -> list[Case]:
    torch.manual_seed(0)
    dt = torch.float64
    net = Net().to(dt)
    s = tdfunc.state(net)
    x = torch.randn(B, 3, 4, dtype=dt)
    d = torch.randn(B, 3, 3, dtype=dt) / 4
    u = torch.randn(B, 3, 1, dtype=dt)

    def op_delta(x, d):
        y, caps = tdfunc.functional_call(
            net, s, (x,), edits={"attn/softmax": tdfunc.delta(d)}, capture=["attn/matmul", "attn/softmax"]
        )
        return torch.cat([y.flatten(), caps["attn/matmul"].flatten(), caps["attn/softmax"].flatten()])

    sharpen = tdfunc.rule(lambda f, args, kwargs, out: f(args[0] * 2.0, *args[1:], **kwargs))  # f: the torch function

    def op_rule_from_site(x):
        edits = {"attn/layer_norm": sharpen, "attn/mul:input.1": tdfunc.from_site("attn/einsum", torch.tanh)}
        y, caps = tdfunc.functional_call(net, s, (x,), edits=edits, capture=["attn/mul@0"])
        return torch.cat([y.flatten(), caps["attn/mul@0"].flatten()])

    def kw_input_output_key(x, u):
        y, caps = tdfunc.functional_call(
            net,
            s,
            (x,),
            edits={"blk:input.scale": tdfunc.delta(u), "blk:output.h": lambda h: h * 3.0},
            capture=["blk:input.scale", "blk:output.h", "attn:input.x"],
        )
        return torch.cat(
            [
                y.flatten(),
                caps["blk:input.scale"].flatten(),
                caps["blk:output.h"].flatten(),
                caps["attn:input.x"].flatten(),
            ]
        )

    m = torch.rand(B, 3, 4, dtype=dt)

    def grad_edit_saliency(x, m):  # grad_edit: the gradient at attn's output masked, inside a saliency map
        f = lambda x: tdfunc.functional_call(net, s, (x,), edits={"attn": tdfunc.grad_edit(lambda g: g * m)}).sum()
        return torch.func.grad(f)(x).flatten()

    def stop_early(x, d):  # stop_early: the forward ends after the last capture
        edits = {"attn:input": tdfunc.delta(d)}
        caps = tdfunc.functional_call(net, s, (x,), edits=edits, capture=["attn/softmax", "attn"], stop=True)
        return torch.cat([caps["attn/softmax"].flatten(), caps["attn"].flatten()])

    return [
        Case("sites:op-softmax-delta+capture", net, op_delta, (x, d), (0, 0), (0, 1), "attn/softmax", probe=x[0]),
        Case("sites:op-rule-from-site", net, op_rule_from_site, (x,), (0,), (0,), "attn/einsum", probe=x[0]),
        Case(
            "sites:kw-input-output-key", net, kw_input_output_key, (x, u), (0, 0), (0, 1), "blk:input.scale", probe=x[0]
        ),
        Case(  # grad_edit: differentiated w.r.t. the mask (w.r.t. x before the site: the straight-through map)
            "sites:grad-edit", net, grad_edit_saliency, (x, m), (0, 0), (1,), "attn", "inductor", probe=x[0]
        ),
        Case("sites:stop-early", net, stop_early, (x, torch.zeros_like(x)), (0, 0), (0, 1), "attn", probe=x[0]),
    ]
