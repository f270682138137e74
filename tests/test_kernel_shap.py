"""Kernel SHAP: captum's KernelShap, exactness on linear models, chunking, errors.

Same coalitions as captum: captum draws ``k`` with ``Categorical(p).sample()`` and the selected
features with ``torch.randn`` from torch's global generator (after the full and empty coalitions);
we seed the global generator with ``torch.manual_seed(s)`` before captum's call and pass
``generator=torch.Generator().manual_seed(s)`` to ours, which makes the same draws
(``torch.multinomial`` + ``torch.randn``) from it.  captum trains one model per example drawing
fresh coalitions each, so each example is compared with captum reseeded (our coalitions are
shared by the batch).  captum fits in float32, hence the float32 tolerance.
"""

from __future__ import annotations

import re

import pytest
import torch
from captum.attr import KernelShap
from tensordict import TensorDict

from tdfunc.attribution._common import AttributionError
from tdfunc.attribution._kernel_shap import _draw_coalitions, kernel_shap


def _td(x, b=None):
    d = {"x": x} if b is None else {"x": x, "baseline": {"x": b}}
    return TensorDict(d, batch_size=[x.shape[0]])


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


@pytest.mark.parametrize("mask", [None, torch.tensor([0, 0, 1, 2, 2, 3])])
def test_matches_captum(mask):
    net = _net()
    x, b = torch.randn(2, 6), 0.1 * torch.randn(2, 6)
    out = kernel_shap(
        lambda t: net(t["x"]), _td(x, b), feature_mask=mask, n_samples=20, generator=torch.Generator().manual_seed(3)
    )["attr", "x"]
    for i in range(2):
        for c in range(3):
            torch.manual_seed(3)
            ref = KernelShap(net).attribute(
                x[i : i + 1],
                baselines=b[i : i + 1],
                target=c,
                feature_mask=None if mask is None else mask[None],
                n_samples=20,
            )
            torch.testing.assert_close(out[i : i + 1, c], ref, rtol=1e-4, atol=2e-5)


def test_explicit_coalitions_and_chunks_agree():
    net = _net(torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    g = lambda t: net(t["x"])
    coal = _draw_coalitions(15, 6, torch.Generator().manual_seed(1))
    a = kernel_shap(g, _td(x), n_samples=15, generator=torch.Generator().manual_seed(1))["attr", "x"]
    b = kernel_shap(g, _td(x), n_samples=15, coalitions=coal.long(), chunk_size=4)["attr", "x"]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # a single target per example is the K-target map's column
    c = kernel_shap(lambda t: net(t["x"])[:, 1], _td(x), n_samples=15, coalitions=coal)["attr", "x"]
    torch.testing.assert_close(c, a[:, 1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mask", [None, torch.tensor([0, 1, 1, 2, 0, 3])])
def test_linear_exact(mask):
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 2).double()
    x, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    out = kernel_shap(
        lambda t: lin(t["x"]), _td(x, b), feature_mask=mask, n_samples=40, generator=torch.Generator().manual_seed(0)
    )["attr", "x"]
    contrib = (x - b)[:, None] * lin.weight  # (4, 2, 6)
    if mask is None:
        want = contrib
    else:
        group = torch.zeros(4, 2, 4, dtype=torch.float64).index_add_(-1, mask, contrib)
        want = group[..., mask]
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    # efficiency: the group values sum to f(x) - f(baseline)
    per_group = out if mask is None else torch.stack([out[..., (mask == g).nonzero()[0, 0]] for g in range(4)], -1)
    torch.testing.assert_close(per_group.sum(-1), lin(x) - lin(b), rtol=1e-9, atol=1e-9)


def test_grad_and_vmap_compose():
    net = _net(torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    coal = _draw_coalitions(12, 6, torch.Generator().manual_seed(2))
    g = lambda xx: kernel_shap(lambda t: net(t["x"]), _td(xx), n_samples=12, coalitions=coal)["attr", "x"]
    torch.autograd.gradcheck(g, (x,))
    per = torch.func.vmap(lambda xi: g(xi[None])[0])(x.detach())
    torch.testing.assert_close(per, g(x.detach()), rtol=1e-10, atol=1e-10)


def test_errors():
    net = _net()
    td = _td(torch.randn(2, 6))
    f = lambda t: net(t["x"])
    with pytest.raises(
        AttributionError, match=re.escape("tdfunc.kernel_shap: n_samples must be an integer >= 1, got 0.")
    ):
        kernel_shap(f, td, n_samples=0)
    with pytest.raises(
        AttributionError,
        match=re.escape("tdfunc.kernel_shap: coalitions has shape (5, 4); expected (5, 6) (n_samples, n_features)."),
    ):
        kernel_shap(f, td, n_samples=5, coalitions=torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(
        AttributionError,
        match=re.escape(
            "tdfunc.kernel_shap: coalitions must be a bool or integer 0/1 tensor of shape (5, 6), got a torch.float32 tensor."
        ),
    ):
        kernel_shap(f, td, n_samples=5, coalitions=torch.ones(5, 6))
    with pytest.raises(
        AttributionError,
        match=re.escape(
            "tdfunc.kernel_shap: coalitions must hold only 0 and 1 (1: the feature keeps its input value)."
        ),
    ):
        kernel_shap(f, td, n_samples=5, coalitions=torch.full((5, 6), 2))
