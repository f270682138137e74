"""captum's NeuronFeatureAblation is ``tdfunc.feature_ablation(tdfunc.neuron(f, model, site, selector), td, ...)``.

Every case of captum's tests/attr/neuron/test_neuron_ablation.py (models, inputs, masks, baselines, expected values;
captum's assertTensorAlmostEqual default tolerance 1e-4), re-expressed with tdfunc, and captum's class run live on
the same inputs.  captum's ``perturbations_per_eval`` is ``chunk_size``; ``attribute_to_neuron_input=True`` is the
site ``"layer:input"``; ``additional_forward_args`` are entries of td that ``f`` reads and that are not attributed
(``in_keys``).
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import NeuronFeatureAblation
from captum.testing.helpers.basic_models import (
    BasicModel_ConvNet_One_Conv,
    BasicModel_MultiLayer,
    BasicModel_MultiLayer_MultiInput,
)
from tensordict import TensorDict

import tdfunc


def _td(*xs, **extra):
    d = {f"x{i}": x for i, x in enumerate(xs)}
    d.update(extra)
    return TensorDict(d, batch_size=[xs[0].shape[0]])


def _check(out, want, n):
    for i in range(n):
        got = out["attr", f"x{i}"]
        torch.testing.assert_close(got, torch.as_tensor(want[i], dtype=got.dtype).expand_as(got), atol=1e-4, rtol=0)


def _live(out, ref, n):
    ref = ref if isinstance(ref, tuple) else (ref,)
    for i in range(n):
        torch.testing.assert_close(out["attr", f"x{i}"], ref[i].expand_as(out["attr", f"x{i}"]), atol=1e-4, rtol=0)


_SUM1 = lambda v: v.sum(1)  # noqa: E731  captum's lambda x: torch.sum(x, dim=1)

MULTILAYER = [
    # (input, feature mask, selector, expected)  test_simple_ablation_with_mask, test_multi_sample_*
    ([[20.0, 50.0, 30.0]], [[0, 0, 1]], 0, [[280.0, 280.0, 120.0]]),
    ([[2.0, 10.0, 3.0], [20.0, 50.0, 30.0]], [[0, 0, 1], [1, 1, 0]], 0, [[41.0, 41.0, 12.0], [280.0, 280.0, 120.0]]),
    (
        [[2.0, 10.0, 3.0], [20.0, 50.0, 30.0]],
        [[0, 0, 1], [1, 1, 0]],
        _SUM1,
        [[82.0, 82.0, 24.0], [560.0, 560.0, 240.0]],
    ),
    (
        [[2.0, 10.0, 3.0], [20.0, 50.0, 30.0]],
        [[0, 0, 1], [1, 1, 0]],
        (slice(0, 2, 1),),
        [[82.0, 82.0, 24.0], [560.0, 560.0, 240.0]],
    ),
]


@pytest.mark.parametrize("x,mask,sel,want", MULTILAYER)
@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_captum_cases_multilayer(x, mask, sel, want, chunk_size):
    net = BasicModel_MultiLayer()
    x, mask = torch.tensor(x), torch.tensor(mask)
    g = tdfunc.neuron(lambda t: net(t["x0"]), net, "linear2", sel)
    out = tdfunc.feature_ablation(g, _td(x), feature_mask=mask, chunk_size=chunk_size)
    _check(out, [want], 1)
    csel = (lambda v: torch.sum(v, dim=1)) if sel is _SUM1 else sel
    _live(out, NeuronFeatureAblation(net, net.linear2).attribute(x, neuron_selector=csel, feature_mask=mask), 1)


def _multi_input():
    x1 = torch.tensor([[23.0, 100.0, 0.0], [20.0, 50.0, 30.0]])
    x2 = torch.tensor([[20.0, 50.0, 30.0], [0.0, 100.0, 0.0]])
    x3 = torch.tensor([[0.0, 100.0, 10.0], [2.0, 10.0, 3.0]])
    return x1, x2, x3


MASKS = (torch.tensor([[1, 1, 1], [0, 1, 0]]), torch.tensor([[3, 4, 2]]), torch.tensor([[5, 6, 7], [5, 5, 5]]))
EXPECTED = (
    [[492.0, 492.0, 492.0], [200.0, 200.0, 200.0]],
    [[80.0, 200.0, 120.0], [0.0, 400.0, 0.0]],
    [[0.0, 400.0, 40.0], [60.0, 60.0, 60.0]],
)


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_captum_multi_input_ablation_with_mask(chunk_size):
    net = BasicModel_MultiLayer_MultiInput()
    x1, x2, x3 = _multi_input()
    keys = ["x0", "x1", "x2"]
    g = tdfunc.neuron(lambda t: net(t["x0"], t["x1"], t["x2"], 1), net, "model.linear2", 0)
    masks = dict(zip(keys, MASKS))
    out = tdfunc.feature_ablation(g, _td(x1, x2, x3), feature_mask=masks, chunk_size=chunk_size)
    _check(out, EXPECTED, 3)
    ref = NeuronFeatureAblation(net, net.model.linear2).attribute(
        (x1, x2, x3), 0, feature_mask=MASKS, additional_forward_args=(1,)
    )
    _live(out, ref, 3)
    # inputs 1, 2 attributed; x3 and the scale held fixed (captum's additional_forward_args=(inp3, 1))
    g2 = tdfunc.neuron(lambda t: net(t["x0"], t["x1"], t["extra"], 1), net, "model.linear2", 0)
    out = tdfunc.feature_ablation(
        g2, _td(x1, x2, extra=x3), feature_mask=dict(zip(keys[:2], MASKS[:2])), in_keys=keys[:2], chunk_size=chunk_size
    )
    _check(out, EXPECTED[:1], 1)
    # shared baselines per input (2, 3.0, 4)
    out = tdfunc.feature_ablation(
        g, _td(x1, x2, x3), feature_mask=masks, baselines={"x0": 2.0, "x1": 3.0, "x2": 4.0}, chunk_size=chunk_size
    )
    want = (
        [[468.0, 468.0, 468.0], [184.0, 192.0, 184.0]],
        [[68.0, 188.0, 108.0], [-12.0, 388.0, -12.0]],
        [[-16.0, 384.0, 24.0], [12.0, 12.0, 12.0]],
    )
    _check(out, want, 3)


@pytest.mark.parametrize(
    "bases,want",
    [
        (
            ([[3.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[1.0, 2.0, 3.0]]),
            (
                [[80.0, 400.0, 0.0], [68.0, 200.0, 120.0]],
                [[80.0, 196.0, 120.0], [0.0, 396.0, 0.0]],
                [[-4.0, 392.0, 28.0], [4.0, 32.0, 0.0]],
            ),
        ),
        (
            (
                [[3.0, 0.0, 0.0], [3.0, 0.0, 2.0]],
                [[0.0, 1.0, 0.0], [0.0, 1.0, 4.0]],
                [[3.0, 2.0, 4.0], [1.0, 2.0, 3.0]],
            ),
            (
                [[80.0, 400.0, 0.0], [68.0, 200.0, 112.0]],
                [[80.0, 196.0, 120.0], [0.0, 396.0, -16.0]],
                [[-12.0, 392.0, 24.0], [4.0, 32.0, 0.0]],
            ),
        ),
    ],
)
def test_captum_multi_input_ablation_baselines(bases, want):
    net = BasicModel_MultiLayer_MultiInput()
    xs = _multi_input()
    bases = [torch.tensor(b) for b in bases]
    g = tdfunc.neuron(lambda t: net(t["x0"], t["x1"], t["x2"], 1), net, "model.linear2", 0)
    out = tdfunc.feature_ablation(g, _td(*xs), baselines={f"x{i}": b for i, b in enumerate(bases)}, chunk_size=2)
    _check(out, want, 3)
    ref = NeuronFeatureAblation(net, net.model.linear2).attribute(
        xs, 0, baselines=tuple(bases), additional_forward_args=(1,)
    )
    _live(out, ref, 3)


CONV_WHOLE = (torch.tensor(0), torch.tensor(1))  # each input one feature
CONV = [
    # (site, selector, mask, expected x, expected x2)  test_simple_multi_input_conv(_intermediate)
    ("relu2", 0, CONV_WHOLE, 67.0, 13.0),
    (
        "relu2",
        0,
        None,
        [[[[0.0, 2.0, 4.0, 3.0], [4.0, 9.0, 10.0, 7.0], [4.0, 13.0, 14.0, 11.0], [0.0, 0.0, 0.0, 0.0]]]],
        [[[[1.0, 2.0, 2.0, 1.0], [1.0, 2.0, 2.0, 1.0], [1.0, 2.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]]]],
    ),
    ("relu1", (1, 0, 0), CONV_WHOLE, 0.0, 0.0),
    ("relu1:input", (1, 0, 0), CONV_WHOLE, 45.0, 9.0),
    (
        "relu1:input",
        (1, 0, 0),
        None,
        [[[[0.0, 1.0, 2.0, 0.0], [4.0, 5.0, 6.0, 0.0], [8.0, 9.0, 10.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]],
        [[[[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]],
    ),
]


@pytest.mark.parametrize("site,sel,mask,want1,want2", CONV)
@pytest.mark.parametrize("chunk_size", [None, 3, 7])
def test_captum_cases_conv(site, sel, mask, want1, want2, chunk_size):
    net = BasicModel_ConvNet_One_Conv(inplace=site.startswith("relu1"))
    x, x2 = torch.arange(16, dtype=torch.float).view(1, 1, 4, 4), torch.ones((1, 1, 4, 4))
    g = tdfunc.neuron(lambda t: net(t["x0"], t["x1"]), net, site, sel)
    masks = None if mask is None else {"x0": mask[0], "x1": mask[1]}
    out = tdfunc.feature_ablation(g, _td(x, x2), feature_mask=masks, chunk_size=chunk_size)
    _check(out, (want1, want2), 2)
    ref = NeuronFeatureAblation(net, getattr(net, site.split(":")[0])).attribute(
        (x, x2), neuron_selector=sel, feature_mask=mask, attribute_to_neuron_input=site.endswith(":input")
    )
    _live(out, ref, 2)


def test_other_perturbation_methods_take_a_neuron_f():
    """occlusion / Shapley sampling of a neuron: the ablation of one feature group each, the Shapley values add
    up to the neuron's change (no captum class: captum has NeuronFeatureAblation only)."""
    torch.manual_seed(0)
    net = BasicModel_MultiLayer()
    x = torch.tensor([[2.0, 10.0, 3.0], [20.0, 50.0, 30.0]])
    g = tdfunc.neuron(lambda t: net(t["x0"]), net, "relu", [(1,), (slice(2, 4),)])
    ab = tdfunc.feature_ablation(g, _td(x))["attr", "x0"]
    occ = tdfunc.occlusion(g, _td(x), sliding_window_shapes=(1,))["attr", "x0"]
    torch.testing.assert_close(occ, ab)
    sv = tdfunc.shapley_value_sampling(g, _td(x), n_samples=4)["attr", "x0"]
    torch.testing.assert_close(sv.sum(-1), g(_td(x)) - g(_td(torch.zeros_like(x))))
