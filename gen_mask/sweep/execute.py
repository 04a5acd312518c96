"""Running one job as a child process: thread budget, log file, stopping it, its final status.

The child runs in its own session, so a Ctrl-C at the terminal reaches only the launcher, which
stops every child once, with SIGINT (a run then saves nothing more than its last end-of-epoch
checkpoint, writes status.json "interrupted" and exits). Its stdout and stderr are appended to
the job's log. A run writes its own status.json; when it could not (killed by a signal, or a
module that does not write one), the launcher writes it from the exit code, with the log's last
line as the error of a failed run.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
from pathlib import Path

from and_mask.core.files import atomic_write_json, writing
from and_mask.core.runfolder import STATUS, now
from gen_mask.sweep.jobs import Job

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
STOP_GRACE_S = 60  # a stopped run gets this long to exit before SIGKILL


def thread_env(threads: int, extra: dict | None = None) -> dict:
    """The launcher's environment with a thread budget (torch takes its thread count from OMP_NUM_THREADS)."""
    env = dict(os.environ, **{name: str(threads) for name in THREAD_VARIABLES})
    env.update(extra or {})
    return env


def write_status(run_dir: Path, status: str, exit_code: int, error: str | None):
    """status.json as a run writes it, for a run that could not (killed, or not writing one)."""
    atomic_write_json(run_dir / STATUS, {"status": status, "exit_code": exit_code, "error": error, "time": now()})


def _status_file(run_dir: Path):
    """Identity of the run's status.json (inode, modification time), None when absent."""
    try:
        stat = (run_dir / STATUS).stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def last_line(path: Path) -> str | None:
    """The last non-empty line of a log (the error a failed run printed last)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    return lines[-1] if lines else None


class Child:
    """A started job. A thread waits for its exit, so that a signal handler interrupting the
    launcher's own wait can still stop the child and wait for it (Popen's wait is not reentrant)."""

    def __init__(self, job: Job, process: subprocess.Popen, status_before):
        self.job, self.process, self.status_before = job, process, status_before
        self.exited = threading.Event()
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self):
        self.process.wait()
        self.exited.set()

    def wait(self) -> int:
        while not self.exited.wait(1.0):  # short waits: signals are handled between them
            pass
        return self.process.returncode

    def stop(self, grace_s: float = STOP_GRACE_S):
        """SIGINT (a run's Ctrl-C), then SIGKILL if it has not exited within `grace_s` seconds."""
        if self.exited.is_set():
            return
        self.process.send_signal(signal.SIGINT)
        if not self.exited.wait(grace_s):
            self.process.kill()
            self.exited.wait()

    def finish(self, stopped: bool = False) -> int:
        """After the exit: write status.json unless the run wrote a new one; returns the exit status.

        `stopped`: the launcher stopped the run (Ctrl-C, preemption), so a non-zero exit is
        "interrupted". A status.json is new when it is not the file that was there at the start
        (compared by inode and time stamp, so that clocks of other machines do not matter). A run
        killed by signal S gets exit code 128 + S, as a shell reports it.
        """
        returncode, run_dir = self.wait(), self.job.run_dir
        if _status_file(run_dir) not in (None, self.status_before):
            return returncode
        run_dir.mkdir(parents=True, exist_ok=True)
        if returncode == 0:
            write_status(run_dir, "finished", 0, None)
        elif returncode < 0:
            write_status(run_dir, "interrupted", 128 - returncode, f"killed by {signal.Signals(-returncode).name}")
        elif stopped:
            write_status(run_dir, "interrupted", returncode, None)
        else:
            write_status(run_dir, "failed", returncode, last_line(self.job.log))
        return returncode


def start(job: Job, threads: int, ignore_signals=()) -> Child:
    """Start `job` in its own session, output appended to its log; `ignore_signals` are ignored by the child.

    The child gets this process's environment, the job's own variables (`Job.env`) and the thread budget.
    """
    status_before = _status_file(job.run_dir)
    with writing(job.log):
        job.log.parent.mkdir(parents=True, exist_ok=True)
        log = open(job.log, "a")
    with log:
        with writing(job.log):
            log.write(f"# {now()} {'resume' if job.resume else 'start'}: {shlex.join(job.command)}\n")
            log.flush()

        def child_setup():  # ignored dispositions survive exec
            for number in ignore_signals:
                signal.signal(number, signal.SIG_IGN)

        process = subprocess.Popen(job.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=thread_env(threads, dict(job.env)),
                                   start_new_session=True,
                                   preexec_fn=child_setup if ignore_signals else None)
    return Child(job, process, status_before)
