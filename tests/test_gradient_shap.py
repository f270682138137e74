"""gradient_shap against captum's GradientShap with the same samples (captum's draw order replicated from seeded
numpy / torch RNGs; captum's test cases test_classification and test_basic_multi_input; tolerance: captum's
assertTensorAlmostEqual, sum of |diff| < 1e-4), and against integrated gradients, its expectation over alpha."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torch import nn

import tdfunc

captum_attr = pytest.importorskip("captum.attr")
basic_models = pytest.importorskip("captum.testing.helpers.basic_models")
cls_models = pytest.importorskip("captum.testing.helpers.classification_models")


def rows_to_samples(a, b, n):  # captum's example-major rows (b * n + s) -> our (n, b, ...)
    a = torch.as_tensor(a)
    return a.reshape(b, n, *a.shape[1:]).transpose(0, 1)


def test_classification_equals_captum():  # captum test_classification: SoftmaxModel, 4 baselines, stdevs 0.009
    torch.manual_seed(0)
    num_in, n, b, std = 40, 10, 2, 0.009
    inputs = torch.arange(0.0, num_in * 2.0).reshape(2, num_in)
    baselines = torch.arange(0.0, num_in * 4.0).reshape(4, num_in)
    model = cls_models.SoftmaxModel(num_in, 20, 10)
    np.random.seed(3)
    torch.manual_seed(3)  # captum's order: baseline indices (numpy), input noise (torch), alphas (numpy)
    idx = np.random.choice(4, n * b)
    noise = torch.normal(0, torch.tensor(std).repeat(b * n, num_in))
    al = np.random.uniform(0, 1, b * n)
    np.random.seed(3)
    torch.manual_seed(3)
    ref = captum_attr.GradientShap(model).attribute(inputs, baselines, target=1, n_samples=n, stdevs=std)
    out = tdfunc.gradient_shap(
        lambda t: model(t["x"])[:, 1],
        TensorDict({"x": inputs}, batch_size=[2]),
        TensorDict({"x": baselines}, batch_size=[4]),
        n_samples=n,
        stdevs=std,
        noise=rows_to_samples(noise, b, n) / std,
        alphas=rows_to_samples(al, b, n).float(),
        baseline_index=rows_to_samples(idx, b, n),
    )
    assert float((out["attr", "x"] - ref).abs().sum()) < 1e-4


@pytest.mark.parametrize("mul", [True, False])
def test_basic_multi_input_equals_captum(mul):  # captum test_basic_multi_input(_wo_mutliplying_by_inputs)
    model = basic_models.BasicLinearModel()
    b, n = 10, 50
    x1, x2 = torch.ones(b, 3), torch.ones(b, 4)
    b1, b2 = torch.zeros(20, 3) + (0 if mul else 1 + 2e-5), torch.zeros(20, 4) + (0 if mul else 1 + 2e-5)
    np.random.seed(0)
    torch.manual_seed(0)
    np.random.choice(20, n * b), np.random.choice(20, n * b)  # one index draw per input (all baselines equal)
    al = np.random.uniform(0, 1, b * n)
    np.random.seed(0)
    torch.manual_seed(0)
    ref = captum_attr.GradientShap(model, multiply_by_inputs=mul).attribute((x1, x2), (b1, b2), n_samples=n)
    out = tdfunc.gradient_shap(
        lambda t: model(t["a"], t["b"])[:, 0],
        TensorDict({"a": x1, "b": x2}, batch_size=[b]),
        TensorDict({"a": b1, "b": b2}, batch_size=[20]),
        n_samples=n,
        multiply_by_inputs=mul,
        alphas=rows_to_samples(al, b, n).float(),
        baseline_index=torch.zeros(n, b, dtype=torch.long),
    )
    assert float((out["attr", "a"] - ref[0]).abs().sum()) < 1e-4
    assert float((out["attr", "b"] - ref[1]).abs().sum()) < 1e-4


def test_expectation_over_alpha_is_integrated_gradients():
    """With one baseline, no noise and alpha at the S midpoints, the sample mean is IG's riemann_middle rule;
    with every baseline drawn once, it is the mean of the N IGs."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    f = lambda t: net(t["x"])
    x, refs = torch.randn(5, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    s = 16
    mid = ((torch.arange(s, dtype=torch.float64) + 0.5) / s)[:, None].expand(s, 5)
    for j in range(2):
        out = tdfunc.gradient_shap(
            f,
            TensorDict({"x": x}, batch_size=[5]),
            TensorDict({"x": refs}, batch_size=[2]),
            n_samples=s,
            alphas=mid,
            baseline_index=torch.full((s, 5), j),
        )
        ig = tdfunc.integrated_gradients(
            f,
            TensorDict({"x": x, ("baseline", "x"): refs[j].expand(5, 4)}, batch_size=[5]),
            n_steps=s,
            method="riemann_middle",
        )
        torch.testing.assert_close(out["attr", "x"], ig["attr", "x"], rtol=1e-12, atol=1e-12)
    both = tdfunc.gradient_shap(
        f,
        TensorDict({"x": x}, batch_size=[5]),
        TensorDict({"x": refs}, batch_size=[2]),
        n_samples=2 * s,
        alphas=mid.repeat(2, 1),
        baseline_index=torch.arange(2).repeat_interleave(s)[:, None].expand(2 * s, 5),
    )
    igs = [
        tdfunc.integrated_gradients(
            f,
            TensorDict({"x": x, ("baseline", "x"): r.expand(5, 4)}, batch_size=[5]),
            n_steps=s,
            method="riemann_middle",
        )["attr", "x"]
        for r in refs
    ]
    torch.testing.assert_close(both["attr", "x"], (igs[0] + igs[1]) / 2, rtol=1e-12, atol=1e-12)


def test_generator_draws_in_documented_order_and_chunks_agree():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    td, refs = (
        TensorDict({"x": torch.randn(4, 3)}, batch_size=[4]),
        TensorDict({"x": torch.randn(6, 3)}, batch_size=[6]),
    )
    f = lambda t: net(t["x"])
    a = tdfunc.gradient_shap(f, td, refs, n_samples=7, stdevs=0.2, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    eps, al, idx = (
        torch.randn(7, 4, 3, generator=g),
        torch.rand(7, 4, generator=g),
        torch.randint(6, (7, 4), generator=g),
    )
    b = tdfunc.gradient_shap(
        f, td, refs, n_samples=7, stdevs=0.2, noise=eps, alphas=al, baseline_index=idx, chunk_size=3
    )
    torch.testing.assert_close(a["attr", "x"], b["attr", "x"])


def test_pins_errors():
    net = nn.Sequential(nn.Linear(3, 2))
    f = lambda t: net(t["x"])
    td, refs = (
        TensorDict({"x": torch.randn(4, 3)}, batch_size=[4]),
        TensorDict({"x": torch.randn(6, 3)}, batch_size=[6]),
    )
    with pytest.raises(
        tdfunc.AttributionError,
        match=r"tdfunc.gradient_shap: baseline_index holds 6, outside \[0, 6\) "
        r"for the 6 baselines\.",
    ):
        tdfunc.gradient_shap(f, td, refs, n_samples=2, baseline_index=torch.full((2, 4), 6))
    with pytest.raises(
        tdfunc.AttributionError,
        match=r"tdfunc.gradient_shap: alphas must be a tensor of shape "
        r"\(n_samples, \*batch\) = \(2, 4\) of dtype torch.float32 in \[0, 1\] on cpu, got shape \(2,\)",
    ):
        tdfunc.gradient_shap(f, td, refs, n_samples=2, alphas=torch.rand(2))
    with pytest.raises(
        tdfunc.AttributionError,
        match=r"tdfunc.gradient_shap: baseline_index must be a tensor of shape "
        r"\(n_samples, \*batch\) = \(2, 4\) of integers in \[0, 6\) on cpu, got shape \(2, 4\), dtype "
        r"torch.float32",
    ):
        tdfunc.gradient_shap(f, td, refs, n_samples=2, baseline_index=torch.zeros(2, 4))
    with pytest.raises(
        tdfunc.AttributionError,
        match=r"tdfunc.gradient_shap: td holds the baseline entry "
        r"\('baseline', 'x'\), but gradient_shap draws its baselines from the baselines TensorDict",
    ):
        tdfunc.gradient_shap(f, td.clone().set(("baseline", "x"), torch.zeros(4, 3)), refs)
    with pytest.raises(tdfunc.AttributionError, match=r"tdfunc.gradient_shap: n_samples"):
        tdfunc.gradient_shap(f, td, refs, n_samples=0)


@pytest.mark.parametrize("site,inp", [("1", False), ("3:input", True)])
@pytest.mark.parametrize("mul", [True, False])
def test_layer_gradient_shap_equals_captum_with_the_same_samples(site, inp, mul):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    b, n, nref, std = 3, 6, 4, 0.1
    x, refs = torch.randn(b, 4), torch.randn(nref, 4)
    np.random.seed(3)
    torch.manual_seed(3)
    idx = np.random.choice(nref, n * b)
    noise = torch.normal(0, torch.tensor(std).repeat(b * n, 4))
    al = np.random.uniform(0, 1, b * n)
    out = tdfunc.layer_gradient_shap(
        lambda t: net(t["x"]),
        TensorDict({"x": x}, batch_size=[b]),
        net,
        site,
        TensorDict({"x": refs}, batch_size=[nref]),
        n_samples=n,
        stdevs=std,
        noise=rows_to_samples(noise, b, n) / std,
        alphas=rows_to_samples(al, b, n).float(),
        baseline_index=rows_to_samples(idx, b, n),
        multiply_by_inputs=mul,
    )
    layer = net[1] if site == "1" else net[3]
    for k in range(3):
        np.random.seed(3)
        torch.manual_seed(3)
        ref = captum_attr.LayerGradientShap(net, layer, multiply_by_inputs=mul).attribute(
            x, refs, target=k, n_samples=n, stdevs=std, attribute_to_layer_input=inp
        )
        assert float((out["attr", site][:, k] - ref).abs().sum()) < 1e-4


def test_layer_gradient_shap_of_a_linear_tail_is_the_mean_site_change_times_the_weights():
    """After the site the net is linear, so the gradient is W (no sampling dependence) and the map is
    mean_s (a(x~_s) - a(x'_j)) * W: checked against that slow formula."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, refs = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    eps, al, idx = (
        torch.randn(5, 4, 3, generator=g, dtype=torch.float64),
        torch.rand(5, 4, generator=g, dtype=torch.float64),
        torch.randint(3, (5, 4), generator=g),
    )
    out = tdfunc.layer_gradient_shap(
        lambda t: net(t["x"]),
        TensorDict({"x": x}, batch_size=[4]),
        net,
        "1",
        TensorDict({"x": refs}, batch_size=[3]),
        n_samples=5,
        stdevs=0.2,
        noise=eps,
        alphas=al,
        baseline_index=idx,
    )
    act = lambda v: net[1](net[0](v))
    slow = torch.stack([(act(x + 0.2 * eps[s]) - act(refs[idx[s]])) for s in range(5)]).mean(0)
    torch.testing.assert_close(out["attr", "1"], slow[:, None, :] * net[2].weight[None], rtol=1e-12, atol=1e-12)


def test_layer_gradient_shap_pins_errors():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    td, refs = (
        TensorDict({"x": torch.randn(2, 3)}, batch_size=[2]),
        TensorDict({"x": torch.randn(4, 3)}, batch_size=[4]),
    )
    with pytest.raises(tdfunc.SiteError, match=r"tdfunc.layer_gradient_shap: unknown site 'nope'"):
        tdfunc.layer_gradient_shap(lambda t: net(t["x"]), td, net, "nope", refs)
    with pytest.raises(
        tdfunc.AttributionError,
        match=r"tdfunc.layer_gradient_shap: td holds the baseline entry "
        r"\('baseline', 'x'\), but layer_gradient_shap draws its baselines from the baselines TensorDict",
    ):
        tdfunc.layer_gradient_shap(
            lambda t: net(t["x"]), td.clone().set(("baseline", "x"), torch.zeros(2, 3)), net, "1", refs
        )
