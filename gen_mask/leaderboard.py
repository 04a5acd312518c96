"""python -m gen_mask.leaderboard: every registered combiner on every task over seeds, then one table.

The tasks are a sweep file of gen_mask/sweeps/ (`--budget`: `leaderboard_quick.toml`, a short
version of each task for a 2-core machine; `leaderboard_full.toml`, the settings of the READMEs'
tables) or one of your own (`--tasks`). A random-label task on Fashion-MNIST runs on CIFAR-10
where its files are in its data folder (`with_cifar10`). Each task's method flag (--method;
--methods for gen_mask.run_erm_irm) takes the values its file lists (baselines such as ERM and
IRM) followed by every combiner of `gen_mask_utils.COMBINERS`, a user's plugins included
(GEN_MASK_PLUGINS), except those in the task's [not_run] table and those the module cannot run
(listed as not run, with the reason).
The sweep is launched like `python -m gen_mask.sweep run` (same folder, launchers, skip / resume
/ retry) and then collected like `python -m gen_mask.sweep collect`: DIR/leaderboard.md,
leaderboard.csv and leaderboard.png. A new combiner registered later adds its own runs to the
same folder; the others are skipped as finished.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from and_mask.core.errors import RunError
from and_mask.core.flags import entry_parser
from and_mask.datasets.cifar import cifar10_present
from gen_mask.erm_irm.fit import valid_methods
from gen_mask.gen_mask_utils import COMBINERS
from gen_mask.sweep import cli
from gen_mask.sweep.spec import parse_spec, read_spec

SWEEPS = Path(__file__).resolve().parent / "sweeps"
BUDGETS = {"quick": SWEEPS / "leaderboard_quick.toml", "full": SWEEPS / "leaderboard_full.toml"}


def erm_irm_combiners() -> tuple[list[str], dict]:
    """The combiners gen_mask.run_erm_irm runs, and {combiner: reason} of those it cannot."""
    valid = set(valid_methods())
    return ([n for n in COMBINERS if n in valid],
            {n: "needs Hessian-vector products, which the benchmark's batched fits do not compute"
             for n in COMBINERS if n not in valid})


def every_combiner() -> tuple[list[str], dict]:
    return list(COMBINERS), {}


# module: (its method flag, the combiners it runs and {combiner: why not} of the others)
METHOD_FLAGS = {"gen_mask.run_erm_irm": ("methods", erm_irm_combiners)}
DEFAULT_METHOD_FLAG = ("method", every_combiner)


def _method_flag(raw: dict, table: dict) -> tuple:
    return METHOD_FLAGS.get(table.get("module", raw.get("module")), DEFAULT_METHOD_FLAG)


def baselines(raw: dict) -> set[str]:
    """The methods that the tasks of `raw` list themselves."""
    return {m for table in raw["task"] for m in
            {**raw.get("grid", {}), **table.get("grid", {})}.get(_method_flag(raw, table)[0], [])}


def with_combiners(raw: dict, only: list[str] | None = None) -> dict:
    """The sweep `raw` (a sweep file's dict, with [[task]] tables) with each task's method flag
    listing its baselines and every combiner it can run (`only`: just these methods)."""
    tasks = []
    for table in raw["task"]:
        flag, combiners = _method_flag(raw, table)
        listed = {**raw.get("grid", {}), **table.get("grid", {})}.get(flag, [])
        not_run = {**raw.get("not_run", {}), **table.get("not_run", {})}
        runnable, unsupported = combiners()
        methods = [m for m in dict.fromkeys([*listed, *runnable])
                   if m not in not_run and (only is None or m in only)]
        not_run = {m: why for m, why in {**unsupported, **not_run}.items() if only is None or m in only}
        if not methods:
            raise RunError(f"task {table.get('name')}: none of {', '.join(only or [])} runs on it")
        table = {**table, "grid": {**table.get("grid", {}), flag: methods}, "not_run": not_run}
        if flag in table.get("seeds_for", {}):  # fewer seeds for some methods: those that run
            table["seeds_for"] = {**table["seeds_for"],
                                  flag: {m: s for m, s in table["seeds_for"][flag].items() if m in methods}}
        tasks.append(table)
    return {**raw, "task": tasks}


def with_cifar10(raw: dict) -> dict:
    """`raw` with each random-label task on Fashion-MNIST moved to CIFAR-10 (the paper's data set)
    when CIFAR-10's files are in the task's --data_path; the task's name says so."""
    tasks = []
    for table in raw["task"]:
        flags = {**raw.get("flags", {}), **table.get("flags", {})}
        if (table.get("module", raw.get("module")) == "gen_mask.run_cifar" and flags.get("dataset") == "fashion_mnist"
                and cifar10_present(flags.get("data_path"))):
            table = {**table, "name": f"{table.get('name', 'cifar')}_cifar10",
                     "flags": {**table.get("flags", {}), "dataset": "cifar10"}}
        tasks.append(table)
    return {**raw, "task": tasks}


def _methods(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser("gen_mask.leaderboard", __doc__)
    parser.add_argument("--budget", choices=BUDGETS, default=None,
                        help="The tasks' settings: quick (a small version of each task) or full (the READMEs' "
                             "settings). Default: quick, unless --tasks is given.")
    parser.add_argument("--tasks", type=Path, default=None,
                        help="A sweep file with [[task]] tables to use instead of the budget's. Default: none, the "
                             "budget's file.")
    parser.add_argument("--methods", type=_methods, default=None,
                        help="Comma-separated methods to run instead of every registered one, e.g. a new "
                             "combiner and mean. Default: every baseline of the tasks and every registered combiner.")
    cli.add_launch_flags(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tasks is not None and args.budget is not None:
        parser.error("give --budget or --tasks, not both")
    try:
        raw = read_spec(args.tasks or BUDGETS[args.budget or "quick"])
        where = str(args.tasks or BUDGETS[args.budget or "quick"])
        parse_spec(raw, where)  # checked as written, before the methods are filled in
        if "task" not in raw:
            raise RunError(f"{where} has no [[task]] tables")
        unknown = sorted(set(args.methods or []) - set(COMBINERS) - baselines(raw))
        if unknown:
            parser.error(f"--methods names {', '.join(unknown)}, neither a registered combiner nor a task's baseline")
        tasks = parse_spec(with_combiners(with_cifar10(raw), args.methods), where)
        status = cli.launch(tasks, args, parser)
        if args.launcher != "dry" and not (args.launcher == "slurm" and args.slurm_detach):
            cli.write_leaderboard(args.out, "training_domain", quiet=True)
            print(f"wrote {Path(args.out, 'leaderboard.md')}, leaderboard.csv and leaderboard.png", file=sys.stderr)
    except RunError as error:
        sys.exit(f"error: {error}")
    if status:
        sys.exit(status)
    return status


if __name__ == "__main__":
    main()
