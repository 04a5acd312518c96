"""What the fault-injection tests share: a tiny run, its reference outputs, ways to damage a file.

Not a test module. Every damage is deterministic (seeded) so that a failure can be replayed.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from and_mask.and_mask_utils import METHOD_FLAGS
from and_mask.core import cli
from and_mask.core.runfolder import read_metrics
from and_mask.experiments import synthetic

MODULE = "and_mask.run_synthetic"
EPOCHS = 2
TINY = ["--examples_per_env", "32", "--n_test", "50", "--n_train_envs", "2", "--n_agreement_envs", "2",
        "--batch_size", "16", "--n_hidden_units", "8", "--n_hidden_layers", "1", "--quiet", "--use_cuda", "0",
        "--method", "and_mask", "--agreement_threshold", "1", "--scale_grad_inverse_sparsity", "1",
        "--epochs", str(EPOCHS)]


def argv(folder, *extra) -> list[str]:
    return TINY + ["--output_dir", str(folder), *map(str, extra)]


def train(folder, *extra):
    """Run the tiny synthetic run in this process; returns None, or the SystemExit's code."""
    try:
        cli.main(synthetic, METHOD_FLAGS, "and_mask", argv(folder, *extra))
    except SystemExit as end:
        return end.code
    return None


def records(folder) -> list[dict]:
    """metrics.jsonl without the timings (which differ between runs)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(folder, quiet=True)]


def weights(folder, name="weights_final.pt") -> dict:
    return torch.load(Path(folder) / name)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(folder) -> dict:
    """{file name: bytes} of a folder's files (run.lock aside), to check that nothing changed."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.name != "run.lock"}


def copy_run(source, target) -> Path:
    shutil.copytree(source, target)
    return Path(target)


def one_line(message) -> bool:
    return isinstance(message, str) and "\n" not in message.strip() and "Traceback" not in message


# Damage of any file: (name, function of the original bytes and a random generator).
DAMAGES = {
    "empty": lambda data, rng: b"",
    "truncated": lambda data, rng: data[: len(data) // 2],
    "random bytes": lambda data, rng: bytes(rng.getrandbits(8) for _ in range(max(len(data), 64))),
}


def damage(path, how, seed: int = 0):
    """Damage `path` in place: a key of DAMAGES, or bytes/str to write instead (wrong content)."""
    path = Path(path)
    if isinstance(how, str) and how in DAMAGES:
        path.write_bytes(DAMAGES[how](path.read_bytes(), random.Random(seed)))
    else:
        path.write_bytes(how if isinstance(how, bytes) else how.encode())


def cut_last_line(path):
    """A kill during an append: the last line loses its second half and its newline."""
    data = Path(path).read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    Path(path).write_bytes(data[: start + (len(data) - start) // 2])


def json_lines(*objects) -> str:
    return "".join(json.dumps(o) + "\n" for o in objects)
