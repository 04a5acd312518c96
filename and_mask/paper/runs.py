"""What the training analyses share: their runs are one sweep, which the sweep engine runs.

An analysis lists its runs as `RunSpec`s (a name, an entry module, its flags, and the labels its
tables group by). `analyse` writes them as a sweep file, OUT/sweep.toml (one task per run), and
runs the sweep engine on it in a child process, `python -m gen_mask.sweep run OUT/sweep.toml
--out OUT`: it checks every run's flags with its module's parser before anything trains (and,
with --dry_run, only prints the commands); runs that finished (their status.json says so) are
skipped, stopped ones continue with --resume, a failed one is reported and the others go on, and
--workers runs several at once.
`collect` reads the finished runs back from the sweep folder (`and_mask.core.sweepfolder`),
and the analysis writes its table and figures into OUT beside them.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from and_mask.core.curves import plot_metric
from and_mask.core.errors import RunError
from and_mask.core.figures import add_output_flags, claim_figures
from and_mask.core.files import atomic_write_text, make_folder
from and_mask.core.flags import MAX_SEED, positive_int
from and_mask.core.runfolder import INTERRUPTED_EXIT_CODES, read_config, read_metrics
from and_mask.core.runsets import load_runs
from and_mask.core.sweepfolder import SweepFolder, state_of

SWEEP_FILE = "sweep.toml"
ENGINE = "gen_mask.sweep"  # run by name in a child process: the engine sits above this package


@dataclass(frozen=True)
class RunSpec:
    name: str  # the run's task in the sweep, and how the analysis' messages name it
    module: str  # entry module, e.g. "gen_mask.run_synthetic"
    argv: tuple  # its flags, --seed included, without --output_dir and --resume
    labels: dict = field(default_factory=dict, compare=False)  # what the tables group by (method, seed, ...)

    def flags(self) -> tuple[dict, int]:
        """({flag: value as typed} for the sweep file, the seed): `--flag value`, or a bare `--flag` as true."""
        flags, words, i = {}, list(self.argv), 0
        while i < len(words):
            name = words[i][2:]
            if i + 1 < len(words) and not words[i + 1].startswith("--"):
                flags[name], i = words[i + 1], i + 2
            else:
                flags[name], i = True, i + 1
        return flags, int(flags.pop("seed", 0))


def sweep_toml(specs: list[RunSpec]) -> str:
    """The sweep file of `specs`: one [[task]] per run, with its module, seed and flags (values as typed)."""
    lines = [f"# The runs of this analysis, for `python -m {ENGINE} run`; written by the analysis, which reruns it."]
    for spec in specs:
        flags, seed = spec.flags()
        lines += ["", "[[task]]", f"name = {json.dumps(spec.name)}", f"module = {json.dumps(spec.module)}",
                  f"seeds = [{seed}]", "[task.flags]"]
        lines += [f"{name} = {'true' if value is True else json.dumps(value)}" for name, value in flags.items()]
    return "\n".join(lines) + "\n"


def add_analysis_flags(parser: argparse.ArgumentParser, methods_default: str | None, seeds_default: str):
    """Flags of every training analysis: methods (unless None), per-method and common flags, seeds, the
    runs at once, dry run, and the output flags (--out, --dpi, --pdf)."""
    group = parser.add_argument_group("runs")
    if methods_default is not None:
        group.add_argument("--methods", default=methods_default,
                           help="Comma-separated --method values of the run module (combiners or baselines).")
        group.add_argument("--method_flags", action="append", metavar="NAME=FLAGS",
                           help="Extra flags for one method, e.g. \"and_mask=--agreement_threshold 0.9\", after "
                                "the analysis' own for it; repeatable. Default: none.")
    group.add_argument("--run_flags", default=None,
                       help="Extra flags for every run, written --run_flags=\"--epochs 20\" (with the =); they "
                            "override the analysis' own. Default: none.")
    group.add_argument("--seeds", default=seeds_default, help="Comma-separated seeds of the runs.")
    group.add_argument("--workers", type=positive_int, default=1,
                       help="Runs trained at once, each a process of the sweep's local launcher.")
    group.add_argument("--dry_run", action="store_true",
                       help="Print the command of every run that is not finished, and train nothing.")
    add_output_flags(parser)


@dataclass(frozen=True)
class RunOptions:
    methods: list  # in the order given
    seeds: list
    per_method: dict  # method -> its extra flags
    common: list  # flags for every run, after the analysis' own

    def flags(self, method) -> list:
        return [*self.per_method.get(method, []), *self.common]


def run_options(parser, args, method_defaults=None) -> RunOptions:
    """The parsed --methods, --seeds, --method_flags and --run_flags, or a one-line parser error.

    `method_defaults` ({method: flags}) go before a method's --method_flags, so these override them.
    """
    methods = list(dict.fromkeys(m.strip() for m in getattr(args, "methods", "").split(",") if m.strip()))
    if hasattr(args, "methods") and not methods:
        parser.error("--methods: give at least one method")
    try:
        seeds = sorted({int(s) for s in args.seeds.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds}")
    if not seeds or min(seeds) < 0 or max(seeds) > MAX_SEED:
        parser.error(f"--seeds: expected integers in [0, 2**32 - 1], got {args.seeds}")
    per_method = {m: list(f) for m, f in (method_defaults or {}).items() if m in methods}
    try:
        for item in getattr(args, "method_flags", None) or ():
            name, sep, text = item.partition("=")
            if not sep or name.strip() not in methods:
                parser.error(f"--method_flags {item!r}: expected NAME=FLAGS with NAME one of --methods")
            per_method.setdefault(name.strip(), []).extend(shlex.split(text))
        common = shlex.split(args.run_flags or "")
    except ValueError as error:  # unbalanced quotes
        parser.error(f"--method_flags / --run_flags: {error}")
    return RunOptions(methods, seeds, per_method, common)


def by_method(results, methods) -> list:
    """[(method, its finished runs)] in the order of `methods`; a method without any gets []."""
    return [(method, [r for r in results if r["method"] == method]) for method in methods]


def method_seed_specs(module, options, base_flags) -> list[RunSpec]:
    """One run per method and seed (named METHOD-seedS): base flags, --method, --seed, then extra flags."""
    return [RunSpec(f"{method}-seed{seed}", module,
                    (*base_flags, "--method", method, "--seed", str(seed), *options.flags(method)),
                    {"method": method, "seed": seed})
            for method in options.methods for seed in options.seeds]


def _saved_stamp(out):
    """The identity of OUT's sweep.json (the engine rewrites it once it has accepted every run), or None."""
    try:
        found = SweepFolder(out).sweep_json.stat()
    except OSError:
        return None
    return found.st_ino, found.st_mtime_ns


