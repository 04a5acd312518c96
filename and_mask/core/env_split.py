"""A training step whose environments are split across the ranks of a run (`and_mask.core.distributed`).

Every rank holds the same batch of E environments (same data, same seed) and the same model.
Rank r takes the contiguous block of environments `World.env_range(E)` (E need not be a
multiple of K; a rank may get none when E < K), computes their gradients, and the ranks combine:

Forward pass.
- Examples that do not interact (no BatchNorm in training mode and no active dropout, or the
  vmap and outer engines, which treat each environment alone): each rank forwards only the
  examples of its environments.
- BatchNorm in training mode or active dropout, with the shared or loop engine: by default
  (`--dist_bn exact`) every rank forwards the WHOLE batch, so the batch statistics (and the
  dropout draws) are those of one process, and back-propagates only its environments' losses.
  Exact, and the E backward passes through the batch are split K ways.
- The vmap engine with BatchNorm normalises every environment with its own statistics, so each
  rank forwards only its environments; the running statistics (evaluation's) are still those
  of one process's step: every rank updates them with one forward pass of the whole batch.
- `--dist_bn local`: each rank forwards only its examples, normalised with their own batch
  statistics, as DistributedDataParallel does. A different model (the per-rank statistics
  depend on K); the running statistics used for evaluation are rank 0's, as with DDP.

Combining.
- A combiner declared as a `SumRule` (mean, AND-mask, geometric mean, SAND-mask, majority
  vote): each rank sums over its environments; one all-reduce per round of sums adds them up
  for every parameter at once (sign counts travel as 8-bit integers while E ≤ 127).
- Any other combiner (median, trimmed mean, PCGrad, MGDA, CAGrad, GAF, align_weights, a plugin
  that declares nothing): the per-environment gradients are all-gathered (a Linear weight's
  OuterProducts as their two factors) and every rank runs the combiner on all of them; a
  warning says when the gathered gradients exceed --dist_gather_warn_mb.
- A step whose rule is the mean (τ = 0): one backward pass of the rank's share
  Σ_{e of r} L_e / E and an all-reduce of the gradients, as DistributedDataParallel does.
Every rank then holds the same update. `--dist_check_every N` compares the parameters of all
ranks every N steps (a debugging aid) and stops the run if they differ.

Random numbers: every rank draws the same numbers in the same order (data order, PCGrad's
random order). A forward pass of only the rank's examples with active dropout would draw
differently on each rank, so it draws from a stream of its own, seeded from the shared one.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from and_mask.core.combiners import Combiner, SumRule, apply_combiner
from and_mask.core.distributed import World
from and_mask.core.per_env_grads import (
    OuterProducts,
    batch_statistics_only,
    couples_examples,
    has_active_dropout,
    resolve_engine,
)

DIST_BN = ("exact", "local")
MAX_INT8_COUNT = 127  # sign counts of up to this many environments travel as int8


@dataclass
class LocalBatch:
    """What one rank forwards in a step, and whose gradients it takes."""

    inputs: torch.Tensor
    target: torch.Tensor
    n_envs: int  # environments forwarded
    first: int  # the step's index of the first environment forwarded
    own: range | None  # the environments of the forwarded batch to back-propagate (None: all)
    whole: bool  # the whole batch was forwarded (every rank sees every output)
    engine: str  # the gradient engine, resolved on the whole batch (the same on every rank)


class EnvSplit:
    """One rank's part in the steps of a run; with a World of one process every method is the plain step's."""

    def __init__(self, world: World | None = None, bn: str = "exact", check_every: int = 0,
                 gather_warn_mb: float = 1024.0):
        if bn not in DIST_BN:
            raise ValueError(f"bn must be one of {DIST_BN}, got {bn!r}")
        self.world = world if world is not None else World()
        self.bn, self.check_every, self.gather_warn_mb = bn, check_every, gather_warn_mb
        self._warned = False

    def local_batch(self, model: nn.Module, engine: str, inputs, target, n_envs: int,
                    accepts_outer: bool = True) -> LocalBatch:
        resolved = resolve_engine(model, engine, inputs.shape[0], n_envs, accepts_outer)
        world = self.world
        if world.size == 1:
            return LocalBatch(inputs, target, n_envs, 0, None, True, resolved)
        envs = world.env_range(n_envs)
        coupled = couples_examples(model) or has_active_dropout(model)
        if self.bn == "exact" and coupled and resolved in ("shared", "loop"):
            return LocalBatch(inputs, target, n_envs, 0, envs, True, resolved)
        per_env = inputs.shape[0] // n_envs
        rows = slice(envs.start * per_env, envs.stop * per_env)
        return LocalBatch(inputs[rows], target[rows], len(envs), envs.start, None, False, resolved)

    def random_stream(self, model: nn.Module, batch: LocalBatch):
        """The random numbers of this rank's forward pass (see the module docstring)."""
        if self.world.size == 1 or batch.whole or not has_active_dropout(model):
            return nullcontext()
        return _rank_stream(self.world)

    @contextmanager
    def whole_batch_statistics(self, model: nn.Module, batch: LocalBatch, inputs: torch.Tensor):
        """Around the gradients of a rank that forwards only its environments: BatchNorm's running
        statistics are then updated by a forward pass of the whole batch `inputs` instead (not
        with --dist_bn local, whose statistics are each rank's own)."""
        if batch.whole or self.bn == "local" or not couples_examples(model):
            yield
            return
        with batch_statistics_only(model):
            yield
        with torch.no_grad():
            model(inputs)

    # ---- gradients ------------------------------------------------------------------------------

    def combine(self, combiner: Combiner, grads: list, hparams: dict, n_envs: int, hvp=None):
        """apply_combiner's result over ALL n_envs environments, from this rank's rows of them
        (`hvp`: `share_hvp`'s, for a combiner that needs Hessian-vector products)."""
        if self.world.size == 1:
            return apply_combiner(combiner, grads, hparams, hvp)
        if combiner.sums is not None:
            return self._combine_sums(combiner.sums, grads, hparams, n_envs)
        return apply_combiner(combiner, self.gather(grads, n_envs), hparams, hvp)

    def _combine_sums(self, rule: SumRule, grads: list, hparams: dict, n_envs: int):
        totals = [{"n_envs": n_envs} for _ in grads]
        wire = torch.int8 if n_envs <= MAX_INT8_COUNT else torch.int32
        for index in range(len(rule.rounds)):
            local = [rule.round_sums(index, g, t) for g, t in zip(grads, totals)]
            sent = [s.to(wire) if name in rule.counts else s for sums in local for name, s in sums.items()]
            received = iter(self.world.all_reduce_sum(sent))
            for sums, t in zip(local, totals):
                t.update({name: next(received).to(s.dtype) for name, s in sums.items()})
        results = [rule.finish(t, **hparams) for t in totals]
        return [r[0] for r in results], [r[1] for r in results]

    def gather(self, grads: list, n_envs: int) -> list:
        """Every environment's gradients from every rank's rows (OuterProducts travel as their factors)."""
        rows = []
        for g in grads:
            rows += [g.output_grads, g.inputs] if isinstance(g, OuterProducts) else [g]
        megabytes = n_envs * sum(r.shape[1:].numel() * r.element_size() for r in rows) / 2 ** 20
        if megabytes > self.gather_warn_mb and not self._warned and self.world.is_leader:
            warnings.warn(f"every rank gathers the gradients of all {n_envs} environments, {megabytes:.3g} MB per "
                          f"step (over --dist_gather_warn_mb {self.gather_warn_mb:g}); only a combiner declared as "
                          "a SumRule avoids that", UserWarning, stacklevel=3)
            self._warned = True
        full = iter(self.world.all_gather_rows(rows, self.world.env_counts(n_envs)))
        return [OuterProducts(next(full), next(full)) if isinstance(g, OuterProducts) else next(full) for g in grads]

    def share_hvp(self, hvp, n_envs: int, whole: bool):
        """Every environment's Hessian-vector products from this rank's `hvp` (its forwarded environments).

        A rank that forwarded the whole batch has every environment's products itself. Otherwise
        v of shape (P,) is the same on every rank (the combiner runs on the same gathered
        gradients everywhere); of a per-environment v (E, P) each rank takes its rows; the
        (E, P) products are the all-gather of every rank's rows.
        """
        if self.world.size == 1 or whole:
            return hvp
        counts, envs = self.world.env_counts(n_envs), self.world.env_range(n_envs)

        def shared(v):
            rows = (hvp(v if v.dim() == 1 else v[envs.start:envs.stop]) if len(envs)
                    else v.new_zeros(0, v.shape[-1]))
            return self.world.all_gather_rows([rows], counts)[0]

        return shared

    def share_terms(self, terms: dict, n_envs: int) -> dict:
        """An objective's per-environment terms of every rank (`objective_loss`): this rank's rows as
        computed (they carry the gradient), the other ranks' as constants."""
        if self.world.size == 1:
            return terms
        envs = self.world.env_range(n_envs)
        names = list(terms)
        rows = torch.stack([terms[name].detach() for name in names], dim=1)
        full = self.world.all_gather_rows([rows], self.world.env_counts(n_envs))[0]
        return {name: torch.cat([full[:envs.start, i], terms[name], full[envs.stop:, i]])
                for i, name in enumerate(names)}

    def sum_grads(self, params: list[torch.Tensor]):
        """Σ over ranks of every parameter's gradient (a rank without environments adds zeros)."""
        if self.world.size == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.world.all_reduce_sum([p.grad for p in params])

    # ---- what the loop logs and checks ----------------------------------------------------------

    def totals(self, env_losses: torch.Tensor, correct: int, n_envs: int, whole: bool) -> tuple[float, int]:
        """(mean loss over all n_envs environments, correct predictions over the whole batch)."""
        if self.world.size == 1 or whole:
            return float(env_losses.mean()), correct
        sums = torch.tensor([float(env_losses.sum()), correct], dtype=torch.float64, device=self.world.device)
        self.world.all_reduce_sum([sums])
        return float(sums[0]) / n_envs, int(sums[1])

    def after_step(self, params: list[torch.Tensor], epoch: int, step: int):
        if self.check_every and step % self.check_every == 0:
            self.world.check_identical(params, f"epoch {epoch}, step {step}")


@contextmanager
def _rank_stream(world: World):
    seed = int(torch.randint(2 ** 62, ()))  # one draw on every rank: the shared stream moves on alike
    devices = [world.device] if world.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=world.device.type):
        torch.manual_seed(seed + world.rank)
        yield
