"""python -m and_mask.summarize RUNS [RUNS ...]: a Markdown table of finished runs, one row per setting.

Each RUNS is a run folder or a folder holding run folders (found by their config.json). Runs
are grouped by their flags minus the seed, output and device flags, so the seeds of one setting
form one row: mean ± std over seeds of every final accuracy, of the last epoch's running
training accuracy and mask density (mean over parameter tensors), and the mean seconds per
epoch. Reads only config.json and metrics.jsonl, never retrains; unfinished runs are listed on
stderr and left out.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from and_mask.core.cli import entry_parser
from and_mask.core.runlog import CONFIG, read_config, read_metrics

IGNORED = {"seed", "output_dir", "resume", "quiet", "use_cuda", "grad_engine", "grad_chunk_size", "num_workers"}


def mean_std(values, scale=100.0, digits=1):
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def flag_value(value):
    """A flag's value as written on the command line: a list (e.g. --lr_milestones) as comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, list) else value


def find_runs(paths) -> list[Path]:
    return sorted({config.parent for path in paths for config in Path(path).rglob(CONFIG)})


def summarize(run_dirs):
    """{flag items: [per-run numbers]} for the finished runs, and the list of unfinished ones."""
    groups, unfinished = {}, []
    for run in run_dirs:
        records = read_metrics(run)
        epochs = [r for r in records if r.get("phase") == "epoch"]
        if not epochs or records[-1].get("phase") != "final":
            unfinished.append(str(run))
            continue
        flags = read_config(run)["flags"]
        key = tuple(sorted((k, flag_value(v)) for k, v in flags.items() if k not in IGNORED))
        densities = list(epochs[-1]["mask_density"].values())
        numbers = {f"final {k[:-4]} acc (%)": v for k, v in records[-1].items() if k.endswith("_acc")}
        numbers.update({"last-epoch train acc (%)": epochs[-1]["train_acc"],
                        "mask density": sum(densities) / len(densities),
                        "s/epoch": statistics.fmean(r["seconds"] for r in epochs)})
        groups.setdefault(key, []).append(numbers)
    return groups, unfinished


def table(groups) -> str:
    common = set.intersection(*(set(key) for key in groups))
    columns = list(dict.fromkeys(c for runs in groups.values() for numbers in runs for c in numbers))
    lines = ["| method | other flags | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for key, runs in sorted(groups.items(), key=lambda item: str(dict(item[0]).get("method"))):
        flags = dict(key)
        other = " ".join(f"--{k} {v}" for k, v in sorted(set(key) - common, key=str)
                         if k != "method" and v is not None) or "defaults"
        cells = []
        for column in columns:
            values = [numbers[column] for numbers in runs if column in numbers]
            if column == "s/epoch":
                cells.append(f"{statistics.fmean(values):.1f}")
            else:
                cells.append(mean_std(values, 1, 2) if column == "mask density" else mean_std(values))
        lines.append(f"| {flags.get('method')} | {other} | {len(runs)} | " + " | ".join(cells) + " |")
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
    groups, unfinished = summarize(run_dirs)
    for run in unfinished:
        print(f"(unfinished, left out: {run})", file=sys.stderr)
    if not groups:
        parser.error("no finished run among the given folders")
    print(table(groups))


if __name__ == "__main__":
    main()
