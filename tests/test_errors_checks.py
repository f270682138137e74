"""The checks of tdfunc/_checks.py, pinned word for word.

One rule for every public function: a wrong type raises ``TypeError`` (an instance of the family's error
too, so ``except AttributionError`` keeps working), a wrong value the family's ``ValueError`` subclass;
the message names the function, echoes the value and says what to pass.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

import tdfunc
from tdfunc import AttributionError
from tdfunc.latent import CacheError, PatchError, ProbeError
from tdfunc.weights import WeightError

NET = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
X = torch.randn(2, 4)
TD = TensorDict({"x": X}, batch_size=[2])
F = lambda t: NET(t["x"])  # noqa: E731
STATE = tdfunc.state(NET)
GEN = "e.g. generator=torch.Generator().manual_seed(0)."
MOD = "pass the model itself (the nn.Module to run)."

# (name, call, family, is a wrong type, message)
PINNED = [
    (
        "task_vector_sweep_chunk_size",
        lambda: tdfunc.weights.task_vector_sweep(
            NET,
            STATE,
            tdfunc.weights.task_vector(STATE, STATE),
            torch.linspace(0, 1, 3),
            lambda s: s["0", "weight"].sum(),
            chunk_size=0,
        ),
        WeightError,
        False,
        "tdfunc.weights.task_vector_sweep: chunk_size must be None or an integer >= 1, got 0.",
    ),
    (
        "kernel_shap_chunk_size",
        lambda: tdfunc.kernel_shap(F, TD, chunk_size=0),
        AttributionError,
        False,
        "tdfunc.kernel_shap: chunk_size must be None or an integer >= 1, got 0.",
    ),
    (
        "patching_sweep_chunk_size",
        lambda: tdfunc.latent.patching_sweep(
            NET, None, (X[:, None],), (X[:, None],), "0", lambda y: y.sum(), chunk_size=0
        ),
        PatchError,
        False,
        "tdfunc.latent.patching_sweep: chunk_size must be None or an integer >= 1, got 0.",
    ),
    (
        "kernel_shap_n_samples_float",
        lambda: tdfunc.kernel_shap(F, TD, n_samples=2.5),
        AttributionError,
        True,
        "tdfunc.kernel_shap: n_samples must be an integer >= 1, got 2.5.",
    ),
    (
        "lora_rank_float",
        lambda: tdfunc.weights.lora_init(STATE, "0", rank=1.5),
        WeightError,
        True,
        "tdfunc.weights.lora_init: rank must be an integer >= 1, got 1.5.",
    ),
    (
        "shapley_generator",
        lambda: tdfunc.shapley_value_sampling(F, TD, generator=3),
        AttributionError,
        True,
        f"tdfunc.shapley_value_sampling: generator must be a torch.Generator or None, got int (3); {GEN}",
    ),
    (
        "kernel_shap_generator",
        lambda: tdfunc.kernel_shap(F, TD, generator="seed"),
        AttributionError,
        True,
        f"tdfunc.kernel_shap: generator must be a torch.Generator or None, got str ('seed'); {GEN}",
    ),
    (
        "infidelity_generator",
        lambda: tdfunc.infidelity(F, TD, tdfunc.saliency(F, TD), generator=0),
        AttributionError,
        True,
        f"tdfunc.infidelity: generator must be a torch.Generator or None, got int (0); {GEN}",
    ),
    (
        "probe_init_generator",
        lambda: tdfunc.latent.probe_init("linear", 4, 2, generator=1),
        ProbeError,
        True,
        f"tdfunc.latent.probe_init: generator must be a torch.Generator or None, got int (1); {GEN}",
    ),
    (
        "sae_init_generator",
        lambda: tdfunc.weights.sae_init(4, 8, generator=1),
        WeightError,
        True,
        f"tdfunc.weights.sae_init: generator must be a torch.Generator or None, got int (1); {GEN}",
    ),
    (
        "patch_module",
        lambda: tdfunc.latent.patch("m", None, (X,), {}, "0"),
        PatchError,
        True,
        f"tdfunc.latent.patch: expected an nn.Module as the module, got str ('m'); {MOD}",
    ),
    (
        "patching_sweep_module",
        lambda: tdfunc.latent.patching_sweep(None, None, (X,), (X,), "0", lambda y: y.sum()),
        PatchError,
        True,
        f"tdfunc.latent.patching_sweep: expected an nn.Module as the module, got NoneType (None); {MOD}",
    ),
    (
        "cache_module",
        lambda: tdfunc.latent.cache_activations(3, None, [], "0", progress=False),
        CacheError,
        True,
        f"tdfunc.latent.cache_activations: expected an nn.Module as the module, got int (3); {MOD}",
    ),
    (
        "generate_greedy_module",
        lambda: tdfunc.latent.generate_greedy("lm", None, torch.tensor([[1]]), 1),
        PatchError,
        True,
        f"tdfunc.latent.generate_greedy: expected an nn.Module as the module, got str ('lm'); {MOD}",
    ),
    (
        "occlusion_window_key",
        lambda: tdfunc.occlusion(F, TD, sliding_window_shapes={"x": (1,), "y": (2,)}),
        AttributionError,
        False,
        "tdfunc.occlusion: sliding_window_shapes names 'y', which is not an attributed input (['x']); give one window "
        "shape per attributed input (a dict key -> window shape, or a bare window shape when there is one input).",
    ),
    (
        "occlusion_strides_key",
        lambda: tdfunc.occlusion(F, TD, sliding_window_shapes=(1,), strides={"x": 1, "z": 1}),
        AttributionError,
        False,
        "tdfunc.occlusion: strides names 'z', which is not an attributed input (['x']); give one stride per attributed "
        "input (a dict key -> stride, or a bare stride when there is one input).",
    ),
    (
        "feature_mask_key",
        lambda: tdfunc.feature_ablation(F, TD, feature_mask={"x": torch.arange(4), "xx": torch.arange(4)}),
        AttributionError,
        False,
        "tdfunc.feature_ablation: feature_mask names 'xx', which is not an attributed input (['x']); give one integer "
        "mask per attributed input (a dict key -> integer mask, or a bare integer mask when there is one input).",
    ),
    (
        "smooth_grad_noise_key",
        lambda: tdfunc.smooth_grad(
            tdfunc.saliency, F, TD, nt_samples=2, noise={"x": torch.randn(2, 2, 4), "y": torch.randn(2, 2, 4)}
        ),
        AttributionError,
        False,
        "tdfunc.smooth_grad: noise names 'y', which is not an attributed input (['x']); give one tensor of shape "
        "(nt_samples, *input.shape) per attributed input.",
    ),
    (
        "baseline_names_no_input",
        lambda: tdfunc.integrated_gradients(F, TensorDict({"x": X, ("baseline", "xx"): X}, batch_size=[2])),
        AttributionError,
        False,
        "tdfunc.integrated_gradients: td holds the baseline ('baseline', 'xx') but no input 'xx' (inputs: ['x']); "
        "store a baseline as ('baseline', key) for an input entry key, or remove it.",
    ),
]


@pytest.mark.parametrize("name, call, family, wrong_type, message", PINNED, ids=[p[0] for p in PINNED])
def test_check_message_is_pinned(name, call, family, wrong_type, message):
    with pytest.raises(family) as info:
        call()
    assert str(info.value) == message
    assert isinstance(info.value, TypeError) == wrong_type
    assert isinstance(info.value, ValueError) and isinstance(info.value, tdfunc.TdfuncError)


def test_a_baseline_of_an_unattributed_input_is_fine():
    td = TensorDict({"x": X, "y": X, ("baseline", "y"): X}, batch_size=[2])
    out = tdfunc.integrated_gradients(F, td, in_keys=["x"], n_steps=2)
    assert out["attr", "x"].shape == (2, 3, 4)
