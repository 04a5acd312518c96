"""Sweeps of any entry module of either package, run on this machine or on a SLURM cluster.

`python -m gen_mask.sweep COMMAND`; a subcommand is an entry of COMMANDS: (help text,
add_flags(parser), main(args, parser) -> exit status).

`run` expands the sweep (a file, flags, or the sweep.json saved in --out), checks every run's
flags with its module's parser, writes DIR/sweep.json, then starts what is left: runs never
started from scratch, interrupted ones with --resume, failed ones only with --retry_failed;
finished and running ones are left alone, and so are runs whose SLURM job is still queued.
Nothing is ever deleted. A second launch on the same folder is refused while one runs.

`collect` writes DIR/leaderboard.md, leaderboard.csv and leaderboard.png (`gen_mask.sweep.collect`).
"""
from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
import tomllib

from and_mask.core.collect import SELECTIONS
from and_mask.core.errors import RunError
from and_mask.core.flags import HelpFormatter, entry_parser, non_negative_int, positive_int, seed_int
from and_mask.core.sweepfolder import SweepFolder
from gen_mask.sweep import local, slurm
from gen_mask.sweep.jobs import Job, carried_env, interfaces
from gen_mask.sweep.spec import PlannedRun, expand, load_spec, parse_spec

SHOWN_FAILURES = 10  # failed runs listed after a launch


def dry_launch(jobs, args) -> list[None]:
    """`--launcher dry`: print the commands, one a line, for any other scheduler; nothing runs."""
    try:
        for job in jobs:
            print(shlex.join(job.command), flush=True)
    except BrokenPipeError:  # the reader stopped early (`| head`): stop printing, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return [None] * len(jobs)


def _no_flags(parser):
    pass


LAUNCHERS = {"local": (local.add_flags, local.launch), "slurm": (slurm.add_flags, slurm.launch),
             "dry": (_no_flags, dry_launch)}


def _value(text: str):
    """A flag value written on the command line, read as in the sweep file (20, 1e-3, true) or kept as text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text}")
    return name, value


def _seed_list(text: str) -> list[int]:
    try:
        return [seed_int(s) for s in text.split(",")]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds in [0, 2**32 - 1], got {text}")


def add_launch_flags(parser: argparse.ArgumentParser):
    """The flags of a launch: the sweep folder, the launcher and each launcher's own flags."""
    parser.add_argument("--out", required=True, help="The sweep folder (sweep.json, runs/, logs/, slurm/).")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="Where the runs go: local processes, a SLURM job array, or printed commands (dry).")
    parser.add_argument("--retry_failed", action="store_true",
                        help="Also rerun failed runs (from their last checkpoint where the module resumes).")
    parser.add_argument("--quiet", action="store_true", help="Show no progress bar.")
    for add_flags, _ in LAUNCHERS.values():
        add_flags(parser)


def add_run_command_flags(parser: argparse.ArgumentParser):
    parser.add_argument("sweep", nargs="?", default=None,
                        help="The sweep file (TOML). Default: the sweep given by --module and the flags below, or "
                             "else the one saved in --out.")
    add_launch_flags(parser)
    group = parser.add_argument_group("a sweep from flags (instead of a file)")
    group.add_argument("--module", default=None,
                       help="The entry module of every run, e.g. gen_mask.run_synthetic. Default: none, the sweep "
                            "comes from the file or from --out.")
    group.add_argument("--name", default=None, help="The task's name. Default: the module's name without run_.")
    group.add_argument("--seeds", type=_seed_list, default=None,
                       help="Comma-separated --seed values of the runs. Default: 0 alone.")
    group.add_argument("--flag", type=_assignment, action="append", default=None, metavar="NAME=VALUE",
                       help="A flag of every run (true: a bare --NAME); repeat for several. Default: none.")
    group.add_argument("--grid", type=_assignment, action="append", default=None, metavar="NAME=V1,V2,...",
                       help="A flag that takes every listed value; repeat for several (every combination). "
                            "Default: none.")
    group.add_argument("--random", type=_assignment, action="append", default=None, metavar="NAME=KIND:A:B",
                       help="A drawn flag: log_uniform:LOW:HIGH, uniform:LOW:HIGH, int_uniform:LOW:HIGH or "
                            "choice:V1:V2:...; repeat for several. Default: none.")
    group.add_argument("--n_random", type=positive_int, default=None,
                       help="Draws of the random search. Default: none, which --random needs.")
    group.add_argument("--random_seed", type=non_negative_int, default=0, help="Seed of the random search's draws.")


