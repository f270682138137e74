"""DeepLift's reveal-cancel rule (``tdfunc.deep_lift(..., rule="reveal_cancel")``) against a slow reference written
from the paper (Shrikumar, Greenside, Kundaje 2017, §3.5.1 linear rule with its half rule at ``Δu_i = 0``, §3.5.3
reveal-cancel), completeness, convolutions against the same network unrolled into dense layers, and the double
backward against autograd through the reference.  captum has no reveal-cancel rule and DeepLIFT's own implementation
is not available here, so the paper's equations are the oracle.
"""

from __future__ import annotations

import re

import pytest
import torch
from tensordict import TensorDict
from torch import nn

import tdfunc
from tdfunc.attribution import AttributionError

DT = torch.float64


def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def _dact(act, z):
    return (z > 0).to(z.dtype) if isinstance(act, nn.ReLU) else 1 - torch.tanh(z) ** 2


def slow_reveal_cancel(hidden, head_w, x, xb, t, eps=1e-10):
    """The paper's multipliers, one example at a time; ``hidden``: [(W, b, activation module)], ``head_w``: (K, H).
    Also returns how many weights took the half rule (an input change exactly 0) and how many multipliers the
    limit (a positive or negative part below eps), so a test can see that those branches ran."""
    out, halves, limits = [], 0, 0
    for e in range(x.shape[0]):
        u, ub, blocks = x[e], xb[e], []
        for w, b, act in hidden:
            du = u - ub
            wdu = w * du[None, :]  # w_ji du_i
            dzp, dzn = (wdu * (wdu > 0)).sum(1), (wdu * (wdu < 0)).sum(1)
            zero = (du == 0).to(DT)[None, :]
            ap = w * (wdu > 0) + 0.5 * w * zero  # multipliers of du_i into z_j's positive / negative part
            an = w * (wdu < 0) + 0.5 * w * zero
            halves += int(zero.sum())
            zb = w @ ub + b
            z = w @ u + b
            dyp = 0.5 * (act(zb + dzp) - act(zb)) + 0.5 * (act(zb + dzn + dzp) - act(zb + dzn))
            dyn = 0.5 * (act(zb + dzn) - act(zb)) + 0.5 * (act(zb + dzp + dzn) - act(zb + dzp))
            okp, okn = dzp.abs() >= eps, dzn.abs() >= eps
            limits += int((~okp).sum() + (~okn).sum())
            mp = torch.where(okp, dyp / torch.where(okp, dzp, 1.0), 0.5 * (_dact(act, zb) + _dact(act, zb + dzn)))
            mn = torch.where(okn, dyn / torch.where(okn, dzn, 1.0), 0.5 * (_dact(act, zb) + _dact(act, zb + dzp)))
            blocks.append((ap, an, mp, mn))
            u, ub = act(z), act(zb)
        m = head_w[t]
        for ap, an, mp, mn in reversed(blocks):
            m = ap.T @ (m * mp) + an.T @ (m * mn)
        out.append(m * (x[e] - xb[e]))
    return torch.stack(out), halves, limits


def _hidden(net):
    return [(net[0].weight, net[0].bias, net[1]), (net[2].weight, net[2].bias, net[3])]


def test_equals_the_paper_on_an_mlp_every_target():
    net = _mlp()
    x = torch.randn(6, 4, dtype=DT)
    x[0, 1] = 0.0  # an input that equals its baseline: the half rule at the first layer
    xb = 0.5 * torch.randn(6, 4, dtype=DT)
    xb[0, 1] = 0.0
    td = TensorDict({"x": x, ("baseline", "x"): xb}, batch_size=[6])
    out = tdfunc.deep_lift(lambda t: net(t["x"]), td, net, rule="reveal_cancel", return_convergence_delta=True)
    got = out["attr", "x"]
    halves = limits = 0
    for t in range(3):
        ref, h, lim = slow_reveal_cancel(_hidden(net), net[4].weight, x, xb, t)
        halves, limits = halves + h, limits + lim
        torch.testing.assert_close(got[:, t], ref, atol=1e-12, rtol=1e-10)
    assert halves > 0 and limits > 0  # the half rule and the limit multipliers were exercised
    assert out["convergence_delta"].abs().max() < 1e-12  # complete
    rescale = tdfunc.deep_lift(lambda t: net(t["x"]), td, net)["attr", "x"]
    assert (rescale - got).abs().max() > 1e-3  # a different rule: the check above can fail


def test_paper_min_example_gives_both_inputs_credit():
    """The paper's min example: o = i1 - ReLU(i1 - i2) at i1 = i2 = 1 against the zero reference.  The rescale rule
    gives all of o = 1 to i1 (the hidden unit's change is 0: its multiplier is ReLU'(0) = 0, and i2's positive and
    negative terms cancel before the ReLU); reveal-cancel splits it 0.5 / 0.5."""
    lin1 = nn.Linear(2, 1, bias=False).to(DT)
    net = nn.ModuleDict({"lin": lin1, "relu": nn.ReLU()})
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[1.0, -1.0]]))
    f = lambda t: t["x"][:, 0] - net["relu"](net["lin"](t["x"]))[:, 0]  # noqa: E731
    td = TensorDict({"x": torch.tensor([[1.0, 1.0]], dtype=DT)}, batch_size=[1])
    rc = tdfunc.deep_lift(f, td, net, rule="reveal_cancel", return_convergence_delta=True)
    torch.testing.assert_close(rc["attr", "x"], torch.tensor([[0.5, 0.5]], dtype=DT))
    resc = tdfunc.deep_lift(f, td, net)["attr", "x"]
    torch.testing.assert_close(resc, torch.tensor([[1.0, 0.0]], dtype=DT))
    assert rc["convergence_delta"].abs().max() < 1e-12


