"""The bad-input catalogue (issue 15): every public function of every namespace, called with malformed
arguments (None for a tensor / td / module / f, wrong types, empty inputs, non-finite values), raises a tdfunc
error naming the function — a ``TdfuncError``, or a ``TypeError`` whose message starts with the function's
public name.  A public function without an entry fails ``test_every_public_function_has_an_entry``, so a new
function must add its row.  The exact wording is pinned in the ``test_errors*.py`` tables.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from tensordict import TensorDict
from torch import nn

import tdfunc

NAN = float("nan")
NET = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
S = tdfunc.state(NET)
X = torch.randn(5, 3)
TD = TensorDict({"x": X}, batch_size=[5])
NAN_TD = TensorDict({"x": torch.full((5, 3), NAN)}, batch_size=[5])
F = lambda t: NET(t["x"])[:, 0]  # noqa: E731
PTS = torch.randn(20, 3)
SITES = TensorDict({"a": torch.randn(10, 3)}, batch_size=[])
Y = torch.tensor([0, 1] * 5)
PROBE = tdfunc.latent.probe_init("linear", 3, 2)
W = tdfunc.weights

# name -> list of malformed calls
TABLE: dict[str, list] = {
    # core
    "functional_call": [
        lambda: tdfunc.functional_call(None, S, (X,)),
        lambda: tdfunc.functional_call(NET, S, (X,), capture=3),
        lambda: tdfunc.functional_call(NET, S, (X,), capture=["0"], stop="yes"),  # stop_early
    ],
    "intervene": [
        lambda: tdfunc.intervene(None, NET)(X),
        lambda: tdfunc.intervene(NET, None)(X),
        lambda: tdfunc.intervene(lambda x: NET(x), NET, capture=["0"], stop="yes"),  # stop_early
    ],
    "state": [lambda: tdfunc.state(None), lambda: tdfunc.state([1, 2])],
    "delta": [lambda: tdfunc.delta(None), lambda: tdfunc.delta("x")],
    "rule": [lambda: tdfunc.rule(None), lambda: tdfunc.rule(3)],
    "from_site": [lambda: tdfunc.from_site(None), lambda: tdfunc.from_site(3)],
    "grad_edit": [lambda: tdfunc.grad_edit(None), lambda: tdfunc.grad_edit(3)],
    "install_sites": [lambda: tdfunc.install_sites(None, ["0"]), lambda: tdfunc.install_sites(NET, 3)],
    "remove_sites": [lambda: tdfunc.remove_sites(None), lambda: tdfunc.remove_sites("net")],
    "list_sites": [lambda: tdfunc.list_sites(None, X), lambda: tdfunc.list_sites(NET, [X])],
    # attribution
    "saliency": [
        lambda: tdfunc.saliency(None, TD),
        lambda: tdfunc.saliency(F, None),
        lambda: tdfunc.saliency(F, NAN_TD),
    ],
    "input_x_gradient": [lambda: tdfunc.input_x_gradient(None, TD), lambda: tdfunc.input_x_gradient(F, NAN_TD)],
    "integrated_gradients": [
        lambda: tdfunc.integrated_gradients(None, TD),
        lambda: tdfunc.integrated_gradients(F, None),
        lambda: tdfunc.integrated_gradients(F, NAN_TD),
    ],
    "grad_cam": [
        lambda: tdfunc.grad_cam(None, TD, NET, "0"),
        lambda: tdfunc.grad_cam(F, TD, None, "0"),
        lambda: tdfunc.grad_cam(F, NAN_TD, NET, "0"),
    ],
    "layer_gradient_x_activation": [
        lambda: tdfunc.layer_gradient_x_activation(None, TD, NET, "0"),
        lambda: tdfunc.layer_gradient_x_activation(F, None, NET, "0"),
    ],
    "layer_integrated_gradients": [
        lambda: tdfunc.layer_integrated_gradients(None, TD, NET, "0"),
        lambda: tdfunc.layer_integrated_gradients(F, NAN_TD, NET, "0"),
    ],
    "smooth_grad": [
        lambda: tdfunc.smooth_grad(None, F, TD),
        lambda: tdfunc.smooth_grad(tdfunc.saliency, None, TD),
        lambda: tdfunc.smooth_grad(tdfunc.saliency, F, NAN_TD),
    ],
    "guided_backprop": [lambda: tdfunc.guided_backprop(None, TD, NET), lambda: tdfunc.guided_backprop(F, TD, None)],
    "deep_lift": [lambda: tdfunc.deep_lift(None, TD, NET), lambda: tdfunc.deep_lift(F, TD, None)],
    "deep_lift_shap": [lambda: tdfunc.deep_lift_shap(F, TD, NET, None), lambda: tdfunc.deep_lift_shap(F, TD, None, TD)],
    "layer_deep_lift": [
        lambda: tdfunc.layer_deep_lift(F, TD, None, "1"),
        lambda: tdfunc.layer_deep_lift(F, TD, NET, "nope"),
    ],
    "gradient_shap": [lambda: tdfunc.gradient_shap(F, TD, None), lambda: tdfunc.gradient_shap(F, TD, TD, n_samples=0)],
    "layer_gradient_shap": [
        lambda: tdfunc.layer_gradient_shap(F, TD, None, "1", TD),
        lambda: tdfunc.layer_gradient_shap(F, TD, NET, "1", None),
    ],
    "deconvolution": [lambda: tdfunc.deconvolution(None, TD, NET), lambda: tdfunc.deconvolution(F, TD, None)],
    "guided_grad_cam": [
        lambda: tdfunc.guided_grad_cam(F, TD, None, "1"),
        lambda: tdfunc.guided_grad_cam(F, TD, NET, "1", interpolate_mode="x"),
    ],
    "layer_conductance": [
        lambda: tdfunc.layer_conductance(F, TD, None, "1"),
        lambda: tdfunc.layer_conductance(F, TD, NET, "1", n_steps=0),
    ],
    "internal_influence": [
        lambda: tdfunc.internal_influence(F, TD, None, "1"),
        lambda: tdfunc.internal_influence(F, TD, NET, "nope"),
    ],
    "lrp": [
        lambda: tdfunc.lrp(None, TD, NET),
        lambda: tdfunc.lrp(F, TD, None),
        lambda: tdfunc.lrp(F, NAN_TD, NET),
        lambda: tdfunc.lrp(F, TD, NET, site="nope_lrp_site"),  # lrp site=
    ],
    "occlusion": [
        lambda: tdfunc.occlusion(None, TD, sliding_window_shapes=(1,)),
        lambda: tdfunc.occlusion(F, NAN_TD, sliding_window_shapes=(1,)),
        lambda: tdfunc.occlusion(F, TD, sliding_window_shapes=(1,), keep_window="yes"),  # keep_window
    ],
    "feature_ablation": [lambda: tdfunc.feature_ablation(None, TD), lambda: tdfunc.feature_ablation(F, NAN_TD)],
    "shapley_value_sampling": [
        lambda: tdfunc.shapley_value_sampling(None, TD),
        lambda: tdfunc.shapley_value_sampling(F, NAN_TD),
    ],
    "kernel_shap": [lambda: tdfunc.kernel_shap(None, TD), lambda: tdfunc.kernel_shap(F, NAN_TD)],
    "neuron": [
        lambda: tdfunc.neuron(None, NET, "0", (1,)),
        lambda: tdfunc.neuron(F, NET, "0", "bad"),
        lambda: tdfunc.neuron(F, None, "0", (1,)),
        lambda: tdfunc.neuron(F, NET, 3, (1,)),
    ],
    "neuron_conductance": [
        lambda: tdfunc.neuron_conductance(None, TD, NET, "0", (1,)),
        lambda: tdfunc.neuron_conductance(F, TD, None, "0", (1,)),
        lambda: tdfunc.neuron_conductance(F, TD, NET, "0", "bad"),
        lambda: tdfunc.neuron_conductance(F, NAN_TD, NET, "0", (1,)),
    ],
    "lime": [lambda: tdfunc.lime(None, TD), lambda: tdfunc.lime(F, NAN_TD), lambda: tdfunc.lime(F, TD, alpha=NAN)],
    "feature_permutation": [
        lambda: tdfunc.feature_permutation(None, TD),
        lambda: tdfunc.feature_permutation(F, NAN_TD),
        lambda: tdfunc.feature_permutation(F, TD[:1]),
    ],
    "layer_feature_ablation": [
        lambda: tdfunc.layer_feature_ablation(None, TD, NET, "0"),
        lambda: tdfunc.layer_feature_ablation(F, TD, None, "0"),
        lambda: tdfunc.layer_feature_ablation(F, NAN_TD, NET, "0"),
    ],
    "activation_maximisation": [
        lambda: tdfunc.activation_maximisation(None, TD),
        lambda: tdfunc.activation_maximisation(F, NAN_TD),
    ],
    "infidelity": [lambda: tdfunc.infidelity(None, TD, TD), lambda: tdfunc.infidelity(F, TD, None)],
    "sensitivity_max": [
        lambda: tdfunc.sensitivity_max(None, F, TD),
        lambda: tdfunc.sensitivity_max(tdfunc.saliency, F, None),
    ],
    # latent
    "cache_attributions": [
        lambda: tdfunc.latent.cache_attributions(None, F, [TD]),
        lambda: tdfunc.latent.cache_attributions(tdfunc.saliency, F, [X]),
    ],
    "cache_activations": [
        lambda: tdfunc.latent.cache_activations(None, None, [X], ["0"]),
        lambda: tdfunc.latent.cache_activations(NET, None, [X], 3),
    ],
    "patch": [
        lambda: tdfunc.latent.patch(None, None, (X,), {}, "0"),
        lambda: tdfunc.latent.patch(NET, None, (X,), None, "0"),
    ],
    "patching_sweep": [
        lambda: tdfunc.latent.patching_sweep(None, None, (X,), (X,), "0", F),
        lambda: tdfunc.latent.patching_sweep(NET, None, (X,), (X,), "0", None),
        lambda: tdfunc.latent.patching_sweep(NET, None, (X,), (X * NAN,), "0", F),
        lambda: tdfunc.latent.patching_sweep(NET, None, (X,), (X,), "0", F, reuse_prefix=True),  # reuse_prefix
    ],
    "path_patch": [
        lambda: tdfunc.latent.path_patch(None, None, (X,), (X,), "0", "2"),
        lambda: tdfunc.latent.path_patch(NET, None, (X,), (X,), None, "2"),
    ],
    "attribution_patching": [
        lambda: tdfunc.latent.attribution_patching(None, None, (X,), (X,), "0", F),
        lambda: tdfunc.latent.attribution_patching(NET, None, (X,), (X,), "0", None),
        lambda: tdfunc.latent.attribution_patching(NET, None, (X,), (X * NAN,), "0", F),
    ],
    "units": [lambda: tdfunc.latent.units(None), lambda: tdfunc.latent.units("a (h d) -> a h d", h=None)],
    "unit_view": [
        lambda: tdfunc.latent.unit_view(X, None),
        lambda: tdfunc.latent.unit_view(None, tdfunc.latent.units("a (h d) -> a h d", h=2)),
    ],
    "unit_edit": [
        lambda: tdfunc.latent.unit_edit(None, X),
        lambda: tdfunc.latent.unit_edit(tdfunc.latent.units("a (h d) -> a h d", h=2), None),
    ],
    "steering_vector": [
        lambda: tdfunc.latent.steering_vector(None, X),
        lambda: tdfunc.latent.steering_vector(X[:0], X[:0]),
        lambda: tdfunc.latent.steering_vector(X * NAN, X),
    ],
    "steer": [lambda: tdfunc.latent.steer(None), lambda: tdfunc.latent.steer(X)],
    "generate_greedy": [
        lambda: tdfunc.latent.generate_greedy(None, None, torch.tensor([[1]]), 1),
        lambda: tdfunc.latent.generate_greedy(NET, None, None, 1),
    ],
    "generate": [  # tdfunc.latent.generate
        lambda: tdfunc.latent.generate(None, None, torch.tensor([[1]])),
        lambda: tdfunc.latent.generate(NET, None, torch.tensor([[1]])),
        lambda: tdfunc.latent.generate(NET, None, None),
    ],
    "probe_init": [lambda: tdfunc.latent.probe_init(None, 3, 2), lambda: tdfunc.latent.probe_init("linear", None, 2)],
    "probe_fit": [
        lambda: tdfunc.latent.probe_fit("linear", None, Y),
        lambda: tdfunc.latent.probe_fit("linear", PTS[:10], None),
        lambda: tdfunc.latent.probe_fit("linear", PTS[:10] * NAN, Y),
        lambda: tdfunc.latent.probe_fit("linear", PTS[:10], Y, steps=0),
    ],
    "probe_apply": [lambda: tdfunc.latent.probe_apply(None, X), lambda: tdfunc.latent.probe_apply(PROBE, None)],
    "probe_evaluate": [
        lambda: tdfunc.latent.probe_evaluate(None, X, Y[:5]),
        lambda: tdfunc.latent.probe_evaluate(PROBE, X, None),
    ],
    "fit_probes": [
        lambda: tdfunc.latent.fit_probes(None, Y),
        lambda: tdfunc.latent.fit_probes(SITES, None),
        lambda: tdfunc.latent.fit_probes(TensorDict({"a": torch.full((10, 3), NAN)}, []), Y),
    ],
    "fit_sklearn_probes": [
        lambda: tdfunc.latent.fit_sklearn_probes(None, Y),
        lambda: tdfunc.latent.fit_sklearn_probes(SITES, None),
    ],
    "probe_stream_init": [
        lambda: tdfunc.latent.probe_stream_init("linear", None, 2),
        lambda: tdfunc.latent.probe_stream_init(None, SITES, 2),
    ],
    "probe_stream_update": [
        lambda: tdfunc.latent.probe_stream_update(None, SITES, Y),
        lambda: tdfunc.latent.probe_stream_update(tdfunc.latent.probe_stream_init("linear", SITES, 2), SITES, None),
    ],
    "probe_stream_params": [lambda: tdfunc.latent.probe_stream_params(None)],
    "stream_probes": [
        lambda: tdfunc.latent.stream_probes(None, S, [], ["0"], n_classes=2),
        lambda: tdfunc.latent.stream_probes(NET, S, [TD], ["0"], n_classes=2),
    ],
    "twonn_dimension": [
        lambda: tdfunc.latent.twonn_dimension(None),
        lambda: tdfunc.latent.twonn_dimension(PTS * NAN),
        lambda: tdfunc.latent.twonn_dimension(torch.zeros(10, 3)),
    ],
    "mle_dimension": [lambda: tdfunc.latent.mle_dimension(None), lambda: tdfunc.latent.mle_dimension(PTS * NAN)],
    "local_pca_dimension": [
        lambda: tdfunc.latent.local_pca_dimension(None),
        lambda: tdfunc.latent.local_pca_dimension(PTS * NAN),
    ],
    "ca_pca_dimension": [
        lambda: tdfunc.latent.ca_pca_dimension(None),
        lambda: tdfunc.latent.ca_pca_dimension(PTS * NAN),
    ],
    "local_knn_dimension": [
        lambda: tdfunc.latent.local_knn_dimension(None),
        lambda: tdfunc.latent.local_knn_dimension(PTS * NAN),
        lambda: tdfunc.latent.local_knn_dimension(torch.zeros(10, 3), k=2),
    ],
    "cka": [lambda: tdfunc.latent.cka(None, PTS), lambda: tdfunc.latent.cka(PTS, PTS * NAN)],
    "information_imbalance": [
        lambda: tdfunc.latent.information_imbalance(None, PTS),
        lambda: tdfunc.latent.information_imbalance(PTS, PTS * NAN),
    ],
    # weights
    "magnitude_scores": [lambda: W.magnitude_scores(None), lambda: W.magnitude_scores(X)],
    "snip_scores": [lambda: W.snip_scores(None, S), lambda: W.snip_scores(lambda s: s["0", "weight"].sum(), None)],
    "prune_masks": [
        lambda: W.prune_masks(None, S, amount=0.5),
        lambda: W.prune_masks(S, S, amount=None),
        lambda: W.prune_masks(S, S, amount=NAN),
    ],
    "apply_masks": [lambda: W.apply_masks(None, S), lambda: W.apply_masks(S, None)],
    "task_vector": [lambda: W.task_vector(None, S), lambda: W.task_vector(S, None)],
    "apply_task_vector": [lambda: W.apply_task_vector(None, S, 1.0), lambda: W.apply_task_vector(S, S, None)],
    "ties_merge": [
        lambda: W.ties_merge(None, density=0.5, lambda_=1.0),
        lambda: W.ties_merge([], density=0.5, lambda_=1.0),
    ],
    "task_vector_sweep": [
        lambda: W.task_vector_sweep(None, S, S, [0.0], lambda s: torch.zeros(())),
        lambda: W.task_vector_sweep(NET, S, S, [0.0, NAN], lambda s: torch.zeros(())),
        lambda: W.task_vector_sweep(NET, S, S, [], lambda s: torch.zeros(())),
    ],
    "interpolate": [lambda: W.interpolate(None, S, [0.5]), lambda: W.interpolate(S, S, [NAN])],
    "sae_init": [lambda: W.sae_init(None, 4), lambda: W.sae_init(3, None)],
    "sae_encode": [lambda: W.sae_encode(None, X), lambda: W.sae_encode(W.sae_init(3, 4), None)],
    "sae_decode": [lambda: W.sae_decode(None, X), lambda: W.sae_decode(W.sae_init(3, 4), None)],
    "sae_edit": [lambda: W.sae_edit(None), lambda: W.sae_edit(3)],
    "transcoder_init": [lambda: W.transcoder_init(None, 4, 3), lambda: W.transcoder_init(3, None, 3)],
    "transcoder_edit": [
        lambda: W.transcoder_edit(None, "0"),
        lambda: W.transcoder_edit(W.transcoder_init(3, 4, 3), None),
    ],
    "lora_init": [
        lambda: W.lora_init(None, "0.weight", 2),
        lambda: W.lora_init(S, "0.weight", None),
        lambda: W.lora_init(S, "nope", 2),
    ],
    "apply_lora": [lambda: W.apply_lora(None, S), lambda: W.apply_lora(S, None)],
    # lrp_rules
    **{
        name: [lambda name=name: getattr(tdfunc.lrp_rules, name)("x")]
        for name in ("epsilon", "gamma", "flat", "wsquare", "zplus")
    },
    # rules without parameters: malformed where they are used (a rule for a module type it does not apply to)
    **{
        name: [
            lambda name=name: tdfunc.lrp(
                F, TD, NET, rules={nn.Linear: getattr(tdfunc.lrp_rules, name)()}, composite=None
            )
        ]
        for name in ("identity", "softmax", "norm")
    },
    "ignore": [lambda: tdfunc.lrp(F, TD, NET, rules={"nope": tdfunc.lrp_rules.ignore()}, composite=None)],
    "gradient": [lambda: tdfunc.lrp(F, TD, NET, rules={3: tdfunc.lrp_rules.gradient()}, composite=None)],
    "alpha_beta": [lambda: tdfunc.lrp_rules.alpha_beta("x", 1.0), lambda: tdfunc.lrp_rules.alpha_beta(NAN, 1.0)],
    "attention": [lambda: tdfunc.lrp_rules.attention("x"), lambda: tdfunc.lrp_rules.attention(softmax="bogus")],
    "zbox": [lambda: tdfunc.lrp_rules.zbox("x", 1.0), lambda: tdfunc.lrp_rules.zbox(0.0, NAN)],
    "merge_batchnorm": [
        lambda: tdfunc.lrp_rules.merge_batchnorm(None),
        lambda: tdfunc.lrp_rules.merge_batchnorm(NET, 3),
    ],
    "with_zero_biases": [lambda: tdfunc.lrp_rules.with_zero_biases(None)],
    "passthrough": [lambda: tdfunc.lrp(F, TD, NET, rules={nn.Linear: tdfunc.lrp_rules.passthrough()}, composite=None)],
    "epsilon_gamma_box": [
        lambda: tdfunc.lrp_rules.epsilon_gamma_box("x", 1.0),
        lambda: tdfunc.lrp_rules.epsilon_gamma_box(0.0, 1.0, gamma=NAN),
    ],
    "uniform": [lambda: tdfunc.lrp_rules.uniform("x"), lambda: tdfunc.lrp_rules.uniform(NAN)],
    "attnlrp": [lambda: tdfunc.lrp_rules.attnlrp("x"), lambda: tdfunc.lrp_rules.attnlrp(softmax="cp")],
    "deconvnet": [lambda: tdfunc.lrp(F, TD, NET, rules={nn.Linear: tdfunc.lrp_rules.deconvnet()}, composite=None)],
    "beta_smooth": [lambda: tdfunc.lrp_rules.beta_smooth("x"), lambda: tdfunc.lrp_rules.beta_smooth(NAN)],
}

SPACES = {
    "tdfunc": tdfunc,
    "tdfunc.latent": tdfunc.latent,
    "tdfunc.weights": tdfunc.weights,
    "tdfunc.lrp_rules": tdfunc.lrp_rules,
}


def _public_functions() -> dict[str, str]:
    """short name -> public dotted name, for every function in every namespace's __all__."""
    out = {}
    for space, module in SPACES.items():
        for name in module.__all__:
            if inspect.isfunction(getattr(module, name)):
                out[name] = f"{space}.{name}"
    return out


