"""Type aliases used in public signatures.

The ``Literal`` aliases list each string option's choices; the runtime checks of the functions that
take them (and their messages) are unchanged, and ``tests/test_types.py`` checks that each alias
lists the same choices as the tuple its check uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

import torch
from tensordict import TensorDictBase

from ._edits import Delta, FromSite, GradEdit, Rule

#: A site string: ``"path"``, ``"path:input"``, ``"path:output.1"``, ``"path@2"``, ``"path@*"``, globs.
Site = str
#: One site or several.
Sites = Union[Site, Sequence[Site]]
#: What can happen at a site.
Edit = Union[torch.Tensor, Delta, Rule, FromSite, GradEdit, Callable[[Any], Any]]
Edits = Mapping[Site, Edit]
Capture = Union[Site, Sequence[Site]]
State = Union[TensorDictBase, Mapping[str, torch.Tensor], None]

#: A TensorDict key: ``"x"`` or a nested ``("a", "x")``.
Key = Union[str, tuple[str, ...]]
#: The entries of ``td`` an attribution method attributes (``in_keys=``).
InKeys = Sequence[Key]
#: A tensor per key, or one tensor for every key (``feature_mask=``, ``noise=``).
PerKey = Union[Mapping[Key, torch.Tensor], torch.Tensor]
#: Tensors by key: a TensorDict or a plain mapping (what a ``perturb_fn`` returns).
KeyedTensors = Union[TensorDictBase, Mapping[Key, torch.Tensor]]

#: ``method=`` of ``integrated_gradients`` / ``layer_integrated_gradients``: the path quadrature.
IGMethod = Literal["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre"]
#: ``strategy=`` of ``integrated_gradients``.
IGStrategy = Literal["vmap", "fold"]
#: ``nt_type=`` of ``smooth_grad``.
NoiseType = Literal["smoothgrad", "smoothgrad_sq", "vargrad"]
#: ``optimizer=`` of ``activation_maximisation``.
Optimizer = Literal["adam", "sgd", "sign"]
#: ``composite=`` of ``lrp``: a name in ``tdfunc.lrp_rules.COMPOSITES`` (zennit's registered names where zennit
#: has the composite, and its class names).
CompositeName = Literal[
    "epsilon",
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
    "excitation_backprop",
    "attnlrp",
    "deconvnet",
    "beta_smooth",
    "EpsilonPlus",
    "EpsilonPlusFlat",
    "EpsilonAlpha2Beta1",
    "EpsilonAlpha2Beta1Flat",
    "ExcitationBackprop",
    "DeconvNet",
    "BetaSmooth",
]
#: ``softmax=`` of ``tdfunc.lrp_rules.attention``.
SoftmaxMode = Literal["attnlrp", "constant"]
#: ``reduce=`` of ``tdfunc.latent.cache_activations`` (or a callable).
Reduction = Literal["last", "mean", "masked_mean"]
#: ``kind=`` of the probes of ``tdfunc.latent``.
ProbeKind = Literal["linear", "bilinear", "low_rank_bilinear", "mean_difference"]
#: ``kernel=`` of ``tdfunc.latent.cka``.
Kernel = Literal["linear", "rbf"]
#: ``over=`` of ``tdfunc.latent.patching_sweep`` (or an int, the unit dim).
Over = Literal["positions"]
#: ``scope=`` of ``tdfunc.weights.prune_masks``.
PruneScope = Literal["global", "module"]
#: ``method=`` of the image plots of ``tdfunc.plot``.
PlotMethod = Literal["heat_map", "blended_heat_map", "masked_image"]
#: ``sign=`` of ``tdfunc.plot``: which part of an attribution to show.
Sign = Literal["all", "positive", "negative", "absolute_value"]
#: ``mode=`` of ``tdfunc.plot.upsample`` and ``grad_cam_overlay``.
UpsampleMode = Literal["bilinear", "nearest", "bicubic", "area"]
