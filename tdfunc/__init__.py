"""tdfunc: functional interpretability for PyTorch over TensorDict state.

A model run is a pure function of (state, inputs, activation edits) returning (outputs, captures);
every method is built from that call and from ``torch.func``.
"""

from ._call import functional_call as functional_call
from .attribution._common import AttributionError as AttributionError
from .attribution._gradient import input_x_gradient as input_x_gradient
from .attribution._gradient import saliency as saliency
from .attribution._ig import integrated_gradients as integrated_gradients
from .attribution._layer import grad_cam as grad_cam
from .attribution._layer import layer_gradient_x_activation as layer_gradient_x_activation
from .attribution._layer import layer_integrated_gradients as layer_integrated_gradients
from .attribution._noise import smooth_grad as smooth_grad
from .attribution._guided import guided_backprop as guided_backprop
from .attribution._maximise import activation_maximisation as activation_maximisation
from .attribution._metrics import infidelity as infidelity
from .attribution._metrics import sensitivity_max as sensitivity_max
from .attribution._perturb import occlusion as occlusion
from .attribution._perturb import feature_ablation as feature_ablation
from .attribution._perturb import shapley_value_sampling as shapley_value_sampling
from .attribution._kernel_shap import kernel_shap as kernel_shap
from .attribution._lrp import lrp as lrp
from .attribution._lrp import lrp_epsilon as lrp_epsilon
from .attribution._lrp import lrp_zplus as lrp_zplus
from .attribution._lrp import lrp_alpha_beta as lrp_alpha_beta
from .attribution._lrp import lrp_gamma as lrp_gamma
from .attribution._lrp import lrp_flat as lrp_flat
from .attribution._lrp import lrp_wsquare as lrp_wsquare
from .attribution._lrp import lrp_pass as lrp_pass
from .attribution._lrp import lrp_zbox as lrp_zbox
from .attribution._lrp import lrp_identity as lrp_identity
from .attribution._lrp import lrp_ignore as lrp_ignore
from .attribution._lrp import lrp_softmax as lrp_softmax
from .attribution._lrp import lrp_norm as lrp_norm
from .attribution._lrp import lrp_attention as lrp_attention
from .attribution._canonize import merge_batchnorm as merge_batchnorm
from ._call import intervene as intervene
from ._edits import Delta as Delta
from ._edits import Rule as Rule
from ._edits import FromSite as FromSite
from ._edits import delta as delta
from ._edits import from_site as from_site
from ._edits import rule as rule
from ._errors import EditError as EditError
from ._errors import NotReachedError as NotReachedError
from ._errors import SiteError as SiteError
from ._errors import StateError as StateError
from ._errors import TdfuncError as TdfuncError
from ._sites import install_sites as install_sites
from ._sites import remove_sites as remove_sites
from ._state import state as state
from ._tap import Tap as Tap
from .weights._common import WeightError as WeightError
from .weights._prune import magnitude_scores as magnitude_scores
from .weights._prune import snip_scores as snip_scores
from .weights._prune import prune_masks as prune_masks
from .weights._prune import apply_masks as apply_masks
from .weights._task import task_vector as task_vector
from .weights._task import apply_task_vector as apply_task_vector
from .weights._task import ties_merge as ties_merge
from .weights._task import task_vector_sweep as task_vector_sweep
from .weights._task import interpolate as interpolate
from .weights._adapters import sae_init as sae_init
from .weights._adapters import sae_encode as sae_encode
from .weights._adapters import sae_decode as sae_decode
from .weights._adapters import sae_edit as sae_edit
from .weights._adapters import transcoder_init as transcoder_init
from .weights._adapters import transcoder_edit as transcoder_edit
from .weights._adapters import lora_init as lora_init
from .weights._adapters import apply_lora as apply_lora
from .latent._geometry import GeometryError as GeometryError
from .latent._geometry import twonn_dimension as twonn_dimension
from .latent._geometry import mle_dimension as mle_dimension
from .latent._geometry import local_pca_dimension as local_pca_dimension
from .latent._geometry import ca_pca_dimension as ca_pca_dimension
from .latent._geometry import cka as cka
from .latent._geometry import information_imbalance as information_imbalance
from .latent._cache import CacheError as CacheError
from .latent._cache import cache_activations as cache_activations
from .latent._probe import ProbeError as ProbeError
from .latent._probe import probe_init as probe_init
from .latent._probe import probe_apply as probe_apply
from .latent._probe import probe_fit as probe_fit
from .latent._probe import probe_evaluate as probe_evaluate
from .latent._probe import fit_probes as fit_probes
from .latent._probe import fit_sklearn_probes as fit_sklearn_probes
from .latent._patch import PatchError as PatchError
from .latent._patch import patch as patch
from .latent._patch import patching_sweep as patching_sweep
from .latent._patch import path_patch as path_patch
from .latent._steer import steering_vector as steering_vector
from .latent._steer import steer as steer
from .latent._steer import generate_greedy as generate_greedy

from ._version import __version__ as __version__

__all__ = [
    "functional_call",
    "intervene",
    "state",
    "delta",
    "rule",
    "from_site",
    "FromSite",
    "Delta",
    "Rule",
    "Tap",
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "grad_cam",
    "layer_gradient_x_activation",
    "layer_integrated_gradients",
    "smooth_grad",
    "guided_backprop",
    "activation_maximisation",
    "infidelity",
    "sensitivity_max",
    "occlusion",
    "feature_ablation",
    "shapley_value_sampling",
    "kernel_shap",
    "AttributionError",
    "lrp",
    "lrp_epsilon",
    "lrp_zplus",
    "lrp_alpha_beta",
    "lrp_gamma",
    "lrp_flat",
    "lrp_wsquare",
    "lrp_pass",
    "lrp_zbox",
    "lrp_identity",
    "lrp_ignore",
    "lrp_softmax",
    "lrp_norm",
    "lrp_attention",
    "merge_batchnorm",
    "install_sites",
    "remove_sites",
    "TdfuncError",
    "SiteError",
    "EditError",
    "StateError",
    "NotReachedError",
    "WeightError",
    "magnitude_scores",
    "snip_scores",
    "prune_masks",
    "apply_masks",
    "task_vector",
    "apply_task_vector",
    "ties_merge",
    "task_vector_sweep",
    "interpolate",
    "sae_init",
    "sae_encode",
    "sae_decode",
    "sae_edit",
    "transcoder_init",
    "transcoder_edit",
    "lora_init",
    "apply_lora",
    "GeometryError",
    "twonn_dimension",
    "mle_dimension",
    "local_pca_dimension",
    "ca_pca_dimension",
    "cka",
    "information_imbalance",
    "CacheError",
    "cache_activations",
    "ProbeError",
    "probe_init",
    "probe_apply",
    "probe_fit",
    "probe_evaluate",
    "fit_probes",
    "fit_sklearn_probes",
    "PatchError",
    "patch",
    "patching_sweep",
    "path_patch",
    "steering_vector",
    "steer",
    "generate_greedy",
]
