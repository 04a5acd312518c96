"""CIFAR-10 with random labels: does a gradient combiner slow down the memorisation of noise?

A fraction of the training labels is replaced by random ones (seeded); the run tracks accuracy on
those relabelled examples, on the whole training set and on the test set. With τ > 0 every
example of a batch is its own environment: the per-example gradients go through the BatchNorm
statistics of the whole batch (engine "shared", exact), so the agreement mask keeps only the
directions on which the examples agree. With τ = 0 (or the `mean` combiner) the step is one
ordinary backward pass of the batch's mean loss. `--grad_engine vmap` is an explicit opt-in that
normalises every example with its own statistics: faster, but a different model.
"""
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import MultiStepLR

from and_mask.core.flags import (
    add_lr_milestones_flag,
    check_lr_milestones,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from and_mask.core.optim import add_optimizer_flags, check_optimizer_flags, make_optimizer
from and_mask.core.training import TrainSetup
from and_mask.datasets.cifar import DATASETS, make_loaders, make_random_label_data
from and_mask.models import FastResnet

NAME = "cifar"
# With τ > 0 each of the (default 80) examples is an environment and each environment's backward
# pass runs through the whole batch; 16 environments per batched backward bound the memory.
RUN_FLAG_DEFAULTS = {"grad_chunk_size": 16}
OUTPUT_DIR_REQUIRED = True  # as in the original


def add_flags(parser, package):
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="cifar10",
                      help="cifar10, or fashion_mnist resized to 32×32 and repeated to 3 channels.")
    data.add_argument("--data_path", default=None,
                      help="Torchvision root holding cifar-10-batches-py/ (or FashionMNIST/raw/). Default: the "
                           "repository's data/ folder.")
    data.add_argument("--download", type=int, choices=[0, 1], default=1,
                      help="1: try to download the data set when its files are missing; 0: never download.")
    data.add_argument("--random_labels_fraction", type=fraction, required=True,
                      help="Fraction of training images given a uniformly random label, drawn from --seed.")
    data.add_argument("--train_subset", type=positive_int, default=None,
                      help="Use only the first N training images (before relabelling). Default: all of them.")
    data.add_argument("--test_subset", type=positive_int, default=None,
                      help="Evaluate on the first N test images only. Default: all of them.")
    data.add_argument("--num_workers", type=non_negative_int, default=10,
                      help="DataLoader worker processes (0: load in the main process).")
    train = parser.add_argument_group("training")
    train.add_argument("--batch_size", type=positive_int, default=80,
                       help="Examples per step; with τ > 0 each is its own environment.")
    train.add_argument("--epochs", type=positive_int, default=80, help="Training epochs.")
    train.add_argument("--init_lr", type=positive_float, required=True,
                       help="Adam's learning rate at the start (see --lr_milestones).")
    add_lr_milestones_flag(train, "after 3/4 of all iterations, as in the original code (the paper: 40,60 of 80 "
                                  "epochs).")
    train.add_argument("--weight_decay", type=non_negative_float, required=True,
                       help="Weight decay coefficient, applied as --weight_decay_order says.")
    train.add_argument("--envs_per_step", type=positive_int, default=None,
                       help="Not available here: every example of a batch is its own environment, so a step "
                            "cannot take its batch from one environment. Default: unset (given, it is refused).")
    add_optimizer_flags(train, "adam_flexible_weight_decay")


def check_objective(args, objective) -> str | None:
    """No training objective applies: every example of a batch is its own environment."""
    return (f"--method {objective.name} is a training objective over environments, which the {NAME} experiment "
            "does not have (every example is its own environment)")


def check(args, parser):
    if args.train_subset is not None and args.batch_size > args.train_subset:
        parser.error(f"--batch_size ({args.batch_size}) exceeds --train_subset ({args.train_subset})")
    if args.envs_per_step is not None:
        parser.error("--envs_per_step is not available for cifar: every example of a batch is its own environment")
    check_optimizer_flags(args, parser)
    check_lr_milestones(parser, args)


def build(args, device) -> TrainSetup:
    if device.type == "cuda":
        # Reproducible convolutions: the same algorithms every run, at some cost in speed.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    data = make_random_label_data(args.dataset, args.data_path, args.random_labels_fraction, args.seed,
                                  args.train_subset, args.test_subset, download=bool(args.download))
    train_loader, eval_loaders = make_loaders(data, args.batch_size, args.num_workers)
    steps_per_epoch = len(train_loader)
    model = FastResnet().to(device)
    optimizer = make_optimizer(args, model.parameters(), args.init_lr, args.weight_decay)
    # Stepped once per iteration: the learning rate drops after 3/4 of all training steps, or after
    # each epoch of --lr_milestones.
    milestones = getattr(args, "lr_milestones", None)
    milestones = ([3 * args.epochs * steps_per_epoch // 4] if milestones is None
                  else [m * steps_per_epoch for m in milestones])
    scheduler = MultiStepLR(optimizer, milestones=milestones, gamma=0.1)

    def train_batches(epoch):
        # Every example is its own environment (E = batch size, one example each). For an
        # averaging combiner the loop takes the mean of these losses, the batch's mean loss.
        for inputs, target in train_loader:
            yield inputs, target, inputs.shape[0]

    return TrainSetup(model=model, optimizer=optimizer, loss_fn=F.cross_entropy, train_batches=train_batches,
                      eval_loaders=eval_loaders, epochs=args.epochs, scheduler=scheduler, scheduler_interval="step",
                      steps_per_epoch=steps_per_epoch)
