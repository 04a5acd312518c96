"""and_mask.summarize groups seeds of one setting into mean ± std rows."""
import json

import pytest

from and_mask import summarize
from and_mask.and_mask_utils import METHOD_FLAGS
from and_mask.core import cli
from and_mask.experiments import synthetic

SMALL = ["--examples_per_env", "32", "--n_test", "50", "--n_train_envs", "2", "--n_agreement_envs", "2",
         "--batch_size", "16", "--n_hidden_units", "8", "--n_hidden_layers", "1", "--quiet", "--use_cuda", "0",
         "--method", "and_mask", "--scale_grad_inverse_sparsity", "0", "--epochs", "1"]


def test_table_groups_seeds_and_reports_mean_and_std(tmp_path, capsys):
    dirs = []
    for tau, seed in [("0", 0), ("0", 1), ("1", 0)]:
        out = tmp_path / f"tau{tau}-s{seed}"
        cli.main(synthetic, METHOD_FLAGS, "and_mask", SMALL + ["--agreement_threshold", tau, "--seed", str(seed),
                                                              "--output_dir", str(out)])
        dirs.append(out)
    capsys.readouterr()
    summarize.main([str(d) for d in dirs])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| agreement_threshold |") and lines[0].rstrip().endswith("seeds |")
    rows = {line.split("|")[1].strip(): line for line in lines[2:]}
    assert set(rows) == {"0.0", "1.0"}
    assert rows["0.0"].rstrip().endswith("| 2 |") and rows["1.0"].rstrip().endswith("| 1 |")
    accs = [json.loads(open(d / "metrics.jsonl").read().splitlines()[-1])["test_acc"] for d in dirs[:2]]
    assert f"{100 * sum(accs) / 2:.1f} ±" in rows["0.0"]


def test_rejects_folders_that_are_not_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        summarize.main([str(tmp_path)])
    assert "not a run folder" in capsys.readouterr().err
