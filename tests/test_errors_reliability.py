"""Issue 15 (reliability), the method families: every error, pinned word for word, and the non-finite policy.

Inputs are checked at the boundary (NaN / inf in an input, baseline, alpha or activation set: the family's
``ValueError`` naming the entry); a non-finite result warns with ``tdfunc.NonFiniteWarning``; inside transforms
neither check runs (the values cannot be read there).  Each message names the function, echoes the value and
says how to fix it.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tensordict import TensorDict
from torch import nn
from torch.func import vmap

import tdfunc
from tdfunc import AttributionError, NonFiniteWarning, NotReachedError, TdfuncError
from tdfunc._checks import renamed
from tdfunc._errors import public
from tdfunc.latent import CacheError, GeometryError, PatchError, ProbeError
from tdfunc.weights import WeightError

NAN, INF = float("nan"), float("inf")
torch.manual_seed(0)
NET = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
OTHER = copy.deepcopy(NET)
X = torch.randn(5, 3)
TD = TensorDict({"x": X}, batch_size=[5])
F = lambda t: NET(t["x"])  # noqa: E731
F0 = lambda t: NET(t["x"])[:, 0]  # noqa: E731
DROPNET = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 4)).train()
FD = lambda t: DROPNET(t["x"])[:, 0]  # noqa: E731


def nan_at(t: torch.Tensor, *idx) -> torch.Tensor:
    t = t.clone()
    t[idx] = NAN
    return t


def with_entry(key, v) -> TensorDict:
    td = TD.clone()
    td.set(key, v)
    return td


SEQ = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
CLEAN, CORR = torch.randn(1, 5, 3), torch.randn(1, 5, 3)
_, CAPS = tdfunc.functional_call(SEQ, None, (CLEAN,), capture=["0"])
METRIC = lambda y: y[0, -1, 0]  # noqa: E731
DSEQ = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), nn.Linear(6, 2)).train()
PRE, FT = nn.Linear(3, 1), nn.Linear(3, 1)
TV = tdfunc.weights.task_vector(tdfunc.state(FT), tdfunc.state(PRE))
XS = torch.randn(16, 3)
CLOSE = lambda s: -(tdfunc.functional_call(PRE, s, (XS,)) - FT(XS)).square().mean()  # noqa: E731
DROP = nn.Dropout(0.5)
PX, PY = torch.randn(10, 3), torch.tensor([0, 1] * 5)
DUP = torch.randn(12, 3)
DUP[4] = DUP[2]
LM = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5))
IG, SAL, OCC = tdfunc.integrated_gradients, tdfunc.saliency, tdfunc.occlusion
PS, PP, PATCH = tdfunc.latent.patching_sweep, tdfunc.latent.path_patch, tdfunc.latent.patch
SV = tdfunc.latent.steering_vector

CASES = [
    # 1. lrp where f never calls the module (grad mode on and off)
    ("lrp_module_never_called", lambda: tdfunc.lrp(lambda t: OTHER(t["x"]), TD, NET), NotReachedError),
    (
        "lrp_module_never_called_no_grad",
        lambda: _no_grad(lambda: tdfunc.lrp(lambda t: OTHER(t["x"]), TD, NET)),
        NotReachedError,
    ),
    # 2. non-finite inputs (attribution: input, baseline; latent: patching, probe, steering, geometry; weights: alphas)
    ("nan_input_saliency", lambda: SAL(F0, with_entry("x", nan_at(X, 0, 1))), AttributionError),
    ("inf_input_ig", lambda: IG(F0, with_entry("x", X.index_fill(0, torch.tensor([2]), INF))), AttributionError),
    (
        "nan_baseline_ig",
        lambda: IG(F0, with_entry(("baseline", "x"), nan_at(torch.zeros(5, 3), 1, 1))),
        AttributionError,
    ),
    (
        "inf_baseline_occlusion",
        lambda: OCC(F0, with_entry(("baseline", "x"), torch.full((5, 3), INF)), sliding_window_shapes=(1,)),
        AttributionError,
    ),
    ("nan_input_grad_cam", lambda: tdfunc.grad_cam(F, with_entry("x", nan_at(X, 0, 0)), NET, "0"), AttributionError),
    ("nan_input_lrp", lambda: tdfunc.lrp(F, with_entry("x", nan_at(X, 0, 0)), NET), AttributionError),
    ("nan_clean_patching_sweep", lambda: PS(SEQ, None, (nan_at(CLEAN, 0, 1, 1),), (CORR,), "0", METRIC), PatchError),
    ("nan_corrupted_patch", lambda: PATCH(SEQ, None, (nan_at(CORR, 0, 0, 0),), CAPS, "0"), PatchError),
    ("nan_clean_captures_patch", lambda: PATCH(SEQ, None, (CORR,), {"0": nan_at(CAPS["0"], 0, 0, 0)}, "0"), PatchError),
    ("nan_probe_fit", lambda: tdfunc.latent.probe_fit("linear", nan_at(PX, 3, 0), PY), ProbeError),
    ("inf_steering_vector", lambda: SV(torch.ones(4, 2), torch.full((4, 2), -INF)), PatchError),
    (
        "nan_steering_vector_site",
        lambda: SV({"h": nan_at(torch.ones(4, 2), 0, 0)}, {"h": torch.zeros(4, 2)}),
        PatchError,
    ),
    (
        "nan_alpha_task_vector_sweep",
        lambda: tdfunc.weights.task_vector_sweep(PRE, tdfunc.state(PRE), TV, [0, NAN, 0.5], CLOSE),
        WeightError,
    ),
    ("nan_points_twonn", lambda: tdfunc.latent.twonn_dimension(nan_at(DUP, 0, 0)), GeometryError),
    # empty and degenerate sets
    ("steering_vector_empty", lambda: SV(torch.zeros(0, 4), torch.zeros(0, 4)), PatchError),
    ("twonn_duplicate_points", lambda: tdfunc.latent.twonn_dimension(DUP), GeometryError),
    # 3. silently accepted before
    ("probe_fit_steps_0", lambda: tdfunc.latent.probe_fit("linear", PX, PY, steps=0), ProbeError),
    ("fit_probes_steps_0", lambda: tdfunc.latent.fit_probes(TensorDict({"a": PX}, []), PY, steps=0), ProbeError),
    (
        "baseline_key_as_input",
        lambda: SAL(F0, with_entry(("baseline", "x"), torch.zeros(5, 3)), in_keys=[("baseline", "x")]),
        AttributionError,
    ),
    ("empty_batch_rows_as_targets", lambda: SAL(F0, TensorDict({"x": X})), AttributionError),
    ("empty_batch_rows_as_targets_ig", lambda: IG(F0, TensorDict({"x": X}), n_steps=2), AttributionError),
    (
        "empty_batch_rows_as_targets_occlusion",
        lambda: OCC(F0, TensorDict({"x": X}), sliding_window_shapes=(1, 1)),
        AttributionError,
    ),
    (
        "reduce_last_without_positions",
        lambda: tdfunc.latent.cache_activations(
            NET, None, [TensorDict({"input": torch.zeros(4, 3)}, [4])], "0", reduce="last", progress=False
        ),
        CacheError,
    ),
    # 4. raw errors at the boundary
    ("saliency_f_none", lambda: SAL(None, TD), TypeError),
    ("ig_f_not_callable", lambda: IG("model", TD), TypeError),
    ("grad_cam_f_none", lambda: tdfunc.grad_cam(None, TD, NET, "0"), TypeError),
    ("kernel_shap_f_none", lambda: tdfunc.kernel_shap(None, TD), TypeError),
    ("saliency_integer_output", lambda: SAL(lambda t: NET(t["x"]).argmax(-1), TD), AttributionError),
    ("lrp_integer_output", lambda: tdfunc.lrp(lambda t: NET(t["x"]).argmax(-1), TD, NET), AttributionError),
    ("patching_sweep_shapes_differ", lambda: PS(SEQ, None, (CLEAN,), (CORR[:, :3],), "0", METRIC), PatchError),
    ("patch_clean_shape_differs", lambda: PATCH(SEQ, None, (CORR[:, :3],), CAPS, "0", positions=[0]), PatchError),
    ("path_patch_shapes_differ", lambda: PP(SEQ, None, (CLEAN,), (CORR[:, :3],), "0", "2"), PatchError),
    ("patching_sweep_metric_none", lambda: PS(SEQ, None, (CLEAN,), (CORR,), "0", None), TypeError),
    ("random_op_ig", lambda: IG(FD, TD, n_steps=2), AttributionError),
    ("random_op_occlusion", lambda: OCC(FD, TD, sliding_window_shapes=(1,)), AttributionError),
    ("random_op_patching_sweep", lambda: PS(DSEQ, None, (CLEAN,), (CORR,), "0", METRIC), PatchError),
    (
        "random_op_task_vector_sweep",
        lambda: tdfunc.weights.task_vector_sweep(PRE, tdfunc.state(PRE), TV, [0.0, 0.5], lambda s: DROP(CLOSE(s))),
        WeightError,
    ),
    ("randomness_bad_value", lambda: IG(F0, TD, randomness="differnt"), AttributionError),
    ("randomness_bad_value_sweep", lambda: PS(SEQ, None, (CLEAN,), (CORR,), "0", METRIC, randomness=True), PatchError),
    ("patch_names_itself", lambda: PATCH(SEQ, None, (CORR,), {"0": torch.zeros(2, 6)}, "0"), TdfuncError),
    (
        "patching_sweep_names_itself",
        lambda: PS(SEQ, TensorDict({"nope": torch.zeros(1)}, []), (CLEAN,), (CORR,), "0", METRIC),
        TdfuncError,
    ),
    ("path_patch_names_itself", lambda: PP(SEQ, None, (CLEAN,), (CORR,), "0", "2", freeze="1@3"), TdfuncError),
    (
        "generate_greedy_names_itself",
        lambda: tdfunc.latent.generate_greedy(LM, None, torch.tensor([[1, 2]]), 1, edits={"1": torch.zeros(3, 3, 3)}),
        TdfuncError,
    ),
]


def _no_grad(thunk):
    with torch.no_grad():
        return thunk()


PINNED: dict[str, str] = {
    "lrp_module_never_called": "tdfunc.lrp: f never called module (Sequential): none of its 2 rewritten submodules ('0', '2') ran, so the result would be plain input x gradient. f must call the module passed as module (not a copy of it), e.g. tdfunc.lrp(lambda t: model(t['x']), td, model).",
    "lrp_module_never_called_no_grad": "tdfunc.lrp: f never called module (Sequential): none of its 2 rewritten submodules ('0', '2') ran, so the result would be plain input x gradient. f must call the module passed as module (not a copy of it), e.g. tdfunc.lrp(lambda t: model(t['x']), td, model).",
    "nan_input_saliency": "tdfunc.saliency: input 'x' holds 1 NaN value (of 15); replace them (e.g. torch.nan_to_num) or drop those examples before attributing.",
    "inf_input_ig": "tdfunc.integrated_gradients: input 'x' holds 3 infinite values (of 15); replace them (e.g. torch.nan_to_num) or drop those examples before attributing.",
    "nan_baseline_ig": "tdfunc.integrated_gradients: baseline ('baseline', 'x') holds 1 NaN value (of 15); replace them (e.g. torch.nan_to_num) or drop those examples before attributing.",
    "inf_baseline_occlusion": "tdfunc.occlusion: baseline ('baseline', 'x') holds 15 infinite values (of 15); replace them (e.g. torch.nan_to_num) or drop those examples before attributing.",
    "nan_input_grad_cam": "tdfunc.grad_cam: input 'x' holds 1 NaN value (of 15); replace them (e.g. torch.nan_to_num) or drop those examples before attributing.",
    "nan_input_lrp": "tdfunc.lrp: input 'x' holds 1 NaN value (of 15); replace them (e.g. torch.nan_to_num) or drop those examples before attributing.",
    "nan_clean_patching_sweep": "tdfunc.latent.patching_sweep: clean_args[0] holds 1 NaN value (of 15); replace them (e.g. torch.nan_to_num) before patching.",
    "nan_corrupted_patch": "tdfunc.latent.patch: corrupted_args[0] holds 1 NaN value (of 15); replace them (e.g. torch.nan_to_num) before patching.",
    "nan_clean_captures_patch": "tdfunc.latent.patch: clean_captures['0'] holds 1 NaN value (of 30); replace them (e.g. torch.nan_to_num) or capture a finite clean run.",
    "nan_probe_fit": "tdfunc.latent.probe_fit: x holds 1 NaN value (of 30); replace them (e.g. torch.nan_to_num) or drop those rows.",
    "inf_steering_vector": "tdfunc.latent.steering_vector: acts_neg holds 8 infinite values (of 8); replace them (e.g. torch.nan_to_num) or drop those examples.",
    "nan_steering_vector_site": "tdfunc.latent.steering_vector: acts_pos['h'] holds 1 NaN value (of 8); replace them (e.g. torch.nan_to_num) or drop those examples.",
    "nan_alpha_task_vector_sweep": "tdfunc.weights.task_vector_sweep: alphas holds 1 NaN value (of 3); give finite coefficients, e.g. torch.linspace(0, 1, 11).",
    "nan_points_twonn": "tdfunc.latent.twonn_dimension: x holds 1 NaN value (of 36); replace them (e.g. torch.nan_to_num) or drop those points.",
    "steering_vector_empty": "tdfunc.latent.steering_vector: acts_pos and acts_neg hold no examples (N=0, shape (0, 4)); the mean difference of an empty set is undefined: pass at least one pair of activations.",
    "twonn_duplicate_points": "tdfunc.latent.twonn_dimension: 2 of the N=12 points have a duplicate (a nearest neighbour at distance 0), where the ratio r2 / r1 is undefined; remove duplicate points first (e.g. torch.unique(x, dim=0)).",
    "probe_fit_steps_0": "tdfunc.latent.probe_fit: steps must be an integer >= 1, got 0. steps=0 would return the untrained initialisation; for a closed-form probe use kind='mean_difference'.",
    "fit_probes_steps_0": "tdfunc.latent.fit_probes: steps must be an integer >= 1, got 0. steps=0 would return the untrained initialisation; for a closed-form probe use kind='mean_difference'.",
    "baseline_key_as_input": "tdfunc.saliency: in_keys names ('baseline', 'x'), the baseline of 'x', as an input; baselines are not attributed. Name the input itself (in_keys=['x']) and keep ('baseline', 'x') as its baseline.",
    "empty_batch_rows_as_targets": "tdfunc.saliency: td has an empty batch size but f returned shape (5,) and every input has 5 rows ('x': (5, 3)), so the rows would be read as 5 targets of one example. Give td its batch size (TensorDict({...}, batch_size=[5])); for one example with 5 targets, add a batch dim of 1 (x[None], batch_size=[1]).",
    "empty_batch_rows_as_targets_ig": "tdfunc.integrated_gradients: td has an empty batch size but f returned shape (5,) and every input has 5 rows ('x': (5, 3)), so the rows would be read as 5 targets of one example. Give td its batch size (TensorDict({...}, batch_size=[5])); for one example with 5 targets, add a batch dim of 1 (x[None], batch_size=[1]).",
    "empty_batch_rows_as_targets_occlusion": "tdfunc.occlusion: td has an empty batch size but f returned shape (5,) and every input has 5 rows ('x': (5, 3)), so the rows would be read as 5 targets of one example. Give td its batch size (TensorDict({...}, batch_size=[5])); for one example with 5 targets, add a batch dim of 1 (x[None], batch_size=[1]).",
    "reduce_last_without_positions": "tdfunc.latent.cache_activations: reduce='last' reduces dim 1 (positions) of a (B, T, ..., D) value, but the value at '0' has shape (4, 8), with no position dim (it would reduce the features); use reduce=None or a callable for this site.",
    "saliency_f_none": "tdfunc.saliency: f must be a callable f(td) -> Tensor, got NoneType (None); pass a function (a lambda, a def or an nn.Module).",
    "ig_f_not_callable": "tdfunc.integrated_gradients: f must be a callable f(td) -> Tensor, got str ('model'); pass a function (a lambda, a def or an nn.Module).",
    "grad_cam_f_none": "tdfunc.grad_cam: f must be a callable f(td) -> Tensor, got NoneType (None); pass a function (a lambda, a def or an nn.Module).",
    "kernel_shap_f_none": "tdfunc.kernel_shap: f must be a callable f(td) -> Tensor, got NoneType (None); pass a function (a lambda, a def or an nn.Module).",
    "saliency_integer_output": "tdfunc.saliency: f returned a tensor of dtype torch.int64; gradients need a floating-point output (a logit, a probability, a loss). Return a float tensor (e.g. the logits, not logits.argmax(-1)), or cast it with .float() if its values are meant.",
    "lrp_integer_output": "tdfunc.lrp: f returned a tensor of dtype torch.int64; gradients need a floating-point output (a logit, a probability, a loss). Return a float tensor (e.g. the logits, not logits.argmax(-1)), or cast it with .float() if its values are meant.",
    "patching_sweep_shapes_differ": "tdfunc.latent.patching_sweep: clean_args and corrupted_args must have the same shapes (one run's values are patched into the other), got [(1, 5, 3)] and [(1, 3, 3)]; pad or truncate the inputs to one shape.",
    "patch_clean_shape_differs": "tdfunc.latent.patch: the clean value at site '0' has shape (1, 5, 6) but the corrupted run's value there has shape (1, 3, 6); capture the clean run with inputs of the corrupted run's shape.",
    "path_patch_shapes_differ": "tdfunc.latent.path_patch: clean_args and corrupted_args must have the same shapes (one run's values are patched into the other), got [(1, 5, 3)] and [(1, 3, 3)]; pad or truncate the inputs to one shape.",
    "patching_sweep_metric_none": "tdfunc.latent.patching_sweep: metric must be a callable metric(output) -> scalar tensor, got NoneType (None); pass a function (a lambda, a def or an nn.Module).",
    "random_op_ig": "tdfunc.integrated_gradients: f calls a random operation (train-mode Dropout, a sampling policy, torch.rand...) inside the vmap this method runs, where torch's default randomness='error' forbids it; pass randomness='different' (independent draws per vmapped input) or randomness='same' (one draw shared by all), or make f deterministic (model.eval()).",
    "random_op_occlusion": "tdfunc.occlusion: f calls a random operation (train-mode Dropout, a sampling policy, torch.rand...) inside the vmap this method runs, where torch's default randomness='error' forbids it; pass randomness='different' (independent draws per vmapped input) or randomness='same' (one draw shared by all), or make f deterministic (model.eval()).",
    "random_op_patching_sweep": "tdfunc.latent.patching_sweep: the model (or metric) calls a random operation (train-mode Dropout, a sampling policy, torch.rand...) inside the vmap this method runs, where torch's default randomness='error' forbids it; pass randomness='different' (independent draws per vmapped input) or randomness='same' (one draw shared by all), or make the model (or metric) deterministic (model.eval()).",
    "random_op_task_vector_sweep": "tdfunc.weights.task_vector_sweep: metric calls a random operation (train-mode Dropout, a sampling policy, torch.rand...) inside the vmap this method runs, where torch's default randomness='error' forbids it; pass randomness='different' (independent draws per vmapped input) or randomness='same' (one draw shared by all), or make metric deterministic (model.eval()).",
    "randomness_bad_value": "tdfunc.integrated_gradients: randomness must be 'error', 'different' or 'same' (torch.func.vmap's flag), got 'differnt'.",
    "randomness_bad_value_sweep": "tdfunc.latent.patching_sweep: randomness must be 'error', 'different' or 'same' (torch.func.vmap's flag), got True.",
    "patch_names_itself": "tdfunc.latent.patch: the substitute at site '0' has shape (2, 6), but the site's value has shape (1, 5, 6); give a tensor with a shape broadcastable to (1, 5, 6).",
    "patching_sweep_names_itself": "tdfunc.latent.patching_sweep: unknown state key 'nope': Sequential has no parameter or buffer of that name. Build the state with tdfunc.state(model) or select from it.",
    "path_patch_names_itself": "tdfunc.latent.path_patch: nothing was captured at site '1@3': the module ran once in this call, so it has no call 3. Capture a site the forward reaches.",
    "generate_greedy_names_itself": "tdfunc.latent.generate_greedy: the substitute at site '1' has shape (3, 3, 3), but the site's value has shape (1, 2, 5); give a tensor with a shape broadcastable to (1, 2, 5).",
}


@pytest.mark.parametrize("name, thunk, exc", CASES, ids=[c[0] for c in CASES])
def test_pinned(name, thunk, exc):
    with pytest.raises(exc) as info:
        thunk()
    assert isinstance(info.value, (TdfuncError, TypeError))
    assert str(info.value) == PINNED[name]


def test_every_case_is_pinned():
    assert sorted(PINNED) == sorted(c[0] for c in CASES)


# ----------------------------------------------------------------------------------- non-finite results warn


def _warns(thunk, msg: str):
    with pytest.warns(NonFiniteWarning) as rec:
        out = thunk()
    assert [str(w.message) for w in rec if w.category is NonFiniteWarning] == [msg]
    return out


def test_nonfinite_attribution_result_warns():
    f = lambda t: NET(t["x"])[:, 0] / (t["x"][:, 0] - t["x"][:, 0])  # noqa: E731  0/0 from finite inputs
    _warns(
        lambda: SAL(f, TD),
        "tdfunc.saliency: the result ('attr', 'x') holds 15 NaN values (of 15); the inputs "
        "were finite, so the model (or f) produced them; check it for overflow or 0/0.",
    )


def test_nonfinite_layer_result_warns():
    f = lambda t: NET(t["x"])[:, 0] * NAN  # noqa: E731
    out = _warns(
        lambda: tdfunc.layer_gradient_x_activation(f, TD, NET, "1"),
        "tdfunc.layer_gradient_x_activation: the result ('attr', '1') holds 40 NaN values (of 40); the "
        "inputs were finite, so the model (or f) produced them; check it for overflow or 0/0.",
    )
    assert out["attr", "1"].isnan().all()


def test_nan_metric_is_never_the_best_alpha():
    ref = tdfunc.state(PRE)

    def metric(s):  # NaN at alpha = 1, the best finite value at alpha = 0.5
        a = (s["bias"] - ref["bias"]).sum() / TV["bias"].sum()
        return torch.where((a - 1).abs() < 1e-3, torch.full((), NAN), -(a - 0.5).square())

    out = _warns(
        lambda: tdfunc.weights.task_vector_sweep(PRE, ref, TV, [0.0, 0.5, 1.0], metric),
        'tdfunc.weights.task_vector_sweep: the result "metric" holds 1 NaN value (of 3); the inputs were '
        "finite, so the model (or f) produced them; check it for overflow or 0/0.",
    )
    assert float(out["best_alpha"]) == 0.5 and int(out["best_index"]) == 1


def test_nonfinite_patching_sweep_warns():
    r = _warns(
        lambda: PS(SEQ, None, (CLEAN,), (CORR,), "0", lambda y: y[0, -1, 0] * INF - y[0, -1, 0] * INF),
        "tdfunc.latent.patching_sweep: the result  holds 5 NaN values (of 5); the inputs were finite, so the "
        "model (or f) produced them; check it for overflow or 0/0.",
    )
    assert r.isnan().all()


# --------------------------------------------------------------------- inside transforms: the caller's job


def test_checks_are_skipped_inside_vmap_and_grad():
    """Inside vmap / grad the values cannot be read: no check, no warning, no error (documented)."""
    x = nan_at(X, 0, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        ixg = lambda xi: tdfunc.input_x_gradient(lambda t: NET(t["x"])[:, 0], TensorDict({"x": xi[None]}, [1]))  # noqa: E731
        out = vmap(lambda xi: ixg(xi)["attr", "x"][0])(x)
    assert out[0, 0].isnan() and not out[1:].isnan().any()
    v = vmap(lambda p, n: SV(p, n))(nan_at(torch.ones(3, 4, 2), 0, 0, 0), torch.zeros(3, 4, 2))
    assert v[0].isnan().any()


def test_lrp_keeps_infinite_masked_scores():
    """LRP defines the relevance of an infinite input (a masked score): 0, not an error; NaN is refused."""
    sm = nn.Sequential(nn.Softmax(-1))
    x = torch.randn(3, 5, dtype=torch.float64)
    x[0, 3] = -INF
    out = tdfunc.lrp(
        lambda t: sm(t["x"]),
        TensorDict({"x": x}, [3]),
        sm,
        rules={nn.Softmax: tdfunc.lrp_rules.softmax()},
        composite=None,
    )
    assert not out["attr", "x"].isnan().any()


# ------------------------------------------------------------------------------- options that now exist


def test_randomness_option_runs_random_f():
    torch.manual_seed(0)
    out = IG(FD, TD, n_steps=2, randomness="different")
    assert out["attr", "x"].shape == (5, 3)
    r = PS(DSEQ, None, (CLEAN,), (CORR,), "0", METRIC, randomness="same")
    assert r.shape == (1, 5)
    sw = tdfunc.weights.task_vector_sweep(
        PRE, tdfunc.state(PRE), TV, [0.0, 0.5], lambda s: DROP(CLOSE(s)), randomness="different"
    )
    assert sw["metric"].shape == (2,)


def test_renamed_keeps_user_errors_and_type():
    """An inner tdfunc.functional_call's error leaves the outer public function under the outer name, type
    kept; an error the user's code raised keeps its own name (a public call nested in f keeps its name)."""

    @public("tdfunc.latent.patch")
    def outer(inner: bool, text: str, err: type[Exception] = PatchError):
        if inner:
            with renamed():
                raise err(text)
        raise err(text)

    with pytest.raises(PatchError, match=r"^tdfunc\.latent\.patch: user: boom$"):
        outer(True, "user: boom")
    with pytest.raises(tdfunc.EditError, match=r"^tdfunc\.latent\.patch: x$"):
        outer(True, "tdfunc.functional_call: x", tdfunc.EditError)
    with pytest.raises(tdfunc.EditError, match=r"^tdfunc\.functional_call: x$"):
        outer(False, "tdfunc.functional_call: x", tdfunc.EditError)  # not tdfunc's own inner call: kept
    with pytest.raises(ValueError, match=r"^x$"):
        outer(False, "x", ValueError)  # not a tdfunc error: untouched