PUBLIC = _public_functions()
ROWS = [
    pytest.param(name, i, *c.values, marks=c.marks, id=f"{name}-{i}")
    if hasattr(c, "values")
    else pytest.param(name, i, c, id=f"{name}-{i}")
    for name, calls in TABLE.items()
    for i, c in enumerate(calls)
]


def test_every_public_function_has_an_entry():
    missing = sorted(set(PUBLIC) - set(TABLE))
    assert not missing, f"public functions without a bad-input row in tests/test_bad_inputs.py: {missing}"
    assert not sorted(set(TABLE) - set(PUBLIC)), "rows for names that are no public function"


@pytest.mark.parametrize("name, i, call", ROWS)
def test_malformed_call_raises_a_tdfunc_error(name, i, call):
    with pytest.raises(Exception) as info:
        call()
    e = info.value
    assert isinstance(e, (tdfunc.TdfuncError, TypeError)), f"{PUBLIC[name]} row {i}: raw {type(e).__name__}: {e}"
    assert str(e).startswith("tdfunc."), f"{PUBLIC[name]} row {i}: message does not name a tdfunc function: {e}"
    # a rule without parameters is malformed only where it is used: tdfunc.lrp names itself and the rule
    used_by = "tdfunc.lrp: " if PUBLIC[name].startswith("tdfunc.lrp_rules.") else None
    named = name in str(e) or (used_by is not None and str(e).startswith(used_by))
    assert named, f"{PUBLIC[name]} row {i}: message does not name it: {e}"
