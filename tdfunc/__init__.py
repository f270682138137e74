"""tdfunc: functional interpretability for PyTorch over TensorDict state.

A model run is a pure function of (state, inputs, activation edits) returning (outputs, captures);
every method is built from that call and from ``torch.func``.

Namespaces (the rule, also in the README):

* ``tdfunc.*`` — the core (state, calls, edits, sites, errors) and the attribution methods, the entry
  points users compose (``tdfunc.integrated_gradients(f, td)``), also reachable as ``tdfunc.attribution.*``;
* ``tdfunc.lrp_rules.*`` — LRP rules, composites and canonizers for ``tdfunc.lrp``;
* ``tdfunc.latent.*`` — caching, patching, steering, probes, representation geometry;
* ``tdfunc.weights.*`` — pruning, task vectors, interpolation, adapters.

Each family exports its own error class (``AttributionError``, ``LatentError``, ``WeightError``), all
subclasses of ``TdfuncError``.
"""

import warnings as _warnings

from . import attribution as attribution
from . import latent as latent
from . import lrp_rules as lrp_rules
from . import weights as weights
from ._call import functional_call as functional_call
from ._call import intervene as intervene
from ._edits import Delta as Delta
from ._edits import FromSite as FromSite
from ._edits import GradEdit as GradEdit
from ._edits import Rule as Rule
from ._edits import delta as delta
from ._edits import from_site as from_site
from ._edits import grad_edit as grad_edit
from ._edits import rule as rule
from ._errors import EditError as EditError
from ._errors import NotReachedError as NotReachedError
from ._errors import SiteError as SiteError
from ._errors import StateError as StateError
from ._errors import TdfuncError as TdfuncError
from ._listing import list_sites as list_sites
from ._sites import install_sites as install_sites
from ._sites import remove_sites as remove_sites
from ._state import state as state
from ._tap import Tap as Tap
from ._version import __version__ as __version__
from .attribution import *  # noqa: F403  (the attribution entry points; listed in attribution.__all__)

__all__ = [
    "attribution",
    "latent",
    "lrp_rules",
    "weights",
    "functional_call",
    "intervene",
    "state",
    "delta",
    "rule",
    "from_site",
    "Delta",
    "Rule",
    "FromSite",
    "Tap",
    "install_sites",
    "remove_sites",
    "TdfuncError",
    "SiteError",
    "EditError",
    "StateError",
    "NotReachedError",
    "list_sites",
    "grad_edit",
    "GradEdit",
]
__all__ += attribution.__all__

# Names that lived at the top level before the family namespaces: old name -> (namespace, new name).
_MOVED = {name: ("latent", name) for name in latent.__all__}
_MOVED.update({name: ("weights", name) for name in weights.__all__})
_MOVED.update(
    {
        f"lrp_{n}": ("lrp_rules", n)
        for n in lrp_rules.__all__
        if n.islower() and n not in ("gradient", "merge_batchnorm")
    }
)
_MOVED.update(lrp_pass=("lrp_rules", "gradient"), merge_batchnorm=("lrp_rules", "merge_batchnorm"))
# a moved name whose new name differs from a peer's word for the same thing
_MOVED_NOTES = {
    "lrp_pass": " (it keeps the plain gradient; zennit's and tdhook's Pass is tdfunc.lrp_rules.passthrough)"
}


def __getattr__(name: str) -> object:
    moved = _MOVED.get(name)
    if moved is None:
        raise AttributeError(f"module 'tdfunc' has no attribute {name!r}")
    space, new = moved
    _warnings.warn(
        f"tdfunc.{name} moved to tdfunc.{space}.{new}; the old name will be removed in tdfunc 0.3."
        + _MOVED_NOTES.get(name, ""),
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(globals()[space], new)