def _dense(conv, shape):
    """The conv (no bias) as a matrix on flattened inputs of ``shape``, and its bias per output position."""
    n = int(torch.tensor(shape).prod())
    eye = torch.eye(n, dtype=DT).reshape(n, *shape)
    cols = conv._conv_forward(eye, conv.weight, None).reshape(n, -1)
    out_shape = conv(torch.zeros(1, *shape, dtype=DT)).shape[1:]
    bias = conv.bias[:, None, None].expand(out_shape).reshape(-1)
    return cols.T, bias, out_shape


def test_convolutions_equal_the_same_network_as_dense_layers():
    torch.manual_seed(4)
    cnn = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(75, 4)
    ).to(DT)
    w1, b1, s1 = _dense(cnn[0], (1, 6, 6))
    w2, b2, s2 = _dense(cnn[2], tuple(s1))
    dense = nn.Sequential(nn.Linear(36, w1.shape[0]), nn.ReLU(), nn.Linear(w1.shape[0], w2.shape[0]), nn.Tanh())
    dense.append(nn.Linear(75, 4)).to(DT)
    with torch.no_grad():
        for lin, w, b in ((dense[0], w1, b1), (dense[2], w2, b2)):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        dense[4].load_state_dict(cnn[5].state_dict())
    x, xb = torch.randn(3, 1, 6, 6, dtype=DT), 0.3 * torch.randn(3, 1, 6, 6, dtype=DT)
    td = TensorDict({"x": x, ("baseline", "x"): xb}, batch_size=[3])
    conv = tdfunc.deep_lift(lambda t: cnn(t["x"]), td, cnn, rule="reveal_cancel", return_convergence_delta=True)
    flat = TensorDict({"x": x.flatten(1), ("baseline", "x"): xb.flatten(1)}, batch_size=[3])
    ref = tdfunc.deep_lift(lambda t: dense(t["x"]), flat, dense, rule="reveal_cancel")
    torch.testing.assert_close(conv["attr", "x"].flatten(2), ref["attr", "x"], atol=1e-12, rtol=1e-10)
    assert conv["convergence_delta"].abs().max() < 1e-12
    for t in range(4):  # and the dense network equals the paper
        slow, _, _ = slow_reveal_cancel(_hidden(dense), dense[4].weight, x.flatten(1), xb.flatten(1), t)
        torch.testing.assert_close(ref["attr", "x"][:, t], slow, atol=1e-12, rtol=1e-10)


def test_double_backward_equals_autograd_through_the_reference():
    net = _mlp()
    x, xb = torch.randn(2, 4, dtype=DT), 0.2 * torch.randn(2, 4, dtype=DT)
    td = TensorDict({"x": x, ("baseline", "x"): xb}, batch_size=[2])
    state = tdfunc.state(net)
    w = state["2", "weight"].clone().requires_grad_()
    s = state.update({("2", "weight"): w}, inplace=False)
    f = lambda t: tdfunc.functional_call(net, s, (t["x"],))[:, 1]  # noqa: E731
    ours = tdfunc.deep_lift(f, td, net, rule="reveal_cancel")["attr", "x"]
    (g1,) = torch.autograd.grad(ours.pow(2).sum(), w)
    hidden = [(net[0].weight, net[0].bias, net[1]), (w, net[2].bias, net[3])]
    ref, _, _ = slow_reveal_cancel(hidden, net[4].weight, x, xb, 1)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)
    (g2,) = torch.autograd.grad(ref.pow(2).sum(), w)
    torch.testing.assert_close(g1, g2, atol=1e-10, rtol=1e-8)


def test_reveal_cancel_errors():
    net = _mlp()
    td = TensorDict({"x": torch.randn(2, 4, dtype=DT)}, batch_size=[2])
    f = lambda t: net(t["x"])  # noqa: E731
    with pytest.raises(
        AttributionError,
        match=re.escape(
            "tdfunc.deep_lift: unknown rule 'revealcancel'; choose 'rescale' (captum's DeepLift) or 'reveal_cancel'"
        ),
    ):
        tdfunc.deep_lift(f, td, net, rule="revealcancel")
    gap = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).to(DT).eval()
    with pytest.raises(
        AttributionError,
        match=re.escape(
            "tdfunc.deep_lift: rule='reveal_cancel' splits an activation's input change into positive and negative "
            "parts by the linear layer that computes it, but the input of the activation '2' is not the output of an "
            "nn.Linear / nn.Conv1d / nn.Conv2d / nn.Conv3d module"
        ),
    ):
        tdfunc.deep_lift(lambda t: gap(t["x"]), td, gap, rule="reveal_cancel")
    tdfunc.deep_lift(lambda t: gap(t["x"]), td, gap)  # the rescale rule needs no linear layer before


def test_deep_lift_shap_takes_the_rule():
    net = _mlp()
    x, refs = torch.randn(3, 4, dtype=DT), torch.randn(2, 4, dtype=DT)
    td = TensorDict({"x": x}, batch_size=[3])
    f = lambda t: net(t["x"])  # noqa: E731
    shap = tdfunc.deep_lift_shap(f, td, net, TensorDict({"x": refs}, batch_size=[2]), rule="reveal_cancel")
    each = [
        tdfunc.deep_lift(f, TensorDict({"x": x, ("baseline", "x"): r.expand(3, 4)}, [3]), net, rule="reveal_cancel")
        for r in refs
    ]
    torch.testing.assert_close(shap["attr", "x"], (each[0]["attr", "x"] + each[1]["attr", "x"]) / 2)
