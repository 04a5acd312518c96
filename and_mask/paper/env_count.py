"""Fig. 15: how many training environments does averaging need before it learns the spiral?

python -m and_mask.paper.env_count --out runs/env_count

Every point is an ordinary run of `gen_mask.run_synthetic --protocol paper` (the sweep's
task METHOD-envsD-seedS in --out, resumed if interrupted). Only the split of the data into D
environments changes from point to point: the training set has --total_examples examples
(default 40 960 = 32 × 1280, the paper protocol's), D environments of total/D each; every step
combines all D environments with --examples_per_step/D examples from each (default 4096 =
32 × 128); every run trains --epochs epochs (default 94 = ⌈3000/32⌉, the paper protocol's budget
at D = 32) with the paper's learning-rate drops and early stop. So the data, the step size, the
number of steps and the budget are the same for every D. With --envs_per_step G a step combines
a group of min(G, D) environments instead (drawn as `--envs_per_step` draws them), so at D > G the
steps are D/G times more and smaller.

At the paper's scale instead (--examples_per_env N, "the same experimental condition as in the
main paper"): D environments of N examples each (1280 in the paper), batches of the protocol's 128
per environment, ⌈3000/D⌉ epochs (the protocol's, unless --epochs), so every run sees about
3000·N training examples whatever D; the data set grows with D.

Table and figure: per method and D, the final test accuracy (mean ± std over seeds) and, as in
Fig. 15, the best over seeds of the highest test accuracy any evaluation reached.
"""
from __future__ import annotations

import argparse

import numpy as np
from matplotlib.ticker import NullLocator

from and_mask.core.figures import figure, run_cli, save
from and_mask.core.flags import entry_parser, positive_int, positive_list, probability
from and_mask.paper.runs import RunSpec, add_analysis_flags, analyse, run_options
from and_mask.summarize import mean_std

MODULE = "gen_mask.run_synthetic"
FIG15_ENVS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The paper's best synthetic setting (Appendix B.3.1): Adam 1e-2, 256 units × 3 layers, L2 1e-4.
BASE_FLAGS = ["--protocol", "paper", "--weight_decay", "1e-4", "--quiet"]


def group_size(args, d: int) -> int:
    """Environments combined per step at D = d: all of them, or --envs_per_step when fewer."""
    return d if args.envs_per_step is None else min(args.envs_per_step, d)


def resolve_design(args, parser):
    """Fill the design flags not given: a fixed total of examples, or the paper's scale with --examples_per_env."""
    if args.examples_per_env is not None:
        if args.total_examples is not None or args.examples_per_step is not None:
            parser.error("--examples_per_env (the paper's scale) excludes --total_examples and --examples_per_step")
        return
    args.total_examples = args.total_examples or 40960
    args.examples_per_step = args.examples_per_step or 4096
    args.epochs = args.epochs or 94
    for d in args.envs:
        if args.total_examples % d or args.examples_per_step % d:
            parser.error(f"{d} environments do not divide --total_examples ({args.total_examples}) and "
                         f"--examples_per_step ({args.examples_per_step})")
    if args.examples_per_step > args.total_examples:
        parser.error("--examples_per_step exceeds --total_examples")


