"""IRMv1 (Arjovsky, Bottou, Gulrajani and Lopez-Paz, 2019): risk plus a per-environment penalty.

For a model output f(x) (a logit or a regression prediction) and environment e with risk
R_e(f) = mean_i ℓ(f(x_i), y_i), IRMv1 multiplies the output by a dummy scalar classifier w and
penalises the slope of the risk at w = 1:

    P_e = ( d/dw R_e(w · f) |_{w=1} )²,
    squared loss   ℓ = (f − y)²:          d/dw = 2 · mean_i (f_i − y_i) f_i,
    logistic loss  ℓ = BCE(logit f, y):   d/dw = mean_i (σ(f_i) − y_i) f_i.

P_e = 0 when rescaling the output cannot lower environment e's risk: the same classifier on
top of the representation is optimal in every environment.

Schedule (the IRM reference code and Ahuja et al., ICLR 2021): with λ the chosen penalty weight,

    weight(step) = 1 for step < anneal_steps (190), else λ,
    loss = mean_e R_e + l2 · ‖θ‖² + weight · mean_e P_e,   divided by weight when weight > 1,

so that after the warm-up the gradients keep the scale of the warm-up's. The same functions
serve the benchmark (`fit`) and the `irm` method of the training loop (`gen_mask.baselines`).
"""
from __future__ import annotations

import torch

PENALTY_WEIGHTS = (1e4, 3.3e4, 6.6e4, 1e5)  # the candidates λ, one chosen on validation data
ANNEAL_STEPS = 190


def irmv1_penalty(output: torch.Tensor, target: torch.Tensor, risk, scale_shape=None) -> torch.Tensor:
    """P_e for one environment: the squared derivative of the risk w.r.t. a dummy scale at 1.

    `output` is (B, *M): B examples of M independent models fitted together (M may be empty);
    `risk(output, target)` returns the (*M) mean risks over the B examples. Returns (*M)
    penalties, differentiable w.r.t. the models' parameters. `scale_shape` overrides the shape
    (*M) of the dummy scale: () for one model with several logits per example, (B, C), whose
    logits are all multiplied by the one scalar (IRMv1's w · Φ for a C-class classifier).
    """
    shape = output.shape[1:] if scale_shape is None else scale_shape
    scale = torch.ones(shape, dtype=output.dtype, device=output.device, requires_grad=True)
    slope = torch.autograd.grad(risk(output * scale, target).sum(), scale, create_graph=True)[0]
    return slope.pow(2)


def penalty_weight(step: int, weights: torch.Tensor, anneal_steps: int = ANNEAL_STEPS) -> torch.Tensor:
    """1 during the first `anneal_steps` steps (0-based), the chosen weight(s) afterwards."""
    return weights if step >= anneal_steps else torch.ones_like(weights)


def annealed_objective(risk: torch.Tensor, penalty: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(risk + w · penalty) / max(w, 1): the IRM reference's rescaling, also V-REx's."""
    return (risk + weight * penalty) / weight.clamp(min=1.0)


def irm_objective(env_risks: torch.Tensor, env_penalties: torch.Tensor, weight: torch.Tensor,
                  l2_term=0.0) -> torch.Tensor:
    """(mean_e R_e + l2_term + w · mean_e P_e) / max(w, 1); env_* are (E, *M), w broadcasts to (*M)."""
    return annealed_objective(env_risks.mean(0) + l2_term, env_penalties.mean(0), weight)
