"""Attribution: which inputs (or activations) a model's output depends on, and how much.

Every method has one calling shape, ``method(f, td, ...) -> TensorDict``, with ``f`` any pure function of
a TensorDict.  These names are also re-exported at the top level (``tdfunc.integrated_gradients``): they
are the entry points users compose with ``vmap``, ``grad`` and ``torch.compile``.  LRP's rules, composites
and canonizers live in :mod:`tdfunc.lrp_rules`.
"""

from .._finite import NonFiniteWarning as NonFiniteWarning
from ._common import AttributionError as AttributionError
from ._common import MiscompileError as MiscompileError
from ._deep_lift import deep_lift as deep_lift
from ._deep_lift import deep_lift_shap as deep_lift_shap
from ._deep_lift import layer_deep_lift as layer_deep_lift
from ._feature_permutation import feature_permutation as feature_permutation
from ._gradient import input_x_gradient as input_x_gradient
from ._gradient import saliency as saliency
from ._gradient_shap import gradient_shap as gradient_shap
from ._gradient_shap import layer_gradient_shap as layer_gradient_shap
from ._guided import deconvolution as deconvolution
from ._guided import guided_backprop as guided_backprop
from ._guided import guided_grad_cam as guided_grad_cam
from ._ig import integrated_gradients as integrated_gradients
from ._kernel_shap import kernel_shap as kernel_shap
from ._layer import grad_cam as grad_cam
from ._layer import layer_gradient_x_activation as layer_gradient_x_activation
from ._layer_ablation import layer_feature_ablation as layer_feature_ablation
from ._layer_path import internal_influence as internal_influence
from ._layer_path import layer_conductance as layer_conductance
from ._layer_path import layer_integrated_gradients as layer_integrated_gradients
from ._lime import lime as lime
from ._lrp import lrp as lrp
from ._maximise import activation_maximisation as activation_maximisation
from ._metrics import infidelity as infidelity
from ._metrics import sensitivity_max as sensitivity_max
from ._neuron import neuron as neuron
from ._neuron_conductance import neuron_conductance as neuron_conductance
from ._noise import smooth_grad as smooth_grad
from ._perturb import feature_ablation as feature_ablation
from ._perturb import occlusion as occlusion
from ._perturb import shapley_value_sampling as shapley_value_sampling

# a literal list (sorted), so that type checkers see the names `from .attribution import *` gives tdfunc
__all__ = [
    "AttributionError",
    "MiscompileError",
    "NonFiniteWarning",
    "activation_maximisation",
    "deconvolution",
    "deep_lift",
    "deep_lift_shap",
    "feature_ablation",
    "feature_permutation",
    "grad_cam",
    "gradient_shap",
    "guided_backprop",
    "guided_grad_cam",
    "infidelity",
    "input_x_gradient",
    "integrated_gradients",
    "internal_influence",
    "kernel_shap",
    "layer_conductance",
    "layer_deep_lift",
    "layer_feature_ablation",
    "layer_gradient_shap",
    "layer_gradient_x_activation",
    "layer_integrated_gradients",
    "lime",
    "lrp",
    "neuron",
    "neuron_conductance",
    "occlusion",
    "saliency",
    "sensitivity_max",
    "shapley_value_sampling",
    "smooth_grad",
]
