"""Small exact solvers behind the gen_mask combiners (E = number of environments, E small).

- `box_simplex_lp`: max c·x s.t. Σx = total, −bound ≤ x ≤ bound (align_weights), exact, sort-based,
  vectorised torch (no host sync).
- `min_norm_weights`: the minimum-norm point of the convex hull of E gradients (MGDA), exact, from
  their E×E Gram matrix via one non-negative least-squares problem.
- `cagrad_weights`: the CAGrad inner problem min_{w ∈ simplex} wᵀQb + c·√(wᵀQw), by SLSQP as in
  the CAGrad authors' code.
- `sort_environments`: sort (E, ...) along the environment axis with a sorting network, several
  times faster than `torch.sort(dim=0)` for the few environments of a step (median, trimmed mean).

The two Gram-matrix solvers work in float64 on the CPU: the E×E matrix is the only thing that
leaves the device.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from scipy.optimize import minimize, nnls


def box_simplex_lp(c: torch.Tensor, total: float = 1.0, bound: float = 2.0) -> torch.Tensor:
    """Exact solution x of max c·x s.t. Σ_e x_e = total, −bound ≤ x_e ≤ bound, over the last dim.

    Greedy (a fractional knapsack): start every x_e at −bound, which leaves total + E·bound to
    hand out; give each coordinate up to 2·bound in decreasing order of c_e. So the largest c_e
    sit at +bound, the smallest at −bound and at most one coordinate lies strictly inside. Any
    other feasible x can move mass from a lower-c to a higher-c coordinate without lowering c·x,
    which is why this is optimal; ties in c give the same objective whatever their order.
    """
    n = c.shape[-1]
    if not -bound * n <= total <= bound * n:
        raise ValueError(f"Σx = {total} is infeasible with {n} weights in [-{bound}, {bound}]")
    order = torch.argsort(c, dim=-1, descending=True)
    ranks = torch.arange(n, device=c.device, dtype=c.dtype)
    free = total + bound * n  # mass above the lower bounds
    x_sorted = -bound + torch.clamp(free - 2 * bound * ranks, 0.0, 2 * bound)
    x_sorted = x_sorted.expand_as(c)
    return torch.empty_like(c).scatter_(-1, order, x_sorted)


def _gram_to_numpy(gram: torch.Tensor) -> tuple[np.ndarray, float]:
    """float64 copy of a Gram matrix scaled to unit mean diagonal, and the scale."""
    q = gram.detach().to("cpu", torch.float64).numpy()
    q = (q + q.T) / 2
    scale = float(np.mean(np.diag(q)))
    return (q / scale if scale > 0 else q), scale


def min_norm_weights(gram: torch.Tensor) -> torch.Tensor:
    """Weights w ∈ simplex minimising ‖Σ_e w_e g_e‖², given the Gram matrix Q_ij = ⟨g_i, g_j⟩.

    Factor Q = RᵀR (eigendecomposition) and solve the non-negative least-squares problem
    min_{u ≥ 0} ‖[R; 1ᵀ] u − [0; 1]‖² (exact, Lawson–Hanson active set). Its optimality conditions
    Qu + (Σu − 1)·1 ≥ 0 with equality where u > 0 are, for w = u / Σu, exactly those of the
    minimum-norm point: (Qw)_e ≥ wᵀQw for every e, with equality where w_e > 0.
    """
    n = gram.shape[0]
    q, scale = _gram_to_numpy(gram)
    if scale <= 0:  # every gradient is zero: any convex combination is the minimum
        return torch.full((n,), 1.0 / n, dtype=gram.dtype, device=gram.device)
    eigenvalues, vectors = np.linalg.eigh(q)
    r = np.sqrt(np.clip(eigenvalues, 0.0, None))[:, None] * vectors.T
    a = np.vstack([r, np.ones((1, n))])
    b = np.zeros(n + 1)
    b[-1] = 1.0
    u, _ = nnls(a, b)
    w = u / u.sum()
    return torch.as_tensor(w, dtype=gram.dtype, device=gram.device)


def cagrad_weights(gram: torch.Tensor, c: float) -> torch.Tensor:
    """Weights w ∈ simplex minimising wᵀQb + c·‖g0‖·√(wᵀQw), b = 1/E (CAGrad's dual, Liu et al. 2021).

    `c` is CAGrad's c (the radius of the ball around the mean gradient g0 is c·‖g0‖). Solved with
    SLSQP from the uniform weights, as in the authors' code, with the analytic gradient and the
    Gram matrix scaled to unit mean diagonal (the minimiser does not depend on that scale).
    """
    n = gram.shape[0]
    q, scale = _gram_to_numpy(gram)
    b = np.full(n, 1.0 / n)
    if scale <= 0:
        return torch.as_tensor(b, dtype=gram.dtype, device=gram.device)
    qb = q @ b
    radius = c * np.sqrt(max(b @ qb, 0.0)) + 1e-8

    def objective(w):
        qw = q @ w
        norm = np.sqrt(max(w @ qw, 0.0) + 1e-8)
        return w @ qb + radius * norm, qb + radius * qw / norm

    result = minimize(objective, b, jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * n,
                      constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(n)},),
                      options={"ftol": 1e-12, "maxiter": 200})
    w = np.clip(result.x, 0.0, None)
    return torch.as_tensor(w / w.sum(), dtype=gram.dtype, device=gram.device)


@functools.lru_cache(maxsize=None)
def _sorting_network(n: int) -> tuple:
    """Comparators (i, j), i < j, of Batcher's odd–even merge sort for n inputs.

    Built for the next power of two; a comparator reaching past n would compare with a +inf
    padding value and leave both in place, so it is dropped.
    """
    size = 1
    while size < n:
        size *= 2
    comparators = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        comparators.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(comparators)


def sort_environments(values: torch.Tensor) -> torch.Tensor:
    """Sort along dim 0 (ascending): `torch.sort(values, dim=0).values` for finite values.

    Each comparator is one elementwise min and max of two environments' tensors (63 of them for
    16 environments), which vectorises over coordinates far better than a sort along a short
    strided axis.
    """
    rows = list(values.unbind(0))
    for i, j in _sorting_network(len(rows)):
        rows[i], rows[j] = torch.minimum(rows[i], rows[j]), torch.maximum(rows[i], rows[j])
    return torch.stack(rows)