def _spec_from_flags(args) -> dict:
    raw = {"module": args.module, "seeds": args.seeds if args.seeds is not None else [0],
           "flags": {name: _value(value) for name, value in args.flag or []},
           "grid": {name: [_value(v) for v in values.split(",")] for name, values in args.grid or []}}
    if args.name is not None:
        raw["name"] = args.name
    if args.random or args.n_random is not None:
        raw["random"] = {"n": args.n_random, "seed": args.random_seed}
        for name, text in args.random or []:
            kind, *values = text.split(":")
            raw["random"][name] = {kind: [_value(v) for v in values]}
    return raw


def _tasks(args, parser):
    spec_flags = [f"--{name}" for name in ("name", "seeds", "flag", "grid", "random", "n_random")
                  if getattr(args, name) is not None]
    if args.sweep is not None and (args.module is not None or spec_flags):
        parser.error(f"give a sweep file or --module with its flags, not both ({', '.join(spec_flags) or '--module'})")
    if args.module is None and spec_flags:
        parser.error(f"{', '.join(spec_flags)} describe a sweep of --module; give --module too")
    if args.sweep is not None:
        return load_spec(args.sweep)
    if args.module is not None:
        return parse_spec(_spec_from_flags(args), "command line")
    return None


def _plan(runs, found, folder: SweepFolder, args) -> tuple[list[Job], dict]:
    """The jobs to launch, and how many runs are in each situation."""
    states = folder.states()
    unsettled = {run_id for run_id, state in states.items() if state.status not in ("finished", "running")}
    queued = slurm.queued_runs(folder, unsettled)
    jobs, counts = [], {}
    for run in runs:
        status = "queued" if run.id in queued else states[run.id].status
        counts[status] = counts.get(status, 0) + 1
        if status in ("finished", "running", "queued") or (status == "failed" and not args.retry_failed):
            continue
        interface = found[run.module]
        jobs.append(Job(run_id=run.id, module=run.module, args=tuple(run.args), output_flag=interface.output_flag,
                        resume_flag=interface.resume_flag, run_dir=folder.run_dir(run.id).resolve(),
                        log=folder.log_path(run.id).resolve(), resume=status != "empty", env=carried_env()))
    return jobs, counts


def _report(folder: SweepFolder) -> int:
    """Print where the sweep stands; 0 when every run has finished."""
    states = folder.states()
    counts = {}
    for state in states.values():
        counts[state.status] = counts.get(state.status, 0) + 1
    print(f"{folder.path}: {len(states)} runs, " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
          file=sys.stderr)
    failed = [(run_id, s) for run_id, s in states.items() if s.status == "failed"]
    for run_id, state in failed[:SHOWN_FAILURES]:
        print(f"  failed {run_id} (exit {state.exit_code}): {state.error}", file=sys.stderr)
    if len(failed) > SHOWN_FAILURES:
        print(f"  ... and {len(failed) - SHOWN_FAILURES} more failed runs", file=sys.stderr)
    return 0 if counts.get("finished", 0) == len(states) else 1


def run_main(args, parser) -> int:
    return launch(_tasks(args, parser), args, parser)


