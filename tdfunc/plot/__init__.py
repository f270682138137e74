"""Plots of tdfunc results: image and token attributions, Grad-CAM overlays, patching sweeps, probes, sweeps.

``import tdfunc.plot`` (``tdfunc`` does not import it): it needs matplotlib, the ``plot`` extra
(``pip install 'tdfunc[plot]'``). Every function takes tensors on any device and dtype (and a tdfunc
TensorDict result where one fits), draws on ``ax=`` or a new pyplot figure, draws only what it is asked
for (no ``show``) and returns ``(fig, ax)``. Signed values use a diverging colour map centred at zero
(red = positive). Bad input raises ``TypeError`` for a wrong type and :class:`PlotError` (a
``tdfunc.TdfuncError`` and ``ValueError``) for a wrong value.
"""

try:
    import matplotlib as _matplotlib  # noqa: F401
except ImportError as _e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        f"tdfunc.plot needs matplotlib, which is not installed ({_e}); install the extra: pip install 'tdfunc[plot]'"
    ) from _e

from ._common import PlotError as PlotError
from ._common import normalize_attribution as normalize_attribution
from ._common import upsample as upsample
from ._image import grad_cam_overlay as grad_cam_overlay
from ._image import image_attribution as image_attribution
from ._image import image_attribution_grid as image_attribution_grid
from ._latent import patching_heatmap as patching_heatmap
from ._latent import probe_accuracy as probe_accuracy
from ._latent import sweep_curve as sweep_curve
from ._text import TokenHTML as TokenHTML
from ._text import token_attribution as token_attribution
from ._text import token_attribution_html as token_attribution_html

__all__ = sorted(name for name in dir() if not name.startswith("_"))
