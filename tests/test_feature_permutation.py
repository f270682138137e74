"""Feature permutation: captum's ``FeaturePermutation`` on the same draws, and captum's own test cases.

captum draws ``torch.randperm(batch)`` per feature (again while it is the identity) from torch's global
generator; ``generator=torch.Generator().manual_seed(s)`` makes the same draws as captum after
``torch.manual_seed(s)`` (each feature in one input).  Cases: captum's tests/attr/test_feature_permutation.py
(inputs, masks, forward functions, including its scalar loss of the batch, and its assertions).
"""

from __future__ import annotations

import re

import pytest
import torch
from captum.attr import FeaturePermutation
from tensordict import TensorDict

import tdfunc
from tdfunc.attribution._common import AttributionError


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


@pytest.mark.parametrize("mask", [None, torch.tensor([0, 0, 1, 2, 2])])
def test_equals_captum_with_the_same_draws_every_class(mask):
    net = _net()
    x = torch.randn(6, 5)
    out = tdfunc.feature_permutation(
        lambda t: net(t["x"]),
        TensorDict({"x": x}, batch_size=[6]),
        feature_mask=mask,
        generator=torch.Generator().manual_seed(3),
        chunk_size=2,
    )["attr", "x"]
    for c in range(3):
        torch.manual_seed(3)
        ref = FeaturePermutation(net).attribute(x, target=c, feature_mask=None if mask is None else mask[None])
        torch.testing.assert_close(out[:, c], ref, rtol=1e-5, atol=1e-6)


def _loss(labels):
    def forward_func(*x):
        y = torch.zeros(x[0].shape[0:2])
        for xx in x:
            y = y + xx[:, :, 0] * xx[:, :, 1]
        return torch.mean((y.sum(dim=-1) - labels) ** 2)

    return forward_func


def test_captum_multi_input_scalar_loss_of_the_batch():
    """captum's test_multi_input: f is the batch's mean squared error (one value per batch)."""
    torch.manual_seed(1234)
    labels = torch.randn(20)
    fwd = _loss(labels)
    a, b = torch.randn(20, 5, 2), torch.randn(20, 5, 3)
    b[:, :, 1] = 4
    td = TensorDict({"a": a, "b": b}, batch_size=[20])
    out = tdfunc.feature_permutation(lambda t: fwd(t["a"], t["b"]), td, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    ref = FeaturePermutation(fwd).attribute(
        (a, b), feature_mask=(torch.arange(10).view(1, 5, 2), torch.arange(10, 25).view(1, 5, 3))
    )
    for key, r in zip("ab", ref):
        assert out["attr", key].shape == td[key].shape  # one map of the batch, the same for every example
        torch.testing.assert_close(out["attr", key], r.expand_as(td[key]), rtol=1e-5, atol=1e-6)
    attr_b = out["attr", "b"]
    assert (attr_b[:, :, 1] == 0).all() and (attr_b[:, :, 2] == 0).all()  # captum's assertions
    assert (out["attr", "a"] != 0).all() and (attr_b[:, :, 0] != 0).all()


def test_captum_group_across_input_tensors():
    torch.manual_seed(1234)
    fwd = _loss(torch.randn(20))
    td = TensorDict({"a": torch.randn(20, 5, 2), "b": torch.randn(20, 5, 3)}, batch_size=[20])
    mask = {"a": torch.zeros(1, 5, 2, dtype=torch.long), "b": torch.zeros(1, 5, 3, dtype=torch.long)}
    out = tdfunc.feature_permutation(lambda t: fwd(t["a"], t["b"]), td, feature_mask=mask)
    first = out["attr", "a"].flatten()[0]
    assert (out["attr", "a"] == first).all() and (out["attr", "b"] == first).all()
    # one permutation for the group: equal to a loop that permutes both inputs with it
    perm = torch.tensor([[3, 0, 1, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14, 17, 16, 19, 18]])
    out = tdfunc.feature_permutation(lambda t: fwd(t["a"], t["b"]), td, feature_mask=mask, permutations=perm)
    ref = fwd(td["a"], td["b"]) - fwd(td["a"][perm[0]], td["b"][perm[0]])
    torch.testing.assert_close(out["attr", "a"], ref.expand(20, 5, 2), rtol=0, atol=0)


@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([0]),
        torch.tensor([[0, 1, 2, 3]]),
        torch.tensor([[[0, 1, 2, 3], [3, 3, 4, 5], [6, 6, 4, 6], [7, 8, 9, 10]]]),
    ],
)
def test_captum_broadcastable_masks(mask):
    torch.manual_seed(1234)
    x = torch.randn(2, 3, 4, 4)
    f = lambda t: t["x"].view(2, -1).sum(-1)
    out = tdfunc.feature_permutation(f, TensorDict({"x": x}, batch_size=[2]), feature_mask=mask)["attr", "x"]
    assert out.shape == x.shape
    fm = mask.expand_as(x[0])
    for feature in set(mask.flatten().tolist()):  # with 2 examples the swap gives opposite values
        m = fm == feature
        torch.testing.assert_close(out[0][m], -out[1][m], rtol=0, atol=0.05)
    torch.manual_seed(5)
    ref = FeaturePermutation(lambda v: v.view(2, -1).sum(-1)).attribute(x, feature_mask=mask)
    out = tdfunc.feature_permutation(
        f, TensorDict({"x": x}, batch_size=[2]), feature_mask=mask, generator=torch.Generator().manual_seed(5)
    )["attr", "x"]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_single_input_constant_feature_gets_zero():
    torch.manual_seed(1234)
    x = torch.randn(2, 6)
    x[:, 0] = 10000
    out = tdfunc.feature_permutation(lambda t: t["x"].sum(-1), TensorDict({"x": x}, batch_size=[2]))["attr", "x"]
    assert out[:, 0].abs().max() <= 0.05 and (out[:, 1:].abs() > 0).all()


