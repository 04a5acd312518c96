"""An --output_dir or --out that cannot be made or written ends the command with one line naming the
path and the cause, before any work; a disk that fills during a run keeps what was written, and
--resume (or a rerun) continues once space is back.

Every entry point with an output folder is run as `python -m` runs it (its `__main__` block, in
this process): a parent that is a regular file is real; permission denied and a read-only file
system are injected where the folder is made (the suite runs as root, which no mode bits stop);
a full disk is injected into the writers.
"""
import contextlib
import errno
import io
import json
import os
import runpy
import sys
import warnings

import pytest

from and_mask.core import files, runfolder, runlog
from and_mask.core.runfolder import read_metrics
from tests.support.entry_points import ENTRY_POINTS, parser_of, required_argv

TINY_SYNTHETIC = ["--method", "and_mask", "--agreement_threshold", "1", "--scale_grad_inverse_sparsity", "1",
                  "--examples_per_env", "32", "--n_test", "50", "--batch_size", "16", "--n_hidden_units", "8",
                  "--n_hidden_layers", "1", "--use_cuda", "0", "--quiet"]
# Flags an entry needs beyond its required ones to get as far as its output folder.
EXTRA = {"gen_mask.sweep run": ["--module", "gen_mask.run_synthetic", "--launcher", "local"],
         "gen_mask.leaderboard": ["--launcher", "local"]}
NEEDS_A_RUN = ("vizualization.plot_runs", "vizualization.loss_landscape", "vizualization.consistency")


def output_flag(parser):
    flags = {option for action in parser._actions for option in action.option_strings}
    return next((flag for flag in ("--output_dir", "--out") if flag in flags), None)


OUTPUT_ENTRIES = [entry for entry in ENTRY_POINTS if output_flag(parser_of(entry))]


def run_as_main(entry: str, argv: list[str]) -> tuple[object, str]:
    """Run `python -m MODULE [SUBCOMMAND] ARGV` in this process: (the exit code, what went to stderr)."""
    module, *subcommand = entry.split()
    err = io.StringIO()
    saved = sys.argv
    sys.argv = [module, *subcommand, *argv]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # runpy warns that the module was imported before: the tests import every entry point
            warnings.simplefilter("ignore", RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=False)
        code = 0
    except SystemExit as stop:
        code = stop.code
    finally:
        sys.argv = saved
    return code, err.getvalue()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny finished synthetic run, for the commands that read one."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    code, err = run_as_main("and_mask.run_synthetic", TINY_SYNTHETIC + ["--epochs", "1", "--output_dir", str(run_dir)])
    assert code == 0, err
    return run_dir


def argv_for(entry, out, run_dir):
    parser = parser_of(entry)
    flag = output_flag(parser)
    argv = required_argv(parser)
    if flag in argv:
        argv[argv.index(flag) + 1] = str(out)
    else:
        argv += [flag, str(out)]
    if entry in NEEDS_A_RUN:
        argv = [str(run_dir) if a == "1" and i == 0 and entry == "vizualization.plot_runs" else a
                for i, a in enumerate(argv)]
        if "--run" in argv:
            argv[argv.index("--run") + 1] = str(run_dir)
        if "--eps" in argv:
            argv[argv.index("--eps") + 1] = "0.1"
    return flag, argv + EXTRA.get(entry, [])


def assert_one_line(code, err, *words):
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert code not in (0, None), err
    message = code if isinstance(code, str) else lines[-1] if lines else ""
    assert "Traceback" not in err and message.startswith("error: ") and "\n" not in message, err
    for word in words:
        assert word in message, (word, message)
    return message


@pytest.mark.parametrize("entry", OUTPUT_ENTRIES)
def test_a_parent_that_is_a_file_ends_the_command_in_one_line(entry, tmp_path, finished_run):
    (tmp_path / "afile").write_text("not a folder\n")
    flag, argv = argv_for(entry, tmp_path / "afile" / "out", finished_run)
    message = assert_one_line(*run_as_main(entry, argv), flag, str(tmp_path / "afile"), "is a file, not a folder")
    assert message.startswith(f"error: {flag}: cannot write")


def refusing(cause):
    """An os.mkdir and os.open that fail with `cause` below /tmp/refused (a folder that cannot be made)."""
    real_mkdir, real_open = os.mkdir, os.open

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(REFUSED):
            raise OSError(cause, os.strerror(cause), str(path))
        return real_mkdir(path, *args, **kwargs)

    def open_(path, *args, **kwargs):
        if str(path).startswith(REFUSED):
            raise OSError(cause, os.strerror(cause), str(path))
        return real_open(path, *args, **kwargs)
    return mkdir, open_


