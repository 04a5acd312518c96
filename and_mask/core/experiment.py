"""What an experiment module gives the shared command line (`and_mask.core.cli`): the `Experiment` protocol.

Each module of `and_mask.experiments` satisfies it with module-level names (a module is an object
whose attributes are its globals): its flags, their checks, whether training objectives over
environments apply, and the `TrainSetup` that the one training loop trains.
"""
from __future__ import annotations

import argparse
from typing import Protocol

import torch

from and_mask.core.training import TrainSetup


class Experiment(Protocol):
    NAME: str  # the experiment's name: `run_<NAME>` of each package, config.json's "experiment"
    RUN_FLAG_DEFAULTS: dict  # run flags whose default this experiment changes, e.g. {"use_cuda": "0"}
    OUTPUT_DIR_REQUIRED: bool  # True where the original code required --output_dir

    def add_flags(self, parser: argparse.ArgumentParser, package: str) -> None:
        """The experiment's flags; `package` ("and_mask" or "gen_mask") where the two packages differ."""

    def check(self, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
        """Refuse impossible combinations of flags with `parser.error` (one line, exit status 2)."""

    def check_objective(self, args: argparse.Namespace, objective) -> str | None:
        """Why the training objective `objective` (IRM, V-REx, DANN) cannot run with these flags, or None."""

    def build(self, args: argparse.Namespace, device: torch.device) -> TrainSetup:
        """Data, model, optimiser and schedule of one run."""
