"""The sweep over methods, training sizes and trials, resumable from its results file.

OUT/results.jsonl gets one JSON object per finished (method, n_train, trial), flushed at once:
dataset, method, n_train, trial, error (test error, or ‖ŵ − w*‖² for the SEMs), optimum (the
optimal invariant error of that draw), penalty_weight (IRM's chosen λ, else null), seconds.
A restart skips the triples already there (a line cut short by an interruption is dropped), so an
interrupted sweep continues where it stopped. OUT/sweep.json keeps the settings that change the
numbers; a restart with different settings is refused rather than mixing them in one table.

SEM draws are fitted side by side: all (n, trial) pairs missing for a method in one vectorised
fit. Colored MNIST draws are fitted one at a time, every method on the same draw before the next.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from and_mask.core.errors import RunError
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


def read_results(out) -> list[dict]:
    """The records of OUT/results.jsonl; a last line cut short by an interruption is removed."""
    path = Path(out) / RESULTS
    if not path.exists():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        path.write_text(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _check_settings(out: Path, settings: dict):
    path = out / SETTINGS
    if path.exists():
        saved = json.loads(path.read_text())
        changed = [f"{k}: {saved.get(k)} there, {v} now" for k, v in settings.items() if saved.get(k) != v]
        if changed:
            raise RunError(f"{out} holds a sweep with other settings ({'; '.join(changed)}); use another --out")
    else:
        path.write_text(json.dumps(settings, indent=1) + "\n")


def _append(out: Path, records: list[dict]):
    with open(out / RESULTS, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.flush()


def run_sweep(sweep: Sweep, out, quiet: bool = False) -> list[dict]:
    """Run every missing (method, n_train, trial) of `sweep` into OUT; returns every record of OUT.

    The records of earlier invocations (other methods, sizes or trials, same settings) are
    included, so that the table covers the whole folder.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, sweep.settings())
    done = {(r["method"], r["n_train"], r["trial"]) for r in read_results(out)}
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
