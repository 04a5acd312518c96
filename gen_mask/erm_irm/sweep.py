"""The sweep over methods, training sizes and trials, resumable from its results file.

OUT/results.jsonl gets one JSON object per finished (method, n_train, trial), flushed at once:
dataset, method, n_train, trial, error (test error, or ‖ŵ − w*‖² for the SEMs), optimum (the
optimal invariant error of that draw), penalty_weight (IRM's chosen λ, else null), seconds.
A restart skips the triples already there (a line cut short by a kill is cut off, with a warning),
so an interrupted sweep continues where it stopped; any other damaged line is a one-line error.
OUT/sweep.json keeps the settings that change the numbers; a restart with different settings is
refused rather than mixing them in one table.

SEM draws are fitted side by side: all (n, trial) pairs missing for a method in one vectorised
fit. Colored MNIST draws are fitted one at a time, every method on the same draw before the next.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from and_mask.core.errors import RunError
from and_mask.core.files import atomic_write_text, drop_partial_line, read_json, read_jsonl, warn, writing
from gen_mask.erm_irm import colored, sem
from gen_mask.erm_irm.fit import FitConfig, fit

RESULTS = "results.jsonl"
SETTINGS = "sweep.json"
DATASETS = (*colored.VARIANTS, *sem.SETUPS)


@dataclass
class Sweep:
    dataset: str
    methods: list
    n_train: list  # SEMs: examples per environment; Colored MNIST: images drawn, before the split
    trials: int
    seed: int
    fit: FitConfig
    batch_size: int  # Colored MNIST: examples per step over both environments
    val_fraction: float
    image_data: str
    data_path: str | None = None

    @property
    def is_sem(self) -> bool:
        return self.dataset in sem.SETUPS

    def settings(self) -> dict:
        """What changes the numbers of one (method, n_train, trial); methods, sizes and trials may grow."""
        settings = {"dataset": self.dataset, "seed": self.seed, "val_fraction": self.val_fraction, **asdict(self.fit)}
        settings["penalty_weights"] = list(settings["penalty_weights"])
        if not self.is_sem:
            settings.update(batch_size=self.batch_size, image_data=self.image_data)
        return settings


RESULT_FIELDS = {"dataset": str, "method": str, "n_train": int, "trial": int, "error": float, "optimum": float}


def _check_result(record: dict) -> str | None:
    for name, kind in RESULT_FIELDS.items():
        value = record.get(name)
        if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            return f"not a result record (needs {', '.join(RESULT_FIELDS)})"
    return None


def read_results(out, quiet: bool = False) -> list[dict]:
    """The records of OUT/results.jsonl; a last line cut short by a kill is ignored with a warning.

    RunError naming the file and line when any other line is not a result record.
    """
    return read_jsonl(Path(out) / RESULTS, _check_result, quiet=quiet)


def _check_settings(out: Path, settings: dict):
    path = out / SETTINGS
    if path.exists():
        saved = read_json(path, "sweep settings object")
        changed = [f"{k}: {saved.get(k)} there, {v} now" for k, v in settings.items() if saved.get(k) != v]
        if changed:
            raise RunError(f"{out} holds a sweep with other settings ({'; '.join(changed)}); use another --out")
    elif (out / RESULTS).exists():
        raise RunError(f"{out} has {RESULTS} but no {SETTINGS}, so the settings of its results are unknown; "
                       f"use another --out")
    else:
        atomic_write_text(path, json.dumps(settings, indent=1) + "\n")


def _append(out: Path, records: list[dict]):
    with writing(out / RESULTS), open(out / RESULTS, "a") as f:
        f.write("".join(json.dumps(record) + "\n" for record in records))
        f.flush()
        os.fsync(f.fileno())


def check_out(sweep: Sweep, out) -> list[dict]:
    """Check that OUT may take `sweep` (the same settings, readable results); returns its records.

    Writes nothing, except sweep.json into a folder that has none yet.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, sweep.settings())
    records = read_results(out, quiet=True)
    other = sorted({r["dataset"] for r in records} - {sweep.dataset})
    if other:
        raise RunError(f"{out / RESULTS} is damaged: it holds results of {', '.join(other)}, not {sweep.dataset}")
    return records


def run_sweep(sweep: Sweep, out, quiet: bool = False) -> list[dict]:
    """Run every missing (method, n_train, trial) of `sweep` into OUT; returns every record of OUT.

    Call it holding OUT's lock (`run_erm_irm.main` does). The records of earlier invocations
    (other methods, sizes or trials, same settings) are included, so that the table covers the
    whole folder.
    """
    out = Path(out)
    check_out(sweep, out)
    if drop_partial_line(out / RESULTS):  # the caller holds OUT's lock: no one else appends
        warn(f"cut off the half-written last line of {out / RESULTS} (the process writing it was killed)")
    records = read_results(out)
    done = {(r["method"], r["n_train"], r["trial"]) for r in records}
    units = [(m, n, t) for n in sweep.n_train for t in range(sweep.trials) for m in sweep.methods]
    todo = [u for u in units if u not in done]
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc=sweep.dataset, unit="fit", disable=quiet)
    if sweep.is_sem:
        _run_sem(sweep, out, todo, bar)
    else:
        _run_colored(sweep, out, todo, bar)
    bar.close()
    return read_results(out)


def _record(sweep, method, n, trial, error, optimum, weight, seconds):
    return {"dataset": sweep.dataset, "method": method, "n_train": n, "trial": trial, "error": float(error),
            "optimum": float(optimum), "penalty_weight": None if weight is None else float(weight),
            "seconds": round(seconds, 3)}


def _run_sem(sweep, out, todo, bar):
    for method in sweep.methods:
        pairs = [(n, t) for m, n, t in todo if m == method]
        if not pairs:
            continue
        bar.set_postfix_str(method)
        started = time.time()
        problem, optima = sem.sem_problem(sweep.dataset, pairs, sweep.seed, sweep.val_fraction)
        result = fit(problem, method, sweep.fit)
        seconds = (time.time() - started) / len(pairs)
        weights = [None] * len(pairs) if result.penalty_weight is None else result.penalty_weight.tolist()
        _append(out, [_record(sweep, method, n, t, e, o, w, seconds)
                      for (n, t), e, o, w in zip(pairs, result.error.tolist(), optima, weights)])
        bar.update(len(pairs))


def _run_colored(sweep, out, todo, bar):
    draws = list(dict.fromkeys((n, t) for _, n, t in todo))  # in sweep order
    for n, trial in draws:
        problem = colored.colored_problem(sweep.dataset, n, trial, sweep.seed, sweep.fit.steps, sweep.batch_size,
                                          sweep.val_fraction, sweep.image_data, sweep.data_path)
        for method in [m for m, n_, t in todo if (n_, t) == (n, trial)]:
            bar.set_postfix_str(f"{method} n={n} trial={trial}")
            started = time.time()
            result = fit(problem, method, sweep.fit)
            _append(out, [_record(sweep, method, n, trial, result.error, colored.OPTIMAL_ERROR[sweep.dataset],
                                  result.penalty_weight, time.time() - started)])
            bar.update(1)
