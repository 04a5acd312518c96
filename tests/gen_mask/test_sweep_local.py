"""The sweep launcher on this machine: skip, resume, retry, failures, the lock, dry runs, Ctrl-C.

Most tests sweep `tests.sweep_fake_run`, a run module that keeps the run-folder contract and
starts in milliseconds; one sweeps the real synthetic and ERM/IRM modules end to end.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from and_mask.core.sweepfolder import SweepFolder
from and_mask.core.sweepfolder import state_of as run_state
from gen_mask.sweep.cli import main
from gen_mask.sweep.spec import expand, load_spec

ROOT = Path(__file__).resolve().parents[2]
FAKE = "tests.support.sweep_fake_run"


@pytest.fixture(autouse=True)
def children_import_this_checkout(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(ROOT)


def write_sweep(tmp_path, text, name="sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def sweep(*argv):
    """`python -m gen_mask.sweep run ...` in this process: its exit status."""
    try:
        return main(["run", *map(str, argv), "--quiet"])
    except SystemExit as exit_:
        return exit_.code


def metrics(run_dir):
    """The complete lines of a run's metrics.jsonl (it may be read while a line is being written)."""
    path = Path(run_dir) / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def states(out):
    return {run_id: state.status for run_id, state in SweepFolder(out).states().items()}


def test_local_sweep_runs_everything_once_then_skips(tmp_path, capsys):
    spec = write_sweep(tmp_path, f"""
module = "{FAKE}"
seeds = [0, 1]
[grid]
method = ["mean", "and_mask"]
""")
    out = tmp_path / "sweep"
    assert sweep(spec, "--out", out, "--workers", "2", "--threads_per_run", "1") == 0
    saved = json.loads((out / "sweep.json").read_text())
    ids = [run["id"] for run in saved["runs"]]
    assert ids == [run.id for run in expand(load_spec(spec))] and len(ids) == 4
    assert saved["tasks"][0]["output_flag"] == "output_dir" and saved["tasks"][0]["resume_flag"] == "resume"
    for run in saved["runs"]:
        run_dir = out / "runs" / run["id"]
        assert [m["epoch"] for m in metrics(run_dir)] == [1, 2, 3]
        config = json.loads((run_dir / "config.json").read_text())
        assert config["flags"]["seed"] == run["seed"] and config["flags"]["method"] == run["flags"]["method"]
        assert config["threads"] == "1"
        assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
        assert (out / "logs" / f"{run['id']}.log").read_text().count(" start: ") == 1
    before = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")}
    capsys.readouterr()
    assert sweep("--out", out) == 0  # the saved sweep, nothing retyped
    assert "4 finished; launching 0 new and 0 resumed" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")} == before


def test_failed_run_is_reported_and_rerun_only_with_retry_failed(tmp_path, capsys):
    marker = tmp_path / "fail"
    marker.touch()
    spec = write_sweep(tmp_path, f"""
module = "{FAKE}"
seeds = [0]
flags = {{ fail_marker = "{marker}" }}
grid = {{ method = ["mean", "and_mask"] }}
""")
    out = tmp_path / "sweep"
    assert sweep(spec, "--out", out, "--workers", "2") == 1
    err = capsys.readouterr().err
    assert "2 failed" in err and err.count("boom at epoch 2") == 2
    run_ids = list(states(out))
    state = run_state(out / "runs" / run_ids[0])
    assert (state.status, state.exit_code, state.error) == ("failed", 1, "boom at epoch 2")
    marker.unlink()
    assert sweep(spec, "--out", out) == 1  # failed runs are left alone without --retry_failed
    assert "launching 0 new and 0 resumed (--retry_failed reruns failed runs)" in capsys.readouterr().err
    assert sweep(spec, "--out", out, "--retry_failed") == 0
    for run_id in run_ids:
        assert [m["epoch"] for m in metrics(out / "runs" / run_id)] == [1, 2, 3]  # resumed after epoch 1
        assert (out / "logs" / f"{run_id}.log").read_text().count(" resume: ") == 1


