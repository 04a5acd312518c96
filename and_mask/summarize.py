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
import statistics
import sys
from pathlib import Path

from and_mask.core.cli import entry_parser
from and_mask.core.runfolder import as_typed
from and_mask.core.runlog import CONFIG
from and_mask.core.runsets import find_runs, key_flags, load_runs, sections, varying

DENSITY = "mask density"
INCONSISTENCY = "inconsistency I^ε ≥"  # a lower bound (and_mask.core.consistency)


def mean_std(values, scale=100.0, digits=1):
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def numbers(run) -> dict:
    """The table's numbers of one finished run."""
    epochs = [r for r in run.records if r["phase"] == "epoch"]
    densities = list(epochs[-1]["mask_density"].values())
    out = {f"final {k[:-4]} acc (%)": v for k, v in run.records[-1].items() if k.endswith("_acc")}
    out.update({"last-epoch train acc (%)": epochs[-1]["train_acc"], DENSITY: sum(densities) / len(densities),
                "s/epoch": statistics.fmean(r["seconds"] for r in epochs)})
    if "inconsistency" in run.records[-1]:
        out[INCONSISTENCY] = run.records[-1]["inconsistency"]
    return out


def summarize(runs):
    """{experiment: {group key: [per-run numbers]}} of the finished runs, and the paths of the others."""
    tables, left_out = {}, []
    for experiment, groups in sections(runs).items():
        for key, members in groups.items():
            for run in members:
                if not run.finished:
                    left_out.append(f"{run.path} ({run.state})")
                    continue
                try:
                    row = numbers(run)
                except (KeyError, TypeError, IndexError, ZeroDivisionError, AttributeError):
                    print(f"warning: skipping {run.path}: its metrics.jsonl lacks the numbers of a finished run",
                          file=sys.stderr)
                    continue
                tables.setdefault(experiment, {}).setdefault(key, []).append(row)
    return tables, left_out


def table(groups) -> str:
    differing = varying(groups)
    several_packages = any("package" in flags for flags in differing.values())
    columns = list(dict.fromkeys(c for runs in groups.values() for numbers in runs for c in numbers))
    lines = ["| method | other flags | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for key, runs in sorted(groups.items(), key=lambda item: str(key_flags(item[0]).get("method"))):
        flags = key_flags(key)
        method = f"{flags.get('method')}" + (f" ({flags['package']})" if several_packages else "")
        other = " ".join(f"--{k} {as_typed(v)}" for k, v in sorted(differing[key].items())
                         if k not in ("method", "package") and v is not None) or "defaults"
        cells = []
        for column in columns:
            values = [numbers[column] for numbers in runs if column in numbers]
            if column == "s/epoch":
                cells.append(f"{statistics.fmean(values):.1f}")
            else:
                cells.append(mean_std(values, 1, 2) if column in (DENSITY, INCONSISTENCY) else mean_std(values))
        lines.append(f"| {method} | {other} | {len(runs)} | " + " | ".join(cells) + " |")
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
    tables, left_out = summarize(load_runs(run_dirs))
    for run in left_out:
        print(f"(unfinished, left out: {run})", file=sys.stderr)
    if not tables:
        parser.error("no finished run among the given folders")
    for experiment, groups in tables.items():
        if len(tables) > 1:
            print(f"## {experiment}\n")
        print(table(groups) + ("\n" if len(tables) > 1 else ""))


if __name__ == "__main__":
    main()
