"""The one training loop shared by every experiment of both packages.

Per epoch: evaluate every evaluation set first (the original's "probe"), then train. Each
training step forwards a batch of E environments stacked env after env, computes the
per-environment gradients, combines them with the chosen combiner, writes `param.grad`, adds
l1_coef·sign(θ) and l2_coef·θ if asked, and steps the optimiser. With a training objective
(`and_mask.core.objectives`) instead of a combiner, the step is one ordinary backward pass of the
objective's loss. An experiment's stop rule may end training after any epoch (its reason goes into
the final record as "stopped_early"). After the last epoch the evaluation sets are measured once
more (phase "final"), together with the optional `final_metrics(model)` (e.g. the consistency
estimate), which never runs during training. Every record goes to metrics.jsonl at once.

A run split across processes (`and_mask.core.env_split`) goes through the same loop: each step
the ranks share out the environments and hold the same update afterwards; evaluation batches are
shared out and their sums added up; only rank 0 writes (its run log; the others' write nothing).
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from and_mask.core.distributed import shard_loader
from and_mask.core.env_split import EnvSplit, LocalBatch
from and_mask.core.errors import NonFiniteLossError, RunError
from and_mask.core.objectives import Objective, ObjectiveContext, captured_features, final_linear, objective_loss
from and_mask.core.per_env_grads import env_losses_from_output, per_env_grads
from and_mask.core.per_env_hvp import env_hvp, hvp_unsupported
from and_mask.core.runfolder import CHECKPOINT
from and_mask.core.runlog import RunLog


@dataclass
class TrainSetup:
    """Everything an experiment builds; the loop does the rest."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    # train_batches(epoch) yields (inputs, target, n_envs) with the environments stacked, or
    # (inputs, target, n_envs, env_ids) where env_ids names the training environment (an index
    # into env_loaders) of each block; objectives that tell environments apart (DANN) need it.
    train_batches: Callable[[int], Iterable]
    eval_loaders: dict
    epochs: int
    scheduler: object = None
    scheduler_interval: str = "epoch"  # "epoch" or "step"
    steps_per_epoch: int | None = None  # for the progress bar only
    # Each training environment as its own loader, for per-environment analysis (loss landscapes).
    env_loaders: list = field(default_factory=list)
    extra_metrics: Callable[[nn.Module], dict] = field(default=lambda model: {})
    # stop_rule(epoch record) -> None to go on, or a one-line reason to stop training after that epoch.
    stop_rule: Callable[[dict], str | None] | None = None


def _flat_output(output: torch.Tensor) -> torch.Tensor:
    return output.reshape(output.shape[0], -1).squeeze(-1)


def count_correct(output: torch.Tensor, target: torch.Tensor) -> int:
    """One logit per example: correct when (logit >= 0) == target; several: argmax == target."""
    if target.shape[0] == 0:
        return 0
    output = _flat_output(output)
    pred = (output >= 0).to(target.dtype) if output.dim() == 1 else output.argmax(dim=1)
    return int((pred == target.reshape(pred.shape)).sum())


@torch.no_grad()
def evaluate(model, loaders: dict, loss_fn, device, world=None) -> dict:
    """Mean loss and accuracy of every evaluation set, in eval mode: {name_loss, name_acc}.

    With a `world` of several ranks, each loader holds this rank's share of the batches
    (`shard_loader`) and the sums are added up across ranks.
    """
    was_training = model.training
    model.eval()
    sums = []
    for loader in loaders.values():
        loss_sum, correct, total = 0.0, 0, 0
        for inputs, target in loader:
            inputs, target = inputs.to(device), target.to(device)
            output = model(inputs)
            loss_sum += float(loss_fn(_flat_output(output), target)) * target.shape[0]
            correct += count_correct(output, target)
            total += target.shape[0]
        sums.append([loss_sum, correct, total])
    model.train(was_training)
    if world is not None and world.size > 1 and sums:
        sums = world.all_reduce_sum([torch.tensor(sums, dtype=torch.float64, device=world.device)])[0].tolist()
    out = {}
    for name, (loss_sum, correct, total) in zip(loaders, sums):
        out[f"{name}_loss"] = loss_sum / max(total, 1)
        out[f"{name}_acc"] = correct / max(total, 1)
    return out


