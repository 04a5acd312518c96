"""The paper's baselines as training objectives: IRMv1, V-REx and DANN (`--method irm|vrex|dann`).

Each is an `ObjectiveModule` (see `and_mask.core.objectives`): `env_terms` computes one
environment's terms from its own examples, `reduce` combines the E environments of a step into
the loss, whose ordinary backward pass is the update. Every docstring below says how the loss
decomposes over environments: what a run with the environments spread over processes would have
to exchange. Registered in `gen_mask.gen_mask_utils.OBJECTIVES` beside the gradient combiners.

Each follows a published training loop step for step (tests/gen_mask/test_baseline_references.py
re-implements the loops and compares the weights after a few hundred steps):
- IRMv1: Arjovsky et al.'s Colored MNIST code (github.com/facebookresearch/InvariantRiskMinimization,
  code/colored_mnist/main.py). Penalty weight 1 for the first `irm_anneal_steps` steps, then λ;
  the L2 term l2·Σ_θ ‖θ‖² (biases included) is part of the loss, and the whole loss is divided by
  the weight when it exceeds 1. The run's --weight_decay is that l2 (`weight_decay_in_loss`): the
  optimiser does not decay, so after the warm-up the decay shrinks with the loss, as in the reference.
- V-REx: Krueger et al.'s Colored MNIST code, the same loop with their penalty
  (github.com/capybaralet/REx_code_release, InvariantRiskMinimization/colored_mnist/main.py, its
  defaults): the loss is Σ_e R_e (a sum, as in the paper's definition), plus l2·Σ_θ ‖θ‖², plus
  w·(R_1 − R_2)², divided by w when w > 1. For E environments the penalty is the mean over pairs
  e < f of (R_e − R_f)², twice the unbiased variance of the risks (DomainBed's VREx instead takes the
  population variance of the mean risk and does not divide by the weight).
- DANN: DomainBed's `AbstractDANN.update` (github.com/facebookresearch/DomainBed,
  domainbed/algorithms.py; unconditional, no class balance): steps alternate between the domain
  classifier D (`dann_d_steps_per_g_step` steps minimising its loss, plus `dann_grad_penalty` times
  the squared gradient of its summed loss w.r.t. its input) and the model (one step minimising
  mean_e R_e − λ·that loss, D fixed). The model's side is Ganin et al.'s gradient reversal layer
  (JMLR 2016): λ multiplies the reversed gradient reaching the features, the input of the model's
  final Linear layer. D is DomainBed's MLP without dropout (`dann_hidden_layers` ReLU layers), one
  class per training environment, with its own Adam options: β = (`dann_disc_beta1`, 0.9), weight
  decay `dann_disc_weight_decay`. By design the model keeps the run's optimiser (its learning rate,
  schedule, β's and --weight_decay), as for every method, where DomainBed gives it Adam with β =
  (beta1, 0.9); D's learning rate and schedule are the model's (DomainBed's lr_d defaults to lr_g).
  `dann_d_steps_per_g_step 0` updates both at every step through the reversal layer (Ganin et al.'s
  simultaneous update), and the `ganin` schedule ramps λ as 2/(1 + exp(−10p)) − 1 over the training
  progress p (DomainBed keeps λ constant).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from and_mask.core.combiners import HParam
from and_mask.core.errors import RunError
from and_mask.core.objectives import Objective, ObjectiveModule
from gen_mask.erm_irm.irm import ANNEAL_STEPS, annealed_objective, irm_objective, irmv1_penalty, penalty_weight


def _anneal_steps(prefix):
    return HParam(f"{prefix}_anneal_steps", int, ANNEAL_STEPS,
                  "Optimiser steps with penalty weight 1 before the chosen weight applies.", low=0)


class IRMv1(ObjectiveModule):
    """IRMv1: (mean_e R_e + l2·Σ_θ ‖θ‖² + w·mean_e P_e)/max(w, 1), P_e = (∂R_e(s·f)/∂s at s = 1)²
    (Arjovsky et al., 2019), w = 1 during the warm-up, then λ."""

    # Decomposes: the loss is a mean of per-environment terms (R_e + w·P_e)/(E·max(w, 1)) plus the
    # L2 term, which belongs to no environment; each process backpropagates its own environments'
    # terms (the L2 term on one process only) and the gradients are summed. The weight w depends
    # only on the step count.

    def __init__(self, context, irm_penalty_weight, irm_anneal_steps):
        super().__init__(context)
        self.weight, self.anneal_steps = irm_penalty_weight, irm_anneal_steps

    def env_terms(self, output, target, features, env_id):
        return {"risk": self.context.loss_fn(output, target),
                "penalty": irmv1_penalty(output, target, self.context.loss_fn, scale_shape=())}

    def reduce(self, terms):
        weight = penalty_weight(int(self.steps_done), torch.tensor(self.weight), self.anneal_steps)
        loss = irm_objective(terms["risk"], terms["penalty"], weight, self.context.l2_term())
        return loss, {"penalty": terms["penalty"].mean().detach(), "penalty_weight": weight}


class VREx(ObjectiveModule):
    """V-REx: (Σ_e R_e + l2·Σ_θ ‖θ‖² + w·mean_{e<f} (R_e − R_f)²)/max(w, 1) (Krueger et al., 2021),
    w = 1 during the warm-up, then β; the penalty is (R_1 − R_2)² for two environments."""

    # Does not decompose into per-environment terms, but its gradient is a weighted sum of them
    # (plus the L2 term's): ∇ = Σ_e c_e ∇R_e with c_e = (1 + 4w(R_e − R̄)/(E − 1))/max(w, 1). A
    # process needs the E risk values of the step (an all-gather of E numbers, without gradients),
    # then backpropagates Σ_{its e} c_e R_e; the gradients are summed.

    def __init__(self, context, vrex_penalty_weight, vrex_anneal_steps):
        super().__init__(context)
        self.weight, self.anneal_steps = vrex_penalty_weight, vrex_anneal_steps

    def env_terms(self, output, target, features, env_id):
        return {"risk": self.context.loss_fn(output, target)}

    def reduce(self, terms):
        risks = terms["risk"]
        n_envs = len(risks)
        # Σ over ordered pairs / E(E − 1) = the mean over pairs e < f
        penalty = (risks[:, None] - risks[None, :]).pow(2).sum() / (n_envs * (n_envs - 1))
        weight = penalty_weight(int(self.steps_done), torch.tensor(self.weight), self.anneal_steps)
        loss = annealed_objective(risks.sum() + self.context.l2_term(), penalty, weight)
        return loss, {"penalty": penalty.detach(), "penalty_weight": weight}


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
    """DANN (Ganin et al., 2016) as DomainBed trains it: with L_D = mean_e [CE(D(φ_e), e) + γ·mean_i ‖∂CE_i/∂φ_i‖²],
    a step of the domain classifier D minimises L_D, a step of the model minimises mean_e R_e − λ·L_D."""

    # Which side a step trains depends only on the step count; the other side's parameters get no
    # gradient, so the optimiser leaves them (and their Adam moments) alone, as DomainBed's two
    # optimisers do. On the model's steps the gradient reversal layer turns D's loss into −λ times
    # its gradient at the features, and D's parameters enter as constants. Decomposes like IRMv1:
    # a mean of per-environment terms (D replicated on every process), given the global index e of
    # each environment and the number of training environments.

    def __init__(self, context, dann_lambda, dann_hidden_units, dann_hidden_layers, dann_grl_schedule,
                 dann_d_steps_per_g_step, dann_grad_penalty, dann_disc_beta1, dann_disc_weight_decay):
        super().__init__(context)
        if dann_grl_schedule == "ganin" and not context.total_steps:
            raise RunError("--dann_grl_schedule ganin needs the run's number of steps, which this experiment does not "
                           "give; use --dann_grl_schedule constant")
        self.weight, self.schedule = dann_lambda, dann_grl_schedule
        self.d_steps, self.grad_penalty = dann_d_steps_per_g_step, dann_grad_penalty
        self.adam_options = {"betas": (dann_disc_beta1, 0.9), "weight_decay": dann_disc_weight_decay}
        widths = [context.n_features] + [dann_hidden_units] * dann_hidden_layers
        hidden = [layer for n_in, n_out in zip(widths, widths[1:]) for layer in (nn.Linear(n_in, n_out), nn.ReLU())]
        self.domain_classifier = nn.Sequential(*hidden, nn.Linear(widths[-1], context.n_train_envs))

    def param_group(self) -> dict:
        return self.adam_options

    def grl_weight(self) -> float:
        """λ, or λ·(2/(1 + exp(−10p)) − 1) with p the fraction of training done (schedule "ganin")."""
        if self.schedule == "constant":
            return self.weight
        progress = min(1.0, int(self.steps_done) / self.context.total_steps)
        return self.weight * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)

    def trains(self) -> str:
        """What this step trains: "domain_classifier", "model", or "both" (dann_d_steps_per_g_step 0).

        DomainBed counts its updates from 1; update k trains the domain classifier when k mod (1 + d) < d.
        """
        if self.d_steps == 0:
            return "both"
        return "domain_classifier" if (int(self.steps_done) + 1) % (1 + self.d_steps) < self.d_steps else "model"

    def domain_logits(self, domain_input, trains: str):
        """D(domain_input); on the model's steps with D's parameters as constants."""
        if trains != "model":
            return self.domain_classifier(domain_input)
        constants = {name: p.detach() for name, p in self.domain_classifier.named_parameters()}
        return functional_call(self.domain_classifier, constants, (domain_input,))

    def env_terms(self, output, target, features, env_id):
        trains = self.trains()
        if trains == "domain_classifier":
            domain_input = features.detach().requires_grad_()  # a leaf, for the gradient penalty's derivative
        else:
            domain_input = reverse_gradient(features, self.grl_weight())
        logits = self.domain_logits(domain_input, trains)
        domain = torch.full((features.shape[0],), env_id, dtype=torch.long, device=features.device)
        terms = {"risk": self.context.loss_fn(output, target), "domain_loss": F.cross_entropy(logits, domain),
                 "domain_acc": (logits.argmax(dim=1) == domain).float().mean().detach()}
        if self.grad_penalty:
            slope = torch.autograd.grad(F.cross_entropy(logits, domain, reduction="sum"), domain_input,
                                        create_graph=True)[0]
            terms["grad_penalty"] = slope.pow(2).sum(dim=1).mean()
        return terms

    def reduce(self, terms):
        domain_loss = terms["domain_loss"].mean()
        if self.grad_penalty:
            domain_loss = domain_loss + self.grad_penalty * terms["grad_penalty"].mean()
        loss = domain_loss if self.trains() == "domain_classifier" else terms["risk"].mean() + domain_loss
        return loss, {"domain_loss": terms["domain_loss"].mean().detach(), "domain_acc": terms["domain_acc"].mean(),
                      "grl_weight": torch.tensor(self.grl_weight())}


IRM = Objective("irm", IRMv1, weight_decay_in_loss=True, hparams=(
    HParam("irm_penalty_weight", float, 1e4, "λ ≥ 0: IRMv1's penalty weight after the warm-up.", low=0.0),
    _anneal_steps("irm")))
VREX = Objective("vrex", VREx, min_envs_per_step=2, weight_decay_in_loss=True, hparams=(
    HParam("vrex_penalty_weight", float, 1e4, "β ≥ 0: weight of the risks' mean squared pairwise difference after "
           "the warm-up.", low=0.0),
    _anneal_steps("vrex")))
DANN_OBJECTIVE = Objective("dann", DANN, needs_features=True, needs_env_ids=True, min_envs_per_step=2, hparams=(
    HParam("dann_lambda", float, 1.0, "λ ≥ 0: weight of the domain loss that the model's steps maximise.", low=0.0),
    HParam("dann_hidden_units", int, 256, "Width of the domain classifier's hidden layers.", low=1),
    HParam("dann_hidden_layers", int, 2, "Hidden ReLU layers of the domain classifier (DomainBed's mlp_depth − 1).",
           low=0),
    HParam("dann_grl_schedule", str, "constant", "ganin: λ ramps up as 2/(1 + exp(−10p)) − 1 over training "
           "progress p; constant: λ throughout (DomainBed).", choices=("ganin", "constant")),
    HParam("dann_d_steps_per_g_step", int, 1, "Domain-classifier steps before each model step (DomainBed's "
           "alternation); 0 updates both at every step through the gradient reversal layer.", low=0),
    HParam("dann_grad_penalty", float, 0.0, "γ ≥ 0: weight of the squared gradient of the domain loss w.r.t. the "
           "classifier's input, added to that loss.", low=0.0),
    HParam("dann_disc_beta1", float, 0.5, "β1 of the domain classifier's Adam moments (its β2 is 0.9, as "
           "DomainBed's).", low=0.0, high=0.999),
    HParam("dann_disc_weight_decay", float, 0.0, "Weight decay of the domain classifier's parameters.", low=0.0)))
BASELINES = (IRM, VREX, DANN_OBJECTIVE)
