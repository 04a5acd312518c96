"""The one collector: outcomes of runs grouped into rows, mean ± std over seeds, model selection.

Every table of results is a view of this module: `and_mask.summarize` (run folders),
`gen_mask.sweep collect` and `gen_mask.leaderboard` (a sweep folder), and the ERM/IRM report
(results.jsonl).

- A **sample** is one measured outcome, a dict {name: number}: the final evaluation of a
  finished run (`training_values`), or one trial of an ERM/IRM fit.
- A **Group** is one row: the runs that differ only in their seed. Its key is every flag that
  changes the numbers except the seed (`runfolder.number_flags`, the one definition), its
  samples come from its finished runs, and it counts its runs by outcome (`OUTCOMES`) and keeps
  the error line of each failed one.
- **Selection.** Where a task searches hyper-parameters, the rows of one method that differ only
  in the searched flags are candidates, and a rule fixed in advance picks one. A rule names the
  ONE number it compares (`Selection.reads`); `select` hands it the candidates' values of that
  number and nothing else, so training-domain validation (the validation metric: accuracy on
  data held out from the training environments, as in DomainBed) cannot see a test metric. The
  oracle compares the test metric itself and is reported only in its own, labelled column.
  Rules are entries of SELECTIONS.
"""
from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from and_mask.core.errors import RunError
from and_mask.core.files import warn
from and_mask.core.runfolder import as_typed, read_status

# A run's state (runfolder.run_state) as a table counts it.
OUTCOMES = ("finished", "failed", "unfinished", "running")
OUTCOME_OF_STATE = {"finished": "finished", "failed": "failed", "running": "running", "interrupted": "unfinished",
                    "unfinished": "unfinished", "empty": "unfinished"}


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float  # sample standard deviation (n − 1), 0 for a single value
    n: int


def stat(values) -> Stat | None:
    values = [float(v) for v in values]
    if not values:
        return None
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


@dataclass(frozen=True)
class Metric:
    """A task's headline number, which way is better, and the validation number that selects by it."""

    name: str = "test_acc"
    higher_is_better: bool = True
    validation: str | None = "val_acc"  # None: the task holds no validation data out

    @property
    def is_accuracy(self) -> bool:
        return self.name.endswith("_acc")

    def label(self) -> str:
        return f"{self.name} (%)" if self.is_accuracy else self.name

    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"

    def show(self, value: float) -> str:
        return f"{100 * value:.1f}" if self.is_accuracy else f"{value:.3g}"

    def cell(self, s: Stat | None) -> str:
        """'95.2 ± 8.3 (3)': mean ± std and the number of values; '–' for none."""
        return "–" if s is None else f"{self.show(s.mean)} ± {self.show(s.std)} ({s.n})"


@dataclass
class Group:
    """One row of a table: runs that differ only in their seed (or trial)."""

    section: str  # the experiment (run folders) or the task (a sweep)
    method: str
    flags: dict  # the flags that change the numbers, seed and method aside
    samples: list = field(default_factory=list)  # {name: number} of each finished run (or trial)
    counts: Counter = field(default_factory=Counter)  # runs by outcome (OUTCOMES)
    errors: list = field(default_factory=list)  # the error line of each failed run
    seconds_unit: str = "epoch"  # what the "seconds" of a sample measure: one epoch, one fit

    def stat(self, name: str) -> Stat | None:
        return stat(s[name] for s in self.samples if name in s)

    def count(self, state: str, error: str | None = None, label: str = ""):
        """Count one run in `state` (runfolder.run_state); a failed run's error line is kept."""
        outcome = OUTCOME_OF_STATE[state]
        self.counts[outcome] += 1
        if outcome == "failed":
            self.errors.append(f"{label}: {error or 'no error line'}" if label else error or "no error line")

    def counts_text(self) -> str:
        return " / ".join(str(self.counts[o]) for o in OUTCOMES)


