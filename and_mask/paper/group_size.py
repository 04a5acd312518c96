"""How many environments each step combines (G): the table and figure of the group-size study.

python -m gen_mask.sweep run gen_mask/sweeps/group_size.toml --out runs/group_size --workers 2
python -m and_mask.paper.group_size runs/group_size --out runs/group_size

The sweep trains `gen_mask.run_synthetic --protocol paper` (D = 32 environments) with each step
combining G of them; its tasks whose names start with "steps" hold the optimiser steps at those of
G = 32, the others train the paper's 94 epochs (see the sweep file). This command reads the
finished runs of the sweep folder (unfinished and failed ones are counted, not used) and writes
group_size.md and group_size.png into --out.

Per arm, method and G over seeds: the final test accuracy (mean ± std (n); an early-stopped run's
final evaluation is the one it stopped at), the best test accuracy of any evaluation, the training
accuracy of the last epoch, the optimiser steps, the kept share of every weight matrix (the mask
density, averaged over the epochs trained, first layer to last), the early stops, and the
difference of the final test accuracy to averaging at the same arm and G: paired by seed (the same
seed draws the same data and initial weights), mean and 95 % Student-t interval, "better" or
"worse" when the interval excludes 0 (`and_mask.core.collect.difference`).
"""
from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field

import numpy as np
from matplotlib.ticker import NullLocator

from and_mask.core.collect import difference
from and_mask.core.errors import RunError
from and_mask.core.figures import add_output_flags, claim_figures, figure, run_cli, save
from and_mask.core.flags import entry_parser
from and_mask.core.masks import AGREEMENT_THRESHOLD
from and_mask.core.runfolder import read_config, read_metrics
from and_mask.core.sweepfolder import SweepFolder, state_of
from and_mask.summarize import mean_std

REFERENCE = "mean"  # every other method is compared with averaging
THRESHOLD_METHODS = ("and_mask", "geom_mean")  # their label carries τ


@dataclass
class Cell:
    """The finished runs of one arm, method and G."""

    final: dict = field(default_factory=dict)  # seed -> final test accuracy
    best: list = field(default_factory=list)
    train: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    kept: list = field(default_factory=list)  # per run: {weight matrix: mean mask density over its epochs}
    stopped: int = 0


def label_of(flags: dict) -> str:
    """The method, with τ for a mask (a run that did not set it has the registry's default)."""
    if flags["method"] in THRESHOLD_METHODS:
        tau = flags.get("agreement_threshold")
        return f"{flags['method']} τ={AGREEMENT_THRESHOLD.default if tau is None else tau:g}"
    return flags["method"]


def kept_share(epochs: list[dict]) -> dict:
    """{weight matrix: mean over the epochs of its mask density}; {} when the method has no mask."""
    names = [n for n in epochs[0].get("mask_density", {}) if n.endswith("weight")] if epochs else []
    return {n: statistics.fmean(r["mask_density"][n] for r in epochs) for n in names}


def read_study(folder) -> tuple[dict, dict]:
    """({(arm, label, G): Cell} of the finished runs of the sweep folder, {state: count} of all its runs)."""
    sweep = SweepFolder(folder)
    cells, states = {}, {}
    for run in sweep.read()["runs"]:
        run_dir = sweep.run_dir(run["id"])
        state = state_of(run_dir).status
        states[state] = states.get(state, 0) + 1
        if state != "finished":
            continue
        flags = read_config(run_dir)["flags"]
        records = read_metrics(run_dir)
        epochs = [r for r in records if r.get("phase") == "epoch"]
        arm = "steps" if run["task"].startswith("steps") else "epochs"
        cell = cells.setdefault((arm, label_of(flags), flags["envs_per_step"]), Cell())
        cell.final[run["seed"]] = records[-1]["test_acc"]
        cell.best.append(max([r["test_acc"] for r in epochs] + [records[-1]["test_acc"]]))
        cell.train.append(epochs[-1]["train_acc"])
        cell.steps.append(sum(r["steps"] for r in epochs))
        cell.kept.append(kept_share(epochs))
        cell.stopped += "stopped_early" in records[-1]
    if not cells:
        raise RunError(f"no finished run in {folder}")
    return cells, states


