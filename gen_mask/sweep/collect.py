"""A sweep folder's outcomes as table rows: every run read, grouped, counted, and selected.

Reads DIR/sweep.json and each run's folder, nothing else (never the scheduler, never retraining).
Per task, a row (`and_mask.core.collect.Group`) holds the runs of one method that differ only in
their seed: its key is every flag of the run's command that changes the numbers
(`runfolder.number_flags`), seed and method aside. A finished run gives its samples (a module's
`Reader` reads them); every run is counted as finished, failed (with the last line of its error),
unfinished (interrupted, killed or not started) or running. Two runs of one row whose config.json
files disagree on a flag the sweep does not set (e.g. made by different versions of the code)
are never mixed: the row is split, with a warning.

How a task is reported comes from its sweep file (`spec.REPORT_KEYS`) over its module's
defaults (`DEFAULT_METRICS`): the headline metric and its direction, the validation metric,
the searched hyper-parameters (default: the flags of its random search) and the methods not run.
Where a task searches, the rows of one method that differ only in the searched flags are the
candidates of a selection rule (`and_mask.core.collect.SELECTIONS`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from and_mask.core.collect import SELECTIONS, Group, Metric, finished_values, select
from and_mask.core.errors import RunError
from and_mask.core.files import warn
from and_mask.core.runfolder import CONFIG, number_flags, read_config, read_metrics
from and_mask.core.sweepfolder import SweepFolder
from and_mask.experiments.saved import entry_defaults
from gen_mask.erm_irm.options import parse
from gen_mask.erm_irm.report import record_groups
from gen_mask.erm_irm.sweep import read_results

# The headline metric of each module (by its name without the package, so both packages share
# it): which number, which way is better, and the validation number that selects by it.
DEFAULT_METRICS = {
    "run_synthetic": Metric("test_acc", True, "val_acc"),  # val_acc with --holdout_fraction > 0
    "run_colored_mnist": Metric("test_acc", True, "val_acc"),
    "run_cifar": Metric("test_acc", True, None),
    "run_erm_irm": Metric("error", False, None),  # ‖ŵ − w*‖² (SEMs) or the test error
}
FALLBACK_METRIC = Metric("test_acc", True, "val_acc")


class TrainingReader:
    """A run of a training module: one sample per finished run, from its metrics.jsonl."""

    seconds_unit = "epoch"

    def rows(self, run: dict) -> list[tuple[str, dict]]:
        """(method, flags) of the rows that the run counts in: here its own."""
        flags = {k: v for k, v in number_flags(run["flags"]).items() if k != "seed"}
        return [(str(flags.pop("method", "–")), flags)]

    def samples(self, run_dir: Path, run: dict) -> list[tuple[str, dict, dict, object]]:
        """(method, flags, values, pairing key) of a finished run; RunError when its files cannot be read.

        The pairing key is the seed: runs of one seed draw the same data whatever their method."""
        (method, flags), = self.rows(run)
        try:
            return [(method, flags, finished_values(read_metrics(run_dir)), run["seed"])]
        except RunError as unreadable:
            raise RunError(f"{run_dir}: {unreadable}") from None

    def config_flags(self, run_dir: Path) -> dict | None:
        """The number flags (seed aside) recorded in config.json, None when there is none to read; a
        flag it lacks (the run predates the flag) counts as its default (`and_mask.experiments.saved.entry_defaults`)."""
        if not (run_dir / CONFIG).exists():
            return None
        try:
            config = read_config(run_dir)
        except RunError:
            return None
        flags = {**entry_defaults(config.get("package"), config.get("experiment")), **config["flags"]}
        return {k: v for k, v in number_flags(flags).items() if k != "seed"}


class ErmIrmReader(TrainingReader):
    """A run of gen_mask.run_erm_irm: a row per method and training size, a sample per trial."""

    seconds_unit = "fit"

    def _parsed(self, run: dict):
        return parse([*run["args"], "--out", "unused"])[1]  # the methods and sizes, defaults filled in

    def rows(self, run: dict) -> list[tuple[str, dict]]:
        sweep = self._parsed(run)
        flags = {k: v for k, v in number_flags(run["flags"]).items() if k not in ("seed", "methods", "n_train")}
        return [(method, {**flags, "n_train": n}) for method in sweep.methods for n in sweep.n_train]

    def samples(self, run_dir: Path, run: dict) -> list[tuple[str, dict, dict, object]]:
        rows = dict(((method, flags["n_train"]), flags) for method, flags in self.rows(run))
        groups = record_groups(read_results(run_dir))
        return [(method, rows[(method, n)], values, (run["seed"], trial)) for (method, n), group in groups.items()
                if (method, n) in rows for values, trial in zip(group.samples, group.pairing)]

    def config_flags(self, run_dir: Path) -> dict | None:
        return None  # the benchmark's own sweep.json refuses other settings in one folder


READERS = {"gen_mask.run_erm_irm": ErmIrmReader()}


def reader(module: str) -> TrainingReader:
    return READERS.get(module, TrainingReader())


def task_metric(task: dict) -> Metric:
    """The task's headline metric: its sweep file's keys over its module's defaults."""
    base = DEFAULT_METRICS.get(task["module"].rsplit(".", 1)[-1], FALLBACK_METRIC)
    report = task.get("report", {})
    validation = report.get("validation", base.validation)
    return Metric(report.get("metric", base.name), report.get("higher_is_better", base.higher_is_better),
                  validation or None)