def test_killed_run_is_continued_with_resume(tmp_path):
    marker = tmp_path / "die"
    marker.touch()
    spec = write_sweep(tmp_path, f'module = "{FAKE}"\nseeds = [0, 1]\nflags = {{ die_marker = "{marker}" }}\n')
    out = tmp_path / "sweep"
    assert sweep(spec, "--out", out, "--workers", "2") == 1
    for run_id in states(out):  # killed: the launcher writes the status the run could not
        state = run_state(out / "runs" / run_id)
        assert (state.status, state.exit_code, state.error) == ("interrupted", 137, "killed by SIGKILL")
    marker.unlink()
    assert sweep("--out", out, "--workers", "2") == 0
    for run_id in states(out):
        first = metrics(out / "runs" / run_id)
        assert [m["epoch"] for m in first] == [1, 2, 3] and first[0]["pid"] != first[1]["pid"]


def test_run_without_status_and_without_process_is_unfinished(tmp_path):
    run_dir = tmp_path / "run"
    assert run_state(run_dir).status == "empty"
    run_dir.mkdir()
    assert run_state(run_dir).status == "empty"
    (run_dir / "config.json").write_text("{}")
    assert run_state(run_dir).status == "unfinished"


def test_second_launch_on_the_same_folder_is_refused(tmp_path, capsys):
    spec = write_sweep(tmp_path, f'module = "{FAKE}"\nseeds = [0]\n')
    out = tmp_path / "sweep"
    with SweepFolder(out).lock():
        assert "is in use by another process" in str(sweep(spec, "--out", out))
    assert not (out / "runs").exists()
    assert sweep(spec, "--out", out) == 0


def test_dry_launcher_prints_the_commands_and_runs_nothing(tmp_path, capsys):
    spec = write_sweep(tmp_path, f'module = "{FAKE}"\nseeds = 2\ngrid = {{ lr = [0.1, 0.2] }}\n')
    out = tmp_path / "sweep"
    assert sweep(spec, "--out", out, "--launcher", "dry") == 0
    lines = capsys.readouterr().out.splitlines()
    runs = expand(load_spec(spec))
    assert lines == [f"{sys.executable} -m {FAKE} {' '.join(r.args)} --output_dir {(out / 'runs' / r.id).resolve()}"
                     for r in runs]
    assert not any((out / "runs").iterdir())


def test_flags_the_module_rejects_stop_the_launch(tmp_path):
    spec = write_sweep(tmp_path, f'module = "{FAKE}"\nseeds = [0]\ngrid = {{ epochs = [2, "many"] }}\n')
    message = sweep(spec, "--out", tmp_path / "sweep")
    assert "rejects `--epochs many --seed 0`" in message and "invalid int value" in message
    assert not (tmp_path / "sweep" / "runs").exists()
    spec = write_sweep(tmp_path, 'module = "gen_mask.no_such_module"\nseeds = [0]\n')
    assert "cannot import the sweep's module" in sweep(spec, "--out", tmp_path / "other")


def test_sweep_folder_may_grow_but_not_lose_runs(tmp_path):
    out = tmp_path / "sweep"
    assert sweep("--module", FAKE, "--seeds", "0", "--grid", "lr=0.1,0.2", "--out", out) == 0
    assert sweep("--module", FAKE, "--seeds", "0,1", "--grid", "lr=0.1,0.2", "--out", out) == 0
    assert len(states(out)) == 4 and set(states(out).values()) == {"finished"}
    message = sweep("--module", FAKE, "--seeds", "0", "--grid", "lr=0.1", "--out", out)
    assert "3 run(s) that this sweep lacks" in message and "may only grow" in message


def test_flags_and_file_give_the_same_sweep(tmp_path):
    spec = write_sweep(tmp_path, f"""
module = "{FAKE}"
seeds = [0, 1]
flags = {{ epochs = 2, quiet = true }}
grid = {{ method = ["a", "b"] }}
random = {{ n = 2, lr = {{ log_uniform = [1e-3, 1e-1] }} }}
""")
    assert sweep(spec, "--out", tmp_path / "a", "--launcher", "dry") == 0
    assert sweep("--module", FAKE, "--seeds", "0,1", "--flag", "epochs=2", "--flag", "quiet=true",
                 "--grid", "method=a,b", "--random", "lr=log_uniform:1e-3:1e-1", "--n_random", "2",
                 "--out", tmp_path / "b", "--launcher", "dry") == 0
    assert json.loads((tmp_path / "a" / "sweep.json").read_text())["runs"] == \
        json.loads((tmp_path / "b" / "sweep.json").read_text())["runs"]


