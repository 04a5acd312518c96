"""Reading many run folders without mixing them: find them, load them, group them.

The one grouping used by every tool that reads many runs (summarize, plot_runs, sweep
collectors): runs go into one section per experiment, and within it into groups whose runs
differ only in their seed (`runfolder.group_key`: every flag that changes the numbers, seeds
aside). A run folder that cannot be read (damaged config.json, metrics.jsonl or status.json) is
skipped with a warning naming it, never silently and never with a traceback.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from and_mask.core.errors import RunError
from and_mask.core.files import warn
from and_mask.core.runfolder import CONFIG, group_key, read_config, read_metrics, run_state


@dataclass
class Run:
    path: Path
    config: dict
    records: list  # metrics.jsonl
    state: str  # runfolder.run_state: running, finished, failed, interrupted, unfinished

    @property
    def flags(self) -> dict:
        return self.config["flags"]

    @property
    def finished(self) -> bool:
        """Its final evaluation is logged and no process is still writing it."""
        return self.state != "running" and bool(self.records) and self.records[-1]["phase"] == "final"


def find_runs(paths) -> list[Path]:
    """The run folders (those with a config.json) among `paths` and below them, sorted."""
    return sorted({config.parent for path in paths for config in Path(path).rglob(CONFIG)})


def load_runs(run_dirs) -> list[Run]:
    """Every readable run of `run_dirs`; each unreadable one is skipped with a warning naming it."""
    runs = []
    for path in map(Path, run_dirs):
        try:
            runs.append(Run(path, read_config(path), read_metrics(path), run_state(path).status))
        except RunError as error:
            warn(f"skipping {path}: {error}")
    return runs


# (package, experiment) -> the flag defaults of the runs it writes ({} when unknown): a flag that a run's
# config.json lacks, because the run predates the flag, counts as its default, so that upgrading the
# code between runs does not split a group (`and_mask.experiments.saved.entry_defaults`).
DefaultsOf = Callable[[str, str], dict]


def sections(runs, defaults_of: DefaultsOf) -> "OrderedDict[str, OrderedDict[tuple, list[Run]]]":
    """{experiment: {group key: runs}}, in the order the runs come; a group's runs differ only in seed."""
    out = OrderedDict()
    for run in runs:
        key = group_key(run.config, defaults_of(run.config.get("package"), run.config["experiment"]))
        out.setdefault(run.config["experiment"], OrderedDict()).setdefault(key, []).append(run)
    return out


def key_flags(key: tuple) -> dict:
    """The flags (seeds aside) that a group key stands for, with the package as "package"."""
    return {"package": key[1], **json.loads(key[2])}


def differing(flag_sets: dict) -> dict:
    """{key: {flag: value}} of the flags whose values are not the same in every one of `flag_sets` ({key: flags})."""
    names = {name for flags in flag_sets.values() for name in flags}
    differ = {n for n in names if len({json.dumps(f.get(n), sort_keys=True) for f in flag_sets.values()}) > 1}
    return {key: {n: v for n, v in flags.items() if n in differ} for key, flags in flag_sets.items()}


def varying(keys) -> dict:
    """{key: {flag: value}} of the flags (and package) whose values are not the same in every group."""
    return differing({key: key_flags(key) for key in keys})
