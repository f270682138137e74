"""tdfunc.lrp: the zᴮ (box) input rule against zennit 0.5.1, and the LayerNorm (LN) rule of Ali et al. 2022
against a slow hand-written reference (gradient × input with the normaliser held constant)."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torch import nn

import tdfunc
from tdfunc.attribution._common import AttributionError
from tdfunc.attribution._lrp import lrp, lrp_epsilon
from test_lrp import ours, zennit_lrp  # the shared zennit-per-class and tdfunc calls

lrp_zbox = tdfunc.lrp_zbox

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
        lo, hi = (-1.0, 1.0) if bounds == "float" else (torch.tensor([-1.0, -2.0], dtype=DT).view(1, 2, 1, 1), torch.tensor([1.5, 1.0], dtype=DT).view(1, 2, 1, 1))
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
    with pytest.raises(AttributionError, match=r"^tdfunc\.lrp_zbox: low must be <= high everywhere \(the box the inputs lie in\), got low > high\.$"):
        lrp_zbox(1.0, 0.0)
    with pytest.raises(AttributionError, match=r"^tdfunc\.lrp_zbox: low must be <= high everywhere"):
        lrp_zbox(torch.tensor([0.0, 2.0]), 1.0)
    with pytest.raises(TypeError, match=r"^tdfunc\.lrp_zbox: low must be a float or a floating-point tensor, got str \('a'\)\.$"):
        lrp_zbox("a", 1.0)
    with pytest.raises(TypeError, match=r"^tdfunc\.lrp_zbox: high must be a float or a floating-point tensor, got a torch\.int64 tensor\.$"):
        lrp_zbox(0.0, torch.tensor([1]))
    with pytest.raises(AttributionError, match=r"^tdfunc\.lrp_zbox: high must be finite, got inf\.$"):
        lrp_zbox(0.0, float("inf"))
    with pytest.raises(AttributionError, match=r"^tdfunc\.lrp_zbox: stabilizer must be a finite number >= 0, got -1\.0\.$"):
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
