"""The inconsistency I^ε of a point of a 2-D toy landscape, exact on a grid, and a method's ILC.

Definitions (Parascandolo et al., ICLR 2021, Section 2), for a point θ* and ε > 0:

- N^ε_{e,θ*}: the largest path-connected set containing θ* on which |L_e(θ) − L_e(θ*)| ≤ ε;
- I^ε(θ*) = max over ordered pairs (e, e′) ∈ E² of max_{θ ∈ N^ε_{e,θ*}} |L_e′(θ) − L_e(θ*)|.
  The pairs e = e′ are included, as in the paper; they contribute at most ε;
- ILC(A) = −E_θ0[I^ε(A_∞(θ0))] for the algorithm A started from θ0;
- restricted to a disc of radius ρ > 0 (the toy's parameter is one 2-vector, so the ball of
  `and_mask.core.consistency` under its euclidean metric): N^ε_{e,θ*,ρ} is the path-connected
  component containing θ* of {θ : ‖θ − θ*‖ ≤ ρ, |L_e(θ) − L_e(θ*)| ≤ ε}, and I^ε_ρ(θ*) the same
  maximum as I^ε over those sets. I^ε_ρ ≤ I^ε, and I^ε_ρ = I^ε once the disc holds every N^ε_{e,θ*}.

On the grid. The evaluation grid has n × n nodes spaced evenly over the landscape's domain
[low, high]², edges included, so N^ε is the part of the ε-region inside the domain: a valley
that leaves the domain counts only up to its edge. Two nodes are adjacent when they differ by
one grid step in x or in y (4-connectivity); N^ε_{e,θ*} is the connected set of nodes with
|L_e − L_e(θ*)| ≤ ε reached by flood fill from θ*, plus θ* itself. With a radius ρ the flood fill
runs on the nodes within distance ρ of θ* only, so N^ε_{e,θ*,ρ} is the connected set of those
feasible in-disc nodes reached from θ*, plus θ*.

A point θ* between the nodes (every minimum found numerically is one) keeps its exact losses
L_e(θ*) as the reference; the flood fill starts from those corners of the grid cell holding θ*
that satisfy the constraint, i.e. the straight segment from θ* to such a corner is taken to lie
in the region (the grid's own discretisation). When no corner does (ε smaller than the change of
L_e across one cell), N^ε_{e,θ*} is {θ*} alone on this grid and the result is flagged as not
resolved: use a finer grid. The maximum is taken over the region's nodes and θ* itself.

A method's ILC on the landscape: the basin map's runs (same starts, same noise). A run has
converged when it ends within `radius` of a minimum found (the basin map's criterion); its
A_∞(θ0) is that minimum, whose I^ε is computed once. Runs that end near no minimum are left
out of the mean and counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from vizualization.landscapes import DTYPE, Landscape, env_losses

FOUR_NEIGHBOURS = ndimage.generate_binary_structure(2, 1)  # edge-adjacent nodes only


@dataclass(frozen=True)
class EvaluationGrid:
    """Every environment's loss on n × n nodes over [low, high]², edges included."""

    xs: np.ndarray  # (n,) node coordinates, also those along y
    losses: np.ndarray  # (n, n, E): rows y, columns x

    @property
    def spacing(self) -> float:
        return float(self.xs[1] - self.xs[0])

    @classmethod
    def of(cls, landscape: Landscape, n: int) -> "EvaluationGrid":
        if n < 2:
            raise ValueError(f"the evaluation grid needs at least 2 nodes per axis, got {n}")
        axis = torch.linspace(landscape.low, landscape.high, n, dtype=DTYPE)
        gy, gx = torch.meshgrid(axis, axis, indexing="ij")
        points = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
        return cls(axis.numpy(), env_losses(landscape, points).numpy().reshape(n, n, -1))

    def cell_corners(self, point) -> list[tuple[int, int]]:
        """(row, column) of the four nodes of the grid cell holding `point` = (x, y)."""
        last = len(self.xs) - 2
        col, row = (int(np.clip(np.floor((p - self.xs[0]) / self.spacing), 0, last)) for p in point)
        return [(row + dr, col + dc) for dr in (0, 1) for dc in (0, 1)]


