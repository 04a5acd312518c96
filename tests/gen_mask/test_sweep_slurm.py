"""`--launcher slurm` on a real one-node SLURM cluster (started here; skipped without slurm-wlm/munge).

A sweep of two real synthetic runs is submitted; while both train, one job is cancelled
(scancel) and the other is sent SIGUSR2, SLURM's warning before a time limit or a preemption.
The second is requeued and resumes by itself; the first is continued by a relaunch. Every epoch
is logged once, both runs' metrics equal those of the same sweep run locally, and so does the
table that `collect` makes of them.
"""
import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from and_mask.core.sweepfolder import SweepFolder
from gen_mask import run_synthetic
from gen_mask.sweep import slurm, slurm_cluster
from gen_mask.sweep.cli import main

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 100  # long enough to signal the jobs mid-run on a fast machine
SPEC = f"""
module = "gen_mask.run_synthetic"
seeds = [0]
[flags]
examples_per_env = 64
n_envs = 4
batch_size = 16
n_test = 256
n_hidden_units = 32
n_hidden_layers = 1
epochs = {EPOCHS}
use_cuda = 0
quiet = true
[grid]
method = ["and_mask", "geom_mean"]
"""
TIMEOUT_S = 600  # the whole story on a slow, shared 2-core machine
REVOKE_S = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install -e .[cluster])")
    reason = slurm_cluster.available()
    if reason and os.environ.get("CI"):  # CI installs SLURM: there the SLURM path must be proved, not skipped
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    env = slurm_cluster.start(folder)
    yield env
    slurm_cluster.stop(folder)


def until(condition, what, timeout_s=TIMEOUT_S, every_s=0.05):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")


def complete_lines(path) -> list[str]:
    """The lines of a file that may be read while a line is being written."""
    text = Path(path).read_text() if Path(path).exists() else ""
    return text[:text.rfind("\n") + 1].splitlines()


def epochs_logged(run_dir):
    records = [json.loads(line) for line in complete_lines(Path(run_dir) / "metrics.jsonl")]
    return [r for r in records if r.get("phase") == "epoch"]


def comparable(run_dir):
    """metrics.jsonl without the wall-clock times."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def leaderboard(sweep_dir) -> tuple[list[dict], list[list[str]]]:
    """`collect`'s CSV rows and Markdown table rows of a sweep folder, wall-clock times left out."""
    assert main(["collect", str(sweep_dir), "--quiet"]) == 0
    rows = [{k: v for k, v in row.items() if k != "seconds"}
            for row in csv.DictReader(io.StringIO((Path(sweep_dir) / "leaderboard.csv").read_text()))]
    cells = [[cell.strip() for cell in line.strip("|").split("|")]
             for line in (Path(sweep_dir) / "leaderboard.md").read_text().splitlines() if line.startswith("| ")]
    timed = cells[0].index("s/epoch")
    return rows, [row[:timed] + row[timed + 1:] for row in cells]


def squeue(env, job_id):
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%t %r"], capture_output=True, text=True,
                         env=dict(os.environ, **env))
    return out.stdout.strip()


def test_slurm_sweep_survives_cancel_and_requeue_and_matches_local(cluster, tmp_path, monkeypatch):
    for name, value in dict(cluster, PYTHONPATH=str(ROOT)).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    spec = tmp_path / "sweep.toml"
    spec.write_text(SPEC)
    local, remote = tmp_path / "local", tmp_path / "slurm"
    assert main(["run", str(spec), "--out", str(local), "--workers", "2", "--threads_per_run", "1", "--quiet"]) == 0

    env = dict(os.environ, PYTHONPATH=str(ROOT), **cluster)
    command = [sys.executable, "-m", "gen_mask.sweep", "run", str(spec), "--out", str(remote), "--launcher",
               "slurm", "--slurm_poll_s", "0.5", "--quiet"]
    launcher = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    submissions = remote / "slurm" / "submissions.jsonl"
    jobs = json.loads(until(lambda: complete_lines(submissions), "the submission")[0])["jobs"]
    (cancelled, cancelled_job), (requeued, requeued_job) = jobs.items()
    folder = SweepFolder(remote)
    # Two epochs logged: the first epoch's checkpoint is written, so --resume has one to continue from.
    until(lambda: all(len(epochs_logged(folder.run_dir(r))) >= 2 for r in jobs), "both runs to train")
    assert all(len(epochs_logged(folder.run_dir(r))) < EPOCHS for r in jobs), "the runs ended before the signals"
    subprocess.run(["scancel", cancelled_job], env=env, check=True)
    subprocess.run(["scancel", "--signal=USR2", requeued_job], env=env, check=True)
    # SLURM holds a requeued job for two minutes before it may start again; let it start sooner, but
    # not within REVOKE_S of the requeue: slurmd refuses a job whose credential (stamped to the
    # second) is not younger than the kill of its previous run.
    until(lambda: squeue(cluster, requeued_job).startswith("PD"), "the requeue", every_s=0.2)
    time.sleep(REVOKE_S)
    subprocess.run(["scontrol", "update", f"JobId={requeued_job}", "StartTime=now"], env=env, check=True)
    _, err = launcher.communicate(timeout=TIMEOUT_S)
    assert launcher.returncode == 1, err  # the cancelled run is left interrupted
    states = folder.states()
    assert states[cancelled].status == "interrupted" and states[requeued].status == "finished", err
    assert folder.log_path(requeued).read_text().count(" resume: ") == 1

    assert main(["run", "--out", str(remote), "--launcher", "slurm", "--slurm_poll_s", "0.5", "--quiet"]) == 0
    assert folder.log_path(cancelled).read_text().count(" resume: ") == 1
    for run_id in jobs:
        assert [r["epoch"] for r in epochs_logged(folder.run_dir(run_id))] == list(range(1, EPOCHS + 1))
        assert comparable(folder.run_dir(run_id)) == comparable(local / "runs" / run_id)
    assert leaderboard(remote) == leaderboard(local)


