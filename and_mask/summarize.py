"""python -m and_mask.summarize RUNS [RUNS ...]: a Markdown table of finished runs, one row per setting.

Each RUNS is a run folder or a folder holding run folders (found by their config.json). Runs
are grouped by every flag that changes the numbers except the seed (`and_mask.core.runsets`, the
grouping plot_runs uses too), so the seeds of one setting form one row: mean ± std over seeds of
every final accuracy, of the last epoch's running training accuracy and mask density (mean over
parameter tensors), of the lower bound on the inconsistency I^ε when the runs estimated it
(--consistency_eps), and the mean seconds per epoch. The "other flags" column shows the flags
that differ between rows. Runs of several experiments give one section each. Reads only
config.json, metrics.jsonl and the run's lock and status, never retrains; unfinished or running
runs are listed on stderr and left out, unreadable ones are skipped with a warning.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from and_mask.core.collect import INCONSISTENCY, Metric, flags_text, run_groups, stat
from and_mask.core.flags import entry_parser
from and_mask.core.runfolder import CONFIG
from and_mask.core.runsets import find_runs, load_runs, varying
from and_mask.experiments.saved import entry_defaults

DENSITY = "mask density"


def mean_std(values, scale=100.0, digits=1):
    """'95.2 ± 8.3': `collect.stat` of `values`, scaled (default: a fraction as a percentage)."""
    s = stat(values)
    return f"{scale * s.mean:.{digits}f} ± {scale * s.std:.{digits}f}"


def columns(groups) -> list[tuple[str, str]]:
    """(header, sample value) of the table: every final accuracy, then the last epoch's running
    training accuracy, mask density, seconds per epoch and, where estimated, the inconsistency."""
    names = list(dict.fromkeys(k for g in groups.values() for sample in g.samples for k in sample))
    accuracies = [(f"final {k[:-4]} acc (%)", k) for k in names if k.endswith("_acc") and k != "train_acc"]
    tail = [(INCONSISTENCY, "inconsistency")] if "inconsistency" in names else []
    return accuracies + [("last-epoch train acc (%)", "train_acc"), (DENSITY, "mask_density"),
                         ("s/epoch", "seconds")] + tail


def table(groups) -> str:
    """The Markdown table of one experiment's groups ({runsets group key: collect.Group}) with finished runs."""
    differ = varying(groups)
    several_packages = any("package" in flags for flags in differ.values())
    shown = columns(groups)
    lines = ["| method | other flags | seeds | " + " | ".join(h for h, _ in shown) + " |",
             "|---" * (len(shown) + 3) + "|"]
    for key, group in sorted(groups.items(), key=lambda item: item[1].method):
        method = group.method + (f" ({group.flags['package']})" if several_packages else "")
        other = flags_text({k: v for k, v in differ[key].items() if k not in ("method", "package")}) or "defaults"
        cells = []
        for header, name in shown:
            s = group.stat(name)
            if s is None:
                cells.append("–")
            elif name == "seconds":
                cells.append(f"{s.mean:.1f}")
            else:
                digits = 2 if name in ("mask_density", "inconsistency") else 1
                scale = 100 if Metric(name).is_accuracy else 1
                cells.append(f"{scale * s.mean:.{digits}f} ± {scale * s.std:.{digits}f}")
        lines.append(f"| {method} | {other} | {len(group.samples)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser("and_mask.summarize", __doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="Run folders, or folders holding run folders.")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.runs if not p.is_dir()]
    if missing:
        parser.error(f"no such folder: {', '.join(missing)}")
    run_dirs = find_runs(args.runs)
    if not run_dirs:
        parser.error(f"no run folder (with a {CONFIG}) under {', '.join(map(str, args.runs))}")
    runs = load_runs(run_dirs)
    for run in runs:
        if not run.finished:
            print(f"(unfinished, left out: {run.path} ({run.state}))", file=sys.stderr)
    tables = {experiment: {key: group for key, group in groups.items() if group.samples}
              for experiment, groups in run_groups(runs, entry_defaults).items()}
    tables = {experiment: groups for experiment, groups in tables.items() if groups}
    if not tables:
        parser.error("no finished run among the given folders")
    for experiment, groups in tables.items():
        if len(tables) > 1:
            print(f"## {experiment}\n")
        print(table(groups) + ("\n" if len(tables) > 1 else ""))


if __name__ == "__main__":
    main()