def kept_text(kept: list[dict]) -> str:
    if not kept or not kept[0]:
        return "–"
    return " / ".join(f"{100 * statistics.fmean(k[n] for k in kept):.3g}" for n in kept[0])


def difference_text(cell: Cell, reference: Cell | None) -> str:
    if reference is None:
        return "–"
    d = difference(list(cell.final.items()), list(reference.final.items()), higher_is_better=True)
    if d.verdict == "too few seeds":
        return f"{100 * d.mean:+.1f} (too few seeds)"
    return f"{100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}] {d.verdict}"


def table(cells: dict, states: dict) -> str:
    lines = ["Group size G: environments combined per step, of D = 32 (paper protocol). Accuracies in %, mean ± std "
             "over seeds (n); kept: the mask density of each weight matrix in %, first layer to last, averaged over "
             "the epochs trained; vs averaging: final test accuracy minus averaging's at the same arm and G, paired "
             "by seed, 95 % interval.", "",
             "Runs of the sweep: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + "."]
    for arm, title in (("epochs", "the paper's 94 epochs at every G"),
                       ("steps", "the optimiser steps held at those of G = 32")):
        keys = sorted((k for k in cells if k[0] == arm), key=lambda k: (k[1] != REFERENCE, k[1], k[2]))
        if not keys:
            continue
        lines += ["", f"**{title}**", "",
                  "| method | G | steps | final test | best test | last-epoch train | kept (%) | early stops "
                  "| vs averaging |", "|---" * 9 + "|"]
        for key in keys:
            cell = cells[key]
            n = len(cell.final)
            reference = cells.get((arm, REFERENCE, key[2])) if key[1] != REFERENCE else None
            lines.append(f"| {key[1]} | {key[2]} | {statistics.fmean(cell.steps):.0f} "
                         f"| {mean_std(list(cell.final.values()))} ({n}) | {mean_std(cell.best)} "
                         f"| {mean_std(cell.train)} | {kept_text(cell.kept)} | {cell.stopped}/{n} "
                         f"| {difference_text(cell, reference)} |")
    return "\n".join(lines) + "\n"


def plot(cells: dict, args) -> list:
    fig, axes = figure(1, 2, "Final test accuracy against the group size G (D = 32)")
    colours = {label: f"C{i}" for i, label in enumerate(sorted({k[1] for k in cells}))}  # one per method, both panels
    for ax, arm in zip(axes[0], ("epochs", "steps")):
        labels = sorted({k[1] for k in cells if k[0] == arm})
        sizes = sorted({k[2] for k in cells if k[0] == arm})
        for label in labels:
            colour = colours[label]
            gs = [g for g in sizes if (arm, label, g) in cells]
            finals = [list(cells[arm, label, g].final.values()) for g in gs]
            ax.errorbar(gs, [np.mean(f) for f in finals], yerr=[np.std(f, ddof=1) if len(f) > 1 else 0 for f in finals],
                        fmt="o-", color=colour, capsize=3, label=label)
        ax.axhline(0.5, color="grey", linewidth=0.8)
        ax.set(title="94 epochs" if arm == "epochs" else "steps of G = 32", xlabel="G", ylabel="final test accuracy",
               ylim=(0.4, 1.02))
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(g) for g in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(alpha=0.3)
        if labels:
            ax.legend(fontsize="small")
    return save(fig, args, "group_size")


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser("and_mask.paper.group_size", __doc__)
    parser.add_argument("folder", help="The sweep folder of gen_mask/sweeps/group_size.toml.")
    add_output_flags(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    claimed = claim_figures(args, "and_mask.paper.group_size", ["group_size"])
    cells, states = read_study(args.folder)
    text = table(cells, states)
    claimed.publish(text, "group_size", plot(cells, args))
    return cells


if __name__ == "__main__":
    run_cli(main)
