"""Weight interventions as pure transforms of state: pruning masks, task vectors, interpolation, adapters.

Every function takes state TensorDicts (from :func:`tdfunc.state`) and returns new ones; the module
and the input states are never written.  ``tdfunc.weights.prune_masks(...)``, ...; every error this family
raises on bad input is a :class:`WeightError` (a :class:`tdfunc.TdfuncError`).
"""

from ._adapters import apply_lora as apply_lora
from ._adapters import lora_init as lora_init
from ._adapters import sae_decode as sae_decode
from ._adapters import sae_edit as sae_edit
from ._adapters import sae_encode as sae_encode
from ._adapters import sae_init as sae_init
from ._adapters import transcoder_edit as transcoder_edit
from ._adapters import transcoder_init as transcoder_init
from ._common import WeightError as WeightError
from ._prune import apply_masks as apply_masks
from ._prune import magnitude_scores as magnitude_scores
from ._prune import prune_masks as prune_masks
from ._prune import snip_scores as snip_scores
from ._task import apply_task_vector as apply_task_vector
from ._task import interpolate as interpolate
from ._task import task_vector as task_vector
from ._task import task_vector_sweep as task_vector_sweep
from ._task import ties_merge as ties_merge

__all__ = sorted(name for name in dir() if not name.startswith("_"))
