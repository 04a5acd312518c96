"""`python -m gen_mask.leaderboard`: every registered combiner, a user's plugin included, on every task.

The budget's runs are checked with --launcher dry (every task, method and seed, nothing run); a
tiny sweep with a plugin combiner is run and collected for real, so the plugin's rows are shown
in the leaderboard without any change to the repository.
"""
import csv
import io
import os
import shlex
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from gen_mask.gen_mask_utils import COMBINERS
from gen_mask.leaderboard import BUDGETS, main

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = '''
import torch
from gen_mask.gen_mask_utils import COMBINERS, HParam

@COMBINERS.register("soft_and", hparams=[HParam("power", float, 2.0, "Exponent p of the agreement.", low=0.0)])
def soft_and(grads, power=2.0):
    """Soft AND-mask: mean_e g_e scaled by |mean_e sign(g_e)|^p."""
    mask = torch.sign(grads).mean(dim=0).abs() ** power
    return mask * grads.mean(dim=0), {"mask": mask}
'''
TINY = """
[[task]]
name = "spirals"
module = "gen_mask.run_synthetic"
seeds = [0]
[task.flags]
examples_per_env = 32
batch_size = 8
n_envs = 2
n_test = 64
holdout_fraction = 0.25
epochs = 2
n_hidden_units = 16
n_hidden_layers = 1
use_cuda = 0
quiet = true

[[task]]
name = "sem_cs"
module = "gen_mask.run_erm_irm"
seeds = [0]
flags = { dataset = "sem_cs", n_train = 50, trials = 1, steps = 50, quiet = true }
grid = { methods = ["erm"] }
"""


def leaderboard(tmp_path, *args):
    (tmp_path / "soft_and_plugin.py").write_text(PLUGIN)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}", GEN_MASK_PLUGINS="soft_and_plugin",
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "gen_mask.leaderboard", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def task_key(module: str, flags: dict) -> str:
    """Which task of the quick budget a run belongs to, from its module and flags."""
    if module == "gen_mask.run_erm_irm":
        return flags["dataset"]
    if module == "gen_mask.run_colored_mnist":
        return f"{module}:{flags['agreement_envs']}"
    return module


def test_dry_lists_every_combiner_and_the_plugin_on_every_task_and_seed(tmp_path):
    done = leaderboard(tmp_path, "--budget", "quick", "--launcher", "dry", "--out", str(tmp_path / "lb"))
    assert done.returncode == 0, done.stderr
    runs = Counter()
    for line in done.stdout.splitlines():
        words = shlex.split(line)[3:] + ["--"]
        flags = {w: None if n.startswith("--") else n for w, n in zip(words, words[1:]) if w.startswith("--")}
        task = task_key(shlex.split(line)[2], {k.removeprefix("--"): v for k, v in flags.items()})
        runs[(task, flags.get("--method", flags.get("--methods")), flags["--seed"])] += 1
    assert set(runs.values()) == {1}
    spec = tomllib.loads(BUDGETS["quick"].read_text())
    combiners = {*COMBINERS, "soft_and"}
    for table in spec["task"]:
        module = table["module"]
        task = task_key(module, table["flags"])
        methods = {m for (t, m, _) in runs if t == task}
        grid = table.get("grid", {})
        expected = combiners - set(table.get("not_run", {})) | set(grid.get("methods", grid.get("method", [])))
        if module == "gen_mask.run_erm_irm":
            expected = expected - {"lookahead"} | {"erm", "irm"}
        assert methods == expected, table["name"]
        fewer = table.get("seeds_for", {}).get("method", {})
        for method in methods:
            seeds = {s for (t, m, s) in runs if t == task and m == method}
            assert seeds == {str(s) for s in fewer.get(method, table["seeds"])}, (table["name"], method)
    assert {t for t, _, _ in runs} == {"gen_mask.run_synthetic", "gen_mask.run_colored_mnist:color",
                                       "gen_mask.run_colored_mnist:example", "sem_cs", "sem_cf", "sem_ac", "sem_hb"}
    assert ("gen_mask.run_colored_mnist:color", "lookahead", "0") in runs  # one seed, as [seeds_for] says


def test_a_plugin_combiner_shows_up_in_the_leaderboard(tmp_path):
    tasks = tmp_path / "tiny.toml"
    tasks.write_text(TINY)
    out = tmp_path / "lb"
    done = leaderboard(tmp_path, "--tasks", str(tasks), "--methods", "soft_and,mean,erm,lookahead", "--workers", "2",
                       "--quiet", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = {(r["task"], r["method"]): r for r in csv.DictReader(io.StringIO((out / "leaderboard.csv").read_text()))}
    assert set(rows) == {("spirals", "soft_and"), ("spirals", "mean"), ("spirals", "lookahead"),
                         ("sem_cs", "soft_and"), ("sem_cs", "mean"), ("sem_cs", "erm"), ("sem_cs", "lookahead")}
    for task in ("spirals", "sem_cs"):
        assert (rows[(task, "soft_and")]["n_finished"], rows[(task, "soft_and")]["mean"] != "") == ("1", True)
    assert rows[("sem_cs", "lookahead")]["note"].startswith("n/a: needs Hessian-vector products")
    assert "| soft_and |" in (out / "leaderboard.md").read_text()


def test_bad_methods_and_both_budget_and_tasks_are_refused(tmp_path, capsys):
    for argv, message in [(["--methods", "nope", "--launcher", "dry"], "--methods names nope"),
                          (["--budget", "quick", "--tasks", "x.toml"], "not both")]:
        with pytest.raises(SystemExit) as exit:
            main([*argv, "--out", str(tmp_path / "lb")])
        assert exit.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_methods_that_leave_out_a_method_with_fewer_seeds(tmp_path):
    """--methods without lookahead drops its [seeds_for] entry with its runs, instead of failing."""
    done = leaderboard(tmp_path, "--budget", "quick", "--methods", "mean,soft_and", "--launcher", "dry",
                       "--out", str(tmp_path / "lb"))
    assert done.returncode == 0, done.stderr
    assert "lookahead" not in done.stdout and "--method soft_and" in done.stdout