def launch(parser, specs: list[RunSpec], out, dry_run: bool, workers: int) -> None:
    """Write the sweep file of `specs` into OUT and run it in a child process (`dry_run`: print its commands).

    The engine exits non-zero when a run did not finish (reported with the results) and when it
    refused the sweep before launching anything (a flag a module rejects, a sweep folder with other
    runs): then it has not rewritten sweep.json, and the analysis ends with a parser error. On
    Ctrl-C the child (which gets the signal too) stops its runs, which keep what they wrote; the
    analysis waits for it and ends with the status of an interrupted run.
    """
    make_folder(out, "--out")
    atomic_write_text(Path(out) / SWEEP_FILE, sweep_toml(specs))
    before = _saved_stamp(out)
    child = subprocess.Popen([sys.executable, "-m", ENGINE, "run", str(Path(out) / SWEEP_FILE), "--out", str(out),
                              "--launcher", "dry" if dry_run else "local", "--workers", str(workers)])
    try:
        status = child.wait()
    except KeyboardInterrupt:
        child.wait()
        raise SystemExit(INTERRUPTED_EXIT_CODES[0]) from None
    if status in INTERRUPTED_EXIT_CODES:
        raise SystemExit(status)
    if status != 0 and _saved_stamp(out) in (None, before):
        parser.error(f"the sweep engine refused the runs of {Path(out) / SWEEP_FILE} (its message is above)")


def collect(specs, out) -> tuple[list[dict], list[str]]:
    """(For every finished spec: its labels, final record, epoch records and flags in effect; a line
    for every failed one), read from the sweep folder OUT."""
    folder = SweepFolder(out)
    by_task = {run["task"]: run for run in folder.read()["runs"]}
    results, failures = [], []
    for spec in specs:
        run = by_task.get(spec.name)
        if run is None:
            continue
        run_dir = folder.run_dir(run["id"])
        state = state_of(run_dir)
        if state.status == "failed":
            failures.append(f"{spec.name}: {state.error or f'exit status {state.exit_code}'}")
        if state.status != "finished":
            continue
        records = read_metrics(run_dir)
        results.append({**spec.labels, "name": spec.name, "dir": run_dir, "final": records[-1],
                        "epochs": [r for r in records if r.get("phase") == "epoch"],
                        "flags": read_config(run_dir)["flags"]})
    if not results:
        raise RunError(f"no finished run in {out}" + (f" ({len(failures)} failed)" if failures else ""))
    return results, failures


def analyse(parser, args, specs, name, report, figures=("accuracy",)):
    """Check and run `specs` as one sweep in --out (or, with --dry_run, print their commands), then report.

    `report(results)` gets the finished runs (`collect`) and returns (Markdown text, figure
    paths, value); the figures are those named in `figures`, claimed in --out before any run
    starts (`and_mask.core.figures.claim_figures`: another command's figures are not replaced
    without --overwrite). The text is written to --out/NAME.md and printed with the paths, then
    the failures, and the value returned (None after a dry run).
    """
    claimed = None if args.dry_run else claim_figures(args, f"and_mask.paper.{name}", [*figures, name])
    launch(parser, specs, args.out, args.dry_run, args.workers)
    if args.dry_run:
        return None
    results, failures = collect(specs, args.out)
    text, drawn, value = report(results)
    claimed.publish(text, name, drawn)
    for line in failures:
        print(f"failed: {line}")
    return value


def plot_curves(args, results) -> list:
    """accuracy.png: every accuracy curve of the runs, mean ± std by method."""
    runs = {str(run.path): run for run in load_runs([r["dir"] for r in results])}
    groups = {}
    for result in results:
        groups.setdefault(result["method"], []).append(runs[str(result["dir"])])
    return plot_metric(args, groups, "_acc", "accuracy", "accuracy")
