"""Run entry points in real child processes that kill themselves at a chosen write (not a test module).

Children come from a multiprocessing fork server that imported torch and the project once, so
each costs milliseconds instead of an interpreter start; they are real processes, killed with a
real SIGKILL, whose locks die with them.

A fault is (event, fraction): the `event`-th write of the run (1-based, in the order below) is
cut after `fraction` of its bytes (0 < fraction < 1: a kill during the write) or completed
(fraction = 1: a kill right after it), and the process SIGKILLs itself. Writes, for a training
run of E epochs: 1 config.json, 2 weights_init.pt, then per epoch k the metrics record
(1 + 2k) and checkpoint.pt (2 + 2k), then the final record (3 + 2E), weights_final.pt (4 + 2E)
and status.json (5 + 2E). Appends (metrics.jsonl, results.jsonl) are cut in the file itself;
atomic writes are cut in their temporary, before the rename. `hold` instead pauses at the event
until the file `release` appears in the output folder (a run that holds its lock meanwhile).
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

from tqdm import tqdm

# Children inherit tqdm's lock from the fork server instead of each making (and, killed, leaking) one.
tqdm.get_lock()


def write_events(epochs: int) -> dict:
    """{name: event number} of a training run's writes."""
    events = {"config": 1, "weights_init": 2}
    for k in range(1, epochs + 1):
        events[f"metrics_{k}"] = 1 + 2 * k
        events[f"checkpoint_{k}"] = 2 + 2 * k
    events.update(final=3 + 2 * epochs, weights_final=4 + 2 * epochs, status=5 + 2 * epochs)
    return events


class _Fault:
    def __init__(self, event: int, fraction: float, hold_in=None):
        self.event, self.fraction, self.hold_in, self.count = event, fraction, hold_in, 0

    def reached(self) -> bool:
        self.count += 1
        return self.count == self.event

    def hold(self):
        (self.hold_in / "held").touch()
        while not (self.hold_in / "release").exists():
            time.sleep(0.02)

    def cut(self, path: Path, keep_from: int = 0):
        """Keep the first `fraction` of the bytes written since `keep_from`, then die."""
        if self.fraction < 1:
            size = path.stat().st_size
            os.truncate(path, keep_from + int((size - keep_from) * self.fraction))
        os.kill(os.getpid(), signal.SIGKILL)


COUNTED = {"config.json", "status.json", "checkpoint.pt", "weights_init.pt", "weights_final.pt"}


def _install(fault: _Fault):
    from and_mask.core import files, runlog
    from gen_mask.erm_irm import sweep

    def atomic(original):
        def write(path, produce):
            if Path(path).name not in COUNTED or not fault.reached():
                return original(path, produce)
            if fault.hold_in is not None:
                fault.hold()
                return original(path, produce)
            tmp = files._temporary(Path(path))
            produce(tmp)
            if fault.fraction == 1:
                os.replace(tmp, path)
            fault.cut(tmp if fault.fraction < 1 else Path(path))
        return write

    def appending(original, path_of):
        def log(*args):
            if not fault.reached():
                return original(*args)
            if fault.hold_in is not None:
                fault.hold()
                return original(*args)
            path = path_of(*args)
            before = path.stat().st_size if path.exists() else 0
            original(*args)
            fault.cut(path, before)
        return log

    # Module globals, looked up at each call: runlog imported its own reference to atomic_write.
    files.atomic_write = atomic(files.atomic_write)
    runlog.atomic_write = atomic(runlog.atomic_write)
    runlog.RunLog.log = appending(runlog.RunLog.log, lambda self, record: self.dir / runlog.METRICS)
    sweep._append = appending(sweep._append, lambda out, records: Path(out) / sweep.RESULTS)


def _call(target: str, args):
    """Call "module:function"(*args) in a child; its exit code is 0, or 1 on an exception."""
    module, function = target.split(":")
    try:
        getattr(importlib.import_module(module), function)(*args)
    except BaseException as error:  # noqa: BLE001 (the parent reads the exit code)
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        os._exit(1)
    os._exit(0)


def start_call(target: str, *args):
    """Start "module:function"(*args) in a child process."""
    process = context().Process(target=_call, args=(target, args))
    process.start()
    return process


def _child(module: str, argv: list, event: int, fraction: float, hold_in):
    sys.stdout = sys.stderr = open(os.devnull, "w")
    if event:
        _install(_Fault(event, fraction, None if hold_in is None else Path(hold_in)))
    try:
        importlib.import_module(module).main(argv)
    except SystemExit as end:
        os._exit(end.code if isinstance(end.code, int) else 1)
    except KeyboardInterrupt:  # SIGTERM / SIGINT that the entry point did not handle
        os._exit(130)
    os._exit(0)


_CONTEXT = None


def context():
    """The fork server's context, started once per test session."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["tests.support.fault_runner", "and_mask.run_synthetic", "gen_mask.run_erm_irm",
                                         "and_mask.summarize"])
    return _CONTEXT


def start(module: str, argv, event: int = 0, fraction: float = 1.0, hold_in=None):
    """Start `module`.main(argv) in a child process, with a fault at write `event` (0: none)."""
    process = context().Process(target=_child, args=(module, list(map(str, argv)), event, fraction,
                                                     None if hold_in is None else str(hold_in)))
    process.start()
    return process


def run(module: str, argv, event: int = 0, fraction: float = 1.0, timeout: float = 120) -> int:
    """Like `start`, then wait: the child's exit code (-9 when it killed itself)."""
    process = start(module, argv, event, fraction)
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        raise TimeoutError(f"{module} {argv} did not end within {timeout} s")
    return process.exitcode


def wait_for(path: Path, timeout: float = 60):
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)
