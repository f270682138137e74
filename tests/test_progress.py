"""Progress bars of long calls (``progress=True``): shown eagerly with the right total, never under
``vmap`` / ``grad`` / ``torch.compile``, and the results equal those of ``progress=False`` bit for bit
(where ``progress=True`` turns a ``vmap(..., chunk_size=...)`` into an explicit loop over the chunks).
"""

from __future__ import annotations

import re

import pytest
import torch
import tqdm.auto
from tensordict import TensorDict
from torch.func import grad, vmap

import tdfunc
from tdfunc._progress import active, n_chunks, progress_bar, vmap_chunks

DT = torch.float64


class Recorder:
    """Replaces ``tqdm.auto.tqdm``: records every bar made (desc, total, count at close)."""

    def __init__(self):
        self.bars = []
        outer = self

        class Bar(tqdm.auto.tqdm):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                outer.bars.append(self)

        self.cls = Bar

    def summary(self) -> list[tuple]:
        return [(b.desc.rstrip(": "), b.total, b.n) for b in self.bars]


@pytest.fixture
def bars(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(tqdm.auto, "tqdm", rec.cls)
    return rec


def _net(d_in=3, d_out=2):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d_in, 4), torch.nn.Tanh(), torch.nn.Linear(4, d_out)).to(DT)


NET = _net()
TD = TensorDict({"x": torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(1))}, batch_size=[5])
F = lambda t: NET(t["x"])  # noqa: E731
PERMS = torch.stack([torch.randperm(3, generator=torch.Generator().manual_seed(s)) for s in range(4)])
COAL = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 1], [0, 1, 0], [1, 0, 1], [0, 0, 1]], dtype=torch.bool)