@pytest.mark.parametrize("argv, message", [
    (["--out", "X"], "holds no sweep"),
    (["SPEC", "--module", FAKE, "--out", "X"], "not both"),
    (["--seeds", "0", "--out", "X"], "give --module too"),
    (["--module", FAKE, "--seeds", "0,-1", "--out", "X"], "seeds in [0, 2**32 - 1]"),
    (["--launcher", "slurm", "--slurm_time", "1", "--out", "X"], "must exceed --slurm_signal_delay_s"),
    (["--module", FAKE, "--flag", "epochs", "--out", "X"], "expected NAME=VALUE"),
    (["--module", FAKE, "--random", "lr=normal:0:1", "--n_random", "2", "--out", "X"], "must be one of"),
])
def test_bad_command_lines_give_one_line(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "x.toml") if a == "SPEC" else str(tmp_path / a) if a == "X" else a for a in argv]
    exit_message = sweep(*argv)
    assert exit_message != 0
    assert message in (str(exit_message) + capsys.readouterr().err)


def test_ctrl_c_stops_every_child_and_the_relaunch_completes_them(tmp_path):
    spec = write_sweep(tmp_path, f'module = "{FAKE}"\nseeds = [0, 1, 2]\nflags = {{ epochs = 8, sleep = 0.25 }}\n')
    out = tmp_path / "sweep"
    launcher = subprocess.Popen([sys.executable, "-m", "gen_mask.sweep", "run", str(spec), "--out", str(out),
                                 "--workers", "2", "--quiet"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                stderr=subprocess.PIPE, text=True)
    runs = out / "runs"
    deadline = time.time() + 120
    while time.time() < deadline:
        started = [d for d in runs.iterdir() if metrics(d)] if runs.exists() else []
        if len(started) == 2:
            break
        time.sleep(0.05)
    assert len(started) == 2, "two runs should have started"
    launcher.send_signal(signal.SIGINT)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and "interrupted" in err
    pids = {m["pid"] for d in started for m in metrics(d)}
    for pid in pids:  # no child outlives the launcher
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    found = states(out)
    assert sorted(found.values()) == ["empty", "interrupted", "interrupted"]
    assert all(len(metrics(d)) < 8 for d in started)
    assert sweep("--out", out, "--workers", "2") == 0
    for run_id in found:
        assert [m["epoch"] for m in metrics(runs / run_id)] == list(range(1, 9))


def test_real_modules_through_output_dir_and_out(tmp_path):
    spec = write_sweep(tmp_path, """
seeds = [0]
[[task]]
name = "spirals"
module = "gen_mask.run_synthetic"
[task.flags]
method = "and_mask"
epochs = 2
examples_per_env = 32
n_envs = 2
batch_size = 16
n_test = 64
n_hidden_units = 16
n_hidden_layers = 1
use_cuda = 0
quiet = true
[[task]]
name = "sem"
module = "gen_mask.run_erm_irm"
flags = { dataset = "sem_ac", n_train = 40, trials = 2, steps = 50, quiet = true }
grid = { methods = ["erm"] }
""")
    out = tmp_path / "sweep"
    assert sweep(spec, "--out", out, "--workers", "2") == 0
    saved = json.loads((out / "sweep.json").read_text())
    assert [(t["name"], t["output_flag"], t["resume_flag"]) for t in saved["tasks"]] == \
        [("spirals", "output_dir", "resume"), ("sem", "out", None)]
    spirals, sem = (out / "runs" / run["id"] for run in saved["runs"])
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "status.json"} <= {p.name for p in spirals.iterdir()}
    assert [json.loads(line)["trial"] for line in (sem / "results.jsonl").read_text().splitlines()] == [0, 1]
    assert set(states(out).values()) == {"finished"}


@pytest.mark.parametrize("example", sorted((ROOT / "gen_mask" / "sweeps").glob("*.toml")),
                         ids=lambda path: path.name)
def test_committed_sweep_files_pass_their_modules_flag_checks(example, tmp_path, capsys):
    assert sweep(example, "--out", tmp_path / "sweep", "--launcher", "dry") == 0
    assert len(capsys.readouterr().out.splitlines()) == len(expand(load_spec(example))) > 1


def test_a_slurm_job_imports_no_torch():
    """The process that runs one SLURM job's command holds no torch (half a gigabyte) besides the run's."""
    check = "import sys, gen_mask.sweep.slurm_job; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], cwd=ROOT).returncode == 0
