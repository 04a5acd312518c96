"""Fault injection on run folders: kills at every write, concurrent runs, --resume and --overwrite.

Runs are killed with a real SIGKILL in child processes (tests/support/fault_runner.py) at every write a
tiny two-epoch run makes, during the write and right after it; each must leave a folder that
holds a prefix of the uninterrupted run's records, no lock and no status, and `--resume` must
end with the uninterrupted run's metrics and weights, bit for bit.
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from and_mask import summarize
from and_mask.core.runfolder import (
    CHECKPOINT,
    CONFIG,
    STATUS,
    differing_number_flags,
    is_running,
    number_flags,
    read_config,
    read_metrics,
    read_status,
    run_state,
)
from tests.support import fault_runner as fr
from tests.support.faults import EPOCHS, MODULE, argv, one_line, records, same_weights, snapshot, train, weights

EVENTS = fr.write_events(EPOCHS)
KILLS = [(name, fraction) for name in EVENTS for fraction in (0.5, 1.0)]
# Killed once epoch 1 is logged but before its checkpoint exists: --resume refuses, --overwrite restarts.
REFUSED = {("metrics_1", 1.0), ("checkpoint_1", 0.5)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference") / "run"
    assert train(folder) is None
    return folder


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Every kill of KILLS, run concurrently: {kill: (exit code, folder)}."""
    root = tmp_path_factory.mktemp("killed")
    started = {}
    for name, fraction in KILLS:
        folder = root / f"{name}-{fraction}"
        started[(name, fraction)] = fr.start(MODULE, argv(folder), EVENTS[name], fraction), folder
    out = {}
    for kill, (process, folder) in started.items():
        process.join(120)
        out[kill] = process.exitcode, folder
    return out


def _checkpoint_epoch(folder) -> int:
    path = folder / CHECKPOINT
    return torch.load(path, weights_only=False)["epoch"] if path.exists() else 0


@pytest.mark.parametrize("kill", KILLS, ids=[f"{name}-{'during' if f < 1 else 'after'}" for name, f in KILLS])
def test_killed_at_any_write_keeps_what_finished_and_resumes_to_the_same_numbers(killed, reference, kill):
    code, folder = killed[kill]
    assert code == -signal.SIGKILL
    assert not is_running(folder)  # the lock died with the process
    if kill == ("status", 1.0):  # killed once all was written
        assert run_state(folder).status == "finished"
    else:
        assert not (folder / STATUS).exists() and run_state(folder).status in ("unfinished", "empty")
    expected = records(reference)
    before = records(folder)
    assert before == expected[:len(before)]  # nothing mixed: a prefix of the uninterrupted run
    covered = _checkpoint_epoch(folder)
    kept = read_metrics(folder, quiet=True)[:covered]
    assert [r["epoch"] for r in kept] == list(range(1, covered + 1))  # every checkpointed epoch is logged

    message = train(folder, "--resume")
    if kill in REFUSED:
        assert one_line(message) and "has metrics but no checkpoint.pt" in message
        assert train(folder, "--overwrite") is None
    else:
        assert message is None
        assert read_metrics(folder)[:covered] == kept  # finished epochs kept as written, timings included
    assert records(folder) == expected
    assert same_weights(weights(folder), weights(reference))
    assert read_status(folder)["status"] == "finished"
    assert not list(folder.glob(".*.tmp"))


@pytest.mark.parametrize("seed", range(3))
def test_random_kills_during_a_run_and_its_resume(tmp_path, reference, seed):
    rng = random.Random(seed)
    folder = tmp_path / "run"
    for attempt in range(2):
        event, fraction = rng.randint(1, len(EVENTS)), rng.choice([0.2, 0.5, 0.9, 1.0])
        code = fr.run(MODULE, argv(folder, *(["--resume"] if attempt else [])), event, fraction)
        assert code in (-signal.SIGKILL, 0, 1)  # 1: --resume refused (epoch 1 logged, no checkpoint)
        assert not is_running(folder)
        assert records(folder) == records(reference)[:len(records(folder))]
    if train(folder, "--resume") is not None:
        assert train(folder, "--overwrite") is None
    assert records(folder) == records(reference) and same_weights(weights(folder), weights(reference))


