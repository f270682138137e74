"""What the latent family's modules share: its error class."""

from __future__ import annotations

from .._errors import TdfuncError

__all__ = ["LatentError"]


class LatentError(TdfuncError, ValueError):
    """Bad input to a latent-space method (caching, patching, steering, probes, geometry)."""
