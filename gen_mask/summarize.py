"""python -m gen_mask.summarize RUNS_DIR [...]: one Markdown row per configuration of the runs below the folders.

Reads every run's config.json and metrics.jsonl (never retrains) and groups the runs by their
flags minus seed, output paths and flags left unset; reports mean ± std over seeds of the final test accuracy, the
last epoch's training accuracy and the mean mask density, and seconds per epoch. Unfinished runs
are listed and left out.
"""
import argparse
import statistics
import sys
from pathlib import Path

from and_mask.core.runlog import read_config, read_metrics

IGNORED = {"seed", "output_dir", "resume", "quiet", "use_cuda", "grad_engine", "grad_chunk_size"}


def mean_std(values, scale=100.0, digits=1):
    m = statistics.mean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def summarize(runs_dirs):
    groups, unfinished = {}, []
    for config_path in sorted(p for d in runs_dirs for p in Path(d).rglob("config.json")):
        run = config_path.parent
        records = read_metrics(run)
        if not records or records[-1].get("phase") != "final":
            unfinished.append(str(run))
            continue
        flags = read_config(run)["flags"]
        key = tuple(sorted((k, v) for k, v in flags.items() if k not in IGNORED and v is not None))
        epochs = [r for r in records if r.get("phase") == "epoch"]
        densities = list(epochs[-1]["mask_density"].values())
        groups.setdefault(key, []).append({
            "test": records[-1]["test_acc"], "train": epochs[-1]["train_acc"],
            "density": sum(densities) / len(densities),
            "seconds": statistics.mean(r["seconds"] for r in epochs)})
    return groups, unfinished


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dirs", nargs="+", metavar="RUNS_DIR")
    args = parser.parse_args(argv)
    groups, unfinished = summarize(args.runs_dirs)
    if not groups:
        sys.exit(f"error: no finished run under {' '.join(args.runs_dirs)}")
    keys = [set(k) for k in groups]
    common = set.intersection(*keys)
    print("| method | other flags | seeds | final test acc (%) | last-epoch train acc (%) | mask density | s/epoch |")
    print("|---|---|---|---|---|---|---|")
    for key, runs in sorted(groups.items(), key=lambda item: (dict(item[0])["method"], item[0])):
        flags = dict(key)
        other = " ".join(f"--{k} {v}" for k, v in sorted(set(key) - common) if k != "method") or "defaults"
        print(f"| {flags['method']} | {other} | {len(runs)} | {mean_std([r['test'] for r in runs])} | "
              f"{mean_std([r['train'] for r in runs])} | {mean_std([r['density'] for r in runs], 1, 2)} | "
              f"{statistics.mean(r['seconds'] for r in runs):.1f} |")
    for run in unfinished:
        print(f"(unfinished, left out: {run})", file=sys.stderr)


if __name__ == "__main__":
    main()
