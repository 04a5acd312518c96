"""The paper's baselines as training objectives: IRMv1, V-REx and DANN (`--method irm|vrex|dann`).

Each is an `ObjectiveModule` (see `and_mask.core.objectives`): `env_terms` computes one
environment's terms from its own examples, `reduce` combines the E environments of a step into
the loss, whose ordinary backward pass is the update. Every docstring below says how the loss
decomposes over environments: what a run with the environments spread over processes would have
to exchange. Registered in `gen_mask.gen_mask_utils.OBJECTIVES` beside the gradient combiners.

Where the papers leave a choice open:
- IRMv1 and V-REx follow the IRM reference code's schedule (`gen_mask.erm_irm.irm`): penalty
  weight 1 for the first `*_anneal_steps` optimiser steps, then the chosen weight, and the loss
  divided by the weight when it exceeds 1 (the V-REx authors' Colored MNIST code does the same).
- V-REx's variance is the population variance over the environments of the step.
- DANN's gradient-reversal weight follows Ganin et al.'s 2/(1 + exp(−10p)) − 1 ramp over the
  training progress p (or stays constant); its domain classifier is one hidden ReLU layer on the
  features, the input of the model's final Linear layer, with one class per training environment.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from and_mask.core.combiners import HParam
from and_mask.core.errors import RunError
from and_mask.core.objectives import Objective, ObjectiveModule
from gen_mask.erm_irm.irm import ANNEAL_STEPS, annealed_objective, irmv1_penalty, penalty_weight


def _anneal_steps(prefix):
    return HParam(f"{prefix}_anneal_steps", int, ANNEAL_STEPS,
                  "Optimiser steps with penalty weight 1 before the chosen weight applies.", low=0)


class IRMv1(ObjectiveModule):
    """IRMv1: mean_e R_e + λ·mean_e P_e, P_e = (∂R_e(w·f)/∂w at w = 1)² (Arjovsky et al., 2019)."""

    # Decomposes: the loss is a mean of per-environment terms (R_e + w·P_e)/(E·max(w, 1)); each
    # process backpropagates its own environments' terms and the gradients are summed. The weight
    # w depends only on the step count.

    def __init__(self, context, irm_penalty_weight, irm_anneal_steps):
        super().__init__(context)
        self.weight, self.anneal_steps = irm_penalty_weight, irm_anneal_steps

    def env_terms(self, output, target, features, env_id):
        return {"risk": self.context.loss_fn(output, target),
                "penalty": irmv1_penalty(output, target, self.context.loss_fn, scale_shape=())}

    def reduce(self, terms):
        weight = penalty_weight(int(self.steps_done), torch.tensor(self.weight), self.anneal_steps)
        loss = annealed_objective(terms["risk"].mean(), terms["penalty"].mean(), weight)
        return loss, {"penalty": terms["penalty"].mean().detach(), "penalty_weight": weight}


class VREx(ObjectiveModule):
    """V-REx: mean_e R_e + β·Var_e R_e, the variance of the environment risks (Krueger et al., 2021)."""

    # Does not decompose into per-environment terms, but its gradient is a weighted sum of them:
    # ∇ = Σ_e c_e ∇R_e with c_e = (1/E + 2β(R_e − R̄)/E)/max(β, 1). A process needs the E risk
    # values of the step (an all-gather of E numbers, without gradients), then backpropagates
    # Σ_{its e} c_e R_e; the gradients are summed.

    def __init__(self, context, vrex_penalty_weight, vrex_anneal_steps):
        super().__init__(context)
        self.weight, self.anneal_steps = vrex_penalty_weight, vrex_anneal_steps

    def env_terms(self, output, target, features, env_id):
        return {"risk": self.context.loss_fn(output, target)}

    def reduce(self, terms):
        risks = terms["risk"]
        variance = (risks - risks.mean()).pow(2).mean()
        weight = penalty_weight(int(self.steps_done), torch.tensor(self.weight), self.anneal_steps)
        return annealed_objective(risks.mean(), variance, weight), {"risk_variance": variance.detach(),
                                                                    "penalty_weight": weight}


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, weight):
        ctx.weight = weight
        return features.view_as(features)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.weight * grad, None


def reverse_gradient(features: torch.Tensor, weight: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by −weight backward (Ganin et al.'s gradient reversal layer)."""
    return _ReverseGradient.apply(features, weight)


