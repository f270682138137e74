"""Several sites in one layer attribution: captum's list of layers (and ``attribute_to_layer_input=True`` on a layer
with several inputs) in ``layer_integrated_gradients`` and ``layer_gradient_x_activation``.

captum's own cases (tests/attr/layer/test_layer_integrated_gradients.py: test_multiple_tensors_compare_with_expected,
test_multiple_tensors_compare_with_exp_wo_mult_by_inputs, test_multiple_layers_single_inputs,
test_multiple_layers_multiple_inputs_shared_input, test_multiple_layers_multiple_input_outputs,
test_simple_multi_gradient_activation_with_unused_layer; their expected values and tolerances), captum's classes
run live on the same inputs, completeness over the sites, and word + position embeddings of a transformers BERT.
A module returning a tuple (captum attributes every element) is the sites ``"layer:output.0"``, ``"layer:output.1"``;
captum's layer inputs are ``"layer:input.0"``, ``"layer:input.1"``, ... .
"""

from __future__ import annotations

import re

import pytest
import torch
from captum.attr import LayerGradientXActivation, LayerIntegratedGradients
from captum.testing.helpers.basic_models import (
    BasicEmbeddingModel,
    BasicModel_MultiLayer,
    BasicModel_MultiLayer_TrueMultiInput,
)
from tensordict import TensorDict

import tdfunc
from tdfunc.attribution import AttributionError

LIG = tdfunc.layer_integrated_gradients


def _close(got, want, delta):
    want = torch.as_tensor(want, dtype=got.dtype)
    assert (got - want).abs().max() <= delta, (got, want)


def test_captum_multiple_tensors_compare_with_expected_and_wo_mult_by_inputs():
    net = BasicModel_MultiLayer(multi_input_module=True)
    x = torch.tensor([[0.0, 100.0, 0.0]])
    td = TensorDict({"x": x}, batch_size=[1])
    f = lambda t: net(t["x"])[:, 0]  # noqa: E731
    sites = ["multi_relu:output.0", "multi_relu:output.1"]
    out = LIG(f, td, net, sites)
    for s in sites:
        _close(out["attr", s], [[90.0, 100.0, 100.0, 100.0]], 0.01)
    ref = LayerIntegratedGradients(net, net.multi_relu).attribute(x, target=0)
    for s, r in zip(sites, ref):
        torch.testing.assert_close(out["attr", s], r, atol=1e-5, rtol=1e-6)
    # without multiplying: times (activation at x - at the baseline) gives the multiplied maps
    plain = LIG(f, td, net, sites, multiply_by_inputs=False)
    acts = tdfunc.functional_call(net, None, (x,), capture=sites)[1]
    base = tdfunc.functional_call(net, None, (torch.zeros_like(x),), capture=sites)[1]
    for s in sites:
        torch.testing.assert_close(plain["attr", s] * (acts[s] - base[s]), out["attr", s])


@pytest.mark.parametrize("mult", [True, False])
def test_captum_multiple_layers_single_inputs_embeddings(mult):
    """[embedding1, embedding2] on one path = IG on the two embeddings (captum's comparison, delta 0.05) and =
    captum's LayerIntegratedGradients with the list of layers (live); convergence deltas equal."""
    torch.manual_seed(0)
    model = BasicEmbeddingModel(nested_second_embedding=True)
    i1 = torch.tensor([[2, 5, 0, 1], [3, 1, 1, 0]])
    i2 = torch.tensor([[0, 2, 4, 1], [2, 3, 5, 7]])
    i3 = torch.tensor([[3, 5, 6, 7], [2, 3, 0, 1]])
    td = TensorDict({"i1": i1, "i2": i2, "i3": i3}, batch_size=[2])
    f = lambda t: model(t["i1"], t["i2"], t["i3"])[:, 0]  # noqa: E731
    sites = ["embedding1", "embedding2"]
    out = LIG(f, td, model, sites, in_keys=["i1", "i2", "i3"], multiply_by_inputs=mult, return_convergence_delta=True)
    zeros = tuple(torch.zeros_like(i) for i in (i1, i2, i3))
    lig = LayerIntegratedGradients(model, [model.embedding1, model.embedding2], multiply_by_inputs=mult)
    ref, ref_delta = lig.attribute((i1, i2, i3), baselines=zeros, return_convergence_delta=True)
    for s, r in zip(sites, ref):
        torch.testing.assert_close(out["attr", s], r, atol=1e-5, rtol=1e-6)
    with torch.no_grad():  # IG on the embeddings themselves (captum's interpretable-embedding comparison)
        e_x = (model.embedding1(i1), model.embedding2(i2, i3))
        e_b = (model.embedding1(zeros[0]), model.embedding2(zeros[1], zeros[2]))
    emb = TensorDict({"e1": e_x[0], "e2": e_x[1], ("baseline", "e1"): e_b[0], ("baseline", "e2"): e_b[1]}, [2])

    def from_embeddings(t):
        h = model.relu(model.linear1(t["e1"] + t["e2"]))
        return model.linear2(h).sum(1)[:, 0]

    assert torch.allclose(from_embeddings(emb), f(td))  # the model after its embeddings
    ig = tdfunc.integrated_gradients(from_embeddings, emb, multiply_by_inputs=mult, return_convergence_delta=True)
    for s, k in zip(sites, ("e1", "e2")):
        _close(out["attr", s], ig["attr", k], 0.05)
    if mult:
        torch.testing.assert_close(out["convergence_delta"], ref_delta, atol=1e-4, rtol=1e-5)
        _close(out["convergence_delta"], ig["convergence_delta"], 0.05)


