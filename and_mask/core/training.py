"""The one training loop shared by every experiment of both packages.

Per epoch: evaluate every evaluation set first (the original's "probe"), then train. Each
training step forwards a batch of E environments stacked env after env, computes the
per-environment gradients, combines them with the chosen combiner, writes `param.grad`, adds
l1_coef·sign(θ) and l2_coef·θ if asked, and steps the optimiser. After the last epoch the
evaluation sets are measured once more (phase "final"). Every record goes to metrics.jsonl at once.

A run split across processes (`and_mask.core.env_split`) goes through the same loop: each step
the ranks share out the environments and hold the same update afterwards; evaluation batches are
shared out and their sums added up; only rank 0 writes (its run log; the others' write nothing).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from and_mask.core.combiners import Combiner
from and_mask.core.distributed import shard_loader
from and_mask.core.env_split import EnvSplit, LocalBatch
from and_mask.core.errors import NonFiniteLossError, RunError
from and_mask.core.per_env_grads import env_losses_from_output, per_env_grads
from and_mask.core.runlog import RunLog


@dataclass
class TrainSetup:
    """Everything an experiment builds; the loop does the rest."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    # train_batches(epoch) yields (inputs, target, n_envs) with the environments stacked.
    train_batches: Callable[[int], Iterable]
    eval_loaders: dict
    epochs: int
    scheduler: object = None
    scheduler_interval: str = "epoch"  # "epoch" or "step"
    steps_per_epoch: int | None = None  # for the progress bar only
    # Each training environment as its own loader, for per-environment analysis (loss landscapes).
    env_loaders: list = field(default_factory=list)
    extra_metrics: Callable[[nn.Module], dict] = field(default=lambda model: {})


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
    def __init__(self, setup: TrainSetup, combiner: Combiner, hparams: dict, runlog: RunLog, device,
                 engine: str = "auto", chunk_size: int | None = None, l1_coef: float = 0.0, quiet: bool = False,
                 l2_coef: float = 0.0, split: EnvSplit | None = None):
        self.setup, self.combiner, self.hparams, self.runlog = setup, combiner, hparams, runlog
        self.device, self.engine, self.chunk_size, self.l1_coef, self.quiet = device, engine, chunk_size, l1_coef, quiet
        self.named_params = [(n, p) for n, p in setup.model.named_parameters() if p.requires_grad]
        self.plain = combiner.reduces_to_mean(**hparams)
        self.l2_coef = l2_coef
        self.split = split if split is not None else EnvSplit()
        self.world = self.split.world
        self.eval_loaders = {name: shard_loader(loader, self.world) for name, loader in setup.eval_loaders.items()}

    def _step(self, inputs, target, n_envs):
        """One step's gradients in param.grad; returns (mean loss, correct predictions, masks or None)."""
        model, params = self.setup.model, [p for _, p in self.named_params]
        self.setup.optimizer.zero_grad(set_to_none=True)
        split = self.split
        batch = split.local_batch(model, "shared" if self.plain else self.engine, inputs, target, n_envs,
                                  accepts_outer=not self.plain)
        masks = None
        with split.random_stream(model, batch):
            if self.plain:
                env_losses, output = self._mean_backward(batch, n_envs)
                split.sum_grads(params)
            else:
                result = per_env_grads(model, batch.inputs, batch.target, self.setup.loss_fn, batch.n_envs,
                                       batch.engine, self.chunk_size, accepts_outer=True, envs=batch.own)
                combined, diagnostics = split.combine(self.combiner, result.grads, self.hparams, n_envs)
                for p, g in zip(params, combined):
                    p.grad = g
                env_losses, output = result.env_losses, result.output
                masks = [d.get("mask") for d in diagnostics]
        loss, correct = split.totals(env_losses, count_correct(output, batch.target), n_envs, batch.whole)
        if self.l1_coef > 0:
            for p in params:
                p.grad.add_(torch.sign(p.detach()), alpha=self.l1_coef)
        if self.l2_coef > 0:  # the gradient of ½·l2_coef·‖θ‖², added after combining (never masked)
            for p in params:
                p.grad.add_(p.detach(), alpha=self.l2_coef)
        return loss, correct, masks

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
        bar = tqdm(setup.train_batches(epoch), total=setup.steps_per_epoch, desc=f"epoch {epoch}", leave=False,
                   disable=self.quiet)
        for inputs, target, n_envs in bar:
            inputs, target = inputs.to(self.device), target.to(self.device)
            loss_value, step_correct, masks = self._step(inputs, target, n_envs)
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f"non-finite training loss ({loss_value}) at epoch {epoch}, step {steps + 1}; "
                                         f"metrics so far are in {self.runlog.dir}")
            setup.optimizer.step()
            self.split.after_step([p for _, p in self.named_params], epoch, steps + 1)
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
        return {"train_loss": loss_sum / steps, "train_acc": correct / count, "steps": steps,
                "lr": lr,
                "mask_density": {n: float(d) / steps for (n, _), d in zip(self.named_params, density)}}

    def _checkpoint(self, epoch):
        s = self.setup
        self.runlog.save_checkpoint({"epoch": epoch, "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
                                     "scheduler": s.scheduler.state_dict() if s.scheduler is not None else None})

    def _restore(self) -> int:
        state = self.runlog.load_checkpoint(self.device)
        if state is None:
            return 1
        s = self.setup
        s.model.load_state_dict(state["model"])
        s.optimizer.load_state_dict(state["optimizer"])
        if s.scheduler is not None:
            s.scheduler.load_state_dict(state["scheduler"])
        self.runlog.truncate_metrics(state["epoch"])
        return state["epoch"] + 1

    def _evaluate(self) -> dict:
        # BatchNorm's running statistics are rank 0's (they differ across ranks only with --dist_bn local).
        self.world.broadcast_state(self.setup.model, buffers_only=True)
        return evaluate(self.setup.model, self.eval_loaders, self.setup.loss_fn, self.device, self.world)

    def run(self, resume: bool = False) -> dict:
        setup = self.setup
        start = self._restore() if resume else 1
        self.world.broadcast_state(setup.model)  # every rank starts from rank 0's model
        if start == 1:
            self.runlog.truncate_metrics(0)
            self.runlog.save_weights(setup.model, "weights_init.pt")
        epochs = tqdm(range(start, setup.epochs + 1), desc="training", disable=self.quiet, initial=start - 1,
                      total=setup.epochs)
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
        final = {"epoch": setup.epochs, "phase": "final"}
        final.update(self._evaluate())
        self.runlog.log(final)
        self.runlog.save_weights(setup.model, "weights_final.pt")
        last_epoch = [r for r in self.runlog.records() if r.get("phase") == "epoch"][-1]
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
