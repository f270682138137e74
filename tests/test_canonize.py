"""tdfunc.lrp_rules.merge_batchnorm: output unchanged, state untouched, zennit's MergeBatchNorm weights, LRP with
zennit's EpsilonPlus + SequentialMergeBatchNorm, stacked states under vmap, pinned errors.

zennit (test-only oracle) is imported as in tests/test_lrp.py, with a stub ``torchvision``.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from tensordict import TensorDict
from torch import nn
from torch.func import vmap

import tdfunc
from tdfunc import AttributionError

DT = torch.float64


def _randomise_bn(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g))
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if mod.affine:
                mod.weight.data.copy_(torch.randn(n, generator=g))
                mod.bias.data.copy_(torch.randn(n, generator=g))
    return m.eval()


def cnn(eps: float = 1e-5) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4, eps=eps),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3),
        nn.BatchNorm2d(3, eps=eps),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
    )
    return _randomise_bn(m, 1)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(6, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 7),
        nn.BatchNorm1d(7, affine=False),
        nn.ReLU(),
        nn.Linear(7, 3),
    )
    return _randomise_bn(m, 2)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.ReLU())
        self.head = nn.Linear(3 * 6, 2)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


@pytest.mark.parametrize("make,x", [(cnn, (3, 2, 6, 6)), (mlp, (5, 6)), (Nested, (4, 2, 8))])
def test_output_unchanged_and_state_untouched(make, x):
    m = make()
    m = _randomise_bn(m, 3) if make is Nested else m
    x = torch.randn(*x)
    s = tdfunc.state(m, copy=True)
    before = s.clone()
    merged = tdfunc.lrp_rules.merge_batchnorm(m, s)
    torch.testing.assert_close(tdfunc.functional_call(m, merged, (x,)), m(x), rtol=0, atol=1e-6)
    assert (s == before).all()  # the state passed in is never modified
    assert merged is not s and merged.batch_size == s.batch_size
    bn = [n for n, mod in m.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    for name in bn:
        key = tuple(name.split("."))
        assert (merged[key + ("running_mean",)] == 0).all()
        if m.get_submodule(name).affine:
            assert (merged[key + ("weight",)] == 1).all() and (merged[key + ("bias",)] == 0).all()


def test_explicit_pairs_and_auto_pairs_agree():
    m = cnn()
    auto = tdfunc.lrp_rules.merge_batchnorm(m)
    explicit = tdfunc.lrp_rules.merge_batchnorm(m, pairs=[("0", "1"), ("3", "4")])
    assert (auto == explicit).all()
    only_first = tdfunc.lrp_rules.merge_batchnorm(m, pairs=[("0", "1")])
    assert (only_first["3", "weight"] == m[3].weight).all()
    n = tdfunc.lrp_rules.merge_batchnorm(Nested().eval())
    assert set(n.keys(True, True)) == set(tdfunc.state(Nested()).keys(True, True))


def test_merged_weights_equal_zennit(zennit):
    m = cnn().to(DT)
    ours = tdfunc.lrp_rules.merge_batchnorm(m)
    zm = copy.deepcopy(m)
    canon = zennit.canonizers.SequentialMergeBatchNorm()
    handles = canon.apply(zm)
    try:
        for name in ["0", "3"]:
            torch.testing.assert_close(ours[name, "weight"], getattr(zm, name).weight.data, rtol=0, atol=1e-14)
            torch.testing.assert_close(ours[name, "bias"], getattr(zm, name).bias.data, rtol=0, atol=1e-14)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(zm[0].weight, m[0].weight, rtol=0, atol=0)  # zennit restores its copy


def _zennit_every_class(z, model, x, composite):
    maps = []
    with z.attribution.Gradient(model=model, composite=composite) as attributor:
        n = model(x).shape[1]
        for k in range(n):
            _, rel = attributor(x, lambda o: o * (torch.arange(n) == k).to(o.dtype))
            maps.append(rel)
    return torch.stack(maps, 1)


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_lrp_epsilon_plus_matches_zennit_with_canonizer(zennit, eps):
    m = cnn(eps).to(DT)
    x = torch.randn(2, 2, 6, 6, dtype=DT)
    merged = tdfunc.lrp_rules.merge_batchnorm(m)
    td = TensorDict({"x": x}, batch_size=[2])
    got = tdfunc.lrp(lambda t: tdfunc.functional_call(m, merged, (t["x"],)), td, m, composite="epsilon_plus")[
        "attr", "x"
    ]
    comp = zennit.composites.EpsilonPlus(canonizers=[zennit.canonizers.SequentialMergeBatchNorm()])
    want = _zennit_every_class(zennit, m, x, comp)
    # zennit leaves the BatchNorm as x / sqrt(1 + eps) (running_var = 1); ours is the exact identity
    tol = 1e-12 if eps == 0 else 1e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert got.shape == (2, 5, 2, 6, 6)


def test_vmap_over_stacked_states():
    m = cnn()
    x = torch.randn(3, 2, 6, 6)
    states = [tdfunc.state(_randomise_bn(cnn(), seed), copy=True) for seed in (4, 5)]
    for s in states:  # different conv weights too
        s["0", "weight"] = torch.randn_like(s["0", "weight"])
    stacked = torch.stack(states)
    merged = tdfunc.lrp_rules.merge_batchnorm(m, stacked)  # on the stacked state directly
    inside = vmap(lambda s: tdfunc.lrp_rules.merge_batchnorm(m, s))(stacked)  # and under vmap
    assert merged.batch_size == (2,)
    want = vmap(lambda s: tdfunc.functional_call(m, s, (x,)))(stacked)
    for td in (merged, inside):
        got = vmap(lambda s: tdfunc.functional_call(m, s, (x,)))(td)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged["0", "weight"], inside["0", "weight"], rtol=0, atol=0)


def test_differentiable_in_state():
    m = cnn().to(DT)
    x = torch.randn(2, 2, 6, 6, dtype=DT)
    s = tdfunc.state(m, copy=True)
    params = TensorDict({k: s[k] for k in s.keys(True, True) if k[-1] in ("weight", "bias")}).unflatten_keys(".")
    buffers = s.exclude(*params.keys(True, True))

    def loss(p, merge):
        full = buffers.clone(recurse=False).update(p)
        full = tdfunc.lrp_rules.merge_batchnorm(m, full) if merge else full
        return tdfunc.functional_call(m, full, (x,)).square().sum()

    g1, g2 = torch.func.grad(loss)(params, True), torch.func.grad(loss)(params, False)
    for k in [("0", "weight"), ("0", "bias"), ("1", "weight"), ("1", "bias"), ("3", "weight")]:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-9, atol=1e-9)


def test_error_training_mode():
    m = cnn().train()
    with pytest.raises(
        AttributionError,
        match=re.escape(
            "tdfunc.lrp_rules.merge_batchnorm: BatchNorm '1' is in training mode, where it normalises with batch statistics "
            "and cannot be merged; call model.eval() first."
        ),
    ):
        tdfunc.lrp_rules.merge_batchnorm(m)


def test_error_pair_not_batchnorm():
    with pytest.raises(
        AttributionError,
        match=re.escape(
            "tdfunc.lrp_rules.merge_batchnorm: pair ('0', '2'): '2' is a ReLU, not a BatchNorm; "
            "the second name of each pair must be the BatchNorm that follows the layer."
        ),
    ):
        tdfunc.lrp_rules.merge_batchnorm(cnn(), pairs=[("0", "2")])


def test_error_channel_mismatch():
    with pytest.raises(
        AttributionError,
        match=re.escape(
            "tdfunc.lrp_rules.merge_batchnorm: pair ('3', '1'): the layer has 3 output channels but the BatchNorm has 4 "
            "features; pair each BatchNorm with the layer that feeds it."
        ),
    ):
        tdfunc.lrp_rules.merge_batchnorm(cnn(), pairs=[("3", "1")])


def test_error_no_bias_and_unknown_name():
    m = nn.Sequential(nn.Linear(3, 2, bias=False), nn.BatchNorm1d(2)).eval()
    with pytest.raises(
        AttributionError,
        match=re.escape(
            "tdfunc.lrp_rules.merge_batchnorm: layer '0' has no bias, so it cannot absorb the BatchNorm's shift (a state "
            "cannot add a parameter); merge into tdfunc.lrp_rules.with_zero_biases(model), a copy with zero biases "
            "(the same function), and call that copy in f."
        ),
    ):
        tdfunc.lrp_rules.merge_batchnorm(m)
    with pytest.raises(
        AttributionError, match=re.escape("tdfunc.lrp_rules.merge_batchnorm: batchnorm '7' names no submodule")
    ):
        tdfunc.lrp_rules.merge_batchnorm(m, pairs=[("0", "7")])