class DANN(ObjectiveModule):
    """DANN: mean_e R_e + mean_e CE(D(GRL_λ(features_e)), e), adversarial domain classifier D (Ganin et al., 2016)."""

    # The domain classifier D learns to tell the training environments apart from the features;
    # the gradient reversal layer GRL_λ makes the feature extractor maximise that loss (its
    # gradient is multiplied by −λ), while D itself minimises it. Decomposes like IRMv1: a mean of
    # per-environment terms (D replicated on every process), given the global index e of each
    # environment and the number of training environments.

    def __init__(self, context, dann_lambda, dann_hidden_units, dann_grl_schedule):
        super().__init__(context)
        if dann_grl_schedule == "ganin" and not context.total_steps:
            raise RunError("--dann_grl_schedule ganin needs the run's number of steps, which this experiment does not "
                           "give; use --dann_grl_schedule constant")
        self.weight, self.schedule = dann_lambda, dann_grl_schedule
        self.domain_classifier = nn.Sequential(nn.Linear(context.n_features, dann_hidden_units), nn.ReLU(),
                                               nn.Linear(dann_hidden_units, context.n_train_envs))

    def grl_weight(self) -> float:
        """λ, or λ·(2/(1 + exp(−10p)) − 1) with p the fraction of training done (schedule "ganin")."""
        if self.schedule == "constant":
            return self.weight
        progress = min(1.0, int(self.steps_done) / self.context.total_steps)
        return self.weight * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)

    def env_terms(self, output, target, features, env_id):
        logits = self.domain_classifier(reverse_gradient(features, self.grl_weight()))
        domain = torch.full((features.shape[0],), env_id, dtype=torch.long, device=features.device)
        return {"risk": self.context.loss_fn(output, target), "domain_loss": F.cross_entropy(logits, domain),
                "domain_acc": (logits.argmax(dim=1) == domain).float().mean().detach()}

    def reduce(self, terms):
        loss = terms["risk"].mean() + terms["domain_loss"].mean()
        return loss, {"domain_loss": terms["domain_loss"].mean().detach(), "domain_acc": terms["domain_acc"].mean(),
                      "grl_weight": torch.tensor(self.grl_weight())}


IRM = Objective("irm", IRMv1, hparams=(
    HParam("irm_penalty_weight", float, 1e4, "λ ≥ 0: IRMv1's penalty weight after the warm-up.", low=0.0),
    _anneal_steps("irm")))
VREX = Objective("vrex", VREx, min_envs_per_step=2, hparams=(
    HParam("vrex_penalty_weight", float, 1e4, "β ≥ 0: weight of the variance of the risks after the warm-up.",
           low=0.0),
    _anneal_steps("vrex")))
DANN_OBJECTIVE = Objective("dann", DANN, needs_features=True, needs_env_ids=True, min_envs_per_step=2, hparams=(
    HParam("dann_lambda", float, 1.0, "λ ≥ 0: weight of the reversed domain-loss gradient in the features.",
           low=0.0),
    HParam("dann_hidden_units", int, 256, "Width of the domain classifier's hidden layer.", low=1),
    HParam("dann_grl_schedule", str, "ganin", "ganin: λ ramps up as 2/(1 + exp(−10p)) − 1 over training "
           "progress p; constant: λ throughout.", choices=("ganin", "constant"))))
BASELINES = (IRM, VREX, DANN_OBJECTIVE)
