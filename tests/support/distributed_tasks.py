"""Tasks that every rank of one launch runs in turn (a helper of tests/and_mask/test_distributed.py, not a test).

    torchrun --standalone --nproc_per_node 2 tests/support/distributed_tasks.py PLAN.json

PLAN.json is a list of {"task": name, "args": {...}}; the tasks share one process group, so one
start-up serves many runs. Results go to the files the arguments name (rank 0 writes them).
The helpers used on both sides (the plugin combiner, the small models and batches) live here too.
"""
import importlib
import json
import sys
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from and_mask.core import distributed
from and_mask.core.env_split import EnvSplit
from and_mask.core.errors import RunError
from and_mask.core.per_env_grads import per_env_grads
from and_mask.core.training import Trainer, TrainSetup
from and_mask.models import MLP, FastResnet
from gen_mask.gen_mask_utils import COMBINERS, OBJECTIVES

PLUGIN = "largest_magnitude"
TASKS = {}


def task(fn):
    TASKS[fn.__name__] = fn
    return fn


def largest_magnitude(grads):
    """Per coordinate, the environment's value of largest magnitude (a rule that declares no sums)."""
    return grads.gather(0, grads.abs().argmax(dim=0, keepdim=True))[0], {}


@contextmanager
def plugin_registered():
    """The plugin combiner in gen_mask's registry for the duration of the block."""
    COMBINERS.register(PLUGIN)(largest_magnitude)
    try:
        yield
    finally:
        del COMBINERS[PLUGIN]


LAYOUTS = {"envs": (5, 3), "examples": (7, 1), "one env": (1, 3)}  # (environments, examples of each)


def small_problem(layout: str = "envs"):
    """(model, inputs, target, n_envs, loss_fn): an MLP on 5 environments of 3 examples, 7 one-example ones
    (the outer engine) or one environment (fewer than the ranks)."""
    torch.manual_seed(0)
    n_envs, per_env = LAYOUTS[layout]
    model = MLP(6, 8, 1, 3, False, 0.0)
    inputs = torch.randn(n_envs * per_env, 6)
    target = torch.randint(0, 3, (n_envs * per_env,))
    return model, inputs, target, n_envs, F.cross_entropy


def fastresnet_problem(images_path):
    """(FastResnet in training mode, 8 images, their labels): every image is its own environment."""
    images, labels = torch.load(images_path)
    torch.manual_seed(0)
    return FastResnet().train(), images, labels


def _save(world, obj, path):
    if world.is_leader:
        torch.save(obj, path)


@task
def train(world, module, argv):
    """`python -m module argv` on every rank."""
    importlib.import_module(module).main(argv)


@task
def train_failing(world, module, argv, rank, epoch):
    """A run in which `rank` raises a RunError when `epoch` starts."""
    original = Trainer.train_epoch

    def train_epoch(self, current):
        if current == epoch and world.rank == rank:
            raise RunError(f"planted failure on rank {rank} at epoch {epoch}")
        return original(self, current)

    Trainer.train_epoch = train_epoch
    importlib.import_module(module).main(argv)


def one_step(world, name: str, layout: str) -> list[torch.Tensor]:
    """The gradients one training step of method `name` writes (model's, then an objective's own)."""
    model, inputs, target, n_envs, loss_fn = small_problem(layout)
    method = COMBINERS[name] if name in COMBINERS else OBJECTIVES[name]
    setup = TrainSetup(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, None, {}, 1,
                       steps_per_epoch=1, env_loaders=[None] * n_envs)
    trainer = Trainer(setup, method, method.defaults(), None, world.device, quiet=True, split=EnvSplit(world))
    torch.manual_seed(1)  # PCGrad's random order: the same draws in every process
    trainer._step(inputs, target, n_envs, list(range(n_envs)))
    objective = list(trainer.objective.parameters()) if trainer.objective is not None else []
    return [p.grad for p in trainer.params + objective]


