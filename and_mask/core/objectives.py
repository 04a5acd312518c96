"""Training objectives: methods whose update is the ordinary gradient of a loss over environments.

A gradient combiner (`combiners.py`) turns the per-environment gradients of a step into one
update. An objective (IRMv1, V-REx, DANN, registered in `gen_mask.baselines`) instead turns the
per-environment outputs of a step into one scalar loss; one ordinary backward pass of that loss
gives the update. `MethodFlags` offers both kinds under --method and the `Trainer` dispatches on
the kind of the entry.

The computation has two explicit stages, so that which quantities belong to one environment is
part of the interface (the environments of a step may live on different processes, see
`objective_loss`):

1. `env_terms(output, target, features, env_id)`: the scalar terms of ONE environment, from its
   own B examples only: its risk R_e = mean loss (always, key "risk"), and e.g. IRM's penalty
   P_e or DANN's domain-classification loss;
2. `reduce(terms)`: the loss, from the (E,) tensor of every term. This is the only place where
   environments meet, and each objective's docstring says how it decomposes.

An objective is an `ObjectiveModule` (an nn.Module): parameters of its own (DANN's domain
classifier) are trained by the run's optimiser, in a parameter group of their own (with the
objective's `param_group` options), and those parameters and a step counter (for the annealing
schedules) are saved in the run's checkpoint and restored on resume. An objective declared with
`weight_decay_in_loss` (IRMv1, V-REx) takes the run's weight decay wd out of the optimiser and adds
wd·Σ_θ ‖θ‖² to its loss itself (`ObjectiveContext.l2_term`), where its reference code has it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from and_mask.core.combiners import HParam, Method
from and_mask.core.per_env_grads import split_envs


@dataclass(frozen=True)
class ObjectiveContext:
    """What an objective may need to know about the run it is built for."""

    loss_fn: Callable  # loss_fn(output_e, target_e) -> mean loss of one environment
    n_train_envs: int  # number of training environments (DANN's domain classes)
    n_features: int | None  # width of the features (the input of the model's final Linear layer)
    total_steps: int | None  # optimiser steps of the whole run, for schedules over training
    # l2_term() -> wd·Σ_θ ‖θ‖² over the model's parameters: the run's weight decay as a term of the
    # loss, for objectives with `weight_decay_in_loss` (0 for the others, whose optimiser decays).
    l2_term: Callable[[], torch.Tensor | float] = lambda: 0.0


class ObjectiveModule(nn.Module):
    """Base of every objective: `env_terms` per environment, `reduce` across environments."""

    def __init__(self, context: ObjectiveContext):
        super().__init__()
        self.context = context
        # Steps taken so far (annealing schedules); a buffer, so checkpoints carry it.
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def env_terms(self, output, target, features, env_id: int | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def reduce(self, terms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, diagnostics) from terms stacked over the E environments of the step."""
        raise NotImplementedError

    def param_group(self) -> dict:
        """Optimiser options of the group of this objective's own parameters; {} takes the optimiser's."""
        return {}


@dataclass(frozen=True)
class Objective(Method):
    """A named objective: `module(context, **hparams)` builds one run's ObjectiveModule."""

    name: str
    module: type
    hparams: tuple[HParam, ...] = ()
    needs_features: bool = False  # the input of the model's final nn.Linear, per example
    needs_env_ids: bool = False  # which training environment each block of a step comes from
    min_envs_per_step: int = 1
    weight_decay_in_loss: bool = False  # the run's weight decay becomes the loss's l2_term (see the module)

    def implementation(self) -> type:
        return self.module

    def build(self, hparams: dict, context: ObjectiveContext) -> ObjectiveModule:
        return self.module(context, **hparams)

    def check_envs_per_step(self, envs_per_step: int) -> str | None:
        """An error message if a step of `envs_per_step` environments is too few, else None."""
        if envs_per_step < self.min_envs_per_step:
            return (f"--method {self.name} needs at least {self.min_envs_per_step} environments per step, "
                    f"got {envs_per_step}")
        return None


class ObjectiveRegistry(dict):
    """name -> Objective. Unknown names fail with the list of valid names."""

    def __missing__(self, name):
        raise KeyError(f"unknown objective '{name}'; valid names: {', '.join(sorted(self))}")

    def add(self, objective: Objective) -> Objective:
        if objective.name in self:
            raise ValueError(f"an objective named '{objective.name}' is already registered")
        self[objective.name] = objective
        return objective


def final_linear(model: nn.Module) -> nn.Linear:
    """The model's last nn.Linear module (its classifier head): its input are the features."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear layer whose input could serve as features")
    return linears[-1]


@contextmanager
def captured_features(model: nn.Module):
    """Within the block, `store["features"]` is the input of the model's final Linear layer."""
    store = {}

    def keep(module, args):
        store["features"] = args[0]

    handle = final_linear(model).register_forward_pre_hook(keep)
    try:
        yield store
    finally:
        handle.remove()


def objective_loss(objective: ObjectiveModule, output, target, n_envs: int, features=None, env_ids=None,
                   envs: range | None = None, share_terms: Callable | None = None):
    """One training step's (loss, the (E,) risks, diagnostics) for E environments stacked env after env.

    Splits the step into its environments, collects each one's `env_terms`, stacks them and
    calls `reduce`; then counts the step. A process given only some of the step's environments
    (`and_mask.core.env_split`) computes the terms of `envs` (default: all) and `share_terms`
    returns those of every environment: the other processes' as constants, so that the loss's
    gradient runs through this process's environments only and the processes' gradients add up.
    """
    envs = range(n_envs) if envs is None else envs
    outputs, targets = split_envs(output, n_envs), split_envs(target, n_envs)
    feats = features.reshape(n_envs, -1, features.shape[-1]) if features is not None else [None] * n_envs
    ids = env_ids if env_ids is not None else [None] * n_envs
    per_env = [objective.env_terms(outputs[e], targets[e], feats[e], ids[e]) for e in envs]
    terms = {key: torch.stack([t[key] for t in per_env]) for key in per_env[0]}
    if share_terms is not None:
        terms = share_terms(terms)
    loss, diagnostics = objective.reduce(terms)
    objective.steps_done += 1
    return loss, terms["risk"], diagnostics