def test_one_sample_with_k_targets_still_works():
    """An empty batch size is one example: allowed when the inputs do not look like K rows."""
    lin = nn.Linear(3, 4)
    out = SAL(lambda t: lin(t["x"]), TensorDict({"x": torch.randn(3)}, []), abs=False)
    torch.testing.assert_close(out["attr", "x"], lin.weight)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: tdfunc.saliency(F, TensorDict({"x": x}, [5]), in_keys=["nope"]),
        lambda x: tdfunc.functional_call(NET, None, (x,), capture=["nope"]),
        lambda x: tdfunc.latent.patch(NET, None, (x,), {"nope": x}, "nope"),
    ],
    ids=["saliency", "functional_call", "patch_renamed"],
)
def test_boundary_names_errors_raised_while_compiling(call):
    """The boundary builds the named message from ``e.args``: dynamo reports an error raised while tracing
    (fullgraph) with the same text as eager, ``raised exception Cls('tdfunc.name: ...')``."""
    with pytest.raises(TdfuncError) as eager:
        call(X)
    assert str(eager.value).startswith("tdfunc.")
    torch._dynamo.reset()
    try:
        with pytest.raises(Exception) as compiled:
            torch.compile(call, fullgraph=True, backend="aot_eager")(X)
    finally:
        torch._dynamo.reset()
    assert f"raised exception {type(eager.value).__name__}({str(eager.value)!r})" in str(compiled.value)
