"""Small exact solvers behind the gen_mask combiners (E = number of environments, E small).

- `box_simplex_lp`: max c·x s.t. Σx = total, −bound ≤ x ≤ bound (align_weights), exact, sort-based,
  vectorised torch (no host sync).
- `min_norm_weights`: the minimum-norm point of the convex hull of E gradients (MGDA), exact, from
  their E×E Gram matrix via one non-negative least-squares problem.
- `cagrad_weights`: the CAGrad inner problem min_{w ∈ simplex} wᵀQb + c·‖g0‖·√(wᵀQw), exact and
  scale-free (bisection over a family of minimum-norm problems, then the optimality conditions).
- `sort_environments`: sort (E, ...) along the environment axis with a sorting network, several
  times faster than `torch.sort(dim=0)` for the few environments of a step (median, trimmed mean).

The two Gram-matrix solvers work in float64 on the CPU: the E×E matrix is the only thing that
leaves the device.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from scipy.optimize import brentq, nnls


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


NNLS_ITERATIONS_PER_WEIGHT = 100


def _gram_to_numpy(gram: torch.Tensor) -> tuple[np.ndarray, float]:
    """float64 copy of a Gram matrix scaled to unit mean diagonal, and the scale."""
    q = gram.detach().to("cpu", torch.float64).numpy()
    q = (q + q.T) / 2
    scale = float(np.mean(np.diag(q)))
    return (q / scale if scale > 0 else q), scale


def _min_norm_from_gram(q: np.ndarray) -> np.ndarray:
    """Simplex weights of the minimum-norm point, from a float64 Gram matrix (see `min_norm_weights`)."""
    n = q.shape[0]
    eigenvalues, vectors = np.linalg.eigh(q)
    r = np.sqrt(np.clip(eigenvalues, 0.0, None))[:, None] * vectors.T
    a = np.vstack([r, np.ones((1, n))])
    b = np.zeros(n + 1)
    b[-1] = 1.0
    # scipy's default of 3n active-set iterations can run out when gradients vanish or coincide
    # (per-example gradients of fitted examples): the active set then takes many more swaps.
    u, _ = nnls(a, b, maxiter=NNLS_ITERATIONS_PER_WEIGHT * (n + 1))
    return u / u.sum()


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
    return torch.as_tensor(_min_norm_from_gram(q), dtype=gram.dtype, device=gram.device)


def cagrad_weights(gram: torch.Tensor, c: float) -> torch.Tensor:
    """Weights w ∈ simplex minimising wᵀQb + c·‖g0‖·√(wᵀQw), b = 1/E (CAGrad's dual, Liu et al. 2021).

    `c` is CAGrad's c: the radius of the ball around the mean gradient g0 = G b is r = c·‖g0‖.
    With x = g_w = Σ_e w_e g_e, the problem is min_{x ∈ C} f(x) = ⟨x, g0⟩ + r‖x‖ over the convex
    hull C of the gradients. It is solved exactly and scale-free: nothing is added to ‖x‖, so the
    weights are the same for G and s·G at any scale s, however small ‖x‖ is at the optimum.

    Since r‖x‖ = min_{η>0} ‖x‖²/(2η) + r²η/2, minimising over x first gives, for each η, the point
    x(η) of C nearest to −η·g0 (a minimum-norm problem over the shifted gradients g_e + η·g0,
    solved exactly by `min_norm_weights`' NNLS). The optimum is x(η*) where ‖x(η)‖ = r·η; what is
    left to minimise over η is convex, so ‖x(η)‖/η decreases and η* is its root (Brent's method on
    log η). The
    shifted Gram matrices mix large and small gradients, so the weights are finally recomputed
    from the optimality conditions on the support found, which involve only the gradients that
    carry weight: with S the support, a = Qb and t = r/‖x‖,
    a_S + t·Q_SS w_S = μ·1 and 1ᵀw_S = 1 give w_S = (μ·Q_SS⁻¹1 − Q_SS⁻¹a_S)/t in closed form.
    If x = 0 is optimal (possible for c ≥ 1) the minimum-norm weights are returned.
    """
    n = gram.shape[0]
    q, scale = _gram_to_numpy(gram)
    b = np.full(n, 1.0 / n)
    if scale <= 0 or n == 1:
        return torch.as_tensor(b, dtype=gram.dtype, device=gram.device)
    w = _cagrad_dual(q, c)
    return torch.as_tensor(w, dtype=gram.dtype, device=gram.device)


def _cagrad_objective(q, a, r, w):
    return float(a @ w + r * np.sqrt(max(w @ q @ w, 0.0)))


def _cagrad_dual(q: np.ndarray, c: float) -> np.ndarray:
    """`cagrad_weights` on a float64 Gram matrix scaled to unit mean diagonal."""
    n = q.shape[0]
    ones = np.ones(n)
    a = q @ ones / n  # ⟨g_e, g0⟩
    g0_sq = float(a.mean())
    r = c * np.sqrt(max(g0_sq, 0.0))
    if r <= 0:  # c = 0: min ⟨x, g0⟩, a vertex
        return np.eye(n)[int(np.argmin(a))]

    def nearest(eta):  # weights of the point of C nearest to −η·g0, and its norm
        shifted = q + eta * (np.outer(a, ones) + np.outer(ones, a)) + eta ** 2 * g0_sq
        w = _min_norm_from_gram(shifted)
        return w, np.sqrt(max(w @ q @ w, 0.0))

    # ‖x(η)‖ ≤ max_e ‖g_e‖, so ‖x(η)‖ < rη above `high`; go down until ‖x(η)‖ > rη.
    high = 2.0 * np.sqrt(q.diagonal().max()) / r
    low = high
    for _ in range(30):
        low *= 1e-3
        w, norm = nearest(low)
        if norm > r * low:
            break
    else:  # ‖x(η)‖ ≤ rη down to η ≈ 1e-90: x = 0 (the minimum-norm point) is optimal
        return _min_norm_from_gram(q)
    # ‖x(η)‖/(rη) − 1 decreases in log η: Brent's method finds its root inside [low, high].
    log_eta = brentq(lambda u: nearest(np.exp(u))[1] / (r * np.exp(u)) - 1.0, np.log(low), np.log(high),
                     xtol=1e-14, rtol=4 * np.finfo(float).eps, maxiter=200)
    w = nearest(np.exp(log_eta))[0]
    return _polish_cagrad(q, a, r, w)


def _polish_cagrad(q, a, r, w):
    """Solve the optimality conditions on the support of `w` exactly; keep `w` if that is not better."""
    support = np.flatnonzero(w > 0)
    q_s, a_s = q[np.ix_(support, support)], a[support]
    try:
        p, q_inv_a = np.linalg.solve(q_s, np.ones(len(support))), np.linalg.solve(q_s, a_s)
    except np.linalg.LinAlgError:
        return w
    sum_p, sum_q = p.sum(), q_inv_a.sum()
    discriminant = sum_q ** 2 - sum_p * (a_s @ q_inv_a - r ** 2)
    if not (sum_p > 0 and discriminant > 0):
        return w
    t = np.sqrt(discriminant)  # t = r/‖x‖ and μ = (Σq + t)/Σp, from 1ᵀw = 1 and ‖x‖ = r/t
    polished = np.zeros_like(w)
    polished[support] = ((sum_q + t) / sum_p * p - q_inv_a) / t
    if polished.min() < 0 or _cagrad_objective(q, a, r, polished) > _cagrad_objective(q, a, r, w):
        return w
    return polished


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