def training_values(records: list[dict]) -> dict:
    """The numbers of a finished training run, from its metrics.jsonl records.

    Every number of the final evaluation (`<set>_acc`, `<set>_loss`, the inconsistency lower
    bound when estimated); `train_acc`/`train_loss`, the last epoch's running values;
    `mask_density`, the last epoch's mean over parameter tensors; `seconds`, the mean seconds
    per epoch. KeyError, TypeError or IndexError when the records lack them.
    """
    epochs = [r for r in records if r["phase"] == "epoch"]
    final, last = records[-1], epochs[-1]
    if final["phase"] != "final":
        raise KeyError("final")
    values = {k: float(v) for k, v in final.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch",)}
    densities = list(last["mask_density"].values())
    values.update(train_acc=float(last["train_acc"]), train_loss=float(last["train_loss"]),
                  mask_density=sum(densities) / len(densities),
                  seconds=statistics.fmean(float(r["seconds"]) for r in epochs))
    return values


UNREADABLE = "its metrics.jsonl lacks the numbers of a finished run"


def finished_values(records: list[dict]) -> dict:
    """`training_values` of a run that has finished; RunError (UNREADABLE) when the records lack them."""
    try:
        return training_values(records)
    except (KeyError, TypeError, IndexError, ZeroDivisionError, AttributeError, ValueError):
        raise RunError(UNREADABLE) from None


def flags_text(flags: dict) -> str:
    """'--lr 0.01 --tau 1': flags as typed (a list-valued flag comma-separated)."""
    return " ".join(f"--{k} {as_typed(v)}" for k, v in sorted(flags.items()) if v is not None)


@dataclass(frozen=True)
class Selection:
    """A model-selection rule: which one number of each candidate it compares, and how it is labelled."""

    name: str
    label: str
    reads: Callable[[Metric], str | None]  # the number compared; None where the task has none to offer
    reads_test: bool  # True only for the oracle, whose choice is shown apart and labelled


SELECTIONS = {s.name: s for s in (
    Selection("training_domain", "training-domain validation", lambda metric: metric.validation, False),
    Selection("oracle", "oracle (test domain)", lambda metric: metric.name, True),
)}


def select(candidates: list[Group], metric: Metric, selection: Selection) -> Group | None:
    """The candidate whose mean over seeds of `selection.reads(metric)` is best (ties: the first).

    The rule sees only that number: each candidate is reduced to the list of its values before
    comparing. None when the task has no such number or no candidate has a value of it.
    """
    name = selection.reads(metric)
    if name is None:
        return None
    seen = [[sample[name] for sample in group.samples if name in sample] for group in candidates]
    scored = [(statistics.fmean(values), i) for i, values in enumerate(seen)
              if values and all(math.isfinite(v) for v in values)]
    if not scored:
        return None
    sign = 1 if metric.higher_is_better else -1
    return candidates[max(scored, key=lambda score: (sign * score[0], -score[1]))[1]]


def run_groups(runs) -> dict:
    """{experiment: {group key: Group}} of training runs (`runsets.Run`), grouped by `runsets.sections`.

    A finished run gives a sample (`training_values`); one whose records lack those numbers is
    counted as failed with that reason, and a warning names it. Every other run is counted by its state, a failed one
    with the error line of its status.json.
    """
    from and_mask.core.runsets import key_flags, sections

    out = {}
    for experiment, keyed in sections(runs).items():
        for key, members in keyed.items():
            flags = key_flags(key)
            group = out.setdefault(experiment, {}).setdefault(
                key, Group(experiment, str(flags.get("method")), {k: v for k, v in flags.items() if k != "method"}))
            for run in members:
                if run.finished:
                    try:
                        group.samples.append(finished_values(run.records))
                    except RunError as unreadable:
                        warn(f"skipping {run.path}: {unreadable}")
                        group.count("failed", str(unreadable), str(run.path))
                        continue
                    group.count("finished")
                    continue
                try:
                    status = read_status(run.path) if run.state == "failed" else None
                except RunError as error:
                    status = {"error": str(error)}
                group.count("unfinished" if run.state == "finished" else run.state,
                            (status or {}).get("error"), str(run.path))
    return out
