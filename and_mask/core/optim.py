"""The optimisers: AdamFlexibleWeightDecay and temporal AND-mask Adam (the paper's Algorithm 1).

`add_optimizer_flags`, `check_optimizer_flags` and `make_optimizer` give every experiment the same
--optimizer choice: its own optimiser (the default) or temporal_and_mask_adam.
"""
import math

import torch
from torch.optim.optimizer import Optimizer

from and_mask.core.flags import fraction, probability

WEIGHT_DECAY_ORDERS = ("before", "after")
TEMPORAL = "temporal_and_mask_adam"


class AdamFlexibleWeightDecay(Optimizer):
    """Adam (bias-corrected moments m, v) with weight decay wd applied in one of two places.

    - ``before``: g ← g + wd·θ before the moment updates. The decay then acts on every weight,
      also on those whose gradient a mask set to zero (coupled, L2-style decay).
    - ``after``:  after the Adam step, θ ← θ − (lr / (1 − β1^t))·wd·θ (decoupled decay).

    The order has no default: the caller must choose.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, *, weight_decay_order, weight_decay=0.0,
                 **extra_defaults):
        if weight_decay_order not in WEIGHT_DECAY_ORDERS:
            raise ValueError(f"weight_decay_order must be one of {WEIGHT_DECAY_ORDERS}, got {weight_decay_order!r}")
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be non-negative")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, weight_decay_order=weight_decay_order,
                        **extra_defaults)
        super().__init__(params, defaults)

    def _masked_first_moment(self, exp_avg, grad, state, group):
        """The first moment that the step uses; subclasses mask it."""
        return exp_avg

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
                p.addcdiv_(self._masked_first_moment(exp_avg, grad, state, group), denom, value=-step_size)
                if order == "after" and wd != 0:
                    p.add_(p, alpha=-step_size * wd)
        return loss


class TemporalAndMaskAdam(AdamFlexibleWeightDecay):
    """Temporal AND-mask Adam (Parascandolo et al., ICLR 2021, Algorithm 1): agreement over time.

    With g the step's gradient (whatever produced it: one environment's, or a combiner's):

        m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²          (Adam's moments, bias-corrected)
        â ← weighted mean of sign(g_1), …, sign(g_t) with weights ∝ β3^(t−k)
        b = 1[|â| ≥ τ],   θ ← θ − lr/(1 − β1^t) · (m ⊙ b) / (√(v/(1 − β2^t)) + ε)
        θ ← θ − lr/(1 − β1^t) · wd·θ                              (weight decay, after the mask)

    â is the bias-corrected β3-average of the signs, â = a/(1 − β3^t) with a ← β3·a + (1 − β3)·sign(g),
    kept in the recursive form â ← â + (1 − β3)/(1 − β3^t)·(sign(g) − â), which is exact (±1)
    for a sign that never changed. So â is the temporal counterpart of the AND-mask's agreement
    |mean_e sign(g_e)|: τ = 0 keeps everything (the optimiser is then exactly
    AdamFlexibleWeightDecay with order "after", and Adam when wd = 0); τ = 1 updates a coordinate
    only while its gradient sign has never changed (nor been 0); at the first step a single sign
    agrees with itself, as the AND-mask of a single environment keeps everything. A sign that
    alternates every step has, from the second step on, |â| ≤ (1 + β3³)/((1 + β3)(1 + β3 + β3²))
    (0.336 for β3 = 0.9, → 1/3 as β3 → 1), so a larger τ freezes it after its first step.
    The moments m and v always take the unmasked gradient. Weight decay is decoupled and never
    masked, with AdamFlexibleWeightDecay's "after" formula.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, *, beta3, temporal_threshold,
                 weight_decay=0.0):
        if not 0.0 <= beta3 < 1.0:
            raise ValueError(f"beta3 must lie in [0, 1), got {beta3}")
        if not 0.0 <= temporal_threshold <= 1.0:
            raise ValueError(f"temporal_threshold must lie in [0, 1], got {temporal_threshold}")
        super().__init__(params, lr, betas, eps, weight_decay_order="after", weight_decay=weight_decay,
                         beta3=beta3, temporal_threshold=temporal_threshold)
        self._kept = self._total = 0  # coordinates updated / seen since `pop_kept_fraction`

    def _masked_first_moment(self, exp_avg, grad, state, group):
        if "sign_agreement" not in state:
            state["sign_agreement"] = torch.zeros_like(grad)
        beta3 = group["beta3"]
        agreement = state["sign_agreement"]
        agreement.add_(torch.sign(grad).sub_(agreement), alpha=(1 - beta3) / (1 - beta3 ** state["step"]))
        mask = agreement.abs() >= group["temporal_threshold"]
        self._kept = self._kept + mask.sum()  # stays on the device: no synchronisation per step
        self._total += mask.numel()
        return exp_avg * mask

    def pop_kept_fraction(self) -> float | None:
        """Fraction of coordinates updated over the steps since the last call (None if no step)."""
        kept, total = self._kept, self._total
        self._kept = self._total = 0
        return float(kept) / total if total else None


