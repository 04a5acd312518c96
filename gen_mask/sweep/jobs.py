"""From runs to commands: each module's output and resume flags, flags checked before launch.

A module's parser (`build_parser()`) tells where its outputs go (`--output_dir`, or `--out` for
the ERM/IRM benchmark) and whether it continues a run with `--resume`; a module without one
(e.g. `--resume` absent) continues by running the same command again. Every run's flags are
parsed by its module's parser before anything starts, so a misspelt flag stops the launch with
one line instead of failing a hundred jobs. A module without `build_parser()` (a user's script)
is taken to accept `--output_dir` and `--resume`, unchecked.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from and_mask.core.errors import RunError
from gen_mask.sweep.spec import PlannedRun

OUTPUT_FLAGS = ("output_dir", "out")
# Environment variables a job carries from the launch to wherever it runs (a SLURM node may not
# get the launcher's environment): the plugin modules that register a user's methods.
CARRIED_VARIABLES = ("GEN_MASK_PLUGINS",)


@dataclass(frozen=True)
class Interface:
    output_flag: str
    resume_flag: str | None
    parser: argparse.ArgumentParser | None


@dataclass(frozen=True)
class Job:
    """One command to run; `resume` adds the module's resume flag."""

    run_id: str
    module: str
    args: tuple
    output_flag: str
    resume_flag: str | None
    run_dir: Path
    log: Path
    resume: bool = False
    env: tuple = ()  # (name, value) pairs set in the run's environment (`carried_env`)

    @property
    def command(self) -> list[str]:
        words = [sys.executable, "-m", self.module, *self.args, f"--{self.output_flag}", str(self.run_dir)]
        return words + ([f"--{self.resume_flag}"] if self.resume and self.resume_flag else [])

    def resumed(self) -> "Job":
        return dataclasses.replace(self, resume=True)


def carried_env() -> tuple:
    """The CARRIED_VARIABLES set in this process, as a Job's `env`."""
    return tuple((name, os.environ[name]) for name in CARRIED_VARIABLES if name in os.environ)


def interface(module: str) -> Interface:
    """The output and resume flags of `module`, from its parser when it has one."""
    try:
        imported = importlib.import_module(module)
    except ImportError as error:
        raise RunError(f"cannot import the sweep's module {module}: {error}")
    if not hasattr(imported, "build_parser"):
        return Interface("output_dir", "resume", None)
    parser = imported.build_parser()
    options = parser._option_string_actions
    output = next((flag for flag in OUTPUT_FLAGS if f"--{flag}" in options), None)
    if output is None:
        raise RunError(f"{module} has neither --output_dir nor --out; a sweep cannot give each run its folder")
    return Interface(output, "resume" if "--resume" in options else None, parser)


class _Rejected(Exception):
    pass


def _raise(message):
    raise _Rejected(message)


def check_flags(run: PlannedRun, found: Interface):
    """RunError when the module's parser rejects the run's flags."""
    if found.parser is None:
        return
    parser = found.parser
    parser.error = _raise  # argparse reports through error(); one line instead of usage and exit
    try:
        parser.parse_args([*run.args, f"--{found.output_flag}", "runs/check"])
    except _Rejected as error:
        raise RunError(f"task {run.task}: {run.module} rejects `{' '.join(run.args)}`: {error}")


def interfaces(runs: list[PlannedRun]) -> dict[str, Interface]:
    """{module: Interface} of the modules of `runs`, every run's flags checked."""
    found = {}
    for run in runs:
        if run.module not in found:
            found[run.module] = interface(run.module)
        check_flags(run, found[run.module])
    return found
