"""Spirals with signatures: does a method learn the shared spiral or each environment's shortcut?"""
import torch.nn.functional as F
from torch.optim.lr_scheduler import MultiStepLR

from and_mask.core.cli import MAX_SEED, non_negative_float, positive_float, positive_int, probability
from and_mask.core.optim import add_optimizer_flags, check_optimizer_flags, make_optimizer
from and_mask.core.training import TrainSetup
from and_mask.datasets.common import env_group_batches
from and_mask.datasets.synthetic import make_loaders
from and_mask.models import MLP

NAME = "synthetic"


def add_flags(parser, package):
    group = parser.add_argument_group("synthetic task")
    group.add_argument("--examples_per_env", type=positive_int, default=1024, help="Training examples per environment.")
    group.add_argument("--n_test", type=positive_int, default=2000, help="Test examples, whose signatures are noise.")
    if package == "and_mask":
        group.add_argument("--n_train_envs", type=positive_int, default=16, help="Training environments.")
        group.add_argument("--n_agreement_envs", "--envs_per_step", type=positive_int, default=16,
                           help="Environments whose gradients are combined at each step; it divides --n_train_envs "
                                "(1: each step's batch from one environment).")
    else:
        group.add_argument("--n_envs", type=positive_int, default=16, help="Training environments.")
        group.add_argument("--envs_per_step", type=positive_int, default=None,
                           help="Environments whose batches make one step, a group of a random partition of the "
                                "environments (it divides --n_envs; 1: each step's batch from one environment). "
                                "Default: all environments at every step.")
    group.add_argument("--n_revolutions", type=positive_int, default=3, help="Turns of each spiral.")
    group.add_argument("--n_dims", type=positive_int, default=8, help="Dimensions of the signature shortcut.")
    group.add_argument("--batch_size", type=positive_int, default=256, help="Examples per environment per step.")
    group.add_argument("--epochs", type=positive_int, default=150, help="Training epochs.")
    group.add_argument("--lr", type=positive_float, default=1e-2,
                       help="Adam's learning rate, multiplied by 0.1 after 3/4 of the epochs.")
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
        return args.n_envs, args.envs_per_step or args.n_envs
    return args.n_train_envs, args.n_agreement_envs


def check(args, parser):
    n_train, n_agree = env_counts(args)
    if n_train % n_agree:
        names = ("--n_envs", "--envs_per_step") if hasattr(args, "n_envs") else ("--n_train_envs", "--n_agreement_envs")
        parser.error(f"{names[0]} ({n_train}) must be a multiple of {names[1]} ({n_agree})")
    if args.seed + n_train - 1 > MAX_SEED:
        parser.error(f"--seed {args.seed} is too large: environment e draws its data with seed + e, and "
                     f"seed + {n_train - 1} exceeds numpy's largest seed {MAX_SEED}")
    if args.batch_size > args.examples_per_env:
        parser.error(f"--batch_size ({args.batch_size}) exceeds --examples_per_env ({args.examples_per_env})")
    check_optimizer_flags(args, parser)


def check_objective(args, objective) -> str | None:
    """Every training objective applies: the environments are the training environments."""
    return objective.check_envs_per_step(env_counts(args)[1])


def build(args, device) -> TrainSetup:
    n_train, n_agree = env_counts(args)
    train_loaders, test_loader = make_loaders(args.examples_per_env, args.n_test, n_train, args.n_revolutions,
                                              args.n_dims, args.batch_size, args.seed)
    model = MLP(2 + args.n_dims, args.n_hidden_units, args.n_hidden_layers, 1, bool(args.batch_norm),
                args.dropout_p).to(device)
    optimizer = make_optimizer(args, model.parameters(), args.lr, args.weight_decay)
    scheduler = MultiStepLR(optimizer, milestones=[3 * args.epochs // 4], gamma=0.1)
    batches_per_env = args.examples_per_env // args.batch_size
    return TrainSetup(model=model, optimizer=optimizer, loss_fn=F.binary_cross_entropy_with_logits,
                      train_batches=lambda epoch: env_group_batches(train_loaders, n_agree),
                      eval_loaders={"test": test_loader}, epochs=args.epochs, scheduler=scheduler,
                      steps_per_epoch=batches_per_env * n_train // n_agree, env_loaders=train_loaders)