def test_a_second_process_is_refused_at_once_while_the_first_runs(tmp_path, reference, capsys):
    folder = tmp_path / "run"
    first = fr.start(MODULE, argv(folder), EVENTS["metrics_2"], hold_in=folder)
    try:
        fr.wait_for(folder / "held")
        assert is_running(folder) and run_state(folder).status == "running"
        before = snapshot(folder)
        for extra in ([], ["--resume"], ["--overwrite"]):
            started = time.time()
            message = train(folder, *extra)
            assert one_line(message) and "is in use by another process (pid" in message
            assert time.time() - started < 30  # the holder waits until released: no waiting here
        assert snapshot(folder) == before  # the refused processes wrote nothing, not even a status
        with pytest.raises(SystemExit):  # no finished run to summarize
            summarize.main([str(folder)])
        assert f"(unfinished, left out: {folder} (running))" in capsys.readouterr().err
    finally:
        (folder / "release").touch()
        first.join(120)
    assert first.exitcode == 0 and records(folder) == records(reference)
    assert read_status(folder)["status"] == "finished"


def test_the_command_line_refuses_a_locked_folder_with_one_line(tmp_path):
    from and_mask.core.runfolder import FolderLock

    folder = tmp_path / "run"
    with FolderLock(folder):
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        done = subprocess.run([sys.executable, "-m", MODULE, *argv(folder, "--resume")], capture_output=True,
                              text=True, timeout=300, env=env, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: {folder} is in use by another process "
                                                f"({(folder / 'run.lock').read_text().strip()}); wait for it to end "
                                                f"or choose another --output_dir"]
    assert not (folder / STATUS).exists()


def test_two_runs_started_together_in_one_folder_give_one_run(tmp_path, reference):
    folder = tmp_path / "run"
    processes = [fr.start(MODULE, argv(folder)) for _ in range(2)]
    for process in processes:
        process.join(120)
    assert sorted(p.exitcode for p in processes) == [0, 1]  # the loser: folder in use, or already holds a run
    assert records(folder) == records(reference) and same_weights(weights(folder), weights(reference))


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, reference):
    folder = tmp_path / "run"
    holder = fr.start(MODULE, argv(folder), EVENTS["checkpoint_2"], hold_in=folder)
    fr.wait_for(folder / "held")
    holder.kill()
    holder.join(60)
    assert holder.exitcode == -signal.SIGKILL and not is_running(folder)
    assert train(folder, "--resume") is None and records(folder) == records(reference)


def test_sigterm_ends_a_run_as_interrupted_and_it_resumes(tmp_path, reference):
    folder = tmp_path / "run"
    process = fr.start(MODULE, argv(folder), EVENTS["metrics_2"], hold_in=folder)
    fr.wait_for(folder / "held")
    os.kill(process.pid, signal.SIGTERM)
    process.join(60)
    status = read_status(folder)
    assert process.exitcode == 128 + signal.SIGTERM
    assert status["status"] == "interrupted" and status["exit_code"] == 128 + signal.SIGTERM
    assert train(folder, "--resume") is None and records(folder) == records(reference)


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path, reference):
    folder = tmp_path / "run"
    assert train(folder) is None
    before = snapshot(folder)
    message = train(folder)
    assert one_line(message) and "already holds a run (finished); pass --resume" in message
    assert snapshot(folder) == before


def test_overwrite_replaces_a_run_only_after_the_new_setup_succeeded(tmp_path, reference, monkeypatch):
    from and_mask.core.errors import RunError
    from and_mask.experiments import synthetic

    folder = tmp_path / "run"
    assert train(folder, "--seed", "1") is None
    before = snapshot(folder)
    build = synthetic.build

    def failing(args, device):
        raise RunError("the data set is missing")

    monkeypatch.setattr(synthetic, "build", failing)
    assert train(folder, "--overwrite") == "error: the data set is missing"
    assert snapshot(folder) == before  # the old run, its config.json and its status untouched
    monkeypatch.setattr(synthetic, "build", build)
    assert train(folder, "--overwrite") is None
    assert read_config(folder)["flags"]["seed"] == 0 and records(folder) == records(reference)
    assert read_status(folder)["status"] == "finished"