@dataclass
class TaskResult:
    """Everything collected for one task of the sweep."""

    name: str
    module: str
    metric: Metric
    searched: list  # the hyper-parameters selected per method ([]: none)
    groups: dict = field(default_factory=dict)  # {row key: Group}, every row
    chosen: dict = field(default_factory=dict)  # {candidates key: {selection name: Group or None}}
    candidates: dict = field(default_factory=dict)  # {candidates key: [Group]}
    not_run: dict = field(default_factory=dict)  # {method: reason}
    seconds_unit: str = "epoch"


def _key(method: str, flags: dict) -> tuple:
    return method, json.dumps(flags, sort_keys=True)


def _split_mixed(task: str, configs: dict) -> dict:
    """{row key: {run id: the flags that tell its variant apart}} of the rows whose runs'
    config.json flags differ (each such row is split, with a warning); runs without a readable
    config.json form a variant of their own."""
    variants = {}
    for key, by_run in configs.items():
        sets = [flags for flags in by_run.values() if flags is not None]
        names = sorted({n for f in sets for n in f if len({json.dumps(s.get(n)) for s in sets}) > 1})
        if names:
            warn(f"task {task}: runs of {key[0]} with the same sweep flags differ in {', '.join(names)} (their "
                 f"config.json, e.g. from another version of the code); they are shown as separate rows")
            variants[key] = {run_id: None if flags is None else {n: flags.get(n) for n in names}
                             for run_id, flags in by_run.items()}
    return variants


def collect_task(folder: SweepFolder, task: dict, runs: list[dict], states: dict, selections) -> TaskResult:
    read = reader(task["module"])
    report = task.get("report", {})
    searched = report.get("search", [k for k in task.get("random", {}) if k not in ("n", "seed")])
    result = TaskResult(task["name"], task["module"], task_metric(task), searched,
                        not_run=dict(report.get("not_run", {})), seconds_unit=read.seconds_unit)
    rows = {run["id"]: read.rows(run) for run in runs}
    configs = {}
    for run in runs:
        for method, flags in rows[run["id"]]:
            configs.setdefault(_key(method, flags), {})[run["id"]] = read.config_flags(folder.run_dir(run["id"]))
    variants = _split_mixed(task["name"], configs)

    def group_of(method: str, flags: dict, run_id: str) -> Group:
        key = _key(method, flags)
        variant = variants.get(key, {}).get(run_id)
        return result.groups.setdefault(key + (json.dumps(variant, sort_keys=True),), Group(
            task["name"], method, {**flags, **(variant or {})}, seconds_unit=read.seconds_unit))

    for run in runs:
        state, run_dir = states[run["id"]], folder.run_dir(run["id"])
        label = f"seed {run['seed']} (run {run['id']})"
        for method, flags in rows[run["id"]]:
            group_of(method, flags, run["id"])  # every row exists, whatever its runs' outcome
        status, error = state.status, state.error
        if status == "finished":
            try:
                for method, flags, values, pairing in read.samples(run_dir, run):
                    group_of(method, flags, run["id"]).add(values, pairing)
            except RunError as unreadable:
                warn(f"task {task['name']}: {unreadable}")
                status, error = "failed", str(unreadable)
        for method, flags in rows[run["id"]]:
            group_of(method, flags, run["id"]).count(status, error, label)
    if searched:
        for group in result.groups.values():
            outer = _key(group.method, {k: v for k, v in group.flags.items() if k not in searched})
            result.candidates.setdefault(outer, []).append(group)
        for outer, candidates in result.candidates.items():
            result.chosen[outer] = {s.name: select(candidates, result.metric, s) for s in selections}
    return result


def collect(path, selection: str = "training_domain") -> list[TaskResult]:
    """The TaskResult of every task of the sweep folder at `path`; `selection` is the rule of
    the reported setting (the oracle is always added, labelled apart)."""
    folder = SweepFolder(path)
    saved = folder.read()
    states = folder.states()
    selections = [SELECTIONS[selection]] + ([SELECTIONS["oracle"]] if selection != "oracle" else [])
    by_task = {}
    for run in saved["runs"]:
        by_task.setdefault(run["task"], []).append(run)
    return [collect_task(folder, task, by_task.get(task["name"], []), states, selections) for task in saved["tasks"]]

