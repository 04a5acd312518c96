"""python -m and_mask.summarize RUN_DIR [RUN_DIR ...]: a markdown table of final accuracies.

Runs are grouped by the flags that differ between them, ignoring --seed and --output_dir, so the
seeds of one configuration form one row: mean ± std (over seeds) of every final accuracy, and
of the last epoch's running training accuracy. Reads only config.json and metrics.jsonl.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from and_mask.core.runlog import read_config, read_metrics

IGNORED = {"seed", "output_dir", "quiet", "resume", "use_cuda", "num_workers"}


def load_runs(run_dirs):
    runs = []
    for run_dir in run_dirs:
        records = read_metrics(run_dir)
        final = [r for r in records if r.get("phase") == "final"]
        epochs = [r for r in records if r.get("phase") == "epoch"]
        if not final or not epochs:
            print(f"skipping {run_dir}: the run did not finish", file=sys.stderr)
            continue
        values = {k: v for k, v in final[-1].items() if k.endswith("_acc")}
        values["train_acc (running)"] = epochs[-1]["train_acc"]
        runs.append((read_config(run_dir)["flags"], values))
    return runs


def mean_std(values):
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def table(runs) -> str:
    keys = sorted({k for flags, _ in runs for k in flags} - IGNORED)
    varying = [k for k in keys if len({repr(flags.get(k)) for flags, _ in runs}) > 1]
    groups = {}
    for flags, values in runs:
        groups.setdefault(tuple(flags.get(k) for k in varying), []).append(values)
    columns = sorted({c for _, values in runs for c in values})
    lines = ["| " + " | ".join(varying + [f"{c} %" for c in columns] + ["seeds"]) + " |",
             "|" + "---|" * (len(varying) + len(columns) + 1)]
    for group, members in groups.items():
        cells = [str(v) for v in group]
        cells += [mean_std([m[c] for m in members if c in m]) for c in columns]
        lines.append("| " + " | ".join(cells + [str(len(members))]) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m and_mask.summarize", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.run_dirs if not (d / "config.json").exists()]
    if missing:
        parser.error(f"not a run folder (no config.json): {', '.join(missing)}")
    runs = load_runs(args.run_dirs)
    if not runs:
        parser.error("no finished run among the given folders")
    print(table(runs))


if __name__ == "__main__":
    main()
