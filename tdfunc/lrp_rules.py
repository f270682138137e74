"""LRP rules, composites and canonizers for :func:`tdfunc.lrp` (as ``zennit.rules`` / ``zennit.composites``).

``tdfunc.lrp(f, td, model, rules={nn.Linear: tdfunc.lrp_rules.epsilon(1e-6)})``.
"""

from .attribution._canonize import merge_batchnorm as merge_batchnorm
from .attribution._lrp import LRPRule as LRPRule
from .attribution._lrp import lrp_alpha_beta as alpha_beta
from .attribution._lrp import lrp_attention as attention
from .attribution._lrp import lrp_epsilon as epsilon
from .attribution._lrp import lrp_flat as flat
from .attribution._lrp import lrp_gamma as gamma
from .attribution._lrp import lrp_identity as identity
from .attribution._lrp import lrp_ignore as ignore
from .attribution._lrp import lrp_norm as norm
from .attribution._lrp import lrp_pass as gradient
from .attribution._lrp import lrp_softmax as softmax
from .attribution._lrp import lrp_wsquare as wsquare
from .attribution._lrp import lrp_zbox as zbox
from .attribution._lrp import lrp_zplus as zplus

__all__ = sorted(name for name in dir() if not name.startswith("_"))
