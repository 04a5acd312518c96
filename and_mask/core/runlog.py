"""What a run leaves in its output folder: config.json, metrics.jsonl and checkpoints.

- config.json: every flag, the library versions, the git commit (when run from a checkout).
- metrics.jsonl: one JSON object per evaluation, flushed at once, so an interrupted run keeps
  everything it measured.
- checkpoint.pt: model, optimiser, scheduler and RNG states at the end of the last finished
  epoch; `--resume` continues from it and truncates metrics.jsonl to that epoch.
- weights_init.pt / weights_final.pt: the model's state at initialisation and at the end, for
  loss-landscape plots.
"""
from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from and_mask.core.errors import RunError

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"


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
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__}


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_config(run_dir) -> dict:
    with open(Path(run_dir) / CONFIG) as f:
        return json.load(f)


class RunLog:
    def __init__(self, output_dir, config: dict, resume: bool = False, experiment: str | None = None,
                 package: str | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        full = {"experiment": experiment, "package": package, "flags": config, "versions": versions(),
                "git_commit": _git_commit(),
                "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
        if resume and (self.dir / CONFIG).exists():
            old = read_config(self.dir)["flags"]
            changed = {k for k in set(old) | set(config) if k != "resume" and old.get(k) != config.get(k)}
            if changed:
                raise RunError(f"--resume with flags that differ from the saved run: {', '.join(sorted(changed))}")
        with open(self.dir / CONFIG, "w") as f:
            json.dump(full, f, indent=2, sort_keys=True, default=str)

    def truncate_metrics(self, last_epoch: int):
        """Keep the records of epochs <= last_epoch (those a checkpoint covers)."""
        kept = [r for r in read_metrics(self.dir) if r["epoch"] <= last_epoch and r.get("phase") != "final"]
        with open(self.dir / METRICS, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def records(self) -> list[dict]:
        return read_metrics(self.dir)

    def log(self, record: dict):
        with open(self.dir / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def save_weights(self, model, name):
        torch.save(model.state_dict(), self.dir / name)

    def save_checkpoint(self, state: dict):
        state = dict(state, rng={"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                                 "python": random.getstate(),
                                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})
        tmp = self.dir / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.dir / CHECKPOINT)  # atomic: a run killed while saving keeps the old one

    def load_checkpoint(self, map_location):
        path = self.dir / CHECKPOINT
        if not path.exists():
            return None
        state = torch.load(path, map_location=map_location, weights_only=False)
        restore_rng(state["rng"])
        return state


def restore_rng(rng: dict, cuda_device: torch.device | None = None):
    """Set the random number generators to the states a checkpoint saved.

    With `cuda_device` (a rank of a run split across GPUs, whose checkpoint rank 0 saved on GPU
    0), only that device's generator is set, to the state of GPU 0.
    """
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        if cuda_device is not None and cuda_device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][0], cuda_device)
        else:
            torch.cuda.set_rng_state_all(rng["cuda"])