REFUSED = "/tmp/refused-by-test"


@pytest.mark.parametrize("cause, words", [(errno.EACCES, "permission denied"),
                                          (errno.EROFS, "the file system is read-only")])
@pytest.mark.parametrize("entry", OUTPUT_ENTRIES)
def test_no_permission_or_a_read_only_file_system_ends_the_command_in_one_line(entry, cause, words, monkeypatch,
                                                                               finished_run):
    mkdir, open_ = refusing(cause)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    flag, argv = argv_for(entry, f"{REFUSED}/out", finished_run)
    assert_one_line(*run_as_main(entry, argv), flag, f"{REFUSED}/out", words)


def test_a_full_disk_before_training_ends_it_before_any_epoch(tmp_path, monkeypatch):
    real_write = os.write

    def write(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "write", write)
    code, err = run_as_main("and_mask.run_synthetic", TINY_SYNTHETIC + ["--epochs", "2", "--output_dir",
                                                                         str(tmp_path / "run")])
    monkeypatch.setattr(os, "write", real_write)
    assert_one_line(code, err, str(tmp_path / "run"), "no space left on the device")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("writer", ["metrics", "checkpoint"])
def test_a_disk_that_fills_during_a_run_keeps_its_files_and_resume_finishes_it(writer, tmp_path, monkeypatch):
    """The disk fills at epoch 3 (its metrics line, or its checkpoint): one line; epochs 1-2 stay readable;
    once space is back, --resume ends with the records of an uninterrupted run."""
    full, run_dir = tmp_path / "full", tmp_path / "interrupted"
    assert run_as_main("and_mask.run_synthetic", TINY_SYNTHETIC + ["--epochs", "4", "--output_dir", str(full)])[0] == 0
    real = runlog.RunLog.log if writer == "metrics" else files.atomic_write
    calls = {"n": 0}

    def log(self, record):
        if record["epoch"] == 3:
            with files.writing(self.dir / runfolder.METRICS):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, record)

    def atomic_write(path, write):
        if str(path).endswith(runfolder.CHECKPOINT):
            calls["n"] += 1
            if calls["n"] == 3:
                with files.writing(path):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, write)
    if writer == "metrics":
        monkeypatch.setattr(runlog.RunLog, "log", log)
    else:
        monkeypatch.setattr(runlog, "atomic_write", atomic_write)
    code, err = run_as_main("and_mask.run_synthetic", TINY_SYNTHETIC + ["--epochs", "4", "--output_dir", str(run_dir)])
    monkeypatch.undo()
    assert_one_line(code, err, str(run_dir), "no space left on the device")
    assert [r["epoch"] for r in read_metrics(run_dir)][:2] == [1, 2]
    assert (run_dir / runfolder.CHECKPOINT).exists() and (run_dir / runfolder.CONFIG).exists()

    code, err = run_as_main("and_mask.run_synthetic",
                            TINY_SYNTHETIC + ["--epochs", "4", "--output_dir", str(run_dir), "--resume"])
    assert code == 0, err
    got, expected = read_metrics(run_dir), read_metrics(full)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in expected]
    for a, b in zip(got, expected):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"


def test_a_full_disk_in_the_erm_irm_benchmark_keeps_its_finished_fits(tmp_path, monkeypatch):
    from gen_mask.erm_irm import sweep

    out = tmp_path / "sem"
    argv = ["--dataset", "sem_cs", "--methods", "erm,and_mask", "--n_train", "40", "--trials", "1", "--steps", "50",
            "--quiet", "--out", str(out)]
    real, calls = sweep._append, {"n": 0}

    def append(folder, records):
        calls["n"] += 1
        if calls["n"] == 2:
            with files.writing(folder / sweep.RESULTS):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(folder, records)
    monkeypatch.setattr(sweep, "_append", append)
    code, err = run_as_main("gen_mask.run_erm_irm", argv)
    monkeypatch.undo()
    assert_one_line(code, err, str(out / sweep.RESULTS), "no space left on the device")
    kept = sweep.read_results(out, quiet=True)
    assert len(kept) >= 1
    assert run_as_main("gen_mask.run_erm_irm", argv)[0] == 0  # space is back: the rerun adds what is missing
    assert len(sweep.read_results(out, quiet=True)) > len(kept)
