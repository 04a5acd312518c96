"""The README's quick-start run, pinned: its metrics.jsonl is the one this code has always written.

`make synthetic` trains AND-mask (τ = 1, rescaled) on the synthetic task for 150 epochs. The
records below (every field but the wall-clock seconds) are those of the repository before its
restructuring into layers, on one CPU thread, with the locked versions (requirements.txt: torch
2.14.1+cu130); another build of the same torch may differ in the last digits. A change that moves
any number of that run, on purpose or not, fails here and must say so.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK_START = ["--method", "and_mask", "--agreement_threshold", "1", "--scale_grad_inverse_sparsity", "1",
               "--use_cuda", "0"]
RECORDS = 151  # 150 epochs and the final evaluation
FINAL = {"epoch": 150, "phase": "final", "test_loss": 0.0054447215516120195, "test_acc": 1.0}
LAST_EPOCH = {"train_loss": 0.005869101034477353, "train_acc": 1.0}
DIGEST = "f1385f1485295ec1fabacb018f06ddab9dc4c9c6022e5638b50b15936292801d"  # sha256 of the records as JSON


def digest(records) -> str:
    stripped = [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    return hashlib.sha256(json.dumps(stripped, sort_keys=True).encode()).hexdigest()


@pytest.mark.slow  # 150 epochs on one thread: a minute or more; CI runs the slow tests after the suite
def test_the_quick_start_run_writes_the_pinned_metrics(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "and_mask.run_synthetic", *QUICK_START, "--quiet", "--output_dir",
                    str(tmp_path / "run")], cwd=ROOT, env=env, check=True, timeout=900)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == RECORDS
    assert records[-1] == FINAL
    assert {k: records[-2][k] for k in LAST_EPOCH} == LAST_EPOCH
    assert digest(records) == DIGEST
