"""AdamFlexibleWeightDecay: Adam whose weight decay acts before or after the adaptive step."""
import math

import torch
from torch.optim.optimizer import Optimizer

WEIGHT_DECAY_ORDERS = ("before", "after")


class AdamFlexibleWeightDecay(Optimizer):
    """Adam (bias-corrected moments m, v) with weight decay wd applied in one of two places.

    - ``before``: g ← g + wd·θ before the moment updates. The decay then acts on every weight,
      also on those whose gradient a mask set to zero (coupled, L2-style decay).
    - ``after``:  after the Adam step, θ ← θ − (lr / (1 − β1^t))·wd·θ (decoupled decay).

    The order has no default: the caller must choose.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, *, weight_decay_order, weight_decay=0.0):
        if weight_decay_order not in WEIGHT_DECAY_ORDERS:
            raise ValueError(f"weight_decay_order must be one of {WEIGHT_DECAY_ORDERS}, got {weight_decay_order!r}")
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be non-negative")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, weight_decay_order=weight_decay_order)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            wd, order = group["weight_decay"], group["weight_decay_order"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                bias_correction1 = 1 - beta1 ** state["step"]
                bias_correction2 = 1 - beta2 ** state["step"]
                if order == "before" and wd != 0:
                    grad = grad.add(p, alpha=wd)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
                step_size = group["lr"] / bias_correction1
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if order == "after" and wd != 0:
                    p.add_(p, alpha=-step_size * wd)
        return loss