@dataclass(frozen=True)
class Inconsistency:
    """I^ε at one point θ*, with what attains it."""

    value: float  # I^ε(θ*)
    pair: tuple[int, int]  # the maximising ordered pair (e, e′), 0-based
    pair_values: np.ndarray  # (E, E): max_{θ ∈ N^ε_{e,θ*}} |L_e′(θ) − L_e(θ*)|, rows e
    pair_points: np.ndarray  # (E, E, 2): a θ where each of those maxima is attained
    regions: np.ndarray  # (E, n, n) bool: the nodes of N^ε_{e,θ*}
    resolved: bool  # False when some N^ε_{e,θ*} holds no grid node

    @property
    def argmax(self) -> tuple[float, float]:
        """A θ ∈ N^ε_{e,θ*} where |L_e′(θ) − L_e(θ*)| = I^ε(θ*), (e, e′) the maximising pair."""
        return tuple(self.pair_points[self.pair].tolist())


def eps_region(grid: EvaluationGrid, env: int, reference: float, eps: float, point,
               radius: float | None = None) -> np.ndarray:
    """(n, n) bool: the nodes of N^ε_{env,θ*} (N^ε_{env,θ*,ρ}, ρ = `radius`: only nodes with ‖θ − θ*‖ ≤ ρ),
    flood-filled from the feasible corners of θ*'s cell."""
    inside = np.abs(grid.losses[..., env] - reference) <= eps
    if radius is not None:
        if not 0 < radius < np.inf:
            raise ValueError(f"radius must be a positive finite number or None, got {radius}")
        gy, gx = np.meshgrid(grid.xs, grid.xs, indexing="ij")
        inside &= np.hypot(gx - point[0], gy - point[1]) <= radius
    labels, _ = ndimage.label(inside, structure=FOUR_NEIGHBOURS)
    seeds = {labels[corner] for corner in grid.cell_corners(point)} - {0}
    return np.isin(labels, list(seeds)) if seeds else np.zeros_like(inside)


def inconsistency(landscape: Landscape, grid: EvaluationGrid, point, eps: float,
                  radius: float | None = None) -> Inconsistency:
    """I^ε(θ*) at θ* = `point` (x, y), by flood fill of each environment's ε-region on `grid`;
    I^ε_ρ(θ*) with ρ = `radius` (the region cut to the disc ‖θ − θ*‖ ≤ ρ)."""
    at_point = env_losses(landscape, torch.tensor([point], dtype=DTYPE))[0].numpy()
    n_envs = at_point.shape[0]
    pair_values = np.zeros((n_envs, n_envs))
    argmax = np.zeros((n_envs, n_envs, 2))
    regions = np.stack([eps_region(grid, e, at_point[e], eps, point, radius) for e in range(n_envs)])
    gy, gx = np.meshgrid(grid.xs, grid.xs, indexing="ij")
    for e in range(n_envs):
        # Candidates: the region's nodes and θ* itself.
        losses = np.concatenate([grid.losses[regions[e]], at_point[None]])
        xy = np.concatenate([np.stack([gx[regions[e]], gy[regions[e]]], axis=1), np.array([point])])
        gaps = np.abs(losses - at_point[e])  # (nodes + 1, E): |L_e′(θ) − L_e(θ*)| for every e′
        best = gaps.argmax(axis=0)
        pair_values[e] = gaps[best, np.arange(n_envs)]
        argmax[e] = xy[best]
    e, other = np.unravel_index(pair_values.argmax(), pair_values.shape)
    return Inconsistency(float(pair_values[e, other]), (int(e), int(other)), pair_values, argmax, regions,
                         bool(regions.reshape(n_envs, -1).any(axis=1).all()))


def method_ilc(values, reached) -> tuple[float, int]:
    """(ILC, converged runs): −mean over the converged runs of the I^ε of the minimum each reached.

    `values[k]` is I^ε of minimum k; `reached[i]` the index of the minimum run i reached, −1 for
    none. ILC is NaN when no run converged.
    """
    reached = np.asarray(reached)
    converged = reached[reached >= 0]
    if converged.size == 0:
        return float("nan"), 0
    return -float(np.asarray(values, dtype=float)[converged].mean()), int(converged.size)
