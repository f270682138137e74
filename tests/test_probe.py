"""Probes: torch linear probe vs scikit-learn (and tdhook's ProbeManager) on load_digits, the
mean-difference probe by hand, bilinear where it is needed, fit_probes = per-site fits, joint
training with an intervention, pinned errors."""

from __future__ import annotations

import re
import sys

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch.func import grad

import tdfunc
from tdfunc.latent import (
    ProbeError,
    fit_probes,
    fit_sklearn_probes,
    probe_apply,
    probe_evaluate,
    probe_fit,
    probe_init,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- real data: load_digits


def test_digits_torch_linear_probe_close_to_sklearn_and_tdhook():
    datasets = pytest.importorskip("sklearn.datasets")
    from sklearn.linear_model import LogisticRegression

    xn, yn = datasets.load_digits(return_X_y=True)
    x, y = torch.tensor(xn, dtype=torch.float32), torch.tensor(yn)
    x = (x - x.mean(0)) / (x.std(0) + 1)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    _, caps = tdfunc.functional_call(mlp, tdfunc.state(mlp), (x,), capture=["1"])  # a random MLP's hidden layer
    acts = TensorDict({"pixels": x, "mlp": caps["1"]}, batch_size=[])
    ours = fit_probes(acts, y, steps=200, lr=0.02, generator=_gen(0))
    ref = fit_sklearn_probes(acts, y, random_state=0)  # the same split for the same seed
    assert torch.equal(ours["test_index"], ref["test_index"]) and torch.equal(ours["train_index"], ref["train_index"])
    for site in ("pixels", "mlp"):
        a, b = float(ours["test", site, "accuracy"]), float(ref["test", site, "accuracy"])
        print(f"digits {site}: torch linear probe {a:.4f}, sklearn LogisticRegression {b:.4f}")
        assert b > 0.85 and abs(a - b) < 0.03
    assert float(ours["test", "pixels", "accuracy"]) > 0.93
    # tdhook's ProbeManager driven on the same split, with the same estimator
    managers = pytest.importorskip("tdhook.latent.probing.managers")
    mgr = managers.ProbeManager(
        LogisticRegression, {"max_iter": 1000}, lambda p, t: {"accuracy": torch.tensor(float((p == t).mean()))}
    )
    tr, te = ours["train_index"].numpy(), ours["test_index"].numpy()
    probe = mgr.probe_factory("pixels", "fwd")
    probe.step(x[tr], labels=yn[tr], step_type="fit")
    probe.step(x[te], labels=yn[te], step_type="predict")
    acc_tdhook = float(mgr.results["predict", "pixels_fwd", "accuracy"])
    print(f"digits pixels: tdhook ProbeManager(LogisticRegression) {acc_tdhook:.4f}")
    assert abs(acc_tdhook - float(ref["test", "pixels", "accuracy"])) < 1e-6


# -------------------------------------------------------------------------------------------- kinds


def test_mean_difference_equals_hand_computation():
    g = _gen(1)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randint(3, (40,), generator=g)
    p = probe_fit("mean_difference", x, y)
    means = torch.stack([x[y == c].mean(0) for c in range(3)])
    assert torch.allclose(p["means"], means)
    dist = torch.cdist(x, means)
    assert torch.equal(probe_apply(p, x).argmax(-1), dist.argmin(-1))  # nearest class mean
    # two classes: logit difference = projection on the mean difference, from the midpoint
    y2 = (y > 0).long()
    p2 = probe_fit("mean_difference", x, y2)
    m0, m1 = x[y2 == 0].mean(0), x[y2 == 1].mean(0)
    z = probe_apply(p2, x)
    assert torch.allclose(z[:, 1] - z[:, 0], (x - (m0 + m1) / 2) @ (m1 - m0))
    acc = ((((x - (m0 + m1) / 2) @ (m1 - m0)) > 0).long() == y2).double().mean()
    assert torch.allclose(probe_evaluate(p2, x, y2)["accuracy"], acc)


def test_bilinear_beats_linear_on_a_bilinear_task():
    g = _gen(2)
    n, d = 600, 4
    x1, x2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    a = torch.randn(d, 2, generator=g) @ torch.randn(2, d, generator=g)  # rank 2
    y = (torch.einsum("ni,ij,nj->n", x1, a, x2) > 0).long()
    tr, te = slice(0, 450), slice(450, None)
    both = torch.cat([x1, x2], 1)
    lin = probe_fit("linear", both[tr], y[tr], steps=150, lr=0.05, generator=_gen(0))
    bil = probe_fit("bilinear", (x1[tr], x2[tr]), y[tr], steps=150, lr=0.05, generator=_gen(0))
    low = probe_fit("low_rank_bilinear", (x1[tr], x2[tr]), y[tr], rank=2, steps=150, lr=0.05, generator=_gen(0))
    acc = lambda p, x: float(probe_evaluate(p, x, y[te])["accuracy"])  # noqa: E731
    a_lin, a_bil, a_low = acc(lin, both[te]), acc(bil, (x1[te], x2[te])), acc(low, (x1[te], x2[te]))
    assert a_lin < 0.7 and a_bil > 0.9 and a_low > 0.85, (a_lin, a_bil, a_low)
    assert low["u"].shape == (2, d, 2) and bil["weight"].shape == (2, d, d)


def test_probe_apply_forms_equal_hand_computation():
    g = _gen(3)
    x1, x2 = torch.randn(7, 3, generator=g), torch.randn(7, 4, generator=g)
    lin = probe_init("linear", 3, 5, generator=g)
    assert torch.allclose(probe_apply(lin, x1), x1 @ lin["weight"].T + lin["bias"])
    bil = probe_init("bilinear", (3, 4), 5, generator=g)
    ref = torch.stack([((x1 @ bil["weight"][c]) * x2).sum(1) for c in range(5)], 1) + bil["bias"]
    assert torch.allclose(probe_apply(bil, (x1, x2)), ref, atol=1e-6)
    low = probe_init("low_rank_bilinear", (3, 4), 5, rank=2, generator=g)
    w = low["u"] @ low["v"].mT
    ref = torch.stack([((x1 @ w[c]) * x2).sum(1) for c in range(5)], 1) + low["bias"]
    assert torch.allclose(probe_apply(low, (x1, x2)), ref, atol=1e-6)
    quad = probe_init("bilinear", 3, 2, generator=g)  # one tensor: x1 = x2 = x
    assert torch.allclose(probe_apply(quad, x1), probe_apply(quad, (x1, x1)))
    ev = probe_evaluate(lin, x1, torch.arange(7) % 5)
    assert torch.allclose(ev["loss"], F.cross_entropy(probe_apply(lin, x1), torch.arange(7) % 5))


# --------------------------------------------------------------------------------------- many sites


def test_fit_probes_equals_per_site_probe_fit():
    g = _gen(4)
    n = 80
    y = torch.randint(3, (n,), generator=g)
    acts = TensorDict(
        {
            "a": torch.randn(n, 5, generator=g) + y[:, None],
            "b": torch.randn(n, 5, generator=g),
            "c": torch.randn(n, 3, generator=g) - y[:, None],
        },
        batch_size=[],
    )
    out = fit_probes(acts, y, steps=40, lr=0.05, weight_decay=1e-3, generator=_gen(9))
    gen = _gen(9)
    perm = torch.randperm(n, generator=gen)  # the split is drawn first, then the inits in site order
    test, train = perm[:20].sort().values, perm[20:].sort().values
    assert torch.equal(out["test_index"], test) and torch.equal(out["train_index"], train)
    for site in ("a", "b", "c"):
        p = probe_fit(
            "linear", acts[site][train], y[train], steps=40, lr=0.05, weight_decay=1e-3, n_classes=3, generator=gen
        )
        for key in ("weight", "bias"):
            torch.testing.assert_close(out["params", site, key], p[key], rtol=1e-4, atol=1e-5)
        for phase, idx in (("train", train), ("test", test)):
            ref = probe_evaluate(p, acts[site][idx], y[idx])
            torch.testing.assert_close(out[phase, site, "loss"], ref["loss"], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out[phase, site, "accuracy"], ref["accuracy"])
    assert out["test", "a", "accuracy"] > out["test", "b", "accuracy"]
    md = fit_probes(acts, y, kind="mean_difference", generator=_gen(9))
    torch.testing.assert_close(
        md["params", "c", "means"], probe_fit("mean_difference", acts["c"][train], y[train])["means"]
    )


def test_fit_sklearn_probes_custom_estimator_and_nested_sites():
    pytest.importorskip("sklearn")
    from sklearn.neighbors import KNeighborsClassifier

    g = _gen(5)
    x = torch.randn(60, 4, generator=g)
    y = (x[:, 0] > 0).long()
    acts = TensorDict({"blk": {"mlp": x}}, batch_size=[])
    out = fit_sklearn_probes(acts, y, KNeighborsClassifier(3), test_fraction=0.5, random_state=1)
    assert out["test", "blk", "mlp", "accuracy"] > 0.7 and out["test_index"].numel() == 30
    assert torch.isfinite(out["train", "blk", "mlp", "loss"])


# ------------------------------------------------------------------------------ joint training


def test_probe_trains_jointly_with_an_intervention():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    s = tdfunc.state(net)
    x = torch.randn(32, 4)
    y = (x[:, 0] > 0).long()

    def loss(p, d):  # the probe reads the hidden layer after an additive edit d at "0"
        _, caps = tdfunc.functional_call(net, s, (x,), edits={"0": tdfunc.delta(d)}, capture=["1"])
        return F.cross_entropy(probe_apply(p, caps["1"]), y)

    p, d = probe_init("linear", 6, 2, generator=_gen(0)), torch.zeros(6)
    first = loss(p, d)
    for _ in range(30):
        gp, gd = grad(loss, argnums=(0, 1))(p, d)
        assert gd.abs().sum() > 0 and gp["weight"].abs().sum() > 0
        p, d = p - 0.1 * gp, d - 0.1 * gd
    assert loss(p, d) < first
    assert d.abs().sum() > 0  # the edit itself was trained


# ------------------------------------------------------------------------------------------- errors


def test_errors_probe():
    x, y = torch.randn(10, 3), torch.zeros(10, dtype=torch.long)
    acts = TensorDict({"a": x}, batch_size=[])
    cases = [
        (
            lambda: probe_init("logistic", 3, 2),
            "tdfunc.latent.probe_init: unknown kind 'logistic'; choose one of ['linear', 'bilinear', 'low_rank_bilinear', "
            "'mean_difference'].",
        ),
        (
            lambda: probe_fit("low_rank_bilinear", x, y),
            "tdfunc.latent.probe_fit: kind 'low_rank_bilinear' needs rank, an integer >= 1, got None; pass rank=... "
            "(the rank r of W = U V^T).",
        ),
        (
            lambda: probe_fit("linear", x, y[:7]),
            "tdfunc.latent.probe_fit: y has 7 labels but x has N=10 rows; give one label per row.",
        ),
        (
            lambda: fit_probes(acts, y[:9]),
            "tdfunc.latent.fit_probes: y has 9 labels but acts['a'] has N=10 rows; give one label per row.",
        ),
        (
            lambda: fit_probes(acts, y, test_fraction=1.0),
            "tdfunc.latent.fit_probes: test_fraction must be a number strictly between 0 and 1, got 1.0.",
        ),
        (
            lambda: fit_probes(acts, y, test_fraction=0),
            "tdfunc.latent.fit_probes: test_fraction must be a number strictly between 0 and 1, got 0.",
        ),
        (
            lambda: probe_apply({"w": x}, x),
            "tdfunc.latent.probe_apply: params have keys ['w'], which match no probe kind; pass the TensorDict of "
            "tdfunc.latent.probe_init / probe_fit (weight+bias, u+v+bias or means).",
        ),
        (
            lambda: probe_fit("linear", x, y.float()),
            "tdfunc.latent.probe_fit: y must be a 1-D integer tensor of class indices, got shape (10,) dtype torch.float32; "
            "pass y.long() of shape (N,).",
        ),
    ]
    for call, msg in cases:
        with pytest.raises(ProbeError, match="^" + re.escape(msg) + "$"):
            call()
    assert issubclass(ProbeError, tdfunc.TdfuncError) and issubclass(ProbeError, ValueError)


def test_errors_sklearn_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.base", None)
    msg = (
        "tdfunc.latent.fit_sklearn_probes needs scikit-learn; install the probing extra: pip install 'tdfunc[probing]' "
        "(or pip install scikit-learn)."
    )
    with pytest.raises(ImportError, match="^" + re.escape(msg) + "$"):
        fit_sklearn_probes(TensorDict({"a": torch.randn(4, 2)}, []), torch.zeros(4, dtype=torch.long))