def launch(tasks, args, parser) -> int:
    """Save the sweep of `tasks` (None: the one saved in args.out) and launch its runs that have not
    finished, with the flags of `add_launch_flags`; 0 when every run has finished."""
    if args.launcher == "slurm" and args.slurm_time * 60 <= args.slurm_signal_delay_s:
        parser.error(f"--slurm_time ({args.slurm_time} min) must exceed --slurm_signal_delay_s "
                     f"({args.slurm_signal_delay_s} s), when a job is told to stop")
    folder = SweepFolder(args.out)
    with folder.lock():
        if tasks is None:
            saved = folder.read()
            runs = [PlannedRun.from_json(record) for record in saved["runs"]]
            task_records = saved["tasks"]
        else:
            runs = expand(tasks)
            task_records = [t.to_json() for t in tasks]
        found = interfaces(runs)
        for record in task_records:
            record.update(output_flag=found[record["module"]].output_flag,
                          resume_flag=found[record["module"]].resume_flag)
        folder.write(task_records, [run.to_json() for run in runs])
        jobs, counts = _plan(runs, found, folder, args)
        resumed = sum(job.resume for job in jobs)
        print(f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
              + f"; launching {len(jobs) - resumed} new and {resumed} resumed"
              + ("" if args.retry_failed or not counts.get("failed") else " (--retry_failed reruns failed runs)"),
              file=sys.stderr)
        if args.launcher == "dry":
            dry_launch(jobs, args)
            return 0
        if jobs:
            try:
                LAUNCHERS[args.launcher][1](jobs, args)
            except KeyboardInterrupt:
                sys.exit(f"interrupted; the same command continues the stopped runs (--out {args.out})")
        if args.launcher == "slurm" and args.slurm_detach:
            return 0
        return _report(folder)


def add_collect_flags(parser: argparse.ArgumentParser):
    parser.add_argument("out", metavar="DIR", help="The sweep folder (the --out of `run`).")
    parser.add_argument("--selection", choices=[s for s in SELECTIONS if not SELECTIONS[s].reads_test],
                        default="training_domain",
                        help="The rule, fixed in advance, that chooses each method's setting where a task searches "
                             "hyper-parameters; the oracle's choice (by the test metric) is always shown apart.")
    parser.add_argument("--quiet", action="store_true", help="Print nothing but warnings and errors.")


def write_leaderboard(out, selection: str, quiet: bool):
    """Write DIR/leaderboard.md, .csv and .png of the sweep folder `out`; print the Markdown unless `quiet`."""
    # lazy: collecting reads every module's defaults (torchvision, the ERM/IRM benchmark), seconds that
    # `run`, which each analysis and test starts in a child process, does not need
    from gen_mask.sweep import leaderboard_files
    from gen_mask.sweep.collect import collect

    text = leaderboard_files.write(out, collect(out, selection), selection)
    if not quiet:
        print(text)


def collect_main(args, parser) -> int:
    if not SweepFolder(args.out).exists():
        parser.error(f"{args.out} holds no sweep (no sweep.json): give the --out of `python -m gen_mask.sweep run`")
    write_leaderboard(args.out, args.selection, args.quiet)
    return 0


COMMANDS = {"run": ("Expand a sweep and launch those of its runs that have not finished.", add_run_command_flags, run_main),
            "collect": ("Tabulate a sweep folder: DIR/leaderboard.md, leaderboard.csv and leaderboard.png.",
                        add_collect_flags, collect_main)}


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser("gen_mask.sweep", __doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="What to do.")
    for name, (help_text, add_flags, command_main) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter,
                                      add_help=False)
        command.add_argument("-h", "--help", action="help", help="Show this help message and exit.")
        add_flags(command)
        command.set_defaults(main=functools.partial(command_main, parser=command))
    return parser


def main(argv=None) -> int:
    """Parse `argv` (else the command line), run the subcommand; exits non-zero unless it succeeded."""
    args = build_parser().parse_args(argv)
    try:
        status = args.main(args)
    except RunError as error:
        sys.exit(f"error: {error}")
    if status:
        sys.exit(status)
    return status