def design_flags(args, d: int) -> list[str]:
    """The data and schedule flags of the runs at D = d."""
    if args.examples_per_env is not None:  # the protocol's batch size and ⌈3000/D⌉ epochs unless --epochs
        return ["--examples_per_env", str(args.examples_per_env), *(["--epochs", str(args.epochs)] if args.epochs
                                                                    else [])]
    return ["--examples_per_env", str(args.total_examples // d), "--batch_size", str(args.examples_per_step // d),
            "--epochs", str(args.epochs)]


def specs_of(args, parser, options) -> list[RunSpec]:
    resolve_design(args, parser)
    for d in args.envs:
        if d % group_size(args, d):
            parser.error(f"--envs_per_step {args.envs_per_step} does not divide {d} environments")
    specs = []
    for method in options.methods:
        for d in args.envs:
            for seed in options.seeds:
                argv = [*BASE_FLAGS, "--method", method, "--n_envs", str(d), *design_flags(args, d),
                        "--envs_per_step", str(group_size(args, d)), "--seed", str(seed), *options.flags(method)]
                specs.append(RunSpec(f"{method}-envs{d}-seed{seed}", MODULE, tuple(argv),
                                     {"method": method, "envs": d, "seed": seed}))
    return specs


def best_accuracy(result) -> float:
    """The highest test accuracy of any evaluation of the run (before each epoch and at the end)."""
    return max([r["test_acc"] for r in result["epochs"]] + [result["final"]["test_acc"]])


def summarise(results, methods, envs, success: float):
    """{(method, D): {"final": [...], "best": [...], "stopped": n}} and the first D each method succeeds at."""
    cells = {}
    for r in results:
        cell = cells.setdefault((r["method"], r["envs"]), {"final": [], "best": [], "stopped": 0})
        cell["final"].append(r["final"]["test_acc"])
        cell["best"].append(best_accuracy(r))
        cell["stopped"] += "stopped_early" in r["final"]
    first = {m: next((d for d in envs if (m, d) in cells and max(cells[m, d]["best"]) >= success), None)
             for m in methods}
    return cells, first


def table(cells, first, methods, envs, args) -> str:
    if args.examples_per_env is not None:
        design = (f"D environments of {args.examples_per_env} examples each, 128 per environment per step, "
                  + (f"{args.epochs} epochs" if args.epochs else "⌈3000/D⌉ epochs"))
    else:
        design = (f"{args.total_examples} training examples split into D environments, {args.examples_per_step} "
                  f"examples per step, {args.epochs} epochs")
    lines = [f"Test accuracy (%) against the number of training environments D: {design}"
             + (f", steps combining min({args.envs_per_step}, D) environments." if args.envs_per_step else "."),
             "final: mean ± std over seeds (n); best: the best over seeds of the highest test accuracy of any "
             "evaluation (Fig. 15); stopped: runs ended by the early stop.", "",
             "| D | examples per environment | " + " | ".join(f"{m}: final | {m}: best | {m}: stopped"
                                                         for m in methods) + " |",
             "|---" * (2 + 3 * len(methods)) + "|"]
    for d in envs:
        row = [str(d), str(args.examples_per_env or args.total_examples // d)]
        for m in methods:
            cell = cells.get((m, d))
            row += ([mean_std(cell["final"]) + f" ({len(cell['final'])})", f"{100 * max(cell['best']):.1f}",
                     str(cell["stopped"])] if cell else ["–", "–", "–"])
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for m in methods:
        where = f"first at D = {first[m]}" if first[m] else "at no D measured"
        lines.append(f"- {m}: best test accuracy ≥ {100 * args.success_acc:.0f} % {where}.")
    return "\n".join(lines) + "\n"


def plot(cells, methods, envs, args):
    fig, axes = figure(1, 1, "Test accuracy vs training environments")
    ax = axes[0, 0]
    for colour, m in zip(("C0", "C1", "C2", "C3", "C4", "C5"), methods):
        ds = [d for d in envs if (m, d) in cells]
        best = [max(cells[m, d]["best"]) for d in ds]
        final = np.array([np.mean(cells[m, d]["final"]) for d in ds])
        spread = np.array([np.std(cells[m, d]["final"], ddof=1) if len(cells[m, d]["final"]) > 1 else 0 for d in ds])
        ax.plot(ds, best, "o-", color=colour, label=f"{m}: best over seeds")
        ax.plot(ds, final, "--", color=colour, label=f"{m}: final, mean ± std")
        ax.fill_between(ds, np.clip(final - spread, 0, 1), np.clip(final + spread, 0, 1), color=colour, alpha=0.2,
                        linewidth=0)
    ax.axhline(0.5, color="grey", linewidth=0.8)
    ax.set(xlabel="training environments D", ylabel="test accuracy", ylim=(0.4, 1.02))
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(envs), [str(d) for d in envs], minor=False)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save(fig, args, "env_count")


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser("and_mask.paper.env_count", __doc__)
    group = parser.add_argument_group("design")
    group.add_argument("--envs", type=positive_list(positive_int, "numbers of environments"), default=FIG15_ENVS,
                       help="Comma-separated numbers of training environments D; each divides the two sizes below.")
    group.add_argument("--total_examples", type=positive_int, default=None,
                       help="Training examples, split into D. Default: 40960 (unless --examples_per_env).")
    group.add_argument("--examples_per_step", type=positive_int, default=None,
                       help="Examples per step, examples_per_step/D from each environment. Default: 4096 (unless "
                            "--examples_per_env).")
    group.add_argument("--examples_per_env", type=positive_int, default=None,
                       help="The paper's scale: D environments of this many examples each (the paper: 1280), the "
                            "protocol's batches of 128 per environment and ⌈3000/D⌉ epochs. Default: a fixed total.")
    group.add_argument("--epochs", type=positive_int, default=None,
                       help="Training epochs of every run. Default: 94 at a fixed total, ⌈3000/D⌉ at the paper's "
                            "scale.")
    group.add_argument("--envs_per_step", type=positive_int, default=None,
                       help="Environments G whose batches make one step (a group of a fresh random partition, "
                            "G = min(G, D), dividing every D); the examples per step are then G/D of "
                            "--examples_per_step. Default: all D at every step (not the paper protocol's default "
                            "G = min(16, D)).")
    group.add_argument("--success_acc", type=probability, default=0.9,
                       help="A method succeeds at D when its best test accuracy reaches this.")
    add_analysis_flags(parser, methods_default="mean,and_mask", seeds_default="0,1,2,3,4")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    options = run_options(parser, args)
    methods = options.methods

    def report(results):
        cells, first = summarise(results, methods, args.envs, args.success_acc)
        return table(cells, first, methods, args.envs, args), plot(cells, methods, args.envs, args), (cells, first)

    return analyse(parser, args, specs_of(args, parser, options), "env_count", report, figures=())


if __name__ == "__main__":
    run_cli(main)
