"""`--launcher local`: a pool of --workers run processes on this machine, each with a thread budget.

Each worker thread runs one job at a time as a child process and waits for it; a progress bar
counts finished jobs. Ctrl-C (SIGINT) or SIGTERM to the launcher stops every running child with
SIGINT and starts nothing more: the runs keep their last end-of-epoch checkpoint and are
continued with --resume by the next launch.
"""
from __future__ import annotations

import argparse
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm.auto import tqdm

from and_mask.core.flags import positive_int
from gen_mask.sweep import execute


def add_flags(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("local launcher")
    group.add_argument("--workers", type=positive_int, default=1, help="Runs at a time on this machine.")
    group.add_argument("--threads_per_run", type=positive_int, default=None,
                       help="Threads of each run (OMP_NUM_THREADS, MKL_NUM_THREADS, torch). Default: the machine's "
                            "cores divided by --workers (local), --slurm_cpus_per_task (slurm).")


def threads_per_run(args) -> int:
    return args.threads_per_run or max(1, (os.cpu_count() or 1) // args.workers)


class _Pool:
    """The running children, so that a stop reaches each exactly once and nothing starts after it."""

    def __init__(self, threads: int):
        self.threads = threads
        self.lock = threading.Lock()
        self.stopping = False
        self.running = {}

    def run(self, job) -> int | None:
        with self.lock:
            if self.stopping:
                return None
            child = execute.start(job, self.threads)
            self.running[job.run_id] = child
        child.wait()
        with self.lock:
            del self.running[job.run_id]
            stopped = self.stopping
        return child.finish(stopped=stopped)

    def stop(self):
        with self.lock:
            self.stopping = True
            children = list(self.running.values())
        threads = [threading.Thread(target=child.stop) for child in children]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def _terminate(signum, frame):
    raise KeyboardInterrupt


def launch(jobs, args) -> list[int | None]:
    """Run `jobs`, --workers at a time; their exit statuses (None: not run, the launch was stopped)."""
    pool = _Pool(threads_per_run(args))
    statuses = [None] * len(jobs)
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _terminate)
    executor = ThreadPoolExecutor(max_workers=args.workers)
    try:
        futures = {executor.submit(pool.run, job): i for i, job in enumerate(jobs)}
        bar = tqdm(total=len(jobs), unit="run", desc="sweep", disable=args.quiet)
        failed = 0
        for future in as_completed(futures):
            statuses[futures[future]] = future.result()
            failed += future.result() != 0
            bar.update(1)
            bar.set_postfix(failed=failed)
        bar.close()
    except KeyboardInterrupt:
        # A second Ctrl-C must not cut the stop short: the children, in their own sessions, would live on.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pool.stop()
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        for number, handler in previous.items():
            signal.signal(number, handler)
    return statuses