def test_token_ids_and_vmap_over_permutation_sets_equal_the_loop():
    torch.manual_seed(0)
    emb, lin = torch.nn.Embedding(9, 4), torch.nn.Linear(4, 1)
    f = lambda t: lin(emb(t["ids"]).mean(1))[:, 0]
    td = TensorDict({"ids": torch.randint(0, 9, (4, 3))}, batch_size=[4])
    perms = torch.stack([torch.stack([torch.roll(torch.arange(4), s) for s in (1, 2, 3)]) for _ in range(2)])
    perms[1] = perms[1].flip(0)
    run = lambda p: tdfunc.feature_permutation(f, td, in_keys="ids", permutations=p)["attr", "ids"]
    torch.testing.assert_close(torch.vmap(run)(perms), torch.stack([run(p) for p in perms]), rtol=0, atol=1e-6)


def _raises(msg, call):
    with pytest.raises(AttributionError, match="^" + re.escape(msg) + "$"):
        call()


def test_errors_pinned():
    td = TensorDict({"x": torch.randn(3, 2)}, batch_size=[3])
    f = lambda t: t["x"].sum(-1)
    _raises(
        "tdfunc.feature_permutation: td has batch shape (1,); permuting a feature needs at least 2 examples along "
        "the first batch dim. Attribute a batch (TensorDict({...}, batch_size=[n]) with n >= 2).",
        lambda: tdfunc.feature_permutation(f, td[:1]),
    )
    _raises(
        "tdfunc.feature_permutation: permutations has shape (3, 3); expected (2, 3) (n_features, batch size).",
        lambda: tdfunc.feature_permutation(f, td, permutations=torch.zeros(3, 3, dtype=torch.long)),
    )
    _raises(
        "tdfunc.feature_permutation: every row of permutations must hold each example index 0 .. 2 exactly once.",
        lambda: tdfunc.feature_permutation(f, td, permutations=torch.tensor([[0, 1, 2], [0, 0, 2]])),
    )
    _raises(
        "tdfunc.feature_permutation: permutations must be an integer tensor of shape (2, 3), got a torch.float32 "
        "tensor.",
        lambda: tdfunc.feature_permutation(f, td, permutations=torch.zeros(2, 3)),
    )
