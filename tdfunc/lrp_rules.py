"""LRP rules, composites and canonizers for :func:`tdfunc.lrp` (as ``zennit.rules`` / ``zennit.composites``).

``tdfunc.lrp(f, td, model, rules={nn.Linear: tdfunc.lrp_rules.epsilon(1e-6)})``.  Every rule is a
:class:`Rule`; write your own against that protocol (``record`` then ``rewrite``) and pass it the same way.
"""

from .attribution._canonize import merge_batchnorm as merge_batchnorm
from .attribution._canonize import with_zero_biases as with_zero_biases
from .attribution._lrp_attention import attention as attention
from .attribution._lrp_attention import uniform as uniform
from .attribution._lrp_composites import COMPOSITES as COMPOSITES
from .attribution._lrp_composites import Composite as Composite
from .attribution._lrp_composites import attnlrp as attnlrp
from .attribution._lrp_composites import epsilon_gamma_box as epsilon_gamma_box
from .attribution._lrp_linear import alpha_beta as alpha_beta
from .attribution._lrp_linear import epsilon as epsilon
from .attribution._lrp_linear import flat as flat
from .attribution._lrp_linear import gamma as gamma
from .attribution._lrp_linear import wsquare as wsquare
from .attribution._lrp_linear import zbox as zbox
from .attribution._lrp_linear import zplus as zplus
from .attribution._lrp_relu import beta_smooth as beta_smooth  # beta_smooth
from .attribution._lrp_relu import deconvnet as deconvnet  # deconvnet
from .attribution._lrp_rules import Rule as Rule
from .attribution._lrp_rules import gradient as gradient
from .attribution._lrp_rules import identity as identity
from .attribution._lrp_rules import ignore as ignore
from .attribution._lrp_rules import norm as norm
from .attribution._lrp_rules import passthrough as passthrough
from .attribution._lrp_rules import softmax as softmax

LRPRule = Rule  # the name before the rule protocol

__all__ = sorted(name for name in dir() if not name.startswith("_"))