@pytest.mark.parametrize("x4", [False, True])
def test_captum_multiple_layers_multiple_inputs_and_outputs(x4):
    """test_multiple_layers_multiple_inputs_shared_input / _multiple_input_outputs: the layers' inputs on one path
    equal IG on the model's inputs (x1 reaches both m1 and m234: its two maps add up), the layers' outputs equal IG
    of ``a + b`` on them; captum live with attribute_to_layer_input=True."""
    torch.manual_seed(0)
    net = BasicModel_MultiLayer_TrueMultiInput()
    xs = [torch.randn(5, 3) for _ in range(4 if x4 else 3)]
    td = TensorDict({f"x{i}": x for i, x in enumerate(xs)}, batch_size=[5])
    f = lambda t: net(*[t[f"x{i}"] for i in range(len(xs))])[:, 0]  # noqa: E731
    zeros = tuple(torch.zeros_like(x) for x in xs)
    sites = ["m1:input", "m234:input.0", "m234:input.1", "m234:input.2"]
    out = LIG(f, td, net, sites)
    ig = tdfunc.integrated_gradients(f, td)
    lig = LayerIntegratedGradients(net, layer=[net.m1, net.m234])
    ref = lig.attribute(tuple(xs), zeros, target=0, attribute_to_layer_input=True)
    for s, r in zip(sites, [ref[0], *ref[1]]):
        torch.testing.assert_close(out["attr", s], r, atol=1e-6, rtol=1e-6)
    a = [out["attr", s] for s in sites]
    want = [a[0], a[1], a[2], a[3]] if x4 else [a[0] + a[3], a[1], a[2]]
    for i, w in enumerate(want):  # captum's delta: 1e-5 (shared input), 1e-7 (four inputs)
        torch.testing.assert_close(w, ig["attr", f"x{i}"], atol=1e-5 if not x4 else 1e-6, rtol=0)
    outs = LIG(f, td, net, ["m1", "m234"], return_convergence_delta=True)
    ref = lig.attribute(tuple(xs), zeros, target=0)
    for s, r in zip(["m1", "m234"], ref):
        torch.testing.assert_close(outs["attr", s], r, atol=1e-6, rtol=1e-6)
    # IG of (a, b) -> (a + b)[:, 0] on the layer outputs: the model after its two layers
    with torch.no_grad():
        caps = tdfunc.functional_call(net, None, tuple(xs), capture=["m1", "m234"])[1]
        base = tdfunc.functional_call(net, None, zeros, capture=["m1", "m234"])[1]
    lay = TensorDict(
        {"a": caps["m1"], "b": caps["m234"], ("baseline", "a"): base["m1"], ("baseline", "b"): base["m234"]}
    )
    lay.batch_size = [5]
    ig2 = tdfunc.integrated_gradients(lambda t: (t["a"] + t["b"])[:, 0], lay)
    torch.testing.assert_close(outs["attr", "m1"], ig2["attr", "a"], atol=1e-6, rtol=0)
    torch.testing.assert_close(outs["attr", "m234"], ig2["attr", "b"], atol=1e-6, rtol=0)
    assert outs["convergence_delta"].abs().max() < 1e-5  # the two sites cut every path: complete