@pytest.mark.parametrize("event", ["config", "weights_init", "metrics_1"])
def test_an_overwrite_killed_early_never_leaves_the_new_config_beside_the_old_records(tmp_path, reference, event):
    folder = tmp_path / "run"
    assert train(folder, "--seed", "1") is None
    assert fr.run(MODULE, argv(folder, "--overwrite"), EVENTS[event], 0.5) == -signal.SIGKILL
    if (folder / CONFIG).exists():
        assert read_config(folder)["flags"]["seed"] == 0
    assert records(folder) == records(reference)[:len(records(folder))]  # none of the seed-1 records
    assert train(folder, "--resume") is None and records(folder) == records(reference)


def test_resume_compares_only_the_flags_that_change_the_numbers(tmp_path, reference):
    folder = tmp_path / "run"
    assert train(folder) is None
    message = train(folder, "--resume", "--lr", "0.5", "--epochs", "3")
    assert one_line(message) and message.endswith("--epochs 3 (run: 2); --lr 0.5 (run: 0.01); --lr_milestones 2 (run: 1)")
    same = ["--resume", "--grad_engine", "loop", "--grad_chunk_size", "1"]
    assert train(Path(f"{folder}/."), *same) is None  # another spelling of the folder, another engine
    assert records(folder) == records(reference)


def test_the_engine_is_a_number_flag_only_where_it_changes_the_model():
    base = {"grad_engine": "auto", "batch_norm": 0, "dropout_p": 0.0, "lr": 0.01, "quiet": True, "use_cuda": "0",
            "num_workers": 0, "data_path": "data", "output_dir": "a", "seed": 3}
    vmap = dict(base, grad_engine="vmap", quiet=False, use_cuda="auto", num_workers=4, data_path="/d", output_dir="b")
    assert number_flags(vmap) == number_flags(base) == {"batch_norm": 0, "dropout_p": 0.0, "lr": 0.01, "seed": 3}
    assert number_flags(dict(vmap, batch_norm=1)) != number_flags(dict(base, batch_norm=1))
    assert number_flags(dict(vmap, dropout_p=0.5)) != number_flags(dict(base, dropout_p=0.5))
    assert differing_number_flags(dict(base, batch_norm=1), dict(vmap, batch_norm=1)) == [
        "--grad_engine vmap (run: auto)"]
    cifar = {"grad_engine": "vmap"}  # no --batch_norm flag: FastResnet always normalises
    assert number_flags(cifar) != number_flags({"grad_engine": "shared"})


def test_resume_of_a_folder_without_checkpoint(tmp_path, reference, capsys):
    folder = tmp_path / "fresh"
    assert train(folder, "--resume") is None
    assert "holds no run yet; starting from scratch" in capsys.readouterr().err
    assert records(folder) == records(reference)
    (folder / CHECKPOINT).unlink()
    message = train(folder, "--resume")
    assert one_line(message) and "has metrics but no checkpoint.pt" in message and "--overwrite" in message


def test_resume_and_overwrite_together_is_an_argparse_error(tmp_path, capsys):
    assert train(tmp_path, "--resume", "--overwrite") == 2
    assert "pass one of them" in capsys.readouterr().err


def test_status_records_how_each_process_ended(tmp_path, monkeypatch):
    from and_mask.core.training import Trainer

    failed = tmp_path / "failed"
    message = train(failed, "--lr", "1e30", "--agreement_threshold", "0", "--scale_grad_inverse_sparsity", "0")
    status = read_status(failed)
    assert status["status"] == "failed" and status["exit_code"] == 1 and f"error: {status['error']}" == message
    assert status["error"].startswith("non-finite training loss")

    def interrupt(self, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_checkpoint", interrupt)
    interrupted = tmp_path / "interrupted"
    assert train(interrupted) == 130
    assert read_status(interrupted) | {"time": None} == {"status": "interrupted", "exit_code": 130,
                                                         "error": "interrupted (SIGINT)", "time": None}
    assert read_metrics(interrupted)  # what was measured stays
