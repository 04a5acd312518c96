"""The group-size study: its sweep file holds the steps of G = 32 fixed, and its report's numbers
are those of the runs' own files (a tiny sweep of the same shape, run by the sweep engine)."""
import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import scipy.stats

from and_mask.core.runfolder import read_metrics
from and_mask.paper import group_size

SWEEP_FILE = Path(__file__).resolve().parents[2] / "gen_mask" / "sweeps" / "group_size.toml"
TINY = """
module = "gen_mask.run_synthetic"
seeds = [0, 1]

[flags]
protocol = "paper"
n_envs = 4
examples_per_env = 64
batch_size = 16
n_test = 50
n_hidden_units = 8
n_hidden_layers = 1
use_cuda = 0
quiet = true

[[task]]
name = "epochs"
[task.grid]
method = ["and_mask", "mean"]
envs_per_step = [2, 4]
[task.flags]
epochs = 4

[[task]]
name = "steps-G2"
[task.flags]
method = "and_mask"
envs_per_step = 2
epochs = 2
"""


def test_the_steps_arm_holds_the_steps_of_all_32_environments():
    sweep = tomllib.loads(SWEEP_FILE.read_text())
    assert sweep["seeds"] == [0, 1, 2, 3, 4] and sweep["flags"]["protocol"] == "paper"
    (epochs,) = [t for t in sweep["task"] if t["name"] == "epochs"]
    assert epochs["grid"] == {"method": ["and_mask", "mean"], "envs_per_step": [2, 4, 8, 16, 32]}
    steps = {t["flags"]["envs_per_step"]: t["flags"]["epochs"] for t in sweep["task"] if t["name"].startswith("steps")}
    assert steps == {g: math.ceil(94 * g / 32) for g in (2, 4, 8, 16)}
    # 10 batches per environment and epoch, 32/G steps each: the fewest epochs with G = 32's 940 steps.
    assert all(e * 320 // g >= 940 > (e - 1) * 320 // g for g, e in steps.items())


def test_report_numbers_are_the_runs_numbers(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    sweep = tmp_path / "sweep"
    subprocess.run([sys.executable, "-m", "gen_mask.sweep", "run", str(tmp_path / "tiny.toml"), "--out", str(sweep),
                    "--workers", "2", "--quiet"], check=True)
    runs = json.loads((sweep / "sweep.json").read_text())["runs"]
    # One run left unfinished: counted, not used.
    (unfinished,) = [r for r in runs if r["task"] == "epochs" and r["seed"] == 1 and r["grid"] == {
        "method": "mean", "envs_per_step": 4}]
    (sweep / "runs" / unfinished["id"] / "status.json").unlink()

    cells = group_size.main([str(sweep), "--out", str(tmp_path / "report")])
    text = (tmp_path / "report" / "group_size.md").read_text()
    assert "1 unfinished" in text and "9 finished" in text and (tmp_path / "report" / "group_size.png").exists()
    assert set(cells) == {("epochs", "and_mask τ=1", 2), ("epochs", "and_mask τ=1", 4), ("epochs", "mean", 2),
                          ("epochs", "mean", 4), ("steps", "and_mask τ=1", 2)}

    def records(task, method, g, seed):
        (run,) = [r for r in runs if r["task"] == task and r["seed"] == seed and r["flags"]["method"] == method
                  and r["flags"]["envs_per_step"] == g]
        return read_metrics(sweep / "runs" / run["id"])

    mask = cells["epochs", "and_mask τ=1", 2]
    mean = cells["epochs", "mean", 2]
    for seed in (0, 1):
        rs = records("epochs", "and_mask", 2, seed)
        epochs = [r for r in rs if r.get("phase") == "epoch"]
        assert mask.final[seed] == rs[-1]["test_acc"]
        assert sum(r["steps"] for r in epochs) == len(epochs) * 4 * 4 // 2
    kept = records("epochs", "and_mask", 2, 0)
    first = [r["mask_density"]["0.weight"] for r in kept if r.get("phase") == "epoch"]
    assert mask.kept[0]["0.weight"] == sum(first) / len(first) and set(mask.kept[0]) == {"0.weight", "2.weight"}
    assert cells["epochs", "mean", 2].kept == [{"0.weight": 1.0, "2.weight": 1.0}] * 2  # averaging keeps everything
    assert len(cells["epochs", "mean", 4].final) == 1 and len(cells["steps", "and_mask τ=1", 2].final) == 2

    # The difference to averaging is paired by seed: Student's t interval of the per-seed differences.
    d = [mask.final[s] - mean.final[s] for s in (0, 1)]
    result = scipy.stats.ttest_rel([mask.final[s] for s in (0, 1)], [mean.final[s] for s in (0, 1)])
    low, high = result.confidence_interval(0.95)
    row = next(line for line in text.splitlines() if line.startswith("| and_mask τ=1 | 2 |"))
    assert f"{100 * sum(d) / 2:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]" in row
