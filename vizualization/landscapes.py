"""Two-environment loss landscapes on θ = (x, y) ∈ [−6, 6)², and their autograd fields.

All landscapes share the "bump", a localised well modulated by a cosine (w = 0.3):

    bump(cx, cy, A)(x, y) = −A · cos(w x) · cos(w y) · exp(−w (x − cx)² − w (y − cy)²)

- ilc_paper:    Z1 = bump(−5, −5, 300) + (x − 2)²,  Z2 = bump(−5, −5, 300) + (y − 2)².
                Both environments have a minimum near the bump (the invariant one); each
                also has its own valley (x = 2, resp. y = 2), and the valleys cross at (2, 2),
                where the average has a "patchwork" minimum that neither environment has.
- ilc_paper_v2: the same with bump(−4, −4, 200).
- home_hard:    Z1 = bump(0, 4, 100) + (x + 2.5)² + (y + 2.5)²,
                Z2 = bump(0, 4, 100) + (x − 2.5)² + (y + 2.5)²: a shared well near (0, 3) and
                one bowl per environment; the average's bowl at (0, −2.5) is spurious.
- home_easy:    Z1 = bump(2.5, −2.5, 100) + x² + (y − 4)²,
                Z2 = bump(−2.5, −2.5, 100) + x² + (y − 4)²: the shared bowl at (0, 4) is the
                invariant minimum, the environment-specific bumps are spurious.

Gradients and Hessians come from autograd (`torch.func.jacrev` / `hessian`), vectorised over
points with `torch.func.vmap`; everything is float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import hessian, jacrev, vmap

DTYPE = torch.float64
W = 0.3  # width/frequency of the bump


def bump(x, y, cx, cy, amplitude):
    """−A · cos(w x) · cos(w y) · exp(−w (x − cx)² − w (y − cy)²)."""
    return -amplitude * torch.cos(W * x) * torch.cos(W * y) * torch.exp(-W * (x - cx) ** 2 - W * (y - cy) ** 2)


@dataclass(frozen=True)
class Landscape:
    """`env_losses(θ)` maps one point θ of shape (2,) to the (E,) environment losses."""

    name: str
    env_losses: Callable[[torch.Tensor], torch.Tensor]
    low: float = -6.0
    high: float = 6.0
    step: float = 0.2  # grid spacing of the field plots
    start: tuple = (5.0, 5.0)  # default start of the plotted trajectory

    @property
    def n_envs(self) -> int:
        return int(self.env_losses(torch.zeros(2, dtype=DTYPE)).shape[0])

    def axis(self, n: int | None = None) -> torch.Tensor:
        """Grid coordinates along one axis: [low, high) with spacing `step`, or n evenly spaced cell centres."""
        if n is None:
            return torch.arange(self.low, self.high - 1e-9, self.step, dtype=DTYPE)
        cell = (self.high - self.low) / n
        return self.low + cell * (torch.arange(n, dtype=DTYPE) + 0.5)

    def grid(self, n: int | None = None):
        """(xs, ys, points): the axes and the (len(ys)·len(xs), 2) points, x varying fastest."""
        xs = self.axis(n)
        ys = xs
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        return xs, ys, torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


def env_losses(landscape: Landscape, points: torch.Tensor) -> torch.Tensor:
    """(N, E) losses of every environment at (N, 2) points."""
    return vmap(landscape.env_losses)(points)


def env_grads(landscape: Landscape, points: torch.Tensor) -> torch.Tensor:
    """(N, E, 2): ∇_θ Z_e at every point, by autograd."""
    return vmap(jacrev(landscape.env_losses))(points)


def env_hessians(landscape: Landscape, points: torch.Tensor) -> torch.Tensor:
    """(N, E, 2, 2): ∇²_θ Z_e at every point, by autograd."""
    return vmap(hessian(landscape.env_losses))(points)


def mean_landscape(landscape: Landscape) -> Landscape:
    """The one-environment landscape of the average loss mean_e Z_e."""
    return Landscape(f"{landscape.name} (mean)", lambda t: landscape.env_losses(t).mean(0, keepdim=True),
                     landscape.low, landscape.high, landscape.step, landscape.start)


def single_env(landscape: Landscape, env: int) -> Landscape:
    return Landscape(f"{landscape.name} (env {env + 1})", lambda t: landscape.env_losses(t)[env:env + 1],
                     landscape.low, landscape.high, landscape.step, landscape.start)


def default_lr(landscape: Landscape) -> float:
    """1 / (largest |Hessian eigenvalue| of any environment on the plotting grid).

    Gradient descent on a quadratic is stable for η < 2/λ_max; η = 1/λ_max leaves room for the
    combiners that rescale the update (AND-mask doubles a half-masked 2-D gradient).
    """
    _, _, points = landscape.grid()
    eigenvalues = torch.linalg.eigvalsh(env_hessians(landscape, points))
    return float(1.0 / eigenvalues.abs().max())


def _ilc(cx, amplitude):
    def losses(t):
        x, y = t[0], t[1]
        shared = bump(x, y, cx, cx, amplitude)
        return torch.stack([shared + (x - 2) ** 2, shared + (y - 2) ** 2])
    return losses


def _home_hard(t):
    x, y = t[0], t[1]
    shared = bump(x, y, 0.0, 4.0, 100.0)
    return torch.stack([shared + (x + 2.5) ** 2 + (y + 2.5) ** 2, shared + (x - 2.5) ** 2 + (y + 2.5) ** 2])


def _home_easy(t):
    x, y = t[0], t[1]
    bowl = x ** 2 + (y - 4) ** 2
    return torch.stack([bump(x, y, 2.5, -2.5, 100.0) + bowl, bump(x, y, -2.5, -2.5, 100.0) + bowl])


LANDSCAPES = {
    "ilc_paper": Landscape("ilc_paper", _ilc(-5.0, 300.0), start=(5.0, -1.0)),
    "ilc_paper_v2": Landscape("ilc_paper_v2", _ilc(-4.0, 200.0), start=(5.0, -1.0)),
    "home_hard": Landscape("home_hard", _home_hard, start=(-5.0, 0.5)),
    "home_easy": Landscape("home_easy", _home_easy, start=(4.0, -5.5)),
}
