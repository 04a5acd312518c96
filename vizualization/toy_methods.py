"""Update directions of every method on a 2-D landscape, vectorised over points.

At a point θ the environments' gradients g_e = ∇Z_e(θ) (plus optional gradient noise σ·ξ_e,
ξ_e ~ N(0, I), drawn independently per environment) are stacked as an (E, 2) tensor and
combined exactly as in training: `apply_combiner(COMBINERS[name], [g], hparams)`, θ being one
parameter tensor of shape (2,). A combiner that needs Hessian-vector products (lookahead
alignment, `gen_mask.lookahead`) gets them from the exact Hessians ∇²Z_e(θ), the noise-free
ones: hvp(v) = (H_e v)_e. It is the very function that training runs.

One toy-only rule needs more than the gradients at θ:

- reptile:   from θ, k gradient steps of size η on each environment alone,
             φ_e ← φ_e − η ∇Z_e(φ_e); direction d = mean_e (θ − φ_e) / (k η). With k = 1 this is
             the average gradient.

`TOY_METHODS` holds the registry's combiners plus reptile as a `Combiner`, so that
`MethodFlags(TOY_METHODS)` makes --method and every hyper-parameter flag, as in training.
"""
from __future__ import annotations

import warnings

import torch
from torch.func import vmap

from and_mask.core.combiners import Combiner, CombinerRegistry, HParam, apply_combiner
from and_mask.core.per_env_hvp import hvp_from_hessians
from gen_mask.gen_mask_utils import COMBINERS
from vizualization.landscapes import Landscape, env_grads, env_hessians

_POINTWISE: set = set()  # combiners that torch.func.vmap cannot trace; evaluated point by point


def noisy_env_grads(landscape: Landscape, points, noise: float = 0.0, generator=None):
    """(N, E, 2): ∇Z_e at every point plus σ·ξ_e."""
    grads = env_grads(landscape, points)
    if noise > 0:
        grads = grads + noise * torch.randn(grads.shape, dtype=grads.dtype, generator=generator)
    return grads


def combine(combiner: Combiner, hparams: dict, grads: torch.Tensor, hessians: torch.Tensor | None = None):
    """(N, 2) combined directions from (N, E, 2) per-environment gradients (and, for a combiner that
    needs them, the (N, E, 2, 2) Hessians), one point at a time in the math, vmapped over the
    points. A combiner that vmap cannot trace (data-dependent Python control flow, `.item()`)
    falls back to a loop over points, with a warning."""
    def one(g, h=None):
        return apply_combiner(combiner, [g], hparams, None if h is None else hvp_from_hessians(h))[0][0]

    inputs = (grads,) if hessians is None else (grads, hessians)
    if combiner.name not in _POINTWISE:
        try:
            return vmap(one, randomness="different")(*inputs)
        except Exception as error:  # any tracing failure; a genuine bug re-raises in the loop below
            _POINTWISE.add(combiner.name)
            warnings.warn(f"combiner {combiner.name} cannot be vmapped ({type(error).__name__}: {error}); "
                          "evaluating it point by point, which is slow on large grids")
    return torch.stack([one(*point) for point in zip(*inputs)])


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


TOY_ONLY = CombinerRegistry()
TOY_ONLY.add(Combiner("reptile", reptile, hparams=(
    HParam("reptile_steps", int, 5, "Inner gradient steps k per environment.", low=1),)))

TOY_METHODS = CombinerRegistry(COMBINERS)
for _method in TOY_ONLY.values():
    TOY_METHODS.add(_method)


def direction(method: Combiner, hparams: dict, landscape: Landscape, points, lr: float, noise: float = 0.0,
              generator=None) -> torch.Tensor:
    """(N, 2) update direction of `method` at (N, 2) points; the step is θ ← θ − η · direction."""
    if method.name in TOY_ONLY:
        return method.fn(landscape, points, lr, noise, generator, **hparams)
    grads = noisy_env_grads(landscape, points, noise, generator)
    return combine(method, hparams, grads, env_hessians(landscape, points) if method.needs_hvp else None)
