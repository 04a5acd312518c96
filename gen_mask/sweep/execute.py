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

from gen_mask.sweep.folder import now, read_status, write_status
from gen_mask.sweep.jobs import Job

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
STOP_GRACE_S = 60  # a stopped run gets this long to exit before SIGKILL


def thread_env(threads: int, extra: dict | None = None) -> dict:
    """The launcher's environment with a thread budget (torch takes its thread count from OMP_NUM_THREADS)."""
    env = dict(os.environ, **{name: str(threads) for name in THREAD_VARIABLES})
    env.update(extra or {})
    return env


class Child:
    """A started job; a thread waits for its exit, so that a signal handler interrupting the
    launcher's own wait can still stop it and wait for it (Popen's wait is not reentrant)."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
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


def start(job: Job, threads: int, ignore_signals=(), extra_env=None) -> Child:
    """Start `job` in its own session, output appended to its log; `ignore_signals` are ignored by the child."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a") as log:
        log.write(f"# {now()} {'resume' if job.resume else 'start'}: {shlex.join(job.command)}\n")
        log.flush()

        def child_setup():  # ignored dispositions survive exec
            for number in ignore_signals:
                signal.signal(number, signal.SIG_IGN)

        return Child(subprocess.Popen(job.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      env=thread_env(threads, extra_env), start_new_session=True,
                                      preexec_fn=child_setup if ignore_signals else None))


def last_line(path: Path) -> str | None:
    """The last non-empty line of a log (the error a failed run printed last)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    return lines[-1] if lines else None


def finish(job: Job, returncode: int, started: float, stopped: bool = False) -> int:
    """Write status.json unless the run wrote it during this attempt; returns `returncode`.

    `stopped`: the launcher stopped the run (Ctrl-C, preemption), so a non-zero exit is "interrupted".
    """
    written = read_status(job.run_dir)
    if written is not None and (job.run_dir / "status.json").stat().st_mtime >= started:
        return returncode
    if not job.run_dir.is_dir():
        job.run_dir.mkdir(parents=True)
    if returncode == 0:
        write_status(job.run_dir, "finished", 0, None)
    elif stopped or returncode < 0:
        write_status(job.run_dir, "interrupted", returncode, None)
    else:
        write_status(job.run_dir, "failed", returncode, last_line(job.log))
    return returncode
