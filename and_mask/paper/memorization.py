"""Fig. 8 / 16: the AND-mask threshold τ against memorisation, on true and on random labels.

python -m and_mask.paper.memorization --out runs/memorization

Every point is an ordinary run of `gen_mask.run_cifar --method and_mask` (the sweep's
task labels-tauT-seedS in --out, resumed if interrupted) with every example of a batch as its own
environment. The defaults are the paper's (Appendix B.5): CIFAR-10, FastResNet, 80 epochs,
batches of 80, Adam 5e-4 with ×0.1 after epochs 40 and 60, τ ∈ {0, 0.05, 0.1, 0.2, 0.4, 0.6,
0.8} (τ = 0 is plain averaging), on the true labels and on labels all replaced by random ones,
two seeds; weight decay 1e-6 (before Adam) and rescaling, as in the original code's command.
The --dataset, --train_subset, --batch_size and --epochs flags shrink it (e.g. Fashion-MNIST as
32×32 images on a CPU).

Table and figure: final accuracy on the training set (with the labels it was trained on, in
eval mode) and on the test set, against τ, mean ± std over seeds.
"""
from __future__ import annotations

import argparse

import numpy as np

from and_mask.core.figures import figure, run_cli, save
from and_mask.core.flags import add_lr_milestones_flag, check_lr_milestones, entry_parser, positive_int
from and_mask.paper.runs import RunSpec, add_analysis_flags, analyse, run_options
from and_mask.summarize import mean_std

MODULE = "gen_mask.run_cifar"
FIG8_TAUS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8)
LABELS = {"true": "0", "random": "1"}  # --random_labels_fraction of each data set
# The original code's CIFAR command: weight decay 1e-6 added before Adam's moments, rescaled masks.
COMMON_FLAGS = ["--weight_decay", "1e-6", "--weight_decay_order", "before", "--quiet"]


def tau_list(text):
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated thresholds, got {text}")
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected thresholds in [0, 1], got {text}")
    return tuple(values)


def add_scale_flags(parser, milestone_fractions: tuple):
    """Data set and training size of the CIFAR-10 runs; the defaults are the paper's.

    The learning rate drops after the given fractions of --epochs unless --lr_milestones says otherwise.
    """
    group = parser.add_argument_group("scale (default: the paper's CIFAR-10 runs)")
    group.add_argument("--dataset", choices=["cifar10", "fashion_mnist"], default="cifar10",
                       help="cifar10, or fashion_mnist resized to 32×32 RGB.")
    group.add_argument("--data_path", default=None,
                       help="Torchvision root holding the data. Default: the repository's data/ folder.")
    group.add_argument("--train_subset", type=positive_int, default=None,
                       help="Train on the first N images only. Default: the whole training set.")
    group.add_argument("--test_subset", type=positive_int, default=None,
                       help="Evaluate on the first N test images only. Default: the whole test set.")
    group.add_argument("--epochs", type=positive_int, default=80, help="Training epochs of every run.")
    group.add_argument("--batch_size", type=positive_int, default=80,
                       help="Examples per step, each its own environment.")
    fractions = " and ".join(f"{f:g}" for f in milestone_fractions)
    add_lr_milestones_flag(group, f"after {fractions} of --epochs (the paper's at 80 epochs).")
    parser.set_defaults(milestone_fractions=milestone_fractions)


def check_scale(parser, args):
    """Fill --lr_milestones from the fractions of --epochs, or check the given ones."""
    if args.lr_milestones is None:
        args.lr_milestones = sorted({int(f * args.epochs) for f in args.milestone_fractions} - {0})
    check_lr_milestones(parser, args)


def scale_argv(args) -> list[str]:
    argv = ["--dataset", args.dataset, "--epochs", str(args.epochs), "--batch_size", str(args.batch_size)]
    if args.lr_milestones:
        argv += ["--lr_milestones", ",".join(map(str, args.lr_milestones))]
    for flag in ("data_path", "train_subset", "test_subset"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    return argv


def specs_of(args, options) -> list[RunSpec]:
    specs = []
    for labels, fraction in LABELS.items():
        for tau in args.taus:
            for seed in options.seeds:
                argv = [*COMMON_FLAGS, *scale_argv(args), "--method", "and_mask", "--agreement_threshold", f"{tau:g}",
                        "--init_lr", "5e-4", "--random_labels_fraction", fraction, "--seed", str(seed),
                        *options.common]
                specs.append(RunSpec(f"{labels}-tau{tau:g}-seed{seed}", MODULE, tuple(argv),
                                     {"labels": labels, "tau": tau, "seed": seed}))
    return specs


def cells_of(results) -> dict:
    """{(labels, τ): {"train": [...], "test": [...]}} of the final evaluations."""
    cells = {}
    for r in results:
        cell = cells.setdefault((r["labels"], r["tau"]), {"train": [], "test": []})
        cell["train"].append(r["final"]["train_eval_acc"])
        cell["test"].append(r["final"]["test_acc"])
    return cells


def table(cells, taus, args) -> str:
    scale = (f"{args.dataset}, {'all' if args.train_subset is None else args.train_subset} training images, "
             f"batches of {args.batch_size}, {args.epochs} epochs, learning rate ×0.1 after epochs "
             f"{','.join(map(str, args.lr_milestones)) or '(3/4 of all iterations)'}")
    lines = [f"Final accuracy (%) against the AND-mask threshold τ ({scale}); mean ± std over seeds (n). "
             "train: the training set with the labels it was trained on.", "",
             "| τ | true labels: train | true labels: test | random labels: train | random labels: test |",
             "|---|---|---|---|---|"]
    for tau in taus:
        row = [f"{tau:g}"]
        for labels in LABELS:
            cell = cells.get((labels, tau))
            row += ([f"{mean_std(cell['train'])} ({len(cell['train'])})", mean_std(cell["test"])] if cell
                    else ["–", "–"])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(cells, taus, args):
    fig, axes = figure(1, 1, "Accuracy against the AND-mask threshold")
    ax = axes[0, 0]
    x = np.arange(len(taus))
    for colour, labels in zip(("C0", "C1"), LABELS):
        for split, style in (("train", "o-"), ("test", "s--")):
            present = [i for i, tau in enumerate(taus) if (labels, tau) in cells]
            values = [cells[labels, taus[i]][split] for i in present]
            mean = np.array([np.mean(v) for v in values])
            spread = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values])
            ax.errorbar(x[present], mean, yerr=spread, fmt=style, color=colour, capsize=3,
                        label=f"{labels} labels: {split}")
    ax.set_xticks(x, [f"{tau:g}" for tau in taus])
    ax.set(xlabel="AND-mask threshold τ", ylabel="final accuracy", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save(fig, args, "memorization")


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser("and_mask.paper.memorization", __doc__)
    parser.add_argument("--taus", type=tau_list, default=FIG8_TAUS, help="Comma-separated thresholds τ in [0, 1].")
    add_scale_flags(parser, milestone_fractions=(0.5, 0.75))
    add_analysis_flags(parser, methods_default=None, seeds_default="0,1")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_scale(parser, args)
    options = run_options(parser, args)

    def report(results):
        cells = cells_of(results)
        return table(cells, args.taus, args), plot(cells, args.taus, args), cells

    return analyse(parser, args, specs_of(args, options), "memorization", report, figures=())


if __name__ == "__main__":
    run_cli(main)
