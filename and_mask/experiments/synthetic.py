"""Spirals with signatures: does a method learn the shared spiral or each environment's shortcut?

Two protocols set the defaults of the data and schedule flags (a flag given explicitly wins;
config.json records the values in effect):

- ``original`` (default): the original code's defaults, draw for draw: 16 environments × 1024
  examples, 8 signature dimensions drawn from N(0, 1), batches of 256 per environment, 150
  epochs, learning rate ×0.1 after 3/4 of the epochs.
- ``paper``: Appendix B of the paper: 32 environments × 1280 examples, 32 signature dimensions
  drawn from N(0, 0.1) (read as variance 0.1: standard deviation √0.1), batches of 128, 3000/D
  epochs for D training environments (rounded up: 94 for D = 32), learning rate ×0.1 after 1/2
  and again after 3/4 of the epochs, and the paper's early stop: training ends after an epoch
  whose running training accuracy exceeds 97 % while the test accuracy (probed before that
  epoch's training) is below 60 %.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch.optim.lr_scheduler import MultiStepLR

from and_mask.core.flags import (
    MAX_SEED,
    add_lr_milestones_flag,
    check_lr_milestones,
    fraction,
    non_negative_float,
    positive_float,
    positive_int,
    probability,
)
from and_mask.core.optim import add_optimizer_flags, check_optimizer_flags, make_optimizer
from and_mask.core.training import TrainSetup
from and_mask.datasets.common import env_group_batches
from and_mask.datasets.synthetic import held_out, make_loaders
from and_mask.models import MLP

NAME = "synthetic"
RUN_FLAG_DEFAULTS: dict = {}  # the run flags keep their defaults
OUTPUT_DIR_REQUIRED = False  # a new folder under runs/ by default


def original_epochs(n_envs: int) -> int:
    return 150


def paper_epochs(n_envs: int) -> int:
    """The paper trains for 3000/D epochs with D training environments: 3000 · examples_per_env
    examples seen whatever D is. Rounded up so that every D gets at least one epoch."""
    return math.ceil(3000 / n_envs)


def original_milestones(epochs: int) -> list[int]:
    return [3 * epochs // 4]


def paper_milestones(epochs: int) -> list[int]:
    """×0.1 halfway through and again at three quarters (a milestone 0 of a run too short for it is dropped)."""
    return sorted({m for m in (epochs // 2, 3 * epochs // 4) if m > 0})


@dataclass(frozen=True)
class Protocol:
    """Defaults of one protocol; None-valued flags take these."""

    examples_per_env: int
    n_envs: int  # training environments D
    # Environments combined per step, G: min(envs_per_step, D); None: all D (gen_mask) or, in and_mask,
    # the original code's --n_agreement_envs default, n_envs.
    envs_per_step: int | None
    n_dims: int
    signature_std: float
    batch_size: int  # examples per environment per step
    epochs: Callable[[int], int]  # of the number of training environments
    lr_milestones: Callable[[int], list[int]]  # of the number of epochs
    stop_train_acc_above: float  # early stop when train acc > this while test acc < the next; 1, 0: never
    stop_test_acc_below: float


PROTOCOLS = {
    "original": Protocol(1024, 16, None, 8, 1.0, 256, original_epochs, original_milestones, 1.0, 0.0),
    # G = 16: the only group size at which the paper's best AND-mask learns the spiral with D = 32, at
    # the paper's epochs and at G = 32's number of steps (gen_mask/sweeps/group_size.toml).
    "paper": Protocol(1280, 32, 16, 32, math.sqrt(0.1), 128, paper_epochs, paper_milestones, 0.97, 0.60),
}


def add_flags(parser, package):
    group = parser.add_argument_group("synthetic task")
    group.add_argument("--protocol", choices=sorted(PROTOCOLS), default="original",
                       help="Where the data and schedule flags not given take their values: original (the "
                            "original code's) or paper (Appendix B of the paper).")
    group.add_argument("--examples_per_env", type=positive_int, default=None,
                       help="Training examples per environment. Default: the protocol's (original 1024, paper 1280).")
    group.add_argument("--n_test", type=positive_int, default=2000, help="Test examples, whose signatures are noise.")
    group.add_argument("--holdout_fraction", type=probability, default=0.0,
                       help="Share in [0, 1) of each training environment's examples held out from training as the "
                            "validation set `val` (evaluated every epoch, for model selection that never looks at "
                            "the test set); 0 holds out nothing and leaves every draw as it was.")
    if package == "and_mask":
        group.add_argument("--n_train_envs", type=positive_int, default=None,
                           help="Training environments. Default: the protocol's (original 16, paper 32).")
        group.add_argument("--n_agreement_envs", "--envs_per_step", type=positive_int, default=None,
                           help="Environments whose gradients are combined at each step, a group of a random "
                                "partition; it divides --n_train_envs (1: each step's batch from one environment). "
                                "Default: the protocol's (original 16, paper min(16, --n_train_envs)).")
    else:
        group.add_argument("--n_envs", type=positive_int, default=None,
                           help="Training environments. Default: the protocol's (original 16, paper 32).")
        group.add_argument("--envs_per_step", type=positive_int, default=None,
                           help="Environments whose batches make one step, a group of a random partition of the "
                                "environments (it divides --n_envs; 1: each step's batch from one environment). "
                                "Default: the protocol's (original: all environments, paper: min(16, --n_envs)).")
    group.add_argument("--n_revolutions", type=positive_int, default=3, help="Turns of each spiral.")
    group.add_argument("--n_dims", type=positive_int, default=None,
                       help="Dimensions of the signature shortcut. Default: the protocol's (original 8, paper 32).")
    group.add_argument("--signature_std", type=positive_float, default=None,
                       help="Standard deviation of the signature entries. Default: the protocol's (original 1, "
                            "paper √0.1 ≈ 0.316, the paper's N(0, 0.1) read as variance 0.1).")
    group.add_argument("--batch_size", type=positive_int, default=None,
                       help="Examples per environment per step. Default: the protocol's (original 256, paper 128).")
    group.add_argument("--epochs", type=positive_int, default=None,
                       help="Training epochs. Default: the protocol's (original 150, paper ⌈3000 / training "
                            "environments⌉, 94 for 32).")
    group.add_argument("--lr", type=positive_float, default=1e-2,
                       help="Adam's learning rate at the start (see --lr_milestones).")
    add_lr_milestones_flag(group, "the protocol's (original after 3/4 of the epochs, paper after 1/2 and 3/4).")
    group.add_argument("--stop_train_acc_above", type=fraction, default=None,
                       help="Early stop: end training after an epoch whose running training accuracy exceeds this "
                            "while the test accuracy is below --stop_test_acc_below; 1 never stops. "
                            "Default: the protocol's (original 1, paper 0.97).")
    group.add_argument("--stop_test_acc_below", type=fraction, default=None,
                       help="The test-accuracy side of the early stop; 0 never stops. "
                            "Default: the protocol's (original 0, paper 0.6).")
    group.add_argument("--weight_decay", type=non_negative_float, default=1e-3,
                       help="Weight decay: coupled L2 with adam (the original), decoupled after the mask with "
                            "temporal_and_mask_adam.")
    group.add_argument("--batch_norm", type=int, choices=[0, 1], default=0,
                       help="1: BatchNorm after every hidden Linear layer; 0: none.")
    group.add_argument("--dropout_p", type=probability, default=0.0,
                       help="Dropout probability after every hidden layer, in [0, 1).")
    group.add_argument("--n_hidden_units", type=positive_int, default=256, help="Units of every hidden layer.")
    group.add_argument("--n_hidden_layers", type=positive_int, default=3, help="Hidden layers of the MLP.")
    group.add_argument("--l1_coef", type=non_negative_float, default=0.0,
                       help="Adds l1_coef·sign(θ) to every gradient, after combining.")
    add_optimizer_flags(group, "adam")


def env_counts(args):
    """(training environments, environments combined per step)."""
    if hasattr(args, "n_envs"):
        return args.n_envs, args.envs_per_step
    return args.n_train_envs, args.n_agreement_envs


def resolve_protocol(args):
    """Fill every None-valued protocol flag of `args` with its protocol's value, in place.

    Idempotent, and tolerant of a config saved before these flags existed (it then gets the
    original protocol's values, which are what such a run used).
    """
    args.protocol = getattr(args, "protocol", None) or "original"
    protocol = PROTOCOLS[args.protocol]
    gen_mask = hasattr(args, "n_envs")
    train_flag, group_flag = ("n_envs", "envs_per_step") if gen_mask else ("n_train_envs", "n_agreement_envs")
    if getattr(args, train_flag, None) is None:
        setattr(args, train_flag, protocol.n_envs)
    if getattr(args, group_flag, None) is None:  # recorded in config.json, as every flag in effect
        n_envs = getattr(args, train_flag)
        if protocol.envs_per_step is not None:
            setattr(args, group_flag, min(protocol.envs_per_step, n_envs))
        else:
            setattr(args, group_flag, n_envs if gen_mask else protocol.n_envs)
    for name in ("examples_per_env", "n_dims", "signature_std", "batch_size", "stop_train_acc_above",
                 "stop_test_acc_below"):
        if getattr(args, name, None) is None:
            setattr(args, name, getattr(protocol, name))
    if getattr(args, "epochs", None) is None:
        args.epochs = protocol.epochs(env_counts(args)[0])
    if getattr(args, "lr_milestones", None) is None:
        args.lr_milestones = protocol.lr_milestones(args.epochs)


def check(args, parser):
    names = ("--n_envs", "--envs_per_step") if hasattr(args, "n_envs") else ("--n_train_envs", "--n_agreement_envs")
    group_given = getattr(args, names[1][2:], None) is not None
    resolve_protocol(args)
    n_train, n_agree = env_counts(args)
    if n_train % n_agree:
        default = "" if group_given else f", the --protocol {args.protocol} default; give {names[1]}"
        parser.error(f"{names[0]} ({n_train}) must be a multiple of {names[1]} ({n_agree}{default})")
    if args.seed + n_train - 1 > MAX_SEED:
        parser.error(f"--seed {args.seed} is too large: environment e draws its data with seed + e, and "
                     f"seed + {n_train - 1} exceeds numpy's largest seed {MAX_SEED}")
    held = held_out(args.examples_per_env, args.holdout_fraction)
    if args.batch_size > args.examples_per_env - held:
        parser.error(f"--batch_size ({args.batch_size}) exceeds --examples_per_env ({args.examples_per_env})"
                     + (f" less the {held} held out (--holdout_fraction)" if held else ""))
    check_lr_milestones(parser, args)
    check_optimizer_flags(args, parser)


def check_objective(args, objective) -> str | None:
    """Every training objective applies: the environments are the training environments."""
    resolve_protocol(args)
    return objective.check_envs_per_step(env_counts(args)[1])


def stop_rule(args):
    """The early stop of `args` as a TrainSetup stop rule, or None when it can never fire."""
    train_above, test_below = args.stop_train_acc_above, args.stop_test_acc_below
    if train_above >= 1 or test_below <= 0:
        return None

    def rule(record):
        if record["train_acc"] > train_above and record["test_acc"] < test_below:
            return (f"early stop: running train_acc {record['train_acc']:.4f} > {train_above} while "
                    f"test_acc {record['test_acc']:.4f} < {test_below}")
        return None

    return rule


def build(args, device) -> TrainSetup:
    resolve_protocol(args)
    n_train, n_agree = env_counts(args)
    train_loaders, test_loader, val_loader = make_loaders(args.examples_per_env, args.n_test, n_train,
                                                          args.n_revolutions, args.n_dims, args.batch_size, args.seed,
                                                          args.signature_std, args.holdout_fraction)
    model = MLP(2 + args.n_dims, args.n_hidden_units, args.n_hidden_layers, 1, bool(args.batch_norm),
                args.dropout_p).to(device)
    optimizer = make_optimizer(args, model.parameters(), args.lr, args.weight_decay)
    scheduler = MultiStepLR(optimizer, milestones=args.lr_milestones, gamma=0.1)
    batches_per_env = (args.examples_per_env - held_out(args.examples_per_env, args.holdout_fraction)) // args.batch_size
    eval_loaders = {"test": test_loader} if val_loader is None else {"val": val_loader, "test": test_loader}
    return TrainSetup(model=model, optimizer=optimizer, loss_fn=F.binary_cross_entropy_with_logits,
                      train_batches=lambda epoch: env_group_batches(train_loaders, n_agree),
                      eval_loaders=eval_loaders, epochs=args.epochs, scheduler=scheduler,
                      steps_per_epoch=batches_per_env * n_train // n_agree, env_loaders=train_loaders,
                      stop_rule=stop_rule(args))
