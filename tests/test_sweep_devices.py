"""Models that span devices: patching, sweeps and edits whose tensors live on another device than the site.

Only one real device (the CPU) exists here, so two set-ups stand in for a multi-GPU ``device_map``:

- a model whose later layers are on ``meta`` behind a forward pre-hook that moves the activations there
  (what accelerate's ``AlignDevicesHook`` does between GPUs): exercises every device move (masks,
  clean values, substitutes, deltas on the CPU reaching a ``meta`` site) — shapes and devices only, as
  ``meta`` has no values;
- ``accelerate.dispatch_model(..., force_hooks=True)`` (the hooks a multi-GPU ``device_map`` installs) on
  one device: values equal to the undispatched model.

Not exercised: values crossing two real devices (needs two GPUs).
"""

from __future__ import annotations

import re

import pytest
import torch

import tdfunc
from tdfunc import EditError


def _split(dtype=torch.float32):
    """Linear-Tanh-Linear-Tanh-Linear with modules '2' on (CPU -> meta at the pre-hook of '2')."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).to(dtype)
    for i in (2, 3, 4):
        net[i].to("meta")
    net[2].register_forward_pre_hook(lambda m, args: tuple(a.to("meta") for a in args))
    return net


def test_the_split_model_spans_two_devices():
    net = _split()
    _, caps = tdfunc.functional_call(net, None, (torch.randn(1, 5, 3),), capture=["0", "3"])
    assert caps["0"].device.type == "cpu" and caps["3"].device.type == "meta"


def test_patching_sweep_over_sites_on_two_devices():
    """The one-hot masks were built on the first site's device and failed at the next one."""
    net = _split()
    clean, corrupt = torch.randn(1, 5, 3), torch.randn(1, 5, 3)
    r = tdfunc.latent.patching_sweep(net, None, (clean,), (corrupt,), ["0", "3"], lambda y: y[0, -1, 0])
    assert r.shape == (2, 5) and r.device.type == "meta"
    r = tdfunc.latent.patching_sweep(net, None, (clean,), (corrupt,), ["0", "3"], lambda y: y[0, -1, 0], over=-1)
    assert r.shape == (2, 4)


def test_patch_with_clean_values_on_another_device():
    net = _split()
    x = torch.randn(1, 5, 3)
    cpu_clean = {"3": torch.randn(1, 5, 4)}  # the site is on meta
    for kw in ({}, {"positions": [1, 3]}, {"patch_fn": lambda v, c: 0.5 * (v + c)}):
        out = tdfunc.latent.patch(net, None, (x,), cpu_clean, "3", **kw)
        assert out.shape == (1, 5, 2) and out.device.type == "meta"


def test_substitute_and_delta_move_to_the_site_and_keep_the_dtype_check():
    net = _split()
    x = torch.randn(1, 5, 3)
    steer_at = tdfunc.latent.steer({"3": torch.ones(4)}, positions=[1, 3])["3"]  # a callable edit: moves its vector
    for edit in (
        torch.zeros(1, 5, 4),
        tdfunc.delta(torch.ones(4)),
        tdfunc.latent.steer({"3": torch.ones(4)})["3"],
        steer_at,
    ):
        out = tdfunc.functional_call(net, None, (x,), edits={"3": edit})
        assert out.device.type == "meta"
    with pytest.raises(EditError) as e:
        tdfunc.functional_call(net, None, (x,), edits={"3": torch.zeros(1, 5, 4, dtype=torch.float64)})
    assert str(e.value) == (
        "tdfunc.functional_call: the substitute at site '3' has dtype torch.float64 on cpu, but the site's value "
        "has dtype torch.float32 on meta; convert it with .to(value.dtype, value.device)."
    )


def test_accelerate_dispatched_gpt2_equals_the_plain_model():
    accelerate = pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, attn_implementation="eager")
    plain = transformers.GPT2LMHeadModel(cfg).eval().double()
    dispatched = transformers.GPT2LMHeadModel(cfg).eval().double()
    dispatched.load_state_dict(plain.state_dict())
    device_map = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu"}
    device_map |= {"transformer.h.1": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu"}
    dispatched = accelerate.dispatch_model(dispatched, device_map=device_map, force_hooks=True)
    assert hasattr(dispatched.transformer.h[1], "_hf_hook")
    g = torch.Generator().manual_seed(1)
    clean, corrupt = (torch.randint(0, 64, (2, 7), generator=g) for _ in range(2))
    metric = lambda o: o.logits[:, -1, 3].mean()  # noqa: E731
    want = tdfunc.latent.patching_sweep(plain, None, (clean,), (corrupt,), "transformer.h.*", metric)
    for reuse in (False, True):
        got = tdfunc.latent.patching_sweep(
            dispatched, None, (clean,), (corrupt,), "transformer.h.*", metric, reuse_prefix=reuse
        )
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    v = torch.randn(32, dtype=torch.float64)
    edits = tdfunc.latent.steer({"transformer.h.0": v}, 2.0)
    torch.testing.assert_close(
        tdfunc.functional_call(dispatched, None, (corrupt,), edits=edits).logits,
        tdfunc.functional_call(plain, None, (corrupt,), edits=edits).logits,
        atol=1e-10,
        rtol=0,
    )
    with pytest.raises(EditError, match=re.escape("has dtype torch.float32 on cpu, but the site's value has dtype")):
        tdfunc.functional_call(dispatched, None, (corrupt,), edits={"transformer.h.0": tdfunc.delta(v.float())})
