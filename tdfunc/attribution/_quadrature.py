"""The integration path shared by integrated gradients and layer integrated gradients: quadrature and options."""

from __future__ import annotations

import torch

from .._checks import check_chunk_size, check_int
from .._types import IGMethod, IGStrategy
from ._common import AttributionError

__all__ = ["METHODS", "STRATEGIES", "quadrature", "check_path_options"]

METHODS: tuple[IGMethod, ...] = (
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
    "gausslegendre",
)
STRATEGIES: tuple[IGStrategy, ...] = ("vmap", "fold")


def quadrature(method: str, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``alpha`` in [0, 1] and weights of the path integral, in float64 (captum's rules).

    Gauss–Legendre nodes come from the Golub–Welsch eigenproblem (equal to numpy's ``leggauss``
    to ~1e-15), mapped from [-1, 1] to [0, 1].
    """
    n = n_steps
    if method == "gausslegendre":
        k = torch.arange(1, n, dtype=torch.float64)
        off = k / torch.sqrt(4 * k * k - 1)
        jac = torch.diag(off, 1) + torch.diag(off, -1)
        nodes, vecs = torch.linalg.eigh(jac)
        return 0.5 * (nodes + 1), vecs[0] ** 2  # weights 2 v0^2, halved for [0, 1]
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    if method == "riemann_trapezoid":
        w[0] /= 2
        w[-1] /= 2
        return torch.linspace(0, 1, n, dtype=torch.float64), w
    start = {"riemann_left": 0.0, "riemann_right": 1.0 / n, "riemann_middle": 0.5 / n}[method]
    return torch.linspace(start, start + 1 - 1.0 / n, n, dtype=torch.float64), w


def check_path_options(n_steps, method, chunk_size, strategy) -> None:
    """The options of a path integral (integrated gradients, layer integrated gradients)."""
    if method not in METHODS:
        raise AttributionError(f"unknown method {method!r}; choose one of {list(METHODS)}.")
    check_int("n_steps", n_steps, AttributionError)
    if method == "riemann_trapezoid" and n_steps < 2:
        raise AttributionError(f"method 'riemann_trapezoid' needs n_steps >= 2, got {n_steps}.")
    check_chunk_size(chunk_size, AttributionError)
    if strategy not in STRATEGIES:
        raise AttributionError(
            f"unknown strategy {strategy!r}; choose 'vmap' (f sees td's batch shape; default) or "
            "'fold' (path steps folded into the batch: f must not close over per-example data)."
        )