def add_optimizer_flags(group, default: str):
    """--optimizer (`default`, the experiment's own: "adam" or "adam_flexible_weight_decay", or
    temporal_and_mask_adam), --beta3 and --temporal_threshold, and with adam_flexible_weight_decay
    its --weight_decay_order."""
    if default == "adam_flexible_weight_decay":
        group.add_argument("--weight_decay_order", choices=WEIGHT_DECAY_ORDERS, default=None,
                           help="before: wd·θ is added to the gradient before Adam's moments (L2); after: decoupled "
                                "decay, applied after the step. Default: before (the original), after with "
                                f"{TEMPORAL}.")
    group.add_argument("--optimizer", choices=[default, TEMPORAL], default=default,
                       help=f"{default}: the experiment's own optimiser; {TEMPORAL}: Adam whose step is masked "
                            "where the sign of the gradient has not agreed over recent steps (the paper's "
                            "Algorithm 1), with decoupled weight decay after the mask.")
    group.add_argument("--beta3", type=probability, default=None,
                       help=f"Decay rate β3 in [0, 1) of the average of gradient signs of {TEMPORAL}. Default: "
                            f"unset, which {TEMPORAL} refuses and the other optimisers require.")
    group.add_argument("--temporal_threshold", type=fraction, default=None,
                       help=f"τ in [0, 1]: {TEMPORAL} updates a coordinate when the average of its gradient signs "
                            f"is at least τ in absolute value (0 is Adam). Default: unset, which {TEMPORAL} refuses "
                            "and the other optimisers require.")


def check_optimizer_flags(args, parser):
    """Reject flags that do not fit --optimizer and settle --weight_decay_order where it exists.

    The experiment's default optimiser takes --weight_decay_order (None: "before", the original);
    temporal AND-mask Adam always decays after its mask, so it takes "after" and refuses "before".
    """
    temporal_flags = [f"--{name}" for name in ("beta3", "temporal_threshold") if getattr(args, name) is None]
    if args.optimizer == TEMPORAL and temporal_flags:
        parser.error(f"--optimizer {TEMPORAL} needs {' and '.join(temporal_flags)}")
    if args.optimizer != TEMPORAL and len(temporal_flags) < 2:
        parser.error(f"--beta3 and --temporal_threshold belong to --optimizer {TEMPORAL}")
    if not hasattr(args, "weight_decay_order"):
        return
    if args.optimizer == TEMPORAL and args.weight_decay_order == "before":
        parser.error(f"--optimizer {TEMPORAL} applies weight decay after its mask; --weight_decay_order before "
                     "is not available with it")
    if args.weight_decay_order is None:
        args.weight_decay_order = "after" if args.optimizer == TEMPORAL else "before"


def make_optimizer(args, params, lr: float, weight_decay: float) -> Optimizer:
    """The optimiser that --optimizer names, with Adam's β1 = 0.9, β2 = 0.999, ε = 1e-8."""
    if args.optimizer == TEMPORAL:
        return TemporalAndMaskAdam(params, lr=lr, weight_decay=weight_decay, beta3=args.beta3,
                                   temporal_threshold=args.temporal_threshold)
    if args.optimizer == "adam":  # coupled L2 decay, torch's implementation (the original's)
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    return AdamFlexibleWeightDecay(params, lr=lr, weight_decay=weight_decay,
                                   weight_decay_order=args.weight_decay_order)
