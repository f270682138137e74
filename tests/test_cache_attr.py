"""tdfunc.latent.cache_attributions: any attribution method over a dataset = the method batch by batch (and captum's
Saliency on the whole data), on disk and resumed after an interruption without recomputing, errors pinned.
Data-parallel (torchrun): tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

import tdfunc
from tdfunc.latent import CacheError

FN = "tdfunc.latent.cache_attributions"
torch.manual_seed(0)
NET = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
DATA = [TensorDict({"x": torch.randn(5, 4, generator=torch.Generator().manual_seed(i))}, [5]) for i in range(4)]
F = lambda td: NET(td["x"])[:, 1]  # noqa: E731


def _loop(method, **options):
    parts = [method(F, b, **options) for b in DATA]
    return torch.cat([p["attr", "x"] for p in parts])


@pytest.mark.parametrize(
    "method, options",
    [(tdfunc.saliency, {}), (tdfunc.integrated_gradients, {"n_steps": 8}), (tdfunc.input_x_gradient, {})],
)
def test_equals_the_method_batch_by_batch(method, options):
    got = tdfunc.latent.cache_attributions(method, F, DATA, progress=False, **options)
    assert got.batch_size == torch.Size([20])
    torch.testing.assert_close(got["attr", "x"], _loop(method, **options), rtol=0, atol=0)


def test_saliency_equals_captum_on_the_whole_data():
    captum = pytest.importorskip("captum.attr")
    x = torch.cat([b["x"] for b in DATA])
    for abs_ in (True, False):
        want = captum.Saliency(NET).attribute(x.clone(), target=1, abs=abs_)
        got = tdfunc.latent.cache_attributions(tdfunc.saliency, F, DATA, progress=False, abs=abs_)
        torch.testing.assert_close(got["attr", "x"], want, rtol=1e-6, atol=1e-7)


class Interrupted:
    def __init__(self, after):
        self.after = after

    def __iter__(self):
        for i, b in enumerate(DATA):
            if i == self.after:
                raise KeyboardInterrupt
            yield b


def test_on_disk_resumes_without_recomputing(tmp_path):
    path = str(tmp_path / "ig")
    with pytest.raises(KeyboardInterrupt):
        tdfunc.latent.cache_attributions(
            tdfunc.integrated_gradients, F, Interrupted(2), path=path, progress=False, n_steps=8
        )
    calls = []
    handle = NET.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        got = tdfunc.latent.cache_attributions(
            tdfunc.integrated_gradients, F, DATA, path=path, progress=False, n_steps=8
        )
    finally:
        handle.remove()
    torch.testing.assert_close(
        torch.as_tensor(got["attr", "x"]), _loop(tdfunc.integrated_gradients, n_steps=8), rtol=0, atol=0
    )
    assert len(calls) == 2  # the two batches not yet written (one vmapped call each)
    with pytest.raises(CacheError) as e:  # other options: another run
        tdfunc.latent.cache_attributions(tdfunc.integrated_gradients, F, DATA, path=path, progress=False, n_steps=9)
    assert str(e.value).startswith(
        f"{FN}: the cache at {path!r} was written by another run: f or the options differ (digest "
    )
    assert str(e.value).endswith(
        ": f's code or closure, the model's tensors, or the options). To resume or load it pass the same method, f, "
        "options and batches; otherwise delete the directory or pass a new path to start a new cache."
    )
    with pytest.raises(CacheError) as e:
        tdfunc.latent.cache_attributions(tdfunc.saliency, F, DATA, path=path, progress=False)
    assert str(e.value) == (
        f"{FN}: the cache at {path!r} was written by the method tdfunc.attribution._ig.integrated_gradients but this "
        "call runs tdfunc.attribution._gradient.saliency; pass the same method to resume it, or another path for a "
        "new cache."
    )


def test_errors_cache_attributions():
    with pytest.raises(CacheError) as e:
        tdfunc.latent.cache_attributions(None, F, DATA)
    assert isinstance(e.value, TypeError) and str(e.value) == (
        f"{FN}: method must be a callable method(f, td, **options) -> TensorDict, got NoneType (None); pass a "
        "function (a lambda, a def or an nn.Module)."
    )
    with pytest.raises(CacheError) as e:
        tdfunc.latent.cache_attributions(tdfunc.saliency, F, [torch.ones(2, 4)], progress=False)
    assert str(e.value) == (
        f"{FN}: batch 0 is a Tensor, not a TensorDict; yield TensorDict batches (e.g. "
        "TensorDict({'input': x}, batch_size=[len(x)]))."
    )
    with pytest.raises(CacheError) as e:
        tdfunc.latent.cache_attributions(lambda f, td: f(td), F, DATA, progress=False)
    assert str(e.value) == (
        f"{FN}: method returned a Tensor for batch 0, not a TensorDict; pass a tdfunc attribution "
        "method (tdfunc.saliency, tdfunc.integrated_gradients, ...)."
    )
    per_class = lambda f, td: TensorDict({"attr": torch.zeros(3, 5, 4)}, [])  # noqa: E731
    with pytest.raises(CacheError) as e:
        tdfunc.latent.cache_attributions(per_class, F, DATA, progress=False)
    assert str(e.value) == (
        f"{FN}: the result's 'attr' of batch 0 has shape (3, 5, 4), not the batch's 5 rows on dim 0; give one target "
        "per example (a per-class result puts the classes first: select one, or move them after the batch dim in f)."
    )
