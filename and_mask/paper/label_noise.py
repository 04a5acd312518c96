"""Fig. 9: 25 % noisy labels; does a method fit the wrong labels or keep predicting the true ones?

python -m and_mask.paper.label_noise --out runs/label_noise

Every run is `gen_mask.run_cifar --random_labels_fraction 0.25` (the sweep's task
METHOD-seedS in --out, resumed if interrupted), every example of a batch its own environment. The defaults are the
paper's (Appendix B.5): CIFAR-10, FastResNet, 80 epochs, batches of 80, learning rate ×0.1 after
epoch 60; averaging (`mean`) at its best learning rate 1e-3 and AND-mask at τ = 0.2 with its best
5e-3 (with rescaling); weight decay 1e-6 before Adam, as the original code's command. A quarter
of the training images get a uniform random label (the paper shuffled a quarter of the labels);
`relabelled` is the part whose label changed, scored against the wrong labels: a model that
memorises them climbs towards 100 %, one that predicts the true classes stays below chance (10 %).

Writes label_noise.md (final and best accuracies, and the paper's claim with a verdict) and
accuracy.png, the accuracy curves of the runs (its relabelled and test panels are Fig. 9).
"""
from __future__ import annotations

import argparse
import statistics

from and_mask.core.figures import run_cli
from and_mask.core.flags import entry_parser, probability
from and_mask.paper.memorization import COMMON_FLAGS, add_scale_flags, check_scale, scale_argv
from and_mask.paper.runs import add_analysis_flags, analyse, by_method, method_seed_specs, plot_curves, run_options
from and_mask.summarize import mean_std

MODULE = "gen_mask.run_cifar"
CHANCE = 0.1  # ten classes
# The paper's best learning rates (Appendix B.5) and AND-mask threshold.
PAPER_METHOD_FLAGS = {"mean": ["--init_lr", "1e-3"], "and_mask": ["--agreement_threshold", "0.2", "--init_lr", "5e-3"]}


def verdict(method, relabelled, memorised: float) -> str:
    mean = statistics.fmean(relabelled)
    if method == "and_mask":
        return ("well below chance on the relabelled part (Fig. 9): "
                + ("holds here" if mean < CHANCE else "does not hold here"))
    if method == "mean":
        return ("memorises the wrong labels (Fig. 9): "
                + ("holds here" if mean >= memorised else "does not hold here"))
    return "not in the paper's label-noise run: no verdict"


def table(results, methods, args) -> str:
    lines = [f"25 % random labels, {args.dataset}; accuracy (%) at the end and the best of any evaluation, mean ± std "
             f"over seeds (n). relabelled: scored against the wrong labels (chance 10 %); a claim of memorising "
             f"holds at ≥ {100 * args.memorised_acc:.0f} % there.", "",
             "| method | relabelled: final | relabelled: max | test: final | test: best (epoch) | train_eval: final "
             "| paper's claim: verdict |", "|---" * 7 + "|"]
    for method, runs in by_method(results, methods):
        if not runs:
            lines.append(f"| {method} | – | – | – | – | – | no finished run |")
            continue
        evaluations = [r["epochs"] + [r["final"]] for r in runs]
        relabelled = [r["final"]["relabelled_acc"] for r in runs]
        peaks = [max(range(len(e)), key=lambda i: e[i]["test_acc"]) for e in evaluations]
        best_test = [e[i]["test_acc"] for e, i in zip(evaluations, peaks)]
        # evaluation i happened after i epochs of training (the loop evaluates before each epoch)
        peak_epochs = ", ".join(str(i) for i in peaks)
        lines.append(f"| {method} | {mean_std(relabelled)} ({len(runs)}) "
                     f"| {mean_std([max(x['relabelled_acc'] for x in e) for e in evaluations])} "
                     f"| {mean_std([r['final']['test_acc'] for r in runs])} | {mean_std(best_test)} ({peak_epochs}) "
                     f"| {mean_std([r['final']['train_eval_acc'] for r in runs])} "
                     f"| {verdict(method, relabelled, args.memorised_acc)} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser("and_mask.paper.label_noise", __doc__)
    parser.add_argument("--noise_fraction", type=probability, default=0.25,
                        help="Fraction of training images given a random label.")
    parser.add_argument("--memorised_acc", type=probability, default=0.5,
                        help="Averaging counts as having memorised the wrong labels at this relabelled accuracy.")
    add_scale_flags(parser, milestone_fractions=(0.75,))
    add_analysis_flags(parser, methods_default="mean,and_mask", seeds_default="0,1,2")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_scale(parser, args)
    if args.noise_fraction == 0:
        parser.error("--noise_fraction must be above 0: the analysis scores the relabelled images")
    options = run_options(parser, args, method_defaults=PAPER_METHOD_FLAGS)
    base = [*COMMON_FLAGS, *scale_argv(args), "--random_labels_fraction", f"{args.noise_fraction:g}"]
    return analyse(parser, args, method_seed_specs(MODULE, options, base), "label_noise",
                   lambda results: (table(results, options.methods, args), plot_curves(args, results), results))


if __name__ == "__main__":
    run_cli(main)
