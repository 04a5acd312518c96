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
- **Difference to the reference.** Each row's headline metric against the reference method's
  (averaging: `mean`, or ERM): the mean difference over seeds with a 95 % Student-t interval,
  paired by seed where both rows ran the same seeds (same seed, same data draws), Welch's
  unpaired interval otherwise, and a verdict: better, worse, or not distinguishable at this
  number of seeds (`difference`).
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

from scipy import stats as scipy_stats

from and_mask.core.errors import RunError
from and_mask.core.files import warn
from and_mask.core.runfolder import as_typed, read_status
from and_mask.core.runsets import DefaultsOf, key_flags, sections

# A run's state (runfolder.run_state) as a table counts it.
OUTCOMES = ("finished", "failed", "unfinished", "running")
OUTCOME_OF_STATE = {"finished": "finished", "failed": "failed", "running": "running", "interrupted": "unfinished",
                    "unfinished": "unfinished", "empty": "unfinished"}

# The column of the lower bound on I^ε (and_mask.core.consistency): its search finds larger values
# the longer it runs (a fourfold budget gave 40 times the bound on one averaging run), so the
# number is not a ranking of minima, and the column says so.
INCONSISTENCY = "I^ε ≥ (undetermined: grows with the search budget)"


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
    pairing: list = field(default_factory=list)  # per sample, the seed whose data draws it shares (None: unknown)
    counts: Counter = field(default_factory=Counter)  # runs by outcome (OUTCOMES)
    errors: list = field(default_factory=list)  # the error line of each failed run
    seconds_unit: str = "epoch"  # what the "seconds" of a sample measure: one epoch, one fit

    def stat(self, name: str) -> Stat | None:
        return stat(s[name] for s in self.samples if name in s)

    def add(self, values: dict, pairing=None):
        """One sample and the key (seed) that pairs it with another row's sample of the same data draws."""
        self.samples.append(values)
        self.pairing.append(pairing)

    def keyed(self, name: str) -> list[tuple[object, float]]:
        """(pairing key, value of `name`) of the samples that have the value."""
        keys = self.pairing + [None] * (len(self.samples) - len(self.pairing))
        return [(key, float(sample[name])) for key, sample in zip(keys, self.samples) if name in sample]

    def count(self, state: str, error: str | None = None, label: str = ""):
        """Count one run in `state` (runfolder.run_state); a failed run's error line is kept."""
        outcome = OUTCOME_OF_STATE[state]
        self.counts[outcome] += 1
        if outcome == "failed":
            self.errors.append(f"{label}: {error or 'no error line'}" if label else error or "no error line")

    def counts_text(self) -> str:
        return " / ".join(str(self.counts[o]) for o in OUTCOMES)


REFERENCE_METHODS = ("mean", "erm")  # averaging the environments' gradients, or ERM: what every row is compared to
CONFIDENCE = 0.95
VERDICTS = ("better", "worse", "not distinguishable")


@dataclass(frozen=True)
class Difference:
    """A row's metric minus the reference row's, over seeds, with a CONFIDENCE interval and a verdict."""

    mean: float
    low: float
    high: float
    n: int  # pairs (paired) or the smaller of the two sample counts (unpaired)
    paired: bool
    verdict: str  # one of VERDICTS, or "too few seeds"

    def cell(self, metric: "Metric") -> str:
        """'+12.3 [+8.1, +16.5] better': the difference in the metric's units, its interval, the verdict."""
        scale = 100 if metric.is_accuracy else 1
        show = (lambda v: f"{scale * v:+.1f}") if metric.is_accuracy else (lambda v: f"{v:+.3g}")
        if self.verdict == "too few seeds":
            return f"{show(self.mean)} (too few seeds)"
        return f"{show(self.mean)} [{show(self.low)}, {show(self.high)}] {self.verdict}"


def difference(row: list[tuple[object, float]], reference: list[tuple[object, float]], higher_is_better: bool,
               confidence: float = CONFIDENCE) -> Difference | None:
    """`row` − `reference` over seeds: mean, Student-t interval at `confidence`, verdict.

    Both are lists of (pairing key, value). Paired when both rows hold the same ≥ 2 distinct keys
    (the same seeds: each difference d_s = x_s − r_s removes what the seed's data draw does to
    both): mean(d) ± t_{n−1} · sd(d)/√n. Otherwise Welch's interval: mean(x) − mean(r) ±
    t_ν · √(s_x²/n_x + s_r²/n_r), ν by Welch–Satterthwaite. The verdict is "better" or "worse"
    (by the metric's direction) when the interval excludes 0, else "not distinguishable"; "too few
    seeds" when either side has fewer than 2 values. None when either row has no value.
    """
    if not row or not reference:
        return None
    x, r = dict(row), dict(reference)
    paired = (None not in x and len(x) == len(row) == len(reference) == len(r) and set(x) == set(r)
              and len(x) >= 2)
    if paired:
        d = [x[k] - r[k] for k in sorted(x, key=repr)]
        n, mean = len(d), statistics.fmean(d)
        half = scipy_stats.t.ppf((1 + confidence) / 2, n - 1) * statistics.stdev(d) / math.sqrt(n)
    else:
        xs, rs = [v for _, v in row], [v for _, v in reference]
        n, mean = min(len(xs), len(rs)), statistics.fmean(xs) - statistics.fmean(rs)
        if n < 2:
            return Difference(mean, math.nan, math.nan, n, False, "too few seeds")
        vx, vr = statistics.variance(xs) / len(xs), statistics.variance(rs) / len(rs)
        se = math.sqrt(vx + vr)
        dof = (vx + vr) ** 2 / (vx ** 2 / (len(xs) - 1) + vr ** 2 / (len(rs) - 1)) if se > 0 else 1
        half = scipy_stats.t.ppf((1 + confidence) / 2, dof) * se
    low, high = mean - half, mean + half
    if low > 0 or high < 0:
        verdict = "better" if (low > 0) == higher_is_better else "worse"
    else:
        verdict = "not distinguishable"
    return Difference(mean, low, high, n, paired, verdict)


def reference_row(group: "Group", references: list["Group"]) -> "Group | None":
    """Among the reference method's rows, the one that shares the most flag values with `group`
    (e.g. the same training size of the ERM/IRM benchmark)."""
    if not references:
        return None
    return max(references, key=lambda ref: sum(group.flags.get(k) == v for k, v in ref.flags.items()))


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


def run_groups(runs, defaults_of: DefaultsOf) -> dict:
    """{experiment: {group key: Group}} of training runs (`runsets.Run`), grouped by `runsets.sections`.

    A finished run gives a sample (`training_values`); one whose records lack those numbers is
    counted as failed with that reason, and a warning names it. Every other run is counted by its state, a failed one
    with the error line of its status.json.
    """
    out = {}
    for experiment, keyed in sections(runs, defaults_of).items():
        for key, members in keyed.items():
            flags = key_flags(key)
            group = out.setdefault(experiment, {}).setdefault(
                key, Group(experiment, str(flags.get("method")), {k: v for k, v in flags.items() if k != "method"}))
            for run in members:
                if run.finished:
                    try:
                        group.add(finished_values(run.records), run.flags.get("seed"))
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
