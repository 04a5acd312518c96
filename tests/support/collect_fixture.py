"""A small sweep folder, written file by file as the runs would have left it, for the collector's tests.

    spirals  gen_mask.run_synthetic, seeds 0, 1 and 2, method ∈ {mean, and_mask} × 2 drawn
             learning rates (searched), validation data held out: 12 runs, of which one failed,
             one was interrupted, one was killed (config.json and one epoch, no status) and
             one never started; `running` names a finished one the tests hold the lock of.
    sem      gen_mask.run_erm_irm on sem_cs, methods erm and irm, 2 trials each; lookahead
             not run, with its reason.

and_mask's runs report an inconsistency lower bound. The numbers are made up from the run's
seed, method and learning rate (`accuracies`): where the validation accuracy and the test accuracy disagree on the best learning rate, training-domain
selection and the oracle choose differently. tests/data/collect/ holds the expected tables; after
a deliberate change of the tables, rewrite them with `python -c "from tests.collect_fixture
import write_expected; write_expected()"` and read the difference before committing it.
"""
import json
from pathlib import Path

from and_mask.core.sweepfolder import SweepFolder
from gen_mask.sweep.spec import expand, parse_spec

DATA = Path(__file__).resolve().parents[1] / "data" / "collect"
SPEC = {
    "seeds": [0, 1, 2],
    "task": [
        {"name": "spirals", "module": "gen_mask.run_synthetic",
         "flags": {"examples_per_env": 64, "n_envs": 4, "epochs": 2, "holdout_fraction": 0.25, "quiet": True},
         "grid": {"method": ["mean", "and_mask"]}, "random": {"n": 2, "lr": {"log_uniform": [1e-3, 1e-1]}}},
        {"name": "sem", "module": "gen_mask.run_erm_irm", "seeds": [0],
         "flags": {"dataset": "sem_cs", "trials": 2, "n_train": 100, "quiet": True},
         "grid": {"methods": ["erm", "irm"]}, "not_run": {"lookahead": "needs Hessian-vector products"}},
    ],
}


def accuracies(method: str, lr: float, seed: int) -> tuple[float, float]:
    """(validation, test) accuracy of a made-up run: the larger learning rate validates better for
    both methods, but tests better only for and_mask."""
    high = lr > 0.01
    val = 0.70 + 0.10 * high + 0.02 * seed
    test = 0.50 + (0.30 if method == "and_mask" else 0.05) * (high if method == "and_mask" else not high) + 0.01 * seed
    return val, test


def _write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _status(run_dir: Path, status: str, code: int, error=None):
    _write(run_dir / "status.json", json.dumps({"status": status, "exit_code": code, "error": error,
                                                "time": "2025-01-01T00:00:00+00:00"}))


def _training_run(run_dir: Path, run: dict, epochs_done: int, final: bool):
    flags = {**run["flags"], "use_cuda": "auto", "output_dir": str(run_dir)}
    _write(run_dir / "config.json", json.dumps({"experiment": "synthetic", "package": "gen_mask", "flags": flags}))
    val, test = accuracies(run["flags"]["method"], run["flags"]["lr"], run["seed"])
    records = []
    for epoch in range(1, epochs_done + 1):
        records.append({"epoch": epoch, "phase": "epoch", "val_loss": 1 - val, "val_acc": val, "test_loss": 1 - test,
                        "test_acc": test, "train_loss": 0.1, "train_acc": 0.9 + 0.01 * epoch, "steps": 4,
                        "lr": run["flags"]["lr"], "mask_density": {"w": 0.25 * epoch, "b": 0.5},
                        "seconds": 0.5 * epoch})
    if final:
        bound = {"inconsistency": 0.1 + 0.01 * run["seed"]} if run["flags"]["method"] == "and_mask" else {}
        records.append({"epoch": epochs_done, "phase": "final", "val_loss": 1 - val, "val_acc": val,
                        "test_loss": 1 - test, "test_acc": test, **bound})
    _write(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def _erm_irm_run(run_dir: Path, run: dict):
    method = run["flags"]["methods"]
    records = [{"dataset": "sem_cs", "method": method, "n_train": 100, "trial": trial,
                "error": (0.5 if method == "erm" else 0.2) + 0.1 * trial, "optimum": 0.01, "penalty_weight": None,
                "seconds": 2.0 if method == "irm" else 1.0} for trial in range(2)]
    _write(run_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    _status(run_dir, "finished", 0)


def write_fixture(path) -> dict:
    """Write the sweep folder into `path`; returns {role: run id} (failed, interrupted, killed,
    not_started, running, and one finished run per method and learning rate, seed 0)."""
    folder = SweepFolder(path)
    tasks = parse_spec(SPEC, "fixture")
    runs = [run.to_json() for run in expand(tasks)]
    folder.write([t.to_json() for t in tasks], runs)
    spirals = [r for r in runs if r["task"] == "spirals"]
    roles = {"failed": spirals[5]["id"], "interrupted": spirals[6]["id"], "killed": spirals[7]["id"],
             "running": spirals[0]["id"]}
    for run in runs:
        run_dir = folder.run_dir(run["id"])
        if run["task"] == "sem":
            _erm_irm_run(run_dir, run)
        elif run["id"] == roles["failed"]:
            _training_run(run_dir, run, 1, final=False)
            _status(run_dir, "failed", 1, "NonFiniteLossError: non-finite training loss (nan) at epoch 2, step 3")
        elif run["id"] == roles["interrupted"]:
            _training_run(run_dir, run, 1, final=False)
            _status(run_dir, "interrupted", 130, "interrupted (SIGINT)")
        elif run["id"] == roles["killed"]:
            _training_run(run_dir, run, 1, final=False)
        elif run["id"] == spirals[4]["id"]:
            roles["not_started"] = run["id"]  # its folder was never made
        else:
            _training_run(run_dir, run, 2, final=True)
            _status(run_dir, "finished", 0)
    return roles


def write_expected():
    """Collect the fixture (with its running run held) and store the tables in tests/data/collect/."""
    import shutil
    import tempfile

    from and_mask.core.runfolder import FolderLock
    from gen_mask.sweep.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        roles = write_fixture(Path(tmp) / "sweep")
        with FolderLock(Path(tmp) / "sweep" / "runs" / roles["running"]):
            main(["collect", str(Path(tmp) / "sweep"), "--quiet"])
        DATA.mkdir(parents=True, exist_ok=True)
        for name in ("leaderboard.md", "leaderboard.csv"):
            shutil.copyfile(Path(tmp) / "sweep" / name, DATA / name)
