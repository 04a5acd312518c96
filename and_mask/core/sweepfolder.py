"""The sweep folder: what launch writes and what relaunch and collect read.

    DIR/sweep.json       the expanded sweep (below); relaunch and collect need nothing retyped
    DIR/run.lock         held by the process launching the sweep (and_mask.core.runfolder's lock): a
                         second launch is refused
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

A run's status is read from its folder alone, never from a scheduler (`state_of`: the run-folder
contract's `and_mask.core.runfolder.run_state`):
    running      a process holds the run folder's lock (run.lock)
    finished | failed | interrupted
                 status.json says so (written last by the run, or by the launcher for a run that
                 died by a signal or does not write it); failed runs carry the last line of their error
    unfinished   the folder has files but no status.json and no process holds it (killed hard),
                 or its status.json is damaged
    empty        the run folder does not exist or holds nothing (never started)
Any file but run.lock counts, so that a folder of the ERM/IRM benchmark (results.jsonl) is seen
as holding a run too.
"""
from __future__ import annotations

import json
from pathlib import Path

from and_mask.core.errors import RunError
from and_mask.core.files import atomic_write_text, read_json
from and_mask.core.runfolder import FolderLock, RunState, now, run_state

SWEEP = "sweep.json"
RUNS = "runs"
LOGS = "logs"
SLURM = "slurm"
VERSION = 1


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

    def lock(self) -> FolderLock:
        """Held while launching (a context manager); RunError when another process holds it."""
        return FolderLock(self.path, "--out")

    def read(self) -> dict:
        """The saved sweep.json; RunError when missing or damaged."""
        if not self.exists():
            raise RunError(f"{self.path} holds no sweep ({SWEEP} is missing); give the sweep file to start one")
        saved = read_json(self.sweep_json, "sweep")
        if saved.get("version") != VERSION or not isinstance(saved.get("runs"), list):
            raise RunError(f"{self.sweep_json} is damaged: not a version-{VERSION} sweep; relaunch with the sweep "
                           f"file to rewrite it")
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
        atomic_write_text(self.sweep_json, head + ',\n "runs": [\n' + ",\n".join("  " + json.dumps(run) for run in runs)
                          + "\n ]\n}\n")

    def states(self) -> dict[str, RunState]:
        """{run id: RunState} of every run of the saved sweep."""
        return {run["id"]: state_of(self.run_dir(run["id"])) for run in self.read()["runs"]}


def state_of(run_dir) -> RunState:
    """`run_state` of a run of the sweep; a damaged status.json makes it unfinished (relaunch resumes it)."""
    try:
        return run_state(run_dir)
    except RunError as damaged:
        return RunState("unfinished", error=str(damaged))
