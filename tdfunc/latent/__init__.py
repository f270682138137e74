"""Latent-space methods: activation caching, patching and steering, probes, representation geometry.

``tdfunc.latent.patch(...)``, ``tdfunc.latent.fit_probes(...)``, ...; every error this family raises on
bad input is a :class:`LatentError` (a :class:`tdfunc.TdfuncError`).
"""

from ._atp import attribution_patching as attribution_patching
from ._cache import CacheError as CacheError
from ._cache import cache_activations as cache_activations
from ._cache_attr import cache_attributions as cache_attributions
from ._common import LatentError as LatentError
from ._dimension import ca_pca_dimension as ca_pca_dimension
from ._dimension import local_knn_dimension as local_knn_dimension
from ._dimension import local_pca_dimension as local_pca_dimension
from ._dimension import mle_dimension as mle_dimension
from ._dimension import twonn_dimension as twonn_dimension
from ._generate import generate as generate
from ._geometry import GeometryError as GeometryError
from ._patch import PatchError as PatchError
from ._patch import patch as patch
from ._patch import patching_sweep as patching_sweep
from ._patch import path_patch as path_patch
from ._probe import ProbeError as ProbeError
from ._probe import probe_apply as probe_apply
from ._probe import probe_evaluate as probe_evaluate
from ._probe import probe_fit as probe_fit
from ._probe import probe_init as probe_init
from ._probe_sites import fit_probes as fit_probes
from ._probe_sklearn import fit_sklearn_probes as fit_sklearn_probes
from ._probe_stream import probe_stream_init as probe_stream_init
from ._probe_stream import probe_stream_params as probe_stream_params
from ._probe_stream import probe_stream_update as probe_stream_update
from ._probe_stream import stream_probes as stream_probes
from ._similarity import cka as cka
from ._similarity import information_imbalance as information_imbalance
from ._steer import generate_greedy as generate_greedy
from ._steer import steer as steer
from ._steer import steering_vector as steering_vector
from ._units import Units as Units
from ._units import unit_edit as unit_edit
from ._units import unit_view as unit_view
from ._units import units as units

__all__ = sorted(name for name in dir() if not name.startswith("_"))
