"""Fit one method on one data draw: ERM, IRMv1, or any registered gradient combiner.

Why the sweep does not use `and_mask.core.training.Trainer`: the Trainer is built for one long
run (per-epoch evaluation, metrics files, checkpoints and weight files in an output folder). The
benchmark makes hundreds of short fits whose only output is one number each, and it must fit
several models side by side (all (n, trial) pairs of a SEM at once, the IRM penalty-weight candidates
branching from one shared warm-up), which the Trainer cannot express. What matters for the
comparison is shared with it: combiner methods take their per-environment gradients from
`per_env_grads` and combine them with `apply_combiner`; every method steps torch's Adam.

One step, for a batch holding E environments of B examples each, stacked env after env:
- erm:       loss = mean_e R_e + l2·‖θ‖²; backward.
- irm:       loss = IRMv1 objective (see `irm`), the penalty weight following the schedule.
- combiner:  g_e = ∇R_e from `per_env_grads`, g = combiner(g_1..g_E) per independent model,
             plus 2·l2·θ (the gradient of l2·‖θ‖², environment-independent, so not combined).
Environments of unequal size: `per_env_grads` needs E equal blocks, so every method draws the
same number of examples from each environment per step (see `colored.env_batches`).

A problem may hold M independent models side by side (the SEMs' (n, trial) pairs), every
parameter's first axis indexing them; risks are then (M,) and the loss their sum, so each
model's gradient is its own, and combiners see one model's gradients at a time
(`combine_stacked`), so no combiner mixes trials.

IRM: the first `anneal_steps` steps (penalty weight 1) are the same for every candidate weight
λ, so they run once; model and Adam state are then copied into one branch per λ, each trained
to `steps` in total: exactly what separate runs from the same seed would compute. Each model
keeps the λ with the lowest validation loss (ties: the smaller λ).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import vmap

from and_mask.core.combiners import apply_combiner
from and_mask.core.errors import NonFiniteLossError
from and_mask.core.per_env_grads import per_env_grads
from gen_mask.erm_irm.irm import irm_objective, irmv1_penalty, penalty_weight
from gen_mask.gen_mask_utils import COMBINERS

BASELINES = ("erm", "irm")


def valid_methods() -> list[str]:
    """The baselines and every combiner that needs no Hessian-vector products: the benchmark's
    stacked models (M independent fits in one module) do not supply them."""
    return [*BASELINES, *sorted(n for n, c in COMBINERS.items() if not c.needs_hvp)]


def check_methods(names: list[str]) -> str | None:
    """An error message naming the valid methods if a name is unknown or unsupported, else None."""
    unsupported = [n for n in names if n in COMBINERS and COMBINERS[n].needs_hvp]
    if unsupported:
        return (f"{', '.join(unsupported)} need(s) per-environment Hessian-vector products, which this benchmark "
                f"does not compute; valid: {', '.join(valid_methods())}")
    unknown = [n for n in names if n not in valid_methods()]
    if unknown:
        return f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(valid_methods())}"
    return None


def trial_seed(*keys: int) -> int:
    """A 32-bit seed derived from non-negative integer keys (seed, trial, n, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


@dataclass
class FitConfig:
    steps: int  # optimiser steps of every method (IRM: per candidate weight, warm-up included)
    lr: float  # Adam learning rate
    l2: float  # coefficient of l2·‖θ‖²
    penalty_weights: tuple  # IRM candidates λ, increasing
    anneal_steps: int  # IRM warm-up steps with penalty weight 1


@dataclass
class Problem:
    """One data draw and how to train and score models on it."""

    make_model: Callable[[], nn.Module]  # deterministic initialisation (seeded by the caller)
    stacked: bool  # True: every parameter's first axis indexes M independent models
    risk: Callable  # (output (B, *M), target (B, *M)) -> mean risks (*M)
    batch: Callable  # step -> (inputs, target) with n_envs equal-size environments stacked
    n_envs: int
    validation_loss: Callable  # model -> (*M), for the choice of λ
    test_error: Callable  # model -> (*M), the benchmark's metric
    squared_norm: Callable = None  # model -> ‖θ‖² per model (*M); needed when l2 > 0


_NOT_VMAPPABLE = set()


def combine_stacked(combiner, grads: list, hparams: dict):
    """apply_combiner on each of M independent models; grads are (E, M, *shape) per parameter.

    Vectorised with torch.func.vmap over the models (each model's call sees exactly its own (E,
    *shape) gradients; random draws are independent per model). A combiner that vmap cannot
    trace (e.g. one calling a solver outside torch) runs model by model instead.
    """
    per_model = [g.movedim(1, 0) for g in grads]  # (M, E, *shape)

    def one_model(*model_grads):
        return tuple(apply_combiner(combiner, list(model_grads), hparams)[0])

    if combiner.name not in _NOT_VMAPPABLE:
        try:
            with warnings.catch_warnings():
                # vmap falls back to a per-model loop for a few ops (scatter_, fill_diagonal_): slower, still exact
                warnings.filterwarnings("ignore", message="There is a performance drop")
                return list(vmap(one_model, randomness="different")(*per_model)), None
        except RuntimeError:
            _NOT_VMAPPABLE.add(combiner.name)
    results = [one_model(*model_grads) for model_grads in zip(*per_model)]
    return [torch.stack(gs) for gs in zip(*results)], None


@dataclass
class FitResult:
    error: torch.Tensor  # (*M) test error of each model
    penalty_weight: torch.Tensor | None = None  # (*M) the λ chosen for each model (IRM)


def _step(problem: Problem, model, optimizer, step, method, config, weights=None, hparams=None):
    inputs, target = problem.batch(step)
    optimizer.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    l2_term = config.l2 * problem.squared_norm(model) if config.l2 > 0 else 0.0
    if method in BASELINES:
        output = model(inputs)
        outs = output.view(problem.n_envs, -1, *output.shape[1:])  # (E, B, *M)
        targets = target.view(problem.n_envs, -1, *target.shape[1:])
        risks = torch.stack([problem.risk(o, t) for o, t in zip(outs, targets)])
        if method == "erm":
            loss = risks.mean(0) + l2_term
        else:
            penalties = torch.stack([irmv1_penalty(o, t, problem.risk) for o, t in zip(outs, targets)])
            loss = irm_objective(risks, penalties, penalty_weight(step, weights, config.anneal_steps), l2_term)
        loss = loss.sum()
        loss.backward()
    else:
        result = per_env_grads(model, inputs, target, lambda o, t: problem.risk(o, t).sum(), problem.n_envs)
        combine = combine_stacked if problem.stacked else apply_combiner
        combined, _ = combine(COMBINERS[method], result.grads, hparams)
        for param, grad in zip(params, combined):
            param.grad = grad + 2 * config.l2 * param.detach() if config.l2 > 0 else grad
        loss = result.env_losses.mean()
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"non-finite training loss with method {method} at step {step}")
    optimizer.step()


