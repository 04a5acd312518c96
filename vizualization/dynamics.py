"""Descent dynamics on a 2-D landscape, its minima found numerically, and basin maps.

Dynamics (heavy-ball momentum μ, step η, all points at once):

    v ← μ v + d(θ),   θ ← θ − η v,

with d the method's direction (`toy_methods.direction`), computed from gradients with noise σ.
μ = 0 is plain gradient descent.

Minima: gradient descent on each environment's loss and on the average loss from a grid of
starts; an end point is a strict local minimum when its gradient is ~0 and its smallest Hessian
eigenvalue is positive. A minimum of the average is *invariant* when every environment has a
strict minimum within `radius` of it, otherwise *spurious*; an environment's own minimum away
from every invariant one is spurious too. A trajectory *reaches* the nearest minimum if it ends
within `radius` of it, and reaches *neither* otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vizualization.landscapes import Landscape, env_grads, env_hessians, env_losses, mean_landscape, single_env
from vizualization.toy_methods import direction

KINDS = ("invariant", "spurious", "neither")


def descend(step_direction, start: torch.Tensor, steps: int, lr: float, momentum: float = 0.0,
            record: bool = False):
    """Run the heavy-ball dynamics from (N, 2) starts; returns the end points, or the (steps+1, N, 2) path."""
    theta, velocity = start.clone(), torch.zeros_like(start)
    path = [theta]
    for _ in range(steps):
        velocity = momentum * velocity + step_direction(theta)
        theta = theta - lr * velocity
        if record:
            path.append(theta)
    return torch.stack(path) if record else theta


def method_dynamics(method, hparams, landscape, start, steps, lr, momentum=0.0, noise=0.0, seed=0, record=False):
    """`descend` along `method`'s direction, with gradient noise σ drawn from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)

    def step_direction(theta):
        return direction(method, hparams, landscape, theta, lr, noise, generator)

    return descend(step_direction, start, steps, lr, momentum, record)


@dataclass(frozen=True)
class Minimum:
    point: tuple  # (x, y)
    kind: str  # "invariant" or "spurious"
    source: str  # "mean" or "env e"


def strict_minima(landscape: Landscape, lr: float, n_starts: int = 25, steps: int = 1000, tol: float = 1e-4,
                  min_curvature: float = 1e-3, dedupe: float = 0.25) -> torch.Tensor:
    """(K, 2) distinct strict local minima of a one-environment landscape inside its domain.

    Gradient descent from an n_starts × n_starts grid; end points with ‖∇Z‖ < tol, smallest
    Hessian eigenvalue > min_curvature and inside [low, high]² are kept, lowest loss first, and
    a point closer than `dedupe` to a kept one is dropped.
    """
    _, _, starts = landscape.grid(n_starts)

    def gradient(theta):
        return env_grads(landscape, theta)[:, 0]

    ends = descend(gradient, starts, steps, lr)
    grad_norm = gradient(ends).norm(dim=1)
    curvature = torch.linalg.eigvalsh(env_hessians(landscape, ends)[:, 0])[:, 0]
    inside = ((ends >= landscape.low) & (ends <= landscape.high)).all(dim=1)
    ends = ends[(grad_norm < tol) & (curvature > min_curvature) & inside]
    ends = ends[env_losses(landscape, ends)[:, 0].argsort()]
    kept = []
    for point in ends:
        if all((point - k).norm() > dedupe for k in kept):
            kept.append(point)
    return torch.stack(kept) if kept else torch.zeros(0, 2, dtype=starts.dtype)


def find_minima(landscape: Landscape, lr: float, radius: float = 1.0, **search) -> list[Minimum]:
    """The invariant and spurious minima of a multi-environment landscape (see the module docstring)."""
    per_env = [strict_minima(single_env(landscape, e), lr, **search) for e in range(landscape.n_envs)]
    minima = []
    for point in strict_minima(mean_landscape(landscape), lr, **search):
        shared = all(len(m) and (m - point).norm(dim=1).min() <= radius for m in per_env)
        minima.append(Minimum(tuple(point.tolist()), "invariant" if shared else "spurious", "mean"))
    invariant = torch.tensor([m.point for m in minima if m.kind == "invariant"], dtype=torch.float64).reshape(-1, 2)
    for e, points in enumerate(per_env):
        for point in points:
            if len(invariant) == 0 or (invariant - point).norm(dim=1).min() > radius:
                minima.append(Minimum(tuple(point.tolist()), "spurious", f"env {e + 1}"))
    return minima


def reached_minimum(ends: torch.Tensor, minima: list[Minimum], radius: float = 1.0) -> torch.Tensor:
    """(N,) index into `minima` of the nearest minimum within `radius` of each end point, −1 for none."""
    reached = torch.full((ends.shape[0],), -1, dtype=torch.long)
    if not minima:
        return reached
    points = torch.tensor([m.point for m in minima], dtype=ends.dtype)
    distance = torch.cdist(ends, points)  # NaN for diverged trajectories: never within radius
    nearest = distance.argmin(dim=1)
    close = distance.gather(1, nearest[:, None])[:, 0] <= radius
    reached[close] = nearest[close]
    return reached


def classify(ends: torch.Tensor, minima: list[Minimum], radius: float = 1.0) -> torch.Tensor:
    """(N,) index into KINDS: the kind of the nearest minimum within `radius`, else "neither"."""
    kinds = torch.tensor([KINDS.index(m.kind) for m in minima] + [KINDS.index("neither")])
    return kinds[reached_minimum(ends, minima, radius)]  # index −1 is the appended "neither"


def basin_runs(method, hparams, landscape, n: int, repeats: int, steps: int, lr: float, momentum: float = 0.0,
               noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """(repeats·n·n, 2) end points of the `repeats` noisy runs from each of n × n start cells (the
    landscape's cell centres, x fastest, then y, then the repeat). All runs go at once."""
    _, _, starts = landscape.grid(n)
    return method_dynamics(method, hparams, landscape, starts.repeat(repeats, 1), steps, lr, momentum, noise, seed)


def basin_fractions(ends: torch.Tensor, minima: list[Minimum], n: int, radius: float = 1.0) -> torch.Tensor:
    """(3, n, n) fraction of the runs of `basin_runs` from each start cell that reach an invariant
    minimum, a spurious one or neither (rows: y, columns: x)."""
    codes = classify(ends, minima, radius).reshape(-1, n, n)
    return torch.stack([(codes == k).double().mean(0) for k in range(len(KINDS))])


def basin_map(method, hparams, landscape, minima, n: int, repeats: int, steps: int, lr: float,
              momentum: float = 0.0, noise: float = 0.0, seed: int = 0, radius: float = 1.0):
    """`basin_fractions` of `basin_runs`."""
    ends = basin_runs(method, hparams, landscape, n, repeats, steps, lr, momentum, noise, seed)
    return basin_fractions(ends, minima, n, radius)


def hessian_eigenvalues(landscape: Landscape, points: torch.Tensor) -> torch.Tensor:
    """(N, E + 1, 2) ascending Hessian eigenvalues of each environment's loss and of their mean."""
    hessians = env_hessians(landscape, points)
    hessians = torch.cat([hessians, hessians.mean(1, keepdim=True)], dim=1)
    return torch.linalg.eigvalsh(hessians)

