"""The sweep folder: what launch writes and what relaunch and collect read.

    DIR/sweep.json       the expanded sweep (below); relaunch and collect need nothing retyped
    DIR/sweep.lock       locked (fcntl) by the process launching the sweep; a second launch is refused
    DIR/runs/<id>/       one run folder per run, passed to the module as its --output_dir (or --out)
    DIR/logs/<id>.log    the run's stdout and stderr, every attempt appended after a "# TIME start|resume: COMMAND" line
    DIR/slurm/           submitit's job scripts, pickles and logs, and submissions.jsonl (one line per job array)

sweep.json (version 1):
    {"version": 1, "updated": ISO-8601 time,
     "tasks": [{"name", "module", "output_flag": "output_dir" | "out", "resume_flag": "resume" | null,
                "seeds": [...], "flags": {...}, "grid": {flag: [values]},
                "random": {} | {"n": draws, "seed": s, flag: {kind: args}}}],
     "runs": [{"id", "task", "module", "seed", "flags": every flag of the command but the output flag,
               "grid": this run's grid values, "random": its drawn values, "draw": index | null,
               "args": the flags as command-line words}]}

A run's status is read from its folder alone, never from a scheduler (`run_state`):
    running      a process holds the run folder's lock (run.lock)
    finished | failed | interrupted
                 status.json says so (written last by the run, or by the launcher for a run that
                 died by a signal or does not write it); failed runs carry the last line of their error
    unfinished   the folder has files but no status.json and no process holds it (killed hard)
    empty        the run folder does not exist or holds nothing (never started)
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from and_mask.core.errors import RunError
from gen_mask.sweep.execute import STATUS, now

SWEEP = "sweep.json"
LOCK = "sweep.lock"
RUNS = "runs"
LOGS = "logs"
SLURM = "slurm"
RUN_LOCK = "run.lock"
VERSION = 1
FINAL = ("finished", "failed", "interrupted")


@dataclass
class RunState:
    status: str  # running, finished, failed, interrupted, unfinished or empty
    exit_code: int | None = None
    error: str | None = None  # the last line of a failed run's error
    time: str | None = None  # when status.json was written


class SweepFolder:
    def __init__(self, path):
        self.path = Path(path)

    @property
    def sweep_json(self) -> Path:
        return self.path / SWEEP

    def run_dir(self, run_id: str) -> Path:
        return self.path / RUNS / run_id

    def log_path(self, run_id: str) -> Path:
        return self.path / LOGS / f"{run_id}.log"

    @property
    def slurm_dir(self) -> Path:
        return self.path / SLURM

    def exists(self) -> bool:
        return self.sweep_json.exists()

    @contextlib.contextmanager
    def lock(self):
        """Hold DIR/sweep.lock while launching; RunError when another process holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunError(f"another launch is running on {self.path} (it holds {LOCK}); wait for it or stop it")
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def read(self) -> dict:
        """The saved sweep.json; RunError when missing or damaged."""
        try:
            saved = json.loads(self.sweep_json.read_text())
        except FileNotFoundError:
            raise RunError(f"{self.path} holds no sweep ({SWEEP} is missing); give the sweep file to start one")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RunError(f"{self.sweep_json} is damaged ({error}); relaunch with the sweep file to rewrite it")
        if not isinstance(saved, dict) or saved.get("version") != VERSION or not isinstance(saved.get("runs"), list):
            raise RunError(f"{self.sweep_json} is not a version-{VERSION} sweep file")
        return saved

    def write(self, tasks: list[dict], runs: list[dict]):
        """Write sweep.json atomically; refuses to drop runs of the sweep already saved here."""
        if self.exists():
            kept = {run["id"] for run in runs}
            dropped = [run["id"] for run in self.read()["runs"] if run["id"] not in kept]
            if dropped:
                raise RunError(f"{self.path} holds a sweep with {len(dropped)} run(s) that this sweep lacks "
                               f"(e.g. {dropped[0]}); a sweep folder may only grow: use another --out")
        for sub in (RUNS, LOGS):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        # One run a line, so that the file reads (and greps) as a table.
        head = json.dumps({"version": VERSION, "updated": now(), "tasks": tasks}, indent=1)[:-2]
        text = head + ',\n "runs": [\n' + ",\n".join("  " + json.dumps(run) for run in runs) + "\n ]\n}\n"
        tmp = self.sweep_json.with_suffix(".json.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.sweep_json)

    def states(self) -> dict[str, RunState]:
        """{run id: RunState} of every run of the saved sweep."""
        return {run["id"]: run_state(self.run_dir(run["id"])) for run in self.read()["runs"]}


def is_running(run_dir) -> bool:
    """Whether a process holds the run folder's lock (the lock dies with its process)."""
    path = Path(run_dir) / RUN_LOCK
    if not path.exists():
        return False
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def read_status(run_dir) -> dict | None:
    """status.json of a run folder, None when absent or unreadable."""
    try:
        status = json.loads((Path(run_dir) / STATUS).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return status if isinstance(status, dict) and status.get("status") in FINAL else None


def run_state(run_dir) -> RunState:
    run_dir = Path(run_dir)
    if is_running(run_dir):
        return RunState("running")
    status = read_status(run_dir)
    if status is not None:
        return RunState(status["status"], status.get("exit_code"), status.get("error"), status.get("time"))
    if run_dir.is_dir() and any(p.name != RUN_LOCK for p in run_dir.iterdir()):
        return RunState("unfinished")
    return RunState("empty")
