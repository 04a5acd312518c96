"""Colored MNIST: does a method learn the digit's shape or the colour that flips at test time?

Two training environments where colour agrees with the (25 %-noisy) binary label 80 % and 90 %
of the time, and a test environment where it agrees 10 % of the time (see
`and_mask.datasets.colored_mnist`). Shape alone gives 75 %; a colour classifier gets ≈ 85 % on the
training set and ≈ 10 % on test. Agreement environments (--agreement_envs):
- ``example`` (the original): the batch of --batch_size examples is drawn from both training
  environments pooled, and every example is its own environment (E = batch_size, B = 1);
- ``color``: each step takes --batch_size examples from each colour environment (E = 2), or with
  --envs_per_step 1 from one of them, the two taking turns in random order.
Evaluation sets: ``train_eval`` (the whole training set with the labels it is trained on),
``relabelled`` (the examples given random labels, when --random_labels_fraction > 0), ``val``
(with --holdout_fraction > 0: examples of both training environments, with their labels, held
out from training and from ``train_eval``), ``test``.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import MultiStepLR

from and_mask.core.errors import RunError
from and_mask.core.flags import (
    add_lr_milestones_flag,
    check_lr_milestones,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from and_mask.core.optim import add_optimizer_flags, check_optimizer_flags, make_optimizer
from and_mask.core.training import TrainSetup
from and_mask.datasets.colored_mnist import PROTOCOLS, ColoredImages, batch_loader, prepared, relabel
from and_mask.datasets.common import env_group_batches
from and_mask.datasets.mnist import DATASETS, DEFAULT_DATA_PATH
from and_mask.models import MLP

NAME = "colored_mnist"
N_CLASSES = 2  # the task is binary: y = 1[digit >= 5] with label noise
RUN_FLAG_DEFAULTS = {"use_cuda": "0"}  # the original's default
OUTPUT_DIR_REQUIRED = True  # as in the original


def add_flags(parser, package):
    group = parser.add_argument_group("colored mnist")
    group.add_argument("--dataset", choices=sorted(DATASETS), default="mnist", help="Source of the grey images.")
    group.add_argument("--protocol", choices=sorted(PROTOCOLS), default="original",
                       help="original: 28×28×3 images, environments of 20 000/20 000/20 000 with colour flips "
                            "0.2/0.1/0.9; irm: 14×14×2 images, 25 000/25 000 training and 10 000 test images (flips "
                            "0.2/0.1/0.9).")
    group.add_argument("--agreement_envs", choices=["example", "color"], default="example",
                       help="example: every example of a batch is an environment (the original); color: the two "
                            "training colour environments, --batch_size examples from each per step.")
    group.add_argument("--data_path", default=str(DEFAULT_DATA_PATH),
                       help="Torchvision root holding MNIST/raw or FashionMNIST/raw; the prepared tensors are cached "
                            "in DATA_PATH/cache.")
    group.add_argument("--num_workers", type=non_negative_int, default=1,
                       help="Data-loading worker processes (0: load in the main process).")
    group.add_argument("--init_lr", type=positive_float, required=True,
                       help="Adam's learning rate at the start (see --lr_milestones).")
    add_lr_milestones_flag(group, "the protocol's: original after 3/4 of all iterations, as in the original code; "
                                  "irm none, as in the IRM authors' script.")
    group.add_argument("--weight_decay", type=non_negative_float, required=True,
                       help="Weight decay coefficient wd, applied as --weight_decay_order says.")
    add_optimizer_flags(group, "adam_flexible_weight_decay")
    group.add_argument("--random_labels_fraction", type=fraction, required=True,
                       help="Fraction of training examples whose label is replaced by a uniform one in {0, 1}.")
    group.add_argument("--holdout_fraction", type=probability, default=0.0,
                       help="Share in [0, 1) of each training colour environment held out from training as the "
                            "validation set `val` (evaluated every epoch, for model selection that never looks at "
                            "the test environment); 0 holds out nothing and leaves every draw as it was.")
    group.add_argument("--train_subset", type=positive_int, default=None,
                       help="Train on the first N examples of each training colour environment (after --holdout_fraction "
                            "takes its share; they come in the environment's random order). Default: all.")
    group.add_argument("--test_subset", type=positive_int, default=None,
                       help="Evaluate on the first N examples of the test environment. Default: all.")
    group.add_argument("--batch_size", type=positive_int, default=100,
                       help="Examples per step (--agreement_envs example) or per colour environment per step (color).")
    group.add_argument("--envs_per_step", type=int, choices=[1, 2], default=None,
                       help="Colour environments per step with --agreement_envs color (1: each step's batch from "
                            "one environment). Default: both.")
    group.add_argument("--epochs", type=positive_int, default=15, help="Training epochs.")
    group.add_argument("--batch_norm", type=int, choices=[0, 1], default=0,
                       help="1: BatchNorm after every hidden Linear layer; 0: none.")
    group.add_argument("--dropout_p", type=probability, default=0.0,
                       help="Dropout probability after every hidden layer, in [0, 1).")
    group.add_argument("--n_dims", type=positive_int, default=None,
                       help="Input size, checked against the protocol's (original 3·28·28 = 2352, irm 2·14·14 = 392). "
                            "Default: the protocol's.")
    group.add_argument("--n_hidden_units", type=positive_int, default=28 * 28, help="Units of every hidden layer.")
    group.add_argument("--n_hidden_layers", type=non_negative_int, default=0,
                       help="Hidden layers of the MLP; 0 makes it logistic regression.")
    group.add_argument("--n_outputs", type=positive_int, default=10,
                       help="1: one logit and BCE; 2 or more: softmax cross-entropy over n_outputs logits, of which "
                            "classes 0 and 1 are the task's (the original's 10 works; 2 is the exact model).")
    group.add_argument("--l1_coef", type=non_negative_float, default=0.0,
                       help="Adds l1_coef·sign(θ) to the gradient, after combining.")
    group.add_argument("--l2_coef", type=non_negative_float, default=0.0,
                       help="Adds l2_coef·θ to the gradient, after combining.")


def check(args, parser):
    n_inputs = PROTOCOLS[args.protocol].n_inputs
    if args.n_dims is not None and args.n_dims != n_inputs:
        parser.error(f"--n_dims {args.n_dims} does not match --protocol {args.protocol} (inputs of size {n_inputs})")
    if args.envs_per_step is not None and args.agreement_envs == "example":
        parser.error("--envs_per_step needs --agreement_envs color: with example environments every example is an "
                     "environment")
    if args.lr_milestones is None and args.protocol == "irm":
        args.lr_milestones = ()
    check_lr_milestones(parser, args)
    check_optimizer_flags(args, parser)


def check_objective(args, objective) -> str | None:
    """Objectives apply to the two colour environments, not to per-example environments."""
    if args.agreement_envs == "example":
        return (f"--method {objective.name} needs --agreement_envs color: with example environments every example "
                "is its own environment")
    if objective.needs_features and args.n_hidden_layers == 0:
        return f"--method {objective.name} needs features: a model with --n_hidden_layers >= 1"
    return objective.check_envs_per_step(args.envs_per_step or 2)


def loss_for(n_outputs):
    """BCE with logits for one output (float labels), cross-entropy over the logits otherwise."""
    return F.binary_cross_entropy_with_logits if n_outputs == 1 else F.cross_entropy


def holdout_split(train_envs: torch.Tensor, fraction: float, seed: int):
    """(kept, held) sorted positions of the training examples: floor(fraction · n_e) of each
    environment e held out for validation, drawn by a generator of their own (so no other draw
    changes); with fraction 0, every position is kept."""
    if fraction == 0:
        return torch.arange(len(train_envs)), torch.zeros(0, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed % 2 ** 32)
    held = []
    for env in (0, 1):
        positions = (train_envs == env).nonzero().squeeze(1)
        held.append(positions[torch.randperm(len(positions), generator=generator)[:int(fraction * len(positions))]])
    held = torch.cat(held).sort().values
    return torch.from_numpy(np.setdiff1d(np.arange(len(train_envs)), held.numpy())), held


def first_of_each_env(kept: torch.Tensor, train_envs: torch.Tensor, n: int) -> torch.Tensor:
    """The sorted positions of `kept` that are among the first n of their environment."""
    kept_envs = train_envs[kept]
    rank = torch.zeros_like(kept)
    for env in (0, 1):
        in_env = kept_envs == env
        rank[in_env] = torch.arange(int(in_env.sum()))
    return kept[rank < n]


def build(args, device) -> TrainSetup:
    tensors = prepared(args.dataset, args.protocol, args.seed, args.data_path)
    envs, labels = tensors["envs"], tensors["labels"]
    train_idx = (envs < 2).nonzero().squeeze(1)
    test_idx = (envs == 2).nonzero().squeeze(1)
    train_labels, relabelled = relabel(labels[train_idx], args.random_labels_fraction, N_CLASSES, args.seed)
    labels = labels.clone()
    labels[train_idx] = train_labels
    if args.n_outputs == 1:
        labels = labels.float()
    data = ColoredImages(tensors["images"], tensors["colors"], labels, args.protocol)

    kept, held = holdout_split(envs[train_idx], args.holdout_fraction, args.seed)
    if args.train_subset is not None:
        kept = first_of_each_env(kept, envs[train_idx], args.train_subset)
        per_step = args.train_subset * (1 if args.agreement_envs == "color" else 2)
        if args.batch_size > per_step:
            raise RunError(f"--batch_size ({args.batch_size}) exceeds the {per_step} training examples that "
                           f"--train_subset {args.train_subset} leaves "
                           + ("in each colour environment" if args.agreement_envs == "color" else "in all"))
    test_idx = test_idx[:args.test_subset]
    train_set = data.subset(train_idx[kept])
    env_sets = [data.subset(train_idx[kept][envs[train_idx[kept]] == e]) for e in (0, 1)]
    eval_loaders = {"train_eval": batch_loader(train_set, 1000, train=False)}
    relabelled = torch.searchsorted(kept, relabelled[torch.isin(relabelled, kept)])  # those trained on
    if len(relabelled):
        eval_loaders["relabelled"] = batch_loader(train_set.subset(relabelled), 1000, train=False)
    if len(held):
        eval_loaders["val"] = batch_loader(data.subset(train_idx[held]), 1000, train=False)
    eval_loaders["test"] = batch_loader(data.subset(test_idx), 1000, train=False)

    env_loaders = [batch_loader(s, args.batch_size, True, args.num_workers) for s in env_sets]
    if args.agreement_envs == "color":
        envs_per_step = args.envs_per_step or 2
        steps = min(len(s) for s in env_sets) // args.batch_size * (2 // envs_per_step)
        train_batches = lambda epoch: env_group_batches(env_loaders, envs_per_step)  # noqa: E731
    else:
        steps = len(train_set) // args.batch_size
        pooled = batch_loader(train_set, args.batch_size, True, args.num_workers)
        train_batches = lambda epoch: ((x, y, len(y)) for x, y in pooled)  # noqa: E731

    model = MLP(PROTOCOLS[args.protocol].n_inputs, args.n_hidden_units, args.n_hidden_layers, args.n_outputs,
                bool(args.batch_norm), args.dropout_p).to(device)
    optimizer = make_optimizer(args, model.parameters(), args.init_lr, args.weight_decay)
    # Stepped once per iteration: the learning rate drops after 3/4 of all iterations (None), or after
    # each epoch of --lr_milestones.
    milestones = ([3 * args.epochs * steps // 4] if args.lr_milestones is None
                  else [m * steps for m in args.lr_milestones])
    scheduler = MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return TrainSetup(model=model, optimizer=optimizer, loss_fn=loss_for(args.n_outputs), train_batches=train_batches,
                      eval_loaders=eval_loaders, epochs=args.epochs, scheduler=scheduler, scheduler_interval="step",
                      steps_per_epoch=steps, env_loaders=env_loaders)
