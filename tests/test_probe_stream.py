"""Streaming probes (issue 14: tdhook's ProbeManager lifecycle): the pure state steps equal the fit on the
concatenated data (mean difference, exactly) or probe_fit / a torch.optim.Adam reference (trained kinds);
stream_probes on scikit-learn's digits against fitting on the concatenated cache and against tdhook's
ProbeManager on the same activations; pinned errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from tensordict import TensorDict

import tdfunc
from tdfunc.latent import ProbeError

L = tdfunc.latent
DT = torch.float64


def _digits(dtype=DT, binary=False):
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=dtype), torch.tensor(y)
    if binary:
        y = (y % 2 == 0).long()
    return x, y


def _net(dtype=DT):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16)).to(dtype)


def _batches(x, y, size, lo=0, hi=None):
    hi = x.shape[0] if hi is None else hi
    return [
        TensorDict(
            {"input": x[i : min(i + size, hi)], "label": y[i : min(i + size, hi)]}, batch_size=[min(i + size, hi) - i]
        )
        for i in range(lo, hi, size)
    ]


def test_mean_difference_stream_equals_fit_on_concatenated_cache():
    x, y = _digits()
    net = _net()
    s = tdfunc.state(net)
    train, test = _batches(x, y, 128, 0, 1400), _batches(x, y, 100, 1400)
    out = L.stream_probes(net, s, train, ["0", "1", "2"], n_classes=10, kind="mean_difference", eval_batches=test)
    cache = L.cache_activations(net, s, train, ["0", "1", "2"], progress=False)
    held = L.cache_activations(net, s, test, ["0", "1", "2"], progress=False)
    for site in ("0", "1", "2"):
        full = L.probe_fit("mean_difference", cache[site], y[:1400])
        torch.testing.assert_close(out["params", site, "means"], full["means"], rtol=1e-12, atol=1e-12)
        for phase, acts, labels in (("fit", cache, y[:1400]), ("predict", held, y[1400:])):
            ref = L.probe_evaluate(full, acts[site], labels)
            torch.testing.assert_close(out[phase, site, "accuracy"], ref["accuracy"], rtol=0, atol=1e-12)
            torch.testing.assert_close(out[phase, site, "loss"], ref["loss"], rtol=1e-10, atol=1e-12)
    assert float(out["predict", "2", "accuracy"]) > 0.5  # nearest class mean of a random net's features (chance 0.1)


@pytest.mark.parametrize("kind,rank", [("linear", None), ("bilinear", None), ("low_rank_bilinear", 3)])
def test_one_batch_streamed_steps_times_equals_probe_fit(kind, rank):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 6, generator=g, dtype=DT), torch.randint(0, 3, (50,), generator=g)
    acts = TensorDict({"h": x}, batch_size=[50])
    st = L.probe_stream_init(kind, acts, 3, rank=rank, generator=torch.Generator().manual_seed(1))
    for _ in range(30):
        st = L.probe_stream_update(st, acts, y, lr=0.05, weight_decay=0.01)
    ref = L.probe_fit(
        kind,
        x,
        y,
        steps=30,
        lr=0.05,
        weight_decay=0.01,
        rank=rank,
        n_classes=3,
        generator=torch.Generator().manual_seed(1),
    )
    got = L.probe_stream_params(st)["h"]
    assert set(got.keys()) == set(ref.keys())
    for name in ref.keys():
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12)


def test_minibatch_adam_equals_torch_optim_reference():
    x, y = _digits()
    acts = [
        TensorDict({"a": x[i : i + 200], "b": x[i : i + 200, :20]}, batch_size=[x[i : i + 200].shape[0]])
        for i in range(0, 1000, 200)
    ]
    st = L.probe_stream_init("linear", acts[0], 10, generator=torch.Generator().manual_seed(0))
    lins = {}
    for site in ("a", "b"):  # torch.optim.Adam on nn.Linear from the same initialisation
        lin = torch.nn.Linear(st["params", site, "weight"].shape[1], 10).to(DT)
        with torch.no_grad():
            lin.weight.copy_(st["params", site, "weight"])
            lin.bias.copy_(st["params", site, "bias"])
        lins[site] = (lin, torch.optim.Adam(lin.parameters(), lr=0.02, weight_decay=0.0))
    for _ in range(3):
        for i, a in enumerate(acts):
            st = L.probe_stream_update(st, a, y[200 * i : 200 * (i + 1)], lr=0.02)
            for site, (lin, opt) in lins.items():
                opt.zero_grad()
                torch.nn.functional.cross_entropy(lin(a[site]), y[200 * i : 200 * (i + 1)]).backward()
                opt.step()
    got = L.probe_stream_params(st)
    for site, (lin, _) in lins.items():
        torch.testing.assert_close(got[site, "weight"], lin.weight.detach(), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(got[site, "bias"], lin.bias.detach(), rtol=1e-9, atol=1e-11)
    assert float(st["step"]) == 15


def _tdhook_manager(estimator_class, kwargs, to_numpy):
    from tdhook.latent.probing import ProbeManager

    def metrics(pred, labels):
        pred = torch.as_tensor(np.asarray(pred))
        return {"accuracy": float((pred.long() == torch.as_tensor(np.asarray(labels))).double().mean())}

    prep = (lambda d: d.detach().flatten(1).numpy()) if to_numpy else None
    return ProbeManager(estimator_class, kwargs, metrics, data_preprocess_callback=prep)


def test_stream_probes_equal_tdhook_probe_manager_mean_difference():
    pytest.importorskip("tdhook.latent.probing")
    from tdhook.latent.probing import MeanDifferenceClassifier

    x, y = _digits(binary=True)
    net = _net()
    s = tdfunc.state(net)
    train, test = _batches(x, y, 256, 0, 1300), _batches(x, y, 256, 1300)
    out = L.stream_probes(
        net, s, train, ["0", "2"], n_classes=2, kind="mean_difference", normalize=True, eval_batches=test
    )
    fit_acts = L.cache_activations(net, s, train, ["0", "2"], progress=False)
    pred_acts = L.cache_activations(net, s, test, ["0", "2"], progress=False)
    manager = _tdhook_manager(MeanDifferenceClassifier, {"normalize": True}, to_numpy=True)
    for site in ("0", "2"):  # tdhook's lifecycle: one fit step, one predict step per probe
        probe = manager.probe_factory(site, "fwd")
        probe.step(fit_acts[site], labels=y[:1300].numpy(), step_type="fit")
        probe.step(pred_acts[site], labels=y[1300:].numpy(), step_type="predict")
        est = manager.estimators[f"{site}_fwd"]
        z = L.probe_apply(out["params", site], pred_acts[site])
        np.testing.assert_allclose(
            (z[:, 1] - z[:, 0]).numpy(), est._decision_function(pred_acts[site].numpy()), rtol=1e-9, atol=1e-9
        )
        for phase in ("fit", "predict"):
            assert float(out[phase, site, "accuracy"]) == pytest.approx(
                manager.results[phase, f"{site}_fwd", "accuracy"].item(), abs=1e-7
            )  # tdhook stores float32


def test_stream_probes_linear_close_to_tdhook_linear_estimator_on_digits():
    pytest.importorskip("tdhook.latent.probing")
    from tdhook.latent.probing import LinearEstimator

    x, y = _digits(torch.float32)
    net = _net(torch.float32)
    s = tdfunc.state(net)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(1400, generator=gen)
    train = _batches(x[perm], y[perm], 64)
    test = _batches(x, y, 200, 1400)
    out = L.stream_probes(
        net,
        s,
        train,
        ["0"],
        n_classes=10,
        epochs=25,
        lr=0.01,
        eval_batches=test,
        generator=torch.Generator().manual_seed(0),
    )
    fit_acts = L.cache_activations(net, s, train, ["0"], progress=False)
    pred_acts = L.cache_activations(net, s, test, ["0"], progress=False)
    torch.manual_seed(0)
    manager = _tdhook_manager(
        LinearEstimator, {"d_latent": 32, "num_classes": 10, "epochs": 25, "lr": 0.01, "batch_size": 64}, to_numpy=False
    )
    probe = manager.probe_factory("0", "fwd")
    probe.step(fit_acts["0"], labels=torch.cat([b["label"] for b in train]), step_type="fit")
    probe.step(pred_acts["0"], labels=y[1400:], step_type="predict")
    ours, theirs = float(out["predict", "0", "accuracy"]), manager.results["predict", "0_fwd", "accuracy"].item()
    assert ours > 0.8 and theirs > 0.8  # measured: 0.851 and 0.849
    assert abs(ours - theirs) < 0.04  # both minibatch Adam, lr 0.01, 25 epochs of batches of 64 (different shuffles)


def _raises(msg, fn, *args, err=ProbeError, **kwargs):
    with pytest.raises(err, match=f"^{re.escape(msg)}$"):
        fn(*args, **kwargs)


def test_pinned_errors_stream():
    acts = TensorDict({"h": torch.randn(6, 3)}, batch_size=[6])
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    md = L.probe_stream_init("mean_difference", acts, 3)
    lin = L.probe_stream_init("linear", acts, 2)
    _raises(
        "tdfunc.latent.probe_stream_update: state must be the TensorDict of tdfunc.latent.probe_stream_init (or of "
        "probe_stream_update), got TensorDict with keys ['means'].",
        L.probe_stream_update,
        TensorDict({"means": torch.zeros(2, 3)}, batch_size=[]),
        acts,
        y,
    )
    _raises(
        "tdfunc.latent.probe_stream_params: state must be the TensorDict of tdfunc.latent.probe_stream_init (or of "
        "probe_stream_update), got dict.",
        L.probe_stream_params,
        {},
    )
    _raises(
        "tdfunc.latent.probe_stream_update: acts lacks the state's sites ['h'] (it has ['g']); pass the activations "
        "of the sites the state was initialised with.",
        L.probe_stream_update,
        md,
        TensorDict({"g": torch.randn(6, 3)}, batch_size=[6]),
        y,
    )
    _raises(
        "tdfunc.latent.probe_stream_update: acts['h'] has width 4 but the state's probe there has width 3; pass the "
        "same sites, reduced the same way, for every batch.",
        L.probe_stream_update,
        lin,
        TensorDict({"h": torch.randn(6, 4)}, batch_size=[6]),
        y,
    )
    _raises(
        "tdfunc.latent.probe_stream_update: y holds labels in [0, 2] but the state has n_classes=2; labels are class "
        "indices 0..1.",
        L.probe_stream_update,
        lin,
        acts,
        torch.tensor([0, 1, 2, 0, 1, 0]),
    )
    _raises(
        "tdfunc.latent.probe_stream_update: lr must be a number > 0, got 0.", L.probe_stream_update, lin, acts, y, lr=0
    )
    _raises(
        "tdfunc.latent.probe_stream_params: classes [2] had no example in the batches streamed so far, so their mean "
        "is undefined; stream more data or initialise with n_classes equal to the classes present.",
        L.probe_stream_params,
        L.probe_stream_update(md, acts, y),
    )
    _raises(
        "tdfunc.latent.probe_stream_params: normalize=True rescales the mean-difference probe, but kind='linear'; use "
        "kind='mean_difference' or drop normalize.",
        L.probe_stream_params,
        lin,
        normalize=True,
    )
    _raises(
        "tdfunc.latent.probe_stream_init: n_classes must be an integer >= 2, got 1.",
        L.probe_stream_init,
        "linear",
        acts,
        1,
    )
    net = torch.nn.Sequential(torch.nn.Linear(3, 4))
    batch = TensorDict({"input": torch.randn(6, 3), "y": y}, batch_size=[6])
    _raises(
        "tdfunc.latent.stream_probes: every batch must be a TensorDict holding the labels at label_key='label', got "
        "['input', 'y']; pass label_key= naming the labels' entry.",
        L.stream_probes,
        net,
        None,
        [batch],
        ["0"],
        n_classes=2,
    )
    _raises(
        "tdfunc.latent.stream_probes: batches is empty; pass at least one batch (a re-iterable list or DataLoader).",
        L.stream_probes,
        net,
        None,
        [],
        ["0"],
        n_classes=2,
    )
    _raises(
        "tdfunc.latent.stream_probes: y holds labels in [0, 2] but the state has n_classes=2; labels are class "
        "indices 0..1.",
        L.stream_probes,
        net,
        None,
        [batch.clone().set("label", y * 2)],
        ["0"],
        n_classes=2,
    )
    _raises(
        "tdfunc.latent.stream_probes: epochs must be an integer >= 1, got 0.",
        L.stream_probes,
        net,
        None,
        [batch],
        ["0"],
        n_classes=2,
        epochs=0,
    )
