"""Update directions of every method on a 2-D landscape, vectorised over points.

At a point θ the environments' gradients g_e = ∇Z_e(θ) (plus optional gradient noise σ·ξ_e,
ξ_e ~ N(0, I), drawn independently per environment) are stacked as an (E, 2) tensor and
combined exactly as in training: `apply_combiner(COMBINERS[name], [g], hparams)`, θ being one
parameter tensor of shape (2,). Two toy-only rules need more than the gradients at θ:

- reptile:   from θ, k gradient steps of size η on each environment alone,
             φ_e ← φ_e − η ∇Z_e(φ_e); direction d = mean_e (θ − φ_e) / (k η). With k = 1 this is
             the average gradient.
- lookahead: before stepping along u = Σ_e a_e g_e, tune the weights a on the simplex,
             a = softmax(s) with s = 0 (the average) at first, by a few gradient steps on s of
                 J(a) = ‖u‖ / mean_e ‖g_e‖ − λ · mean_{e<f} cos(g'_e, g'_f),
             where g'_e = g_e − η H_e u is environment e's gradient after the step, to first
             order (H_e its Hessian): the smallest convex combination (as in MGDA) after which
             the environments agree. Keeping a on the simplex keeps u from vanishing or turning
             against every environment; dividing ‖u‖ by the mean gradient norm gives λ the same
             meaning everywhere on the landscape.

`TOY_METHODS` holds the registry's combiners plus these two as `Combiner`s, so that
`MethodFlags(TOY_METHODS)` makes --method and every hyper-parameter flag, as in training.
"""
from __future__ import annotations

import warnings

import torch
from torch.func import grad, vmap

from and_mask.core.combiners import Combiner, CombinerRegistry, HParam, apply_combiner
from gen_mask.gen_mask_utils import COMBINERS
from vizualization.landscapes import Landscape, env_grads, env_hessians

_POINTWISE: set = set()  # combiners that torch.func.vmap cannot trace; evaluated point by point


def noisy_env_grads(landscape: Landscape, points, noise: float = 0.0, generator=None):
    """(N, E, 2): ∇Z_e at every point plus σ·ξ_e."""
    grads = env_grads(landscape, points)
    if noise > 0:
        grads = grads + noise * torch.randn(grads.shape, dtype=grads.dtype, generator=generator)
    return grads


def combine(combiner: Combiner, hparams: dict, grads: torch.Tensor) -> torch.Tensor:
    """(N, 2) combined directions from (N, E, 2) per-environment gradients, one point at a time
    in the math, vmapped over the points. A combiner that vmap cannot trace (data-dependent
    Python control flow, `.item()`) falls back to a loop over points, with a warning."""
    def one(g):
        return apply_combiner(combiner, [g], hparams)[0][0]

    if combiner.name not in _POINTWISE:
        try:
            return vmap(one, randomness="different")(grads)
        except Exception as error:  # any tracing failure; a genuine bug re-raises in the loop below
            _POINTWISE.add(combiner.name)
            warnings.warn(f"combiner {combiner.name} cannot be vmapped ({type(error).__name__}: {error}); "
                          "evaluating it point by point, which is slow on large grids")
    return torch.stack([one(g) for g in grads])


def reptile(landscape: Landscape, points, lr: float, noise: float = 0.0, generator=None, reptile_steps: int = 5):
    """Reptile: mean_e (θ − φ_e)/(kη) after k steps φ_e ← φ_e − η ∇Z_e(φ_e) on each env alone."""
    n, n_envs = points.shape[0], landscape.n_envs
    envs = torch.arange(n_envs)
    phi = points.unsqueeze(1).expand(n, n_envs, 2)
    for _ in range(reptile_steps):
        # Every environment's gradient at every φ_e, then the diagonal: env e's gradient at φ_e.
        all_grads = noisy_env_grads(landscape, phi.reshape(-1, 2), noise, generator).reshape(n, n_envs, n_envs, 2)
        phi = phi - lr * all_grads[:, envs, envs]
    return (points.unsqueeze(1) - phi).mean(1) / (reptile_steps * lr)


def _lookahead_objective(logits, grads, hessians, lr, lam):
    u = torch.softmax(logits, dim=0) @ grads
    scale = grads.norm(dim=1).mean() + 1e-12
    after = grads - lr * torch.einsum("eij,j->ei", hessians, u)
    unit = after / (after.norm(dim=1, keepdim=True) + 1e-12)
    cos = unit @ unit.T
    n_envs = grads.shape[0]
    mean_pair_cos = (cos.sum() - cos.diagonal().sum()) / (n_envs * (n_envs - 1))
    return torch.sqrt(u @ u + 1e-12) / scale - lam * mean_pair_cos


def lookahead(landscape: Landscape, points, lr: float, noise: float = 0.0, generator=None,
              lookahead_lambda: float = 1.0, lookahead_steps: int = 5, lookahead_lr: float = 1.0):
    """Lookahead: u = Σ a_e g_e, a = softmax(s) tuned on ‖u‖/mean‖g‖ − λ·cos(g_e − ηH_e u, g_f − ηH_f u)."""
    grads = noisy_env_grads(landscape, points, noise, generator)
    hessians = env_hessians(landscape, points)
    logits = torch.zeros(grads.shape[:2], dtype=grads.dtype)
    objective_grad = vmap(grad(_lookahead_objective), in_dims=(0, 0, 0, None, None))
    for _ in range(lookahead_steps):
        logits = logits - lookahead_lr * objective_grad(logits, grads, hessians, lr, lookahead_lambda)
    return torch.einsum("ne,nei->ni", torch.softmax(logits, dim=1), grads)


TOY_ONLY = CombinerRegistry()
TOY_ONLY.add(Combiner("reptile", reptile, hparams=(
    HParam("reptile_steps", int, 5, "Inner gradient steps k per environment.", low=1),)))
TOY_ONLY.add(Combiner("lookahead", lookahead, hparams=(
    HParam("lookahead_lambda", float, 1.0, "Weight λ of the post-step gradient agreement.", low=0.0),
    HParam("lookahead_steps", int, 5, "Gradient steps on the logits of the environment weights.", low=0),
    HParam("lookahead_lr", float, 1.0, "Step size of the updates of those logits.", low=0.0))))

TOY_METHODS = CombinerRegistry(COMBINERS)
for _method in TOY_ONLY.values():
    TOY_METHODS.add(_method)


def direction(method: Combiner, hparams: dict, landscape: Landscape, points, lr: float, noise: float = 0.0,
              generator=None) -> torch.Tensor:
    """(N, 2) update direction of `method` at (N, 2) points; the step is θ ← θ − η · direction."""
    if method.name in TOY_ONLY:
        return method.fn(landscape, points, lr, noise, generator, **hparams)
    return combine(method, hparams, noisy_env_grads(landscape, points, noise, generator))