def vmap_batchnorm_step(world) -> list[torch.Tensor]:
    """BatchNorm's buffers after one AND-mask step of the vmap engine (each rank forwards its environments)."""
    torch.manual_seed(0)
    model = MLP(6, 8, 2, 3, batch_norm=True)
    inputs, target = torch.randn(15, 6), torch.randint(0, 3, (15,))
    setup = TrainSetup(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, None, {}, 1)
    method = COMBINERS["and_mask"]
    Trainer(setup, method, method.defaults(), None, world.device, engine="vmap", quiet=True,
            split=EnvSplit(world))._step(inputs, target, 5)
    buffers = [b.clone() for b in model.buffers()]
    world.check_identical(buffers, "the running statistics")
    return buffers


@task
def running_statistics(world, out):
    _save(world, vmap_batchnorm_step(world), out)


def methods_of(layout: str) -> list[str]:
    """The methods stepped with `layout`: every combiner, and every objective unless each rank cannot have
    an environment (the objectives refuse that)."""
    return sorted({*COMBINERS, *OBJECTIVES} if LAYOUTS[layout][0] > 1 else COMBINERS)


@task
def step_every_method(world, out, layout):
    """One step of every registered combiner and objective, the environments split across the ranks."""
    with plugin_registered():
        results = {name: one_step(world, name, layout) for name in methods_of(layout)}
    _save(world, results, out)


@task
def batchnorm_grads(world, images, out):
    """FastResnet's per-example gradients (exact and --dist_bn local) gathered from every rank, and the
    gradient of the mean loss (a τ = 0 step)."""
    results = {}
    for bn in ("exact", "local"):
        model, inputs, target = fastresnet_problem(images)
        split = EnvSplit(world, bn=bn)
        batch = split.local_batch(model, "shared", inputs, target, len(target))
        grads = per_env_grads(model, batch.inputs, batch.target, F.cross_entropy, batch.n_envs, batch.engine,
                              envs=batch.own).grads
        results[bn] = split.gather(grads, len(target))
        model, inputs, target = fastresnet_problem(images)
        setup = TrainSetup(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, None, {}, 1)
        Trainer(setup, COMBINERS["mean"], {}, None, world.device, quiet=True, split=split)._step(inputs, target, 8)
        results[f"{bn} mean"] = [p.grad for p in model.parameters()]
    _save(world, results, out)


@task
def checksums(world, out):
    """World.check_identical on equal tensors, then on tensors that differ on rank 1: its message."""
    tensors = [torch.ones(3), torch.arange(4.0)]
    world.check_identical(tensors, "the first look")
    tensors[1][2] += world.rank * 1e-6
    try:
        world.check_identical(tensors, "the second look")
        message = None
    except RunError as error:
        message = str(error)
    _save(world, message, out)


@task
def traffic(world, out):
    """Bytes each collective carried in one training step of the small MLP, per method (see the test)."""
    results = {}
    with plugin_registered():
        for name, hparams in (("and_mask", {"agreement_threshold": 0.5}), ("geom_mean", {}), ("sand_mask", {}),
                              ("majority_vote", {}), ("mean", {}), ("pcgrad", {}), (PLUGIN, {})):
            for layout in ("envs", "examples"):
                model, inputs, target, n_envs, loss_fn = small_problem(layout)
                setup = TrainSetup(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, None, {}, 1)
                combiner = COMBINERS[name]
                trainer = Trainer(setup, combiner, {**combiner.defaults(), **hparams}, None, world.device, quiet=True,
                                  split=EnvSplit(world))
                world.traffic.clear()
                trainer._step(inputs, target, n_envs)
                results[name, layout == "examples"] = {kind: dict(v) for kind, v in world.traffic.items()}
    _save(world, results, out)


def main():
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    with distributed.shared_world() as world:
        for item in plan:
            TASKS[item["task"]](world, **item["args"])


if __name__ == "__main__":
    main()
