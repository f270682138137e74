"""Layer feature ablation: captum's ``LayerFeatureAblation`` on the same inputs, and captum's own test cases.

Cases: captum's tests/attr/layer/test_layer_ablation.py (models from captum.testing, their sites, masks,
baselines and expected values, compared exactly as captum does: ``delta=0.0001``); parity with captum on
a random MLP for every class, sites at a module output and at a module input.
"""

from __future__ import annotations

import re

import pytest
import torch
from captum.attr import LayerFeatureAblation
from tensordict import TensorDict

import tdfunc
from tdfunc.attribution._common import AttributionError

bm = pytest.importorskip("captum.testing.helpers.basic_models")


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8),
        torch.nn.Tanh(),
        torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU()),
        torch.nn.Linear(6, 3),
    )


@pytest.mark.parametrize("site,path,to_input", [("1", "1", False), ("2.0", "2.0", False), ("2.0:input", "2.0", True)])
def test_equals_captum_every_class(site, path, to_input):
    net = _net()
    layer = net.get_submodule(path)
    x = torch.randn(4, 5)
    out = tdfunc.layer_feature_ablation(
        lambda t: net(t["x"]), TensorDict({"x": x}, batch_size=[4]), net, site, chunk_size=3
    )["attr", site]
    ref = torch.stack(
        [LayerFeatureAblation(net, layer).attribute(x, target=c, attribute_to_layer_input=to_input) for c in range(3)],
        1,
    )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_mask_and_baseline_equal_captum():
    net = _net()
    x = torch.randn(4, 5)
    mask = torch.tensor([[0, 0, 1, 1, 2, 2]])
    out = tdfunc.layer_feature_ablation(
        lambda t: net(t["x"])[:, 1], TensorDict({"x": x}, batch_size=[4]), net, "2", feature_mask=mask, baselines=0.3
    )["attr", "2"]
    ref = LayerFeatureAblation(net, net[2]).attribute(x, target=1, layer_mask=mask, layer_baselines=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


_I1 = [[23.0, 100.0, 0.0], [20.0, 50.0, 30.0]]
_I2 = [[20.0, 50.0, 30.0], [0.0, 100.0, 0.0]]
_I3 = [[0.0, 100.0, 10.0], [2.0, 10.0, 3.0]]
_CONV = (torch.arange(16, dtype=torch.float).view(1, 1, 4, 4).tolist(), torch.ones(1, 1, 4, 4).tolist())
CASES = {  # name: (model, inputs, site, mask, baselines, expected)
    "simple_ablation_with_mask": (
        lambda: bm.BasicModel_MultiLayer(),
        [[[20.0, 50.0, 30.0]]],
        "linear0:input",
        [[0, 0, 1]],
        None,
        [[280.0, 280.0, 120.0]],
    ),
    "multi_input_ablation_to_input": (
        lambda: bm.BasicModel_MultiLayer_MultiInput(),
        [_I1, _I2, _I3],
        "model.linear1:input",
        None,
        [[1.0, 2.0, 3.0]],
        [[168.0, 992.0, 148.0], [84.0, 632.0, 120.0]],
    ),
    "multi_input_ablation": (
        lambda: bm.BasicModel_MultiLayer_MultiInput(),
        [_I1, _I2, _I3],
        "model.linear0",
        None,
        [[1.0, 2.0, 3.0]],
        [[168.0, 992.0, 148.0], [84.0, 632.0, 120.0]],
    ),
    "multi_input_ablation_with_layer_mask_to_input": (
        lambda: bm.BasicModel_MultiLayer_MultiInput(),
        [_I1, _I2, _I3],
        "model.linear1:input",
        [[0, 1, 0], [0, 1, 2]],
        [[1.0, 2.0, 3.0]],
        [[316.0, 992.0, 316.0], [84.0, 632.0, 120.0]],
    ),
    "multi_input_ablation_with_layer_mask": (
        lambda: bm.BasicModel_MultiLayer_MultiInput(),
        [_I1, _I2, _I3],
        "model.linear0",
        [[0, 1, 0], [0, 1, 2]],
        [[1.0, 2.0, 3.0]],
        [[316.0, 992.0, 316.0], [84.0, 632.0, 120.0]],
    ),
    "conv_intermediate": (
        lambda: bm.BasicModel_ConvNet_One_Conv(inplace=True),
        list(_CONV),
        "relu1",
        None,
        None,
        [[[[4.0, 13.0], [40.0, 49.0]], [[0, 0], [-15.0, -24.0]]]],
    ),
    "conv_intermediate_input_baselines": (
        lambda: bm.BasicModel_ConvNet_One_Conv(inplace=True),
        list(_CONV),
        "relu1:input",
        None,
        [[[-4.0, -13.0], [-2.0, -2.0]], [[0, 0], [0.0, 0.0]]],
        [[[[4.0, 13.0], [40.0, 49.0]], [[0, 0], [-15.0, -24.0]]]],
    ),
    "conv_intermediate_mask": (
        lambda: bm.BasicModel_ConvNet_One_Conv(inplace=True),
        list(_CONV),
        "relu1",
        [[[[0, 0], [1, 1]], [[2, 2], [3, 3]]]],
        None,
        [[[[17.0, 17.0], [67.0, 67.0]], [[0, 0], [-39.0, -39.0]]]],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_captum_cases(name):
    make, inputs, site, mask, base, expected = CASES[name]
    torch.manual_seed(1234)
    net = make()
    keys = [f"x{i}" for i in range(len(inputs))]
    td = TensorDict({k: torch.tensor(v) for k, v in zip(keys, inputs)}, batch_size=[len(inputs[0])])
    extra = (1,) if len(inputs) == 3 else ()
    f = lambda t: net(*[t[k] for k in keys], *extra)[:, 0]
    out = tdfunc.layer_feature_ablation(
        f,
        td,
        net,
        site,
        feature_mask=None if mask is None else torch.tensor(mask),
        baselines=None if base is None else torch.tensor(base),
    )["attr", site]
    torch.testing.assert_close(out, torch.tensor(expected).expand_as(out), rtol=0, atol=1e-4)


def _raises(msg, call, cls=AttributionError):
    with pytest.raises(cls, match="^" + re.escape(msg) + "$"):
        call()


def test_errors_pinned():
    net = _net()
    td = TensorDict({"x": torch.randn(2, 5)}, batch_size=[2])
    f = lambda t: net(t["x"])[:, 0]
    _raises(
        "tdfunc.layer_feature_ablation: module must be the nn.Module whose site is attributed, got str ('1'); "
        "pass the model itself, e.g. tdfunc.layer_feature_ablation(f, td, model, 'layer1').",
        lambda: tdfunc.layer_feature_ablation(f, td, "1", "1"),
        TypeError,
    )
    _raises(
        "tdfunc.layer_feature_ablation: site '*' names several values; attribute one site at a time (no globs; "
        "'@k' for the k-th call of a module that runs several times).",
        lambda: tdfunc.layer_feature_ablation(f, td, net, "*"),
    )
    _raises(
        "tdfunc.layer_feature_ablation: baseline for '1' has shape (3,) but the site's value has shape (2, 8); "
        "give a baseline broadcastable to the site's value: a number, the feature shape (8,), (1, ...) or the "
        "site's value's shape.",
        lambda: tdfunc.layer_feature_ablation(f, td, net, "1", baselines=torch.zeros(3)),
    )
    _raises(
        "tdfunc.layer_feature_ablation: feature_mask for '1' has shape (3,) but the site's value has shape "
        "(2, 8); give an integer mask broadcastable to the site's value (batch + feature shape).",
        lambda: tdfunc.layer_feature_ablation(f, td, net, "1", feature_mask=torch.zeros(3, dtype=torch.long)),
    )
