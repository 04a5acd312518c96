"""What a run leaves in its output folder: config.json, metrics.jsonl, checkpoints and weights.

- config.json: every flag, the library versions, the git commit (when run from a checkout).
- metrics.jsonl: one JSON object per evaluation, written with its newline in one append and
  flushed, so an interrupted run keeps everything it measured; a line cut short by a kill is
  ignored with a warning and cut off when the run is resumed.
- checkpoint.pt: model, optimiser, scheduler and RNG states at the end of the last finished
  epoch, replaced atomically; `--resume` continues from it and truncates metrics.jsonl to it.
- weights_init.pt / weights_final.pt: the model's state at initialisation and at the end, for
  loss-landscape plots.
The names of these files, their readers, who may write into the folder, and status.json are
`and_mask.core.runfolder`'s business (torch-free, so that a SLURM job's launcher can read them).
"""
from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from and_mask.core.errors import RunError
from and_mask.core.files import atomic_write, atomic_write_text, load_torch, writing
from and_mask.core.runfolder import CHECKPOINT, METRICS, read_metrics

CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng")


def default_output_dir(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-{stamp}-{os.getpid()}"


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    try:  # the installed version, without importing torchvision (seconds)
        torchvision = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        torchvision = None
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision,
            "numpy": np.__version__}


def describe(flags: dict, experiment: str | None, package: str | None) -> dict:
    """The content of config.json for a run with these flags."""
    return {"experiment": experiment, "package": package, "flags": flags, "versions": versions(),
            "git_commit": _git_commit(), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}


def load_weights(run_dir, name: str, map_location="cpu") -> dict:
    """A saved state dict (weights_init.pt, weights_final.pt); RunError naming the file if damaged."""
    path = Path(run_dir) / name
    if not path.exists():
        raise RunError(f"{run_dir} has no {name}")
    state = load_torch(path, "state dict of model weights", map_location)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunError(f"{path} is damaged: not a state dict of model weights")
    return state


class RunLog:
    """The records of one run folder (the folder's lock is held by the caller's RunFolder)."""

    def __init__(self, output_dir):
        self.dir = Path(output_dir)

    def truncate_metrics(self, last_epoch: int):
        """Keep the records of epochs <= last_epoch (those a checkpoint covers), atomically.

        A half-written last line goes too. RunError if the log lacks an epoch the checkpoint covers.
        """
        records = read_metrics(self.dir, quiet=True)
        kept = [r for r in records if r["epoch"] <= last_epoch and r["phase"] == "epoch"]
        if [r["epoch"] for r in kept] != list(range(1, last_epoch + 1)):
            raise RunError(f"{self.dir / METRICS} is damaged: it does not hold one record of each of the epochs "
                           f"1..{last_epoch} that {CHECKPOINT} covers; --overwrite starts the run again")
        atomic_write_text(self.dir / METRICS, "".join(_line(r) for r in kept))

    def records(self) -> list[dict]:
        return read_metrics(self.dir)

    def log(self, record: dict):
        with writing(self.dir / METRICS), open(self.dir / METRICS, "a") as f:
            f.write(_line(record))
            f.flush()
            os.fsync(f.fileno())

    def save_weights(self, model, name):
        atomic_write(self.dir / name, lambda tmp: torch.save(model.state_dict(), tmp))

    def save_checkpoint(self, state: dict):
        state = dict(state, rng={"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                                 "python": random.getstate(),
                                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})
        # Atomic: a run killed while saving keeps the previous checkpoint.
        atomic_write(self.dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, map_location):
        """The checkpoint's state, with the RNG states restored; None if there is none."""
        path = self.dir / CHECKPOINT
        if not path.exists():
            return None
        state = load_torch(path, "checkpoint", map_location, weights_only=False)
        if not isinstance(state, dict) or not all(k in state for k in CHECKPOINT_KEYS) \
                or not isinstance(state["epoch"], int):
            raise RunError(f"{path} is damaged: not a checkpoint of this project; --overwrite starts the run again")
        try:
            restore_rng(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError):
            raise RunError(f"{path} is damaged: its random number generator states cannot be restored") from None
        return state


def restore_rng(rng: dict, cuda_device: torch.device | None = None):
    """Set the random number generators to the states a checkpoint saved.

    With `cuda_device` (a rank of a run split across GPUs, whose checkpoint rank 0 saved on GPU
    0), only that device's generator is set, to the state of GPU 0.
    """
    # map_location moved the RNG states too; generators take their state as a CPU tensor.
    torch.set_rng_state(rng["torch"].cpu())
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        if cuda_device is not None and cuda_device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][0].cpu(), cuda_device)
        else:
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])


def _line(record: dict) -> str:
    return json.dumps(record) + "\n"
