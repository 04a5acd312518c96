"""What the training analyses share: ordinary runs in sub-folders, resumed where they stopped.

An analysis is a list of `RunSpec`s (a sub-folder name, an entry module and its flags).
`validate` checks every spec's flags with the module's parser (a typo fails before anything
trains); `run_all` runs each one in this process with `module.main(argv + ["--output_dir",
folder])`: a finished run (its metrics.jsonl ends with the final evaluation) is skipped, a
started one is continued with --resume, and a run that fails with an error is reported and the
others go on; `collect` reads the runs back without training. `analyse` does the three and
writes the analysis' table and figures.
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from and_mask.core.flags import MAX_SEED
from and_mask.core.errors import RunError
from and_mask.core.runfolder import CONFIG, INTERRUPTED_EXIT_CODES, read_config, read_metrics
from vizualization import plot_runs
from vizualization.plotting import add_output_flags, claim_figures


@dataclass(frozen=True)
class RunSpec:
    name: str  # sub-folder of the analysis folder
    module: str  # entry module, e.g. "gen_mask.run_synthetic"
    argv: tuple  # its flags, without --output_dir and --resume
    labels: dict = field(default_factory=dict, compare=False)  # what the tables group by (method, seed, ...)

    def command(self, out) -> str:
        return shlex.join(["python", "-m", self.module, *self.argv, "--output_dir", str(Path(out) / self.name)])


def add_run_flags(parser: argparse.ArgumentParser, methods_default: str | None, seeds_default: str):
    """Flags of every training analysis: methods (unless None), per-method and common flags, seeds, dry
    run, and the output flags (--out, --dpi, --pdf)."""
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
    """One run per method and seed (sub-folder METHOD-seedS): base flags, --method, --seed, then extra flags."""
    return [RunSpec(f"{method}-seed{seed}", module,
                    (*base_flags, "--method", method, "--seed", str(seed), *options.flags(method)),
                    {"method": method, "seed": seed})
            for method in options.methods for seed in options.seeds]


def is_finished(run_dir) -> bool:
    records = read_metrics(run_dir)
    return bool(records) and records[-1].get("phase") == "final"


def validate(parser, specs):
    """Parse every spec's flags with its module's parser; the first bad one is this parser's error."""
    for spec in specs:
        try:
            importlib.import_module(spec.module).build_parser().parse_args([*spec.argv, "--output_dir", "unused"])
        except SystemExit:
            parser.error(f"{spec.module} refuses the flags of run {spec.name} (its message is above)")


def run_all(specs, out, dry_run=False) -> list[str]:
    """Train every unfinished spec into out/NAME; returns one line per run that failed."""
    out = Path(out)
    failures = []
    for spec in specs:
        folder = out / spec.name
        if is_finished(folder):
            continue
        if dry_run:
            print(spec.command(out))
            continue
        argv = [*spec.argv, "--output_dir", str(folder)] + (["--resume"] if (folder / CONFIG).exists() else [])
        print(f"[{spec.name}] {spec.command(out)}", flush=True)
        module, saved_argv = importlib.import_module(spec.module), sys.argv
        sys.argv = [module.__file__, *argv]  # config.json records the run's own command line
        try:
            module.main(argv)
        except SystemExit as stop:
            if stop.code in INTERRUPTED_EXIT_CODES:  # Ctrl-C ends the whole analysis, not just this run
                raise
            message = f"exit status {stop.code}" if isinstance(stop.code, int) else str(stop.code)
            failures.append(f"{spec.name}: {message}")
            print(f"[{spec.name}] failed: {message}", file=sys.stderr, flush=True)
        finally:
            sys.argv = saved_argv
    return failures


def collect(specs, out) -> list[dict]:
    """For every finished spec: its labels, final record, epoch records and flags in effect."""
    results = []
    for spec in specs:
        folder = Path(out) / spec.name
        if not is_finished(folder):
            continue
        records = read_metrics(folder)
        results.append({**spec.labels, "name": spec.name, "dir": folder, "final": records[-1],
                        "epochs": [r for r in records if r.get("phase") == "epoch"],
                        "flags": read_config(folder)["flags"]})
    if not results:
        raise RunError(f"no finished run under {out}")
    return results


def analyse(parser, args, specs, name, report, figures=("accuracy",)):
    """Check and run `specs` into --out (or, with --dry_run, print their commands), then report.

    `report(results)` gets the finished runs (`collect`) and returns (Markdown text, figure
    paths, value); the figures are those named in `figures`, claimed in --out before any run
    starts (`vizualization.plotting.claim_figures`: another command's figures are not replaced
    without --overwrite). The text is written to --out/NAME.md and printed with the failures and
    paths, and the value returned (None after a dry run).
    """
    validate(parser, specs)
    claimed = None if args.dry_run else claim_figures(args, f"and_mask.paper.{name}", [*figures, name])
    failures = run_all(specs, args.out, args.dry_run)
    if args.dry_run:
        return None
    text, drawn, value = report(collect(specs, args.out))
    paths = drawn + [claimed.save_text(text, name)]
    claimed.finish()
    print(text)
    for line in failures:
        print(f"failed: {line}")
    for path in paths:
        print(path)
    return value


def plot_curves(args, results) -> list:
    """accuracy.png: every accuracy curve of the runs, mean ± std by method (as `vizualization.plot_runs`)."""
    experiments = plot_runs.group_runs(plot_runs.load([r["dir"] for r in results]))
    # An analysis runs one experiment; its groups are the methods (and settings) compared.
    (groups,) = experiments.values()
    return plot_runs.plot_metric(args, groups, "_acc", "accuracy", "accuracy")