def test_several_tasks_per_job_get_the_torch_distributed_environment(cluster, tmp_path, monkeypatch):
    for name, value in dict(cluster, PYTHONPATH=str(ROOT)).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "sweep"
    assert main(["run", "--module", "tests.support.sweep_fake_run", "--seeds", "0", "--out", str(out), "--launcher", "slurm",
                 "--slurm_tasks_per_node", "2", "--slurm_poll_s", "0.5", "--quiet"]) == 0
    (run_id, state), = SweepFolder(out).states().items()
    ranks = [json.loads(line) for line in (out / "runs" / run_id / "ranks.jsonl").read_text().splitlines()]
    assert sorted(r["RANK"] for r in ranks) == ["0", "1"] and {r["WORLD_SIZE"] for r in ranks} == {"2"}
    assert state.status == "finished"


def test_a_job_of_two_tasks_trains_one_run_split_across_two_ranks(cluster, tmp_path, monkeypatch):
    """--slurm_tasks_per_node 2 on a real run: the two tasks are the two ranks of one run (5
    environments split 3 + 2), which ends with the metrics of the same run in one process."""
    for name, value in dict(cluster, PYTHONPATH=str(ROOT)).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    flags = {"method": "pcgrad", "n_envs": 5, "examples_per_env": 48, "batch_size": 16, "n_hidden_units": 32,
             "n_hidden_layers": 2, "epochs": 3, "n_test": 200, "use_cuda": 0}
    out = tmp_path / "sweep"
    assert main(["run", "--module", "gen_mask.run_synthetic", "--seeds", "0", "--out", str(out),
                 *[word for k, v in flags.items() for word in ("--flag", f"{k}={v}")], "--flag", "quiet=true",
                 "--launcher", "slurm", "--slurm_tasks_per_node", "2", "--slurm_poll_s", "0.5", "--quiet"]) == 0
    (run_id, state), = SweepFolder(out).states().items()
    run_dir = out / "runs" / run_id
    assert state.status == "finished" and json.loads((run_dir / "config.json").read_text())["ranks"] == 2
    run_synthetic.main([word for k, v in flags.items() for word in (f"--{k}", str(v))]
                       + ["--quiet", "--output_dir", str(tmp_path / "one")])
    split, alone = comparable(run_dir), comparable(tmp_path / "one")
    assert [r.keys() for r in split] == [r.keys() for r in alone]
    for a, b in zip(split, alone):
        for key, value in a.items():
            assert value == (pytest.approx(b[key], rel=1e-5) if isinstance(value, float) else b[key]), key


def test_detached_launch_then_a_relaunch_leaves_queued_runs_alone(cluster, tmp_path, monkeypatch, capsys):
    for name, value in dict(cluster, PYTHONPATH=str(ROOT)).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "sweep"
    argv = ["run", "--module", "tests.support.sweep_fake_run", "--seeds", "0,1", "--flag", "sleep=0.3", "--flag", "epochs=5",
            "--out", str(out), "--quiet"]
    assert main(argv + ["--launcher", "slurm", "--slurm_detach"]) == 0
    capsys.readouterr()
    assert main(argv + ["--launcher", "dry"]) == 0
    relaunch = capsys.readouterr()
    assert relaunch.out == "" and "launching 0 new and 0 resumed" in relaunch.err, relaunch.err
    folder = SweepFolder(out)
    until(lambda: {s.status for s in folder.states().values()} == {"finished"}, "the detached jobs", every_s=0.2)
    until(lambda: not slurm.queued_runs(folder, set(folder.states())), "the jobs to leave the queue", every_s=0.2)
    assert main(argv) == 0 and "2 finished; launching 0 new" in capsys.readouterr().err


def test_a_job_that_slurm_itself_restarts_resumes_its_run(cluster, tmp_path, monkeypatch):
    """`scontrol requeue`, as a node failure or a preemption in REQUEUE mode: the same job starts again."""
    for name, value in dict(cluster, PYTHONPATH=str(ROOT)).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "sweep"
    env = dict(os.environ, PYTHONPATH=str(ROOT), **cluster)
    launcher = subprocess.Popen([sys.executable, "-m", "gen_mask.sweep", "run", "--module", "tests.support.sweep_fake_run",
                                 "--seeds", "0", "--flag", "sleep=0.3", "--flag", "epochs=12", "--out", str(out),
                                 "--launcher", "slurm", "--slurm_poll_s", "0.5", "--quiet"],
                                cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    submissions = out / "slurm" / "submissions.jsonl"
    ((run_id, job_id),) = json.loads(until(lambda: complete_lines(submissions), "the submission")[0])["jobs"].items()
    run_dir = out / "runs" / run_id
    until(lambda: len(complete_lines(run_dir / "metrics.jsonl")) >= 2, "the run to train")
    subprocess.run(["scontrol", "requeue", job_id], env=env, check=True)
    until(lambda: squeue(cluster, job_id).startswith("PD"), "the requeue", every_s=0.2)
    time.sleep(REVOKE_S)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True)
    _, err = launcher.communicate(timeout=TIMEOUT_S)
    assert launcher.returncode == 0, err
    assert SweepFolder(out).log_path(run_id).read_text().count(" resume: ") == 1
    epochs = [json.loads(line)["epoch"] for line in complete_lines(run_dir / "metrics.jsonl")]
    assert epochs == list(range(1, 13))