def _train(problem, model, optimizer, start, stop, method, config, weights=None, hparams=None):
    for step in range(start, stop):
        _step(problem, model, optimizer, step, method, config, weights, hparams)


def fit(problem: Problem, method: str, config: FitConfig, hparams: dict | None = None) -> FitResult:
    """Train `method` for config.steps Adam steps on `problem` and return its test error(s)."""
    model = problem.make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if method != "irm":
        if method not in BASELINES:
            hparams = {**COMBINERS[method].defaults(), **(hparams or {})}
        _train(problem, model, optimizer, 0, config.steps, method, config, hparams=hparams)
        with torch.no_grad():
            return FitResult(problem.test_error(model))
    warmup = min(config.anneal_steps, config.steps)
    one = torch.ones(())
    _train(problem, model, optimizer, 0, warmup, "irm", config, weights=one)
    best_loss = best_error = best_weight = None
    for weight in config.penalty_weights:
        branch = copy.deepcopy(model)
        branch_optimizer = torch.optim.Adam(branch.parameters(), lr=config.lr)
        branch_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        _train(problem, branch, branch_optimizer, warmup, config.steps, "irm", config, weights=torch.tensor(weight))
        with torch.no_grad():
            loss, error = problem.validation_loss(branch), problem.test_error(branch)
        weight = torch.full_like(loss, weight)
        if best_loss is None:
            best_loss, best_error, best_weight = loss, error, weight
            continue
        better = loss < best_loss  # strict: ties keep the smaller λ (candidates are increasing)
        best_loss = torch.where(better, loss, best_loss)
        best_error = torch.where(better, error, best_error)
        best_weight = torch.where(better, weight, best_weight)
    return FitResult(best_error, best_weight)
