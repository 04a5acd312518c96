"""A run folder belongs to one run: its lock, its status, and when a folder may be reused.

The contract every tool relies on (training runs write it through `RunFolder`; summarize,
plot_runs and sweep collectors read it with `run_state`, `read_status`, `is_running`):

- ``run.lock``: an fcntl advisory lock (flock), held by the process running in the folder for
  its whole life. A second process is refused at once. The lock dies with its process (and its
  data-loading workers), so a killed run never leaves a stale lock. The file itself stays; it
  names the last holder ("pid P on HOST since TIME"), for messages only.
- ``config.json``: written once the run's setup (data, model) has succeeded, before any record.
- ``metrics.jsonl``, ``checkpoint.pt``, ``weights_init.pt``, ``weights_final.pt``: see runlog.
- ``status.json``: written atomically as the last thing the process does,
  {"status": "finished" | "failed" | "interrupted", "exit_code": int, "error": one line or
  null, "time": ISO-8601}. It is removed when a process takes the run over (starts or resumes
  it), so a folder holding a run with neither status.json nor a live lock holder was killed
  (SIGKILL, power loss): unfinished, and `--resume` continues it. A process refused by the
  folder, or whose setup fails before it took a run over, leaves the status as it was; in a
  folder that held no run, a failed setup leaves status.json ("failed") and no config.json.

Reusing a folder that holds a run (any of config.json, metrics.jsonl, checkpoint.pt, weights):
refused unless ``--resume`` (continue it: the flags that change the numbers must be those of the
run) or ``--overwrite`` (replace it, but only once the new run's setup has succeeded; the old
config.json goes first, so no config.json ever sits beside another run's records).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

from and_mask.core.errors import RunError
from and_mask.core.files import atomic_write_json, make_folder, read_json, read_jsonl, remove_temporaries, warn, writing

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
WEIGHTS_INIT, WEIGHTS_FINAL = "weights_init.pt", "weights_final.pt"
LOCK = "run.lock"
STATUS = "status.json"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, WEIGHTS_INIT, WEIGHTS_FINAL)  # any of them: the folder holds a run
STATUSES = ("finished", "failed", "interrupted")

# Flags that never change what a run computes, only where it writes, what it prints, where the
# data lies, which device does the arithmetic (up to rounding) or how the work is split. Every
# other flag changes the numbers (a new flag that does not must be added here).
NOT_NUMBER_FLAGS = frozenset({"output_dir", "resume", "overwrite", "quiet", "use_cuda", "grad_chunk_size",
                              "num_workers", "data_path", "download", "dist_check_every", "dist_gather_warn_mb"})
SEED_FLAGS = frozenset({"seed"})


def engine_changes_model(flags: dict) -> bool:
    """True when --grad_engine vmap gives other gradients than the loop.

    vmap runs each environment on its own: BatchNorm then normalises with each environment's
    statistics and dropout draws other masks. Every other engine (and vmap without either)
    equals the loop up to rounding. Experiments without a --batch_norm flag (CIFAR's
    FastResnet) always normalise.
    """
    return flags.get("grad_engine") == "vmap" and (bool(flags.get("batch_norm", 1)) or flags.get("dropout_p", 0) > 0)


def number_flags(flags: dict) -> dict:
    """The flags of a run that change its numbers (the seed included), as JSON values.

    The one definition used by `--resume` (which refuses any difference), by the grouping of
    summarize and plot_runs (`group_key`) and by sweep collectors.
    """
    # A flag whose value is None was not given and means "the default" (a combiner's own value): the
    # same as a flag that a run made before the flag existed lacks.
    kept = {k: v for k, v in flags.items()
            if k not in NOT_NUMBER_FLAGS and k not in ("grad_engine", "dist_bn") and v is not None}
    if engine_changes_model(flags):
        kept["grad_engine"] = "vmap"
    if flags.get("dist_bn") == "local":  # per-process batch statistics: another model (exact is one process's)
        kept["dist_bn"] = "local"
    return json.loads(json.dumps(kept, default=str))


def as_typed(value) -> str:
    """A flag's value as typed on the command line: a list (e.g. --lr_milestones) comma-separated, an
    empty one as `none`."""
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


def differing_number_flags(old: dict, new: dict) -> list[str]:
    """'--name NEW (run: OLD)' for every flag that changes the numbers and differs."""
    a, b = number_flags(old), number_flags(new)
    return [f"--{k} {as_typed(new.get(k, 'absent'))} (run: {as_typed(old.get(k, 'absent'))})"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def group_key(config: dict, defaults: dict | None = None) -> tuple:
    """Runs with equal keys differ only in their seed: (experiment, package, number flags as JSON).

    `defaults` (the entry module's parser defaults) stand in for flags that the run's config.json
    lacks because the run predates them, as they do on --resume.
    """
    flags = {k: v for k, v in number_flags({**(defaults or {}), **config["flags"]}).items() if k not in SEED_FLAGS}
    return config.get("experiment"), config.get("package"), json.dumps(flags, sort_keys=True)


def _check_record(record: dict) -> str | None:
    if not isinstance(record.get("epoch"), int) or record.get("phase") not in ("epoch", "final"):
        return "not a metrics record (an integer epoch and a phase, epoch or final)"
    return None


def read_metrics(run_dir, quiet: bool = False) -> list[dict]:
    """The records of a run's metrics.jsonl ([] if none); RunError naming the file if it is damaged."""
    return read_jsonl(Path(run_dir) / METRICS, _check_record, quiet=quiet)


def read_config(run_dir) -> dict:
    """A run's config.json; RunError naming the file if it is damaged."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise RunError(f"{run_dir} is not a run folder: it has no {CONFIG}")
    config = read_json(path, "run configuration")
    if not isinstance(config.get("flags"), dict) or not isinstance(config.get("experiment"), str):
        raise RunError(f"{path} is damaged: expected an object with the run's experiment and flags")
    return config


def holds_run(folder) -> bool:
    """Whether the folder holds a training run's files (a new run there must --resume or --overwrite)."""
    return any((Path(folder) / name).exists() for name in RUN_FILES)


def holds_files(folder) -> bool:
    """Whether anything has started in the folder: it holds a file other than the lock (a training
    run's files, or another command's, such as the ERM/IRM benchmark's results.jsonl)."""
    folder = Path(folder)
    return folder.is_dir() and any(p.name != LOCK for p in folder.iterdir())


def is_running(folder) -> bool:
    """True while a live process holds the folder's lock (tested without waiting).

    Ask from another process than the holder: where flock is emulated with POSIX locks (NFS), a
    process that closes any descriptor of the file drops its own lock.
    """
    try:
        fd = os.open(Path(folder) / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: probes never block each other
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def lock_holder(folder) -> str:
    try:
        return (Path(folder) / LOCK).read_text().strip() or "unknown process"
    except OSError:
        return "unknown process"


def read_status(folder) -> dict | None:
    """The folder's status.json, or None if it has none; RunError if it is damaged."""
    path = Path(folder) / STATUS
    if not path.exists():
        return None
    status = read_json(path, "status object")
    if status.get("status") not in STATUSES or not isinstance(status.get("exit_code"), int):
        raise RunError(f"{path} is damaged: expected a status in {', '.join(STATUSES)} and an integer exit_code")
    return status


@dataclass(frozen=True)
class RunState:
    """What a run folder says of its run (`run_state`)."""

    status: str  # running | finished | failed | interrupted | unfinished (killed, resumable) | empty
    exit_code: int | None = None  # from status.json
    error: str | None = None  # the one line of a failed run's error
    time: str | None = None  # when status.json was written


def run_state(folder) -> RunState:
    """The state of the run in `folder`, read from the folder alone (never from a scheduler).

    running while a process holds its lock; else the status.json of the last process that took the
    folder over (finished, failed, interrupted: also a run that failed before writing any record);
    else unfinished when it holds files (killed: `--resume` continues it), empty when not.
    RunError naming status.json when that file is damaged.
    """
    if is_running(folder):
        return RunState("running")
    status = read_status(folder)
    if status is not None:
        return RunState(status["status"], status["exit_code"], status.get("error"), status.get("time"))
    return RunState("unfinished" if holds_files(folder) else "empty")


def now() -> str:
    """The local time with its offset, to the second (ISO 8601): status.json's and the lock's time stamps."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# Exit statuses of a run stopped by Ctrl-C (SIGINT) or SIGTERM, as `outcome` gives them.
INTERRUPTED_EXIT_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit or pre-emption), handled like Ctrl-C."""


@contextlib.contextmanager
def terminate_as_interrupt():
    """Turn SIGTERM into `Terminated`, so a terminated run ends as "interrupted" with its status."""
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def outcome(error: BaseException | None) -> dict:
    """The status.json fields (without time) of a process that ends with `error` (None: success)."""
    if error is None or isinstance(error, SystemExit) and error.code in (0, None):
        return {"status": "finished", "exit_code": 0, "error": None}
    if isinstance(error, SystemExit):
        code = error.code if isinstance(error.code, int) else 1
        return {"status": "failed", "exit_code": code, "error": None if isinstance(error.code, int) else str(error.code)}
    if isinstance(error, Terminated):
        return {"status": "interrupted", "exit_code": 128 + signal.SIGTERM, "error": "terminated (SIGTERM)"}
    if isinstance(error, KeyboardInterrupt):
        return {"status": "interrupted", "exit_code": 128 + signal.SIGINT, "error": "interrupted (SIGINT)"}
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if not isinstance(error, RunError):
        message = f"{type(error).__name__}: {message}".rstrip(": ")
    return {"status": "failed", "exit_code": 1, "error": message}


class FolderLock:
    """One process's hold on an output folder: the lock while it runs, status.json when it ends.

    Entering takes the lock (refused at once if another process holds it). `start()` takes the
    folder's contents over: its old status.json goes, and on leaving this process writes its own.
    A process that leaves before `start()` (refused, or failed before touching anything) leaves
    the folder's status as it was.
    """

    def __init__(self, path, flag: str = "--output_dir"):
        self.path, self.flag = Path(path), flag
        self.started = False
        self._fd = None

    def __enter__(self):
        make_folder(self.path, self.flag)  # a path that cannot be written ends the command here, in one line
        with writing(self.path / LOCK):
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunError(f"{self.path} is in use by another process ({lock_holder(self.path)}); wait for it to "
                           f"end or choose another {self.flag}") from None
        try:
            with writing(self.path / LOCK):
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now()}\n".encode())
        except RunError:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def start(self):
        (self.path / STATUS).unlink(missing_ok=True)
        remove_temporaries(self.path)
        self.started = True

    def record(self, error: BaseException | None):
        """status.json of this process ending with `error` (None: success), once it has started.

        Called on leaving, or by a watcher thread when the process must end at once (another
        rank of a run split across processes failed)."""
        if self.started:
            # On a full disk status.json may not be written: the folder then reads as unfinished
            # (as after a kill), which is what it is, and --resume continues it once space is back.
            with contextlib.suppress(RunError):
                atomic_write_json(self.path / STATUS, {**outcome(error), "time": now()})

    def __exit__(self, kind, error, traceback):
        try:
            self.record(error)
        finally:
            os.close(self._fd)  # releases the lock
            self._fd = None
        return False


class RunFolder(FolderLock):
    """A training run's hold on its folder, as a context manager.

    mode: "new" (refuse a folder that holds a run), "resume" or "overwrite". On entering, the
    lock is taken and the folder checked against the mode; `start(config)` (call it once the
    setup has succeeded) replaces an old run or continues it; on leaving, status.json records how
    the process ended. A folder whose run was left untouched (refused, or a setup that failed
    before `start`) keeps its old status.json.

    `flags` are compared with the run's on --resume; `defaults` (the parser's) stand in for the
    flags the run's config.json lacks. After entering, `resumes` tells whether there is a
    checkpoint to continue from.
    """

    def __init__(self, path, mode: str, flags: dict | None = None, flag: str = "--output_dir",
                 defaults: dict | None = None):
        if mode not in ("new", "resume", "overwrite"):
            raise ValueError(f"unknown mode {mode!r}")
        super().__init__(path, flag)
        self.mode, self.flags, self.defaults = mode, flags, defaults or {}
        self.resumes = False

    def __enter__(self):
        super().__enter__()
        try:
            self._check()
        except BaseException as error:
            super().__exit__(type(error), error, None)
            raise
        if not holds_run(self.path):  # nothing to keep: the status is this process's at once
            super().start()
        return self

    def _state_words(self) -> str:
        status = read_status(self.path)
        return status["status"] if status else "unfinished, no status.json"

    def _check(self):
        if not holds_run(self.path):
            if self.mode == "resume":
                warn(f"--resume: {self.path} holds no run yet; starting from scratch")
            return
        if self.mode == "new":
            raise RunError(f"{self.path} already holds a run ({self._state_words()}); pass --resume to continue it, "
                           f"--overwrite to replace it, or choose another {self.flag}")
        if self.mode == "resume":
            self._check_resume()

    def _check_resume(self):
        if not (self.path / CONFIG).exists():
            raise RunError(f"{self.path} holds run files but no {CONFIG}, so its flags are unknown; "
                           f"--overwrite starts the run again")
        if self.flags is not None:
            # A flag added since the run was made counts as having had its default.
            differences = differing_number_flags({**self.defaults, **read_config(self.path)["flags"]}, self.flags)
            if differences:
                raise RunError(f"--resume refused: flags that change the numbers differ from the run in {self.path}: "
                               + "; ".join(differences))
        if (self.path / CHECKPOINT).exists():
            self.resumes = True
        elif read_metrics(self.path, quiet=True):
            raise RunError(f"{self.path} has metrics but no {CHECKPOINT} to continue from; --overwrite starts the "
                           f"run again")
        else:
            warn(f"--resume: {self.path} has no {CHECKPOINT} yet; starting from scratch")

    def start(self, config: dict | None = None):
        """Take the folder's run over: continue it, or replace whatever run was there by a new one.

        A replaced run's files are removed config.json first, then `config` is written.
        """
        super().start()
        if not self.resumes:
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
            if config is not None:
                atomic_write_json(self.path / CONFIG, config)
