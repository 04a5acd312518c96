"""Lookahead alignment: environment weights chosen so that the environments agree after the step.

The last open idea of the original repository, drafted there on the 2-D toy landscapes only; this
one function serves both the toy (`vizualization.toy_methods`, exact 2×2 Hessians) and training
(`and_mask.core.per_env_hvp`, exact Hessian-vector products with `torch.func`).

With the per-environment gradients g_1..g_E at θ (the rows of G, (E, P)), a step θ' = θ − η d
along d = Σ_e w_e g_e, w on the simplex, changes environment e's gradient, to first order, into

    g'_e(w) = g_e − η H_e d,        H_e = ∇²L_e(θ).

The weights are w = softmax(s), s = 0 (the average) at first, after K gradient steps of size α
on s of

    J(w) = ‖d‖ / σ − λ · mean_{e≠f} cos(g'_e, g'_f),        σ = mean_e ‖g_e‖:

the smallest step (relative to the gradients' size, so that λ means the same at every scale)
after which the environments' gradients agree; the update is then d. Keeping w on the simplex
keeps d from vanishing or turning against every environment. K = 0 (or α = 0) is the average;
one environment, or E identical gradients, give that gradient back; λ = 0 shrinks the step
towards the minimum-norm point of the gradients' hull (MGDA).

Gradient in s. J depends on w through d and through the products a_e = H_e d. With the partial
derivatives of the closed-form J(d, a) (∂J/∂d at fixed a, and B_e = ∂J/∂a_e, by `torch.func`),
and each H_e symmetric,

    ∂J/∂d = ∂J/∂d|_a + Σ_e H_e B_e,    ∂J/∂w = G ∂J/∂d,    ∂J/∂s = w ⊙ (∂J/∂w − wᵀ ∂J/∂w).

So each inner step costs two Hessian-vector products per environment: H_e d (the prediction)
and H_e B_e (its adjoint), besides O(E·P) arithmetic. The iterates do not depend on the scale of
G (everything is computed on G/σ, and the products are linear).

The prediction models a plain gradient step of size η; an optimiser that rescales the gradient
(Adam) takes a different step, so η is a hyper-parameter of its own.
"""
from __future__ import annotations

import torch
from torch.func import grad

from and_mask.core.combiners import Combiner, HParam

EPS = 1e-12


def mean_pairwise_cosine(vectors: torch.Tensor) -> torch.Tensor:
    """mean over ordered pairs e ≠ f of cos(v_e, v_f), for (E, P) rows, E ≥ 2 (a zero row counts as 0)."""
    unit = vectors / (vectors.norm(dim=1, keepdim=True) + EPS)
    cos = unit @ unit.T
    n = vectors.shape[0]
    return (cos.sum() - cos.diagonal().sum()) / (n * (n - 1))


def objective(direction: torch.Tensor, products: torch.Tensor, grads: torch.Tensor, eta: float, lam: float):
    """J = ‖d‖ − λ · mean_{e≠f} cos(g_e − η a_e, g_f − η a_f) for gradients already divided by σ."""
    return torch.sqrt(direction @ direction + EPS) - lam * mean_pairwise_cosine(grads - eta * products)


_partials = grad(objective, argnums=(0, 1))


def lookahead(grads, hvp, lookahead_eta=0.01, lookahead_lambda=1.0, lookahead_steps=5, lookahead_weight_lr=1.0):
    """Lookahead alignment: Σ w_e g_e, w = softmax(s) tuned so that the g_e − ηH_e d agree after the step."""
    n_envs = grads.shape[0]
    if n_envs == 1:
        return grads[0], {"weights": torch.ones(1, dtype=grads.dtype, device=grads.device)}
    scale = grads.norm(dim=1).mean().clamp_min(torch.finfo(grads.dtype).tiny)
    scaled = grads / scale
    logits = torch.zeros(n_envs, dtype=grads.dtype, device=grads.device)
    for _ in range(lookahead_steps):
        weights = torch.softmax(logits, dim=0)
        direction = weights @ scaled
        d_direction, d_products = _partials(direction, hvp(direction), scaled, lookahead_eta, lookahead_lambda)
        d_direction = d_direction + hvp(d_products).sum(dim=0)
        d_weights = scaled @ d_direction
        logits = logits - lookahead_weight_lr * weights * (d_weights - weights @ d_weights)
    weights = torch.softmax(logits, dim=0)
    return weights @ grads, {"weights": weights}


LOOKAHEAD = Combiner(
    "lookahead", lookahead, scope="model", needs_hvp=True,
    hparams=(HParam("lookahead_eta", float, 0.01, "Step size η ≥ 0 of the predicted plain step θ − η·d (not the "
                    "optimiser's).", low=0.0),
             HParam("lookahead_lambda", float, 1.0, "Weight λ ≥ 0 of the predicted agreement after the step.", low=0.0),
             HParam("lookahead_steps", int, 5, "Number K ≥ 0 of gradient steps on the logits of the environment "
                    "weights; 0 is the average.", low=0),
             HParam("lookahead_weight_lr", float, 1.0, "Step size α ≥ 0 of those gradient steps on the logits.",
                    low=0.0)),
    reduces_to_mean=lambda lookahead_steps, lookahead_weight_lr, **others: lookahead_steps == 0
    or lookahead_weight_lr == 0)