def _sweep(**kw):
    clean = torch.randn(1, 7, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    corrupt = torch.randn(1, 7, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    return tdfunc.latent.patching_sweep(NET, None, (clean,), (corrupt,), ["0", "1", "2"], lambda y: y[0, -1, 0], **kw)


def _tvs(**kw):
    pre, ft = _net(3, 1), _net(3, 1)
    with torch.no_grad():
        ft[0].weight.add_(0.5)
    x = torch.randn(16, 3, dtype=DT, generator=torch.Generator().manual_seed(4))
    tv = tdfunc.weights.task_vector(tdfunc.state(ft), tdfunc.state(pre))
    close = lambda s: -(tdfunc.functional_call(pre, s, (x,)) - ft(x)).square().mean()  # noqa: E731
    return tdfunc.weights.task_vector_sweep(pre, tdfunc.state(pre), tv, torch.linspace(0, 2, 7, dtype=DT), close, **kw)


def _probe_data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(60, 5, dtype=DT, generator=g)
    acts = TensorDict(
        {"a": x, "b": torch.randn(60, 5, dtype=DT, generator=g), "c": torch.randn(60, 3, dtype=DT, generator=g)},
        batch_size=[],
    )
    return x, (x[:, 0] > 0).long(), acts


def _sg(**kw):
    return tdfunc.smooth_grad(
        tdfunc.saliency, F, TD, nt_samples=7, stdevs=0.3, generator=torch.Generator().manual_seed(0), **kw
    )


def _attr(td):
    return td["attr", "x"]


def _probe_fit(**kw):
    x, y, _ = _probe_data()
    return tdfunc.latent.probe_fit("linear", x, y, steps=12, lr=0.05, generator=torch.Generator().manual_seed(0), **kw)


def _fit_probes(**kw):
    _, y, acts = _probe_data()
    return tdfunc.latent.fit_probes(acts, y, steps=12, lr=0.05, generator=torch.Generator().manual_seed(0), **kw)


# name: (call(**kw) -> TensorDict or tensor, chunk_size that splits the work unevenly, expected bar total
#        with that chunk_size, expected total without chunk_size)
CASES = {
    "patching_sweep": (_sweep, 3, 3 * 3, 3),  # 3 sites x ceil(7 / 3) chunks; 3 sites
    "task_vector_sweep": (_tvs, 3, 3, 1),  # ceil(7 alphas / 3)
    "integrated_gradients": (lambda **kw: _attr(tdfunc.integrated_gradients(F, TD, n_steps=10, **kw)), 4, 3, 1),
    "smooth_grad": (lambda **kw: _attr(_sg(**kw)), 3, 3, 1),
    "occlusion": (lambda **kw: _attr(tdfunc.occlusion(F, TD, sliding_window_shapes=(1,), **kw)), 2, 2, 1),
    "feature_ablation": (lambda **kw: _attr(tdfunc.feature_ablation(F, TD, **kw)), 2, 2, 1),
    "shapley_value_sampling": (
        lambda **kw: _attr(tdfunc.shapley_value_sampling(F, TD, n_samples=4, permutations=PERMS, **kw)),
        5,
        3,
        1,
    ),  # 4 x 3 perturbations
    "kernel_shap": (lambda **kw: _attr(tdfunc.kernel_shap(F, TD, n_samples=7, coalitions=COAL, **kw)), 3, 3, 1),
    "probe_fit": (_probe_fit, None, 12, 12),  # Adam steps
    "fit_probes": (_fit_probes, None, 24, 24),  # 12 steps x 2 width groups (5 and 3)
}
DESC = {
    "patching_sweep": "tdfunc.latent.patching_sweep",
    "task_vector_sweep": "tdfunc.weights.task_vector_sweep",
    "probe_fit": "tdfunc.latent.probe_fit",
    "fit_probes": "tdfunc.latent.fit_probes",
}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    ka = sorted(a.keys(include_nested=True, leaves_only=True), key=str)
    kb = sorted(b.keys(include_nested=True, leaves_only=True), key=str)
    return ka == kb and all(torch.equal(a.get(k), b.get(k)) for k in ka)


# --------------------------------------------------------------------------------------------- helper


def test_helper_off_returns_the_iterable_and_makes_no_bar(bars):
    r = range(3)
    assert progress_bar(r, enabled=False, desc="x") is r
    assert progress_bar(enabled=False, desc="x") is None
    bar = progress_bar(r, enabled=True, desc="x")
    assert list(bar) == [0, 1, 2] and bars.summary() == [("x", 3, 3)]
    assert n_chunks(7, None) == 1 and n_chunks(7, 3) == 3 and n_chunks(6, 3) == 2 and n_chunks(2, 5) == 1


def test_helper_silent_under_transforms_and_compile(bars):
    seen = []

    def f(x):
        seen.append(active(True))
        it = progress_bar(range(2), enabled=True, desc="inner")
        seen.append(type(it) is range)
        return x.sin().sum()

    vmap(f)(torch.randn(3, 2))
    grad(f)(torch.randn(2))
    vmap(grad(f))(torch.randn(3, 2))
    torch.compile(f, backend="aot_eager", fullgraph=True)(torch.randn(2))
    assert seen and not any(seen[0::2]) and all(seen[1::2])
    assert bars.bars == [] and active(True) and not active(False)


def test_vmap_chunks_is_vmaps_own_chunking():
    x = torch.randn(10, 3, dtype=DT)
    w = {"a": torch.randn(10, 2, dtype=DT), ("b", "c"): torch.randn(10, dtype=DT)}
    fun = lambda x, w: {"s": (x.sin() * w["a"].sum()).sum(), "t": x * w[("b", "c")]}  # noqa: E731

    class Ticks:
        n = 0

        def update(self, k):
            self.n += k

    for cs in (None, 1, 3, 4, 10, 11):
        ref = vmap(fun, chunk_size=cs)(x, w)
        ticks = Ticks()
        got = vmap_chunks(fun, cs, ticks)(x, w)
        assert torch.equal(got["s"], ref["s"]) and torch.equal(got["t"], ref["t"])
        assert ticks.n == n_chunks(10, cs)


# ------------------------------------------------------------------------------------ every function


@pytest.mark.parametrize("name", list(CASES))
def test_bar_total_and_equal_results(name, bars):
    call, cs, total_chunked, total_all = CASES[name]
    desc = DESC.get(name, f"tdfunc.{name}")
    for chunk_kw, total in (({}, total_all), ({"chunk_size": cs} if cs else {}, total_chunked)):
        off = call(**chunk_kw)
        assert bars.bars == []  # progress defaults to False: no bar made
        on = call(progress=True, **chunk_kw)
        assert _equal(on, off), name  # bit for bit, float64
        assert bars.summary() == [(desc, total, total)], name
        bars.bars.clear()


def test_bar_on_stderr(capsys):
    _sweep(chunk_size=3, progress=True)
    err = capsys.readouterr()
    assert "tdfunc.latent.patching_sweep" in err.err and "9/9" in err.err and err.out == ""
    _probe_fit()
    assert capsys.readouterr().err == ""


def test_cache_activations_uses_the_helper(bars):
    data = [TensorDict({"input": torch.randn(5, 3, dtype=DT)}, batch_size=[5]) for _ in range(3)]
    tdfunc.latent.cache_activations(NET, None, data, "1")  # progress=True by default
    assert bars.summary() == [("tdfunc.latent.cache_activations", 3, 3)]
    bars.bars.clear()
    tdfunc.latent.cache_activations(NET, None, data, "1", progress=False)
    assert bars.bars == []


# ----------------------------------------------------------------------------- inside transforms


def test_nothing_shown_under_vmap_and_grad(bars, capfd):
    xs = torch.randn(3, 5, 3, dtype=DT)

    def ig(x, progress):
        return tdfunc.integrated_gradients(
            F, TensorDict({"x": x}, batch_size=[5]), n_steps=6, chunk_size=4, progress=progress
        )["attr", "x"]

    assert torch.equal(vmap(lambda x: ig(x, True))(xs), vmap(lambda x: ig(x, False))(xs))
    g_on = grad(lambda x: ig(x, True).sum())(xs[0])
    assert torch.equal(g_on, grad(lambda x: ig(x, False).sum())(xs[0]))

    clean = torch.randn(1, 7, 3, dtype=DT)
    corrupts = torch.randn(2, 1, 7, 3, dtype=DT)
    sweep = lambda c, p: tdfunc.latent.patching_sweep(
        NET,
        None,
        (clean,),
        (c,),
        ["0", "2"],
        lambda y: y[0, -1, 0],  # noqa: E731
        chunk_size=3,
        progress=p,
    )
    assert torch.equal(vmap(lambda c: sweep(c, True))(corrupts), vmap(lambda c: sweep(c, False))(corrupts))
    assert torch.equal(
        grad(lambda c: sweep(c, True).sum())(corrupts[0]), grad(lambda c: sweep(c, False).sum())(corrupts[0])
    )

    noise = torch.randn(2, 7, 5, 3, dtype=DT)
    sg = lambda n, p: _attr(
        tdfunc.smooth_grad(
            tdfunc.saliency,
            F,
            TD,
            nt_samples=7,
            noise=n,
            chunk_size=3,  # noqa: E731
            progress=p,
        )
    )
    assert torch.equal(vmap(lambda n: sg(n, True))(noise), vmap(lambda n: sg(n, False))(noise))
    assert bars.bars == [] and capfd.readouterr().err == ""


def test_nothing_shown_inside_compile(bars, capfd):
    torch._dynamo.reset()
    x = TD["x"].clone()

    def ig(x, progress):
        return tdfunc.integrated_gradients(
            F, TensorDict({"x": x}, batch_size=[5]), n_steps=6, chunk_size=4, progress=progress
        )["attr", "x"]

    def occ(x, progress):
        return tdfunc.occlusion(
            F, TensorDict({"x": x}, batch_size=[5]), sliding_window_shapes=(1,), chunk_size=2, progress=progress
        )["attr", "x"]

    for fun in (ig, occ):
        compiled = torch.compile(lambda x, fun=fun: fun(x, True), backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), fun(x, False), rtol=1e-12, atol=1e-12)
    assert bars.bars == [] and capfd.readouterr().err == ""


# ------------------------------------------------------------------------------------------- errors


PINNED = {
    "tdfunc.integrated_gradients": (
        lambda: tdfunc.integrated_gradients(F, TD, progress="yes"),
        tdfunc.AttributionError,
    ),
    "tdfunc.smooth_grad": (lambda: tdfunc.smooth_grad(tdfunc.saliency, F, TD, progress="yes"), tdfunc.AttributionError),
    "tdfunc.kernel_shap": (lambda: tdfunc.kernel_shap(F, TD, progress="yes"), tdfunc.AttributionError),
    "tdfunc.latent.patching_sweep": (lambda: _sweep(progress="yes"), tdfunc.latent.PatchError),
    "tdfunc.latent.probe_fit": (lambda: _probe_fit(progress="yes"), tdfunc.latent.ProbeError),
    "tdfunc.latent.cache_activations": (
        lambda: tdfunc.latent.cache_activations(NET, None, [], "1", progress="yes"),
        tdfunc.latent.CacheError,
    ),
    "tdfunc.weights.task_vector_sweep": (lambda: _tvs(progress="yes"), tdfunc.weights.WeightError),
}


@pytest.mark.parametrize("fn", list(PINNED))
def test_progress_type_error_pinned(fn):
    call, family = PINNED[fn]
    msg = f"{fn}: progress must be True or False, got str ('yes'); pass progress=True or progress=False."
    with pytest.raises(TypeError, match="^" + re.escape(msg) + "$") as info:
        call()
    assert isinstance(info.value, family)