class Trainer:
    """Trains `setup.model` with `method`: a Combiner of per-environment gradients or an Objective."""

    def __init__(self, setup: TrainSetup, method, hparams: dict, runlog: RunLog, device,
                 engine: str = "auto", chunk_size: int | None = None, l1_coef: float = 0.0, quiet: bool = False,
                 l2_coef: float = 0.0, final_metrics: Callable[[nn.Module], dict] | None = None,
                 split: EnvSplit | None = None):
        self.setup, self.method, self.hparams, self.runlog = setup, method, hparams, runlog
        self.device, self.engine, self.chunk_size, self.l1_coef, self.quiet = device, engine, chunk_size, l1_coef, quiet
        self.named_params = [(n, p) for n, p in setup.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.split = split if split is not None else EnvSplit()
        self.world = self.split.world
        self.objective = self._build_objective() if isinstance(method, Objective) else None
        self.plain = self.objective is None and method.reduces_to_mean(**hparams)
        self.l2_coef = l2_coef
        self.final_metrics = final_metrics
        needs_hvp = self.objective is None and method.needs_hvp and not self.plain
        problem = hvp_unsupported(setup.model) if needs_hvp else None
        if problem:
            raise RunError(f"--method {method.name}: {problem}")
        self.eval_loaders = {name: shard_loader(loader, self.world) for name, loader in setup.eval_loaders.items()}

    def _build_objective(self):
        """The run's ObjectiveModule; its own parameters join the optimiser as a new parameter group."""
        setup, method = self.setup, self.method
        total_steps = setup.epochs * setup.steps_per_epoch if setup.steps_per_epoch else None
        weight_decay = {"l2_term": self._weight_decay_as_loss()} if method.weight_decay_in_loss else {}
        context = ObjectiveContext(loss_fn=setup.loss_fn, n_train_envs=len(setup.env_loaders),
                                   n_features=final_linear(setup.model).in_features if method.needs_features else None,
                                   total_steps=total_steps, **weight_decay)
        objective = method.build(self.hparams, context).to(self.device)
        extra = [p for p in objective.parameters() if p.requires_grad]
        if extra:  # the group takes the optimiser's defaults (learning rate, ...) unless the objective sets them
            setup.optimizer.add_param_group({"params": extra, **objective.param_group()})
        return objective

    def _weight_decay_as_loss(self):
        """l2_term() = Σ_groups wd_g·Σ_{θ in g} ‖θ‖², each group's weight decay wd_g moved out of the optimiser.

        With several processes the term's gradient flows on rank 0 only (the others add its value as
        a constant), so that the gradients summed across ranks hold it once.
        """
        groups = self.setup.optimizer.param_groups
        decayed = [(group["weight_decay"], [p for p in group["params"] if p.requires_grad])
                   for group in groups if group["weight_decay"]]
        for group in groups:
            group["weight_decay"] = 0.0

        def l2_term():
            term = sum(wd * sum(p.pow(2).sum() for p in params) for wd, params in decayed)  # 0 if none decays
            return term.detach() if torch.is_tensor(term) and not self.world.is_leader else term

        return l2_term

    def _objective_step(self, batch: LocalBatch, n_envs: int, env_ids):
        """Backward pass of the objective's loss over all n_envs environments, through this rank's terms."""
        if self.method.needs_env_ids and env_ids is None:
            raise RunError(f"--method {self.method.name} needs to know the environment of each example, which this "
                           "experiment's batches do not say")
        if batch.n_envs == 0:
            raise RunError(f"--method {self.method.name} needs at least one environment per process: a step has "
                           f"{n_envs} environments for {self.world.size} processes")
        features = captured_features(self.setup.model) if self.method.needs_features else nullcontext({})
        with features as captured:
            output = self.setup.model(batch.inputs)
        ids = None if env_ids is None else env_ids[batch.first:batch.first + batch.n_envs]
        loss, risks, diagnostics = objective_loss(self.objective, output, batch.target, batch.n_envs,
                                                  captured.get("features"), ids, batch.own,
                                                  lambda terms: self.split.share_terms(terms, n_envs))
        loss.backward()
        # A parameter that the step does not train (DANN's alternating steps) has no gradient; the optimiser skips it.
        trained = [p for p in [*self.objective.parameters(), *self.params] if p.requires_grad and p.grad is not None]
        self.split.sum_grads(trained)
        own = self.world.env_range(n_envs)
        risks = risks if batch.whole else risks[own.start:own.stop]  # as the rank's share of the batch's losses
        return risks.detach(), output.detach(), {"objective": loss.detach(), **diagnostics}

    def _step(self, inputs, target, n_envs, env_ids=None):
        """One step's gradients in param.grad; returns (mean loss, correct predictions, masks or None,
        the objective's diagnostics)."""
        model, params = self.setup.model, self.params
        self.setup.optimizer.zero_grad(set_to_none=True)
        split = self.split
        per_env = self.objective is None and not self.plain
        batch = split.local_batch(model, self.engine if per_env else "shared", inputs, target, n_envs,
                                  accepts_outer=per_env)
        masks, diagnostics = None, {}
        with split.random_stream(model, batch):
            if self.objective is not None:
                env_losses, output, diagnostics = self._objective_step(batch, n_envs, env_ids)
            elif self.plain:
                env_losses, output = self._mean_backward(batch, n_envs)
                split.sum_grads(params)
            else:
                with split.whole_batch_statistics(model, batch, inputs):
                    result = per_env_grads(model, batch.inputs, batch.target, self.setup.loss_fn, batch.n_envs,
                                           batch.engine, self.chunk_size, accepts_outer=True, envs=batch.own)
                # Hessian-vector products at θ of the same per-environment losses, for the combiners that need them
                hvp = (split.share_hvp(env_hvp(model, batch.inputs, batch.target, self.setup.loss_fn, batch.n_envs,
                                               batch.engine, self.chunk_size) if batch.n_envs else None,
                                       n_envs, batch.whole)
                       if self.method.needs_hvp else None)
                combined, per_tensor = split.combine(self.method, result.grads, self.hparams, n_envs, hvp)
                for p, g in zip(params, combined):
                    p.grad = g
                env_losses, output = result.env_losses, result.output
                masks = [d.get("mask") for d in per_tensor]
        loss, correct = split.totals(env_losses, count_correct(output, batch.target), n_envs, batch.whole)
        trained = [p for p in params if p.grad is not None]  # not the model on DANN's domain-classifier steps
        if self.l1_coef > 0:
            for p in trained:
                p.grad.add_(torch.sign(p.detach()), alpha=self.l1_coef)
        if self.l2_coef > 0:  # the gradient of ½·l2_coef·‖θ‖², added after combining (never masked)
            for p in trained:
                p.grad.add_(p.detach(), alpha=self.l2_coef)
        return loss, correct, masks, diagnostics

    def _mean_backward(self, batch: LocalBatch, n_envs: int):
        """Backward pass of this rank's share Σ_e L_e / E of the mean loss; (env losses, output) forwarded."""
        if batch.n_envs == 0:
            empty = batch.target.new_zeros(0)
            return empty, empty
        output = self.setup.model(batch.inputs)
        env_losses = env_losses_from_output(output, batch.target, self.setup.loss_fn, batch.n_envs)
        own = env_losses if batch.own is None else env_losses[batch.own.start:batch.own.stop]
        (own.sum() / n_envs).backward()
        return env_losses.detach(), output.detach()

    def train_epoch(self, epoch: int) -> dict:
        setup = self.setup
        setup.model.train()
        lr = setup.optimizer.param_groups[0]["lr"]
        loss_sum, correct, count, steps = 0.0, 0, 0, 0
        density = [torch.zeros((), device=self.device) for _ in self.named_params]
        objective_sums = {}
        bar = tqdm(setup.train_batches(epoch), total=setup.steps_per_epoch, desc=f"epoch {epoch}", leave=False,
                   disable=self.quiet)
        for inputs, target, n_envs, *env_ids in bar:
            inputs, target = inputs.to(self.device), target.to(self.device)
            loss_value, step_correct, masks, diagnostics = self._step(inputs, target, n_envs, *env_ids)
            values = {key: float(value) for key, value in diagnostics.items()}
            if not (math.isfinite(loss_value) and math.isfinite(values.get("objective", 0.0))):
                raise NonFiniteLossError(f"non-finite training loss ({loss_value}, objective "
                                         f"{values.get('objective')}) at epoch {epoch}, step {steps + 1}; "
                                         f"metrics so far are in {self.runlog.dir}")
            for key, value in values.items():
                objective_sums[key] = objective_sums.get(key, 0.0) + value
            setup.optimizer.step()
            self.split.after_step(self.params, epoch, steps + 1)
            if setup.scheduler is not None and setup.scheduler_interval == "step":
                setup.scheduler.step()
            if masks is not None:
                for i, m in enumerate(masks):
                    density[i] += m.mean() if m is not None else 1.0
            else:
                for d in density:
                    d += 1.0
            loss_sum += loss_value
            correct += step_correct
            count += target.shape[0]
            steps += 1
        if steps == 0:
            raise RunError(f"epoch {epoch} had no training step: the batch size is larger than an environment")
        if setup.scheduler is not None and setup.scheduler_interval == "epoch":
            setup.scheduler.step()
        record = {"train_loss": loss_sum / steps, "train_acc": correct / count, "steps": steps, "lr": lr,
                  "mask_density": {n: float(d) / steps for (n, _), d in zip(self.named_params, density)}}
        if self.objective is not None:  # the objective's terms, averaged over the epoch's steps
            record["objective_terms"] = {key: value / steps for key, value in objective_sums.items()}
        if hasattr(setup.optimizer, "pop_kept_fraction"):  # temporal AND-mask Adam
            record["temporal_mask_density"] = setup.optimizer.pop_kept_fraction()
        return record

    def _checkpoint(self, epoch):
        s = self.setup
        self.runlog.save_checkpoint({"epoch": epoch, "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
                                     "scheduler": s.scheduler.state_dict() if s.scheduler is not None else None,
                                     "objective": self.objective.state_dict() if self.objective is not None else None})

    def _restore(self) -> int:
        state = self.runlog.load_checkpoint(self.device)
        if state is None:
            return 1
        s = self.setup
        try:
            if not 1 <= state["epoch"] <= s.epochs:
                raise ValueError(f"its epoch {state['epoch']} is not one of this run's 1..{s.epochs}")
            s.model.load_state_dict(state["model"])
            s.optimizer.load_state_dict(state["optimizer"])
            decayed = any(g["weight_decay"] for g in s.optimizer.param_groups)
            if decayed and getattr(self.method, "weight_decay_in_loss", False):
                # Saved when this objective's weight decay was the optimiser's: continuing would decay twice.
                raise ValueError(f"it was saved when --method {self.method.name} left the weight decay to the "
                                 f"optimiser, not to its loss")
            if self.objective is not None:
                self.objective.load_state_dict(state["objective"])
            if s.scheduler is not None:
                s.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RunError(f"{self.runlog.dir / CHECKPOINT} does not fit this run ({reason}); --overwrite starts "
                           f"the run again") from None
        self.runlog.truncate_metrics(state["epoch"])
        return state["epoch"] + 1

    def _stop_reason(self, record: dict) -> str | None:
        return self.setup.stop_rule(record) if self.setup.stop_rule is not None else None

    def _evaluate(self) -> dict:
        # BatchNorm's running statistics are rank 0's (they differ across ranks only with --dist_bn local).
        self.world.broadcast_state(self.setup.model, buffers_only=True)
        return evaluate(self.setup.model, self.eval_loaders, self.setup.loss_fn, self.device, self.world)

    def run(self, resume: bool = False) -> dict:
        setup = self.setup
        start = self._restore() if resume else 1
        self.world.broadcast_state(setup.model)  # every rank starts from rank 0's model (and objective)
        if self.objective is not None:
            self.world.broadcast_state(self.objective)
        if start == 1:
            self.runlog.truncate_metrics(0)
            self.runlog.save_weights(setup.model, "weights_init.pt")
        epoch_records = [r for r in self.runlog.records() if r.get("phase") == "epoch"]
        # A resumed run that had already met its stop rule goes straight to the final evaluation.
        reason = self._stop_reason(epoch_records[-1]) if epoch_records else None
        remaining = range(start, setup.epochs + 1) if reason is None else range(0)
        epochs = tqdm(remaining, desc="training", disable=self.quiet, initial=start - 1, total=setup.epochs)
        for epoch in epochs:
            started = time.time()
            record = {"epoch": epoch, "phase": "epoch"}
            record.update(self._evaluate())
            record.update(self.train_epoch(epoch))
            record.update(setup.extra_metrics(setup.model))
            record["seconds"] = time.time() - started
            self.runlog.log(record)
            self._checkpoint(epoch)
            if not self.quiet:
                epochs.write(format_record(record))
            reason = self._stop_reason(record)
            if reason is not None:
                break
        last_epoch = [r for r in self.runlog.records() if r.get("phase") == "epoch"][-1]
        final = {"epoch": last_epoch["epoch"], "phase": "final"}
        final.update(self._evaluate())
        if reason is not None:
            final["stopped_early"] = reason
            if not self.quiet:
                print(f"stopped after epoch {last_epoch['epoch']}: {reason}")
        if self.final_metrics is not None and self.world.is_leader:  # the same on every rank: rank 0 alone
            final.update(self.final_metrics(setup.model))
        self.runlog.log(final)
        self.runlog.save_weights(setup.model, "weights_final.pt")
        # The summary also reports the last epoch's running training loss and accuracy.
        return {**final, "train_loss": last_epoch["train_loss"], "train_acc": last_epoch["train_acc"]}


def format_record(record: dict) -> str:
    parts = [f"epoch {record['epoch']:>3}"]
    for key, value in record.items():
        if key.endswith("_acc"):
            parts.append(f"{key} {100 * value:5.1f}%")
        elif key.endswith("_loss"):
            parts.append(f"{key} {value:.4f}")
    if "mask_density" in record:
        values = list(record["mask_density"].values())
        parts.append(f"mask density {sum(values) / len(values):.3f}")
    return "  ".join(parts)