def test_captum_unused_layer_and_gradient_x_activation_list():
    """test_simple_multi_gradient_activation_with_unused_layer ([linear1, relu]; relu's output feeds nothing) and
    captum's LayerGradientXActivation with a list of layers (live)."""
    model = BasicModel_MultiLayer(multi_input_module=True)
    x = torch.tensor([[3.0, 4.0, 0.0]])
    td = TensorDict({"x": x}, batch_size=[1])
    f = lambda t: model(t["x"])[:, 0]  # noqa: E731
    out = LIG(f, td, model, ["linear1", "relu"])
    assert out["attr", "linear1"].shape == (1, 4) and out["attr", "relu"].shape == (1, 4)
    assert out["attr", "relu"].abs().max() == 0
    x2 = torch.tensor([[3.0, 4.0, 0.0], [1.0, -2.0, 5.0]])
    td2 = TensorDict({"x": x2}, batch_size=[2])
    sites = ["linear1", "multi_relu:output.1", "linear2"]
    gxa = tdfunc.layer_gradient_x_activation(lambda t: model(t["x"]), td2, model, sites)
    for c in range(2):
        ref = LayerGradientXActivation(model, [model.linear1, model.multi_relu, model.linear2]).attribute(x2, target=c)
        for s, r in zip(sites, [ref[0], ref[1][1], ref[2]]):
            torch.testing.assert_close(gxa["attr", s][:, c], r)
        one = tdfunc.layer_gradient_x_activation(lambda t: model(t["x"])[:, c], td2, model, "linear1")
        torch.testing.assert_close(gxa["attr", "linear1"][:, c], one["attr", "linear1"])


def _bert():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(cfg).eval().double()


def test_word_and_position_embeddings_of_bert_match_captum_and_are_complete():
    """captum's BERT recipe: LayerIntegratedGradients(forward, [word_embeddings, position_embeddings]) with the pad
    ids and position ids 0 as baselines; every target from one call, complete over the two sites."""
    model = _bert()
    ids = torch.randint(1, 50, (3, 6))
    pos = torch.arange(6).expand(3, 6)
    fwd = lambda i, p: model(input_ids=i, position_ids=p).logits  # noqa: E731
    td = TensorDict({"input_ids": ids, "position_ids": pos}, batch_size=[3])
    sites = ["bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings"]
    out = LIG(
        lambda t: fwd(t["input_ids"], t["position_ids"]),
        td,
        model,
        sites,
        baselines={"input_ids": 0, "position_ids": 0},
        n_steps=30,
        return_convergence_delta=True,
    )
    emb = model.bert.embeddings
    lig = LayerIntegratedGradients(fwd, [emb.word_embeddings, emb.position_embeddings])
    for c in range(3):
        ref = lig.attribute((ids, pos), (torch.zeros_like(ids), torch.zeros_like(pos)), target=c, n_steps=30)
        for s, r in zip(sites, ref):
            torch.testing.assert_close(out["attr", s][:, c], r, atol=1e-9, rtol=1e-7)
    with torch.no_grad():
        gap = fwd(ids, pos) - fwd(torch.zeros_like(ids), torch.zeros_like(pos))
    total = sum(out["attr", s].flatten(2).sum(-1) for s in sites)
    torch.testing.assert_close(total, gap, atol=1e-9, rtol=1e-7)  # both embeddings together: f(x) - f(x')
    assert out["convergence_delta"].abs().max() < 1e-9
    one = LIG(lambda t: fwd(t["input_ids"], t["position_ids"]), td, model, sites[:1], baselines={"input_ids": 0})
    alone = LIG(lambda t: fwd(t["input_ids"], t["position_ids"]), td, model, sites[0], baselines={"input_ids": 0})
    torch.testing.assert_close(one["attr", sites[0]], alone["attr", sites[0]])  # a list of one = the single site


def test_joint_sites_errors():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    td = TensorDict({"x": torch.randn(2, 3)}, batch_size=[2])
    f = lambda t: net(t["x"])  # noqa: E731
    for fn in (LIG, tdfunc.layer_gradient_x_activation):
        name = fn.__name__
        with pytest.raises(
            AttributionError,
            match=re.escape(
                f"tdfunc.{name}: the sites ['0', '2', '0'] name ['0'] more than once; list each site once."
            ),
        ):
            fn(f, td, net, ["0", "2", "0"])
        with pytest.raises(
            TypeError,
            match=re.escape(
                f"tdfunc.{name}: site must be a site string or a non-empty list of site strings, got []; "
                "e.g. 'layer1' or ['emb.word', 'emb.pos']."
            ),
        ):
            fn(f, td, net, [])
        with pytest.raises(TypeError, match=re.escape(f"tdfunc.{name}: site must be a site string or a non-empty")):
            fn(f, td, net, ["0", 2])
        with pytest.raises(AttributionError, match=re.escape(f"tdfunc.{name}: site '1*' names several values")):
            fn(f, td, net, ["0", "1*"])
        with pytest.raises(tdfunc.SiteError, match=re.escape(f"tdfunc.{name}: unknown site 'nope'")):
            fn(f, td, net, ["0", "nope"])
