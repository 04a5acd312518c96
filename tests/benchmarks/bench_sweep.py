"""Throughput of the local sweep launcher: --workers 2 against --workers 1, and its cost per run.

A sweep of --runs one-thread synthetic runs (AND-mask, seeds 0, 1, ...) is launched into fresh
folders with `--workers 1` and with `--workers 2`, --repeats times, alternating; the ratio of the
median wall-clock times is the speed-up (on 2 idle cores, ideally 2). The same commands are also
run one after another without the launcher; the difference, divided by the number of runs, is
the launcher's cost per run. Relaunching a finished sweep (every run skipped) measures the
launcher's fixed cost: start, reading the sweep, checking every run's flags.

    python tests/benchmarks/bench_sweep.py [--runs 8] [--epochs 20] [--repeats 1]
"""
import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def run(command) -> tuple[float, str]:
    """Seconds taken by `command`, and its stdout."""
    start = time.perf_counter()
    out = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: {shlex.join(command)} failed: {out.stderr.strip()}")
    return time.perf_counter() - start, out.stdout


def sweep(spec: Path, out: Path, *flags) -> list[str]:
    return [sys.executable, "-m", "gen_mask.sweep", "run", str(spec), "--out", str(out), "--quiet", *flags]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8, help="runs in the sweep")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of each synthetic run (default size)")
    parser.add_argument("--repeats", type=int, default=1, help="launches of each setting; the median is reported")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and data set, to check the script")
    args = parser.parse_args()
    flags = {"method": '"and_mask"', "epochs": args.epochs, "use_cuda": 0, "quiet": "true"}
    if args.tiny:
        flags.update(examples_per_env=32, n_envs=2, batch_size=16, n_test=64, n_hidden_units=16, n_hidden_layers=1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = tmp / "bench.toml"
        spec.write_text(f'module = "gen_mask.run_synthetic"\nseeds = {args.runs}\n[flags]\n'
                        + "".join(f"{k} = {v}\n" for k, v in flags.items()))
        times = {1: [], 2: []}
        for repeat in range(args.repeats):
            for workers in (1, 2):
                folder = tmp / f"w{workers}-{repeat}"
                times[workers].append(run(sweep(spec, folder, "--workers", str(workers), "--threads_per_run", "1"))[0])
        relaunch = run(sweep(spec, tmp / "w1-0", "--workers", "1"))[0]
        dry = run(sweep(spec, tmp / "direct", "--launcher", "dry"))[1].splitlines()
        direct = sum(run(shlex.split(line))[0] for line in dry)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(f"{args.runs} runs of `{' '.join(shlex.split(dry[0])[1:-2])}`")
    print(f"{'setting':<34}{'seconds':>9}")
    print(f"{'commands one after another':<34}{direct:>9.1f}")
    print(f"{'sweep --workers 1':<34}{one:>9.1f}")
    print(f"{'sweep --workers 2':<34}{two:>9.1f}")
    print(f"{'relaunch, every run finished':<34}{relaunch:>9.1f}")
    print(f"speed-up of --workers 2: {one / two:.2f}x")
    print(f"launcher cost per run, (workers 1 - direct) / runs: {(one - direct) / args.runs:.2f} s, of which "
          f"{(one - direct - relaunch) / args.runs:.2f} s beyond the fixed cost of a relaunch")


if __name__ == "__main__":
    main()
