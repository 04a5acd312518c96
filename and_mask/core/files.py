"""Reading files that may be damaged, and writing files so that a kill never leaves half of one.

Every reader here turns a damaged file (empty, truncated, random bytes, valid format with the
wrong content) into a `RunError` whose one line names the file and what is wrong. Writers go
through a temporary file in the same folder and `os.replace`, which is atomic on POSIX file
systems: a reader (or a later run) sees the old file or the new one, never a mixture.

Append-only logs (metrics.jsonl, results.jsonl) are JSON lines; a process killed during an
append leaves a last line without its newline. `read_jsonl` ignores such a line with a warning;
the process that continues the log cuts it off first (`drop_partial_line`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pickle
import sys
import zipfile
from pathlib import Path

from and_mask.core.errors import RunError


def warn(message: str):
    print(f"warning: {message}", file=sys.stderr)


# Causes of a failed write, in words; any other error is described by the system's own text.
CAUSES = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up",
          errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
          errno.EPERM: "permission denied"}


def _regular_file_above(path: Path) -> Path | None:
    """The nearest ancestor of `path` that exists but is not a folder (why mkdir says ENOTDIR)."""
    for parent in (path, *path.parents):
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def write_error(path, error: OSError) -> RunError:
    """A RunError whose one line names the path that cannot be written and why.

    A full disk (or any failure after some files were written) leaves those files as they were:
    every writer here is atomic or appends whole lines.
    """
    path = Path(path)
    blocker = _regular_file_above(path) if error.errno in (errno.ENOTDIR, errno.EEXIST) else None
    if blocker is not None:
        cause = f"{blocker} is a file, not a folder"
    else:
        cause = CAUSES.get(error.errno) or (error.strerror or str(error)).lower()
    return RunError(f"cannot write {path}: {cause}")


@contextlib.contextmanager
def writing(path):
    """Turn an OSError of the block into `write_error(path, ...)`: one line, no traceback."""
    try:
        yield
    except OSError as error:
        raise write_error(path, error) from None


def make_folder(path, flag: str) -> Path:
    """Create the folder `path` given by `flag` (parents too) and check that a file can be written in it.

    Called before any work, so that a path that cannot be written ends the command at once with one
    line naming the flag, the path and the cause.
    """
    path = Path(path)
    probe = path / f".write-test.{os.getpid()}.tmp"
    try:
        with writing(path):
            path.mkdir(parents=True, exist_ok=True)
            with open(probe, "w") as f:
                f.write("x\n")
                f.flush()
                os.fsync(f.fileno())
    except RunError as error:
        raise RunError(f"{flag}: {error}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    return path


def _temporary(path: Path) -> Path:
    # Unique per process, so that two processes writing the same file never share a temporary.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path, write):
    """Call write(temporary path), fsync it, then rename it onto `path`."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        with writing(path):
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path, text: str):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def remove_temporaries(folder):
    """Delete the temporaries a killed writer left in `folder` (only safe while holding its lock)."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def read_json(path, what: str = "JSON object") -> dict:
    """The JSON object in `path`; RunError naming the file when it is empty, not JSON or not an object."""
    path = Path(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise RunError(f"{path} is damaged: not text") from None
    if not text.strip():
        raise RunError(f"{path} is damaged: empty")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        raise RunError(f"{path} is damaged: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(obj, dict):
        raise RunError(f"{path} is damaged: expected a {what}, found a JSON {type(obj).__name__}")
    return obj


def read_jsonl(path, check=None, quiet: bool = False) -> list[dict]:
    """The objects of a JSON-lines log; [] if the file does not exist.

    Every record is written with its newline in one append, so a last line without its newline
    was cut short by a kill: it is ignored with a warning (unless `quiet`). Any other line that
    is not a JSON object, or that `check(record)` rejects with a message, is a RunError naming
    the file and the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    *lines, partial = path.read_bytes().split(b"\n")
    if partial and not quiet:
        warn(f"ignoring the half-written last line of {path} (the process writing it was killed)")
    records = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            problem = None if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            problem = f"not valid JSON ({getattr(error, 'msg', error)})"
        if problem is None and check is not None:
            problem = check(record)
        if problem is not None:
            raise RunError(f"{path} is damaged: line {number} is {problem}")
        records.append(record)
    return records


def drop_partial_line(path) -> bool:
    """Cut off a last line that lacks its newline (a killed append); True if one was cut.

    Truncation is one system call, so a kill during it never loses a whole line.
    """
    path = Path(path)
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    os.truncate(path, data.rfind(b"\n") + 1)
    return True


def load_torch(path, what: str, map_location="cpu", weights_only: bool = True):
    """torch.load of `path`; RunError naming the file when it cannot be read as a torch file.

    torch is imported here, not at the top: this module is read by processes that must not load
    torch (a SLURM job's launcher, the sweep's local launcher)."""
    import torch

    path = Path(path)
    if path.stat().st_size == 0:
        raise RunError(f"{path} is damaged: empty (expected {what})")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, ValueError, KeyError, TypeError, AttributeError, ImportError, IndexError,
            OSError, UnicodeDecodeError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RunError(f"{path} is damaged: not a readable {what} ({reason[:160]})") from None


@contextlib.contextmanager
def locked(path):
    """Hold an exclusive advisory lock on `path` (created if missing), waiting for other holders.

    For short critical sections shared by concurrent processes: extracting data, updating a
    manifest. The lock dies with its process.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
