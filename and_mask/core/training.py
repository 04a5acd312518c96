"""The one training loop shared by every experiment of both packages.

Per epoch: evaluate every evaluation set first (the original's "probe"), then train. Each
training step forwards a batch of E environments stacked env after env, computes the
per-environment gradients, combines them with the chosen combiner, writes `param.grad`, adds
l1_coef·sign(θ) and l2_coef·θ if asked, and steps the optimiser. After the last epoch the
evaluation sets are measured once more (phase "final"). Every record goes to metrics.jsonl at once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from and_mask.core.combiners import Combiner, apply_combiner
from and_mask.core.errors import NonFiniteLossError, RunError
from and_mask.core.per_env_grads import env_losses_from_output, per_env_grads
from and_mask.core.per_env_hvp import env_hvp, hvp_unsupported
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
    output = _flat_output(output)
    pred = (output >= 0).to(target.dtype) if output.dim() == 1 else output.argmax(dim=1)
    return int((pred == target.reshape(pred.shape)).sum())


@torch.no_grad()
def evaluate(model, loaders: dict, loss_fn, device) -> dict:
    """Mean loss and accuracy of every evaluation set, in eval mode: {name_loss, name_acc}."""
    was_training = model.training
    model.eval()
    out = {}
    for name, loader in loaders.items():
        loss_sum, correct, total = 0.0, 0, 0
        for inputs, target in loader:
            inputs, target = inputs.to(device), target.to(device)
            output = model(inputs)
            loss_sum += float(loss_fn(_flat_output(output), target)) * target.shape[0]
            correct += count_correct(output, target)
            total += target.shape[0]
        out[f"{name}_loss"] = loss_sum / max(total, 1)
        out[f"{name}_acc"] = correct / max(total, 1)
    model.train(was_training)
    return out


class Trainer:
    def __init__(self, setup: TrainSetup, combiner: Combiner, hparams: dict, runlog: RunLog, device,
                 engine: str = "auto", chunk_size: int | None = None, l1_coef: float = 0.0, quiet: bool = False,
                 l2_coef: float = 0.0):
        self.setup, self.combiner, self.hparams, self.runlog = setup, combiner, hparams, runlog
        self.device, self.engine, self.chunk_size, self.l1_coef, self.quiet = device, engine, chunk_size, l1_coef, quiet
        self.named_params = [(n, p) for n, p in setup.model.named_parameters() if p.requires_grad]
        self.plain = combiner.reduces_to_mean(**hparams)
        self.l2_coef = l2_coef
        problem = hvp_unsupported(setup.model) if combiner.needs_hvp and not self.plain else None
        if problem:
            raise RunError(f"--method {combiner.name}: {problem}")

    def _step(self, inputs, target, n_envs):
        model, params = self.setup.model, [p for _, p in self.named_params]
        self.setup.optimizer.zero_grad(set_to_none=True)
        if self.plain:
            output = model(inputs)
            loss = env_losses_from_output(output, target, self.setup.loss_fn, n_envs).mean()
            loss.backward()
            output, masks = output.detach(), None
            loss = loss.detach()
        else:
            result = per_env_grads(model, inputs, target, self.setup.loss_fn, n_envs, self.engine, self.chunk_size,
                                   accepts_outer=True)
            # Hessian-vector products at θ of the same per-environment losses, for the combiners that need them
            hvp = (env_hvp(model, inputs, target, self.setup.loss_fn, n_envs, self.engine, self.chunk_size)
                   if self.combiner.needs_hvp else None)
            combined, diagnostics = apply_combiner(self.combiner, result.grads, self.hparams, hvp)
            for p, g in zip(params, combined):
                p.grad = g
            output, loss = result.output, result.env_losses.mean()
            masks = [d.get("mask") for d in diagnostics]
        if self.l1_coef > 0:
            for p in params:
                p.grad.add_(torch.sign(p.detach()), alpha=self.l1_coef)
        if self.l2_coef > 0:  # the gradient of ½·l2_coef·‖θ‖², added after combining (never masked)
            for p in params:
                p.grad.add_(p.detach(), alpha=self.l2_coef)
        return output, loss, masks

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
            output, loss, masks = self._step(inputs, target, n_envs)
            loss_value = float(loss)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"non-finite training loss ({loss_value}) at epoch {epoch}, step {steps + 1}; "
                                         f"metrics so far are in {self.runlog.dir}")
            setup.optimizer.step()
            if setup.scheduler is not None and setup.scheduler_interval == "step":
                setup.scheduler.step()
            if masks is not None:
                for i, m in enumerate(masks):
                    density[i] += m.mean() if m is not None else 1.0
            else:
                for d in density:
                    d += 1.0
            loss_sum += loss_value
            correct += count_correct(output, target)
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

    def run(self, resume: bool = False) -> dict:
        setup = self.setup
        start = self._restore() if resume else 1
        if start == 1:
            self.runlog.truncate_metrics(0)
            self.runlog.save_weights(setup.model, "weights_init.pt")
        epochs = tqdm(range(start, setup.epochs + 1), desc="training", disable=self.quiet, initial=start - 1,
                      total=setup.epochs)
        for epoch in epochs:
            started = time.time()
            record = {"epoch": epoch, "phase": "epoch"}
            record.update(evaluate(setup.model, setup.eval_loaders, setup.loss_fn, self.device))
            record.update(self.train_epoch(epoch))
            record.update(setup.extra_metrics(setup.model))
            record["seconds"] = time.time() - started
            self.runlog.log(record)
            self._checkpoint(epoch)
            if not self.quiet:
                epochs.write(format_record(record))
        final = {"epoch": setup.epochs, "phase": "final"}
        final.update(evaluate(setup.model, setup.eval_loaders, setup.loss_fn, self.device))
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
