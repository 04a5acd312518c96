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
        out = tmp_path / "runs" / f"tau{tau}-s{seed}"
        cli.main(synthetic, METHOD_FLAGS, "and_mask", SMALL + ["--agreement_threshold", tau, "--seed", str(seed),
                                                              "--output_dir", str(out)])
        dirs.append(out)
    (tmp_path / "runs" / "unfinished").mkdir()
    (tmp_path / "runs" / "unfinished" / "config.json").write_text(
        json.dumps({"experiment": "synthetic", "package": "and_mask", "flags": {}}))
    capsys.readouterr()
    summarize.main([str(tmp_path / "runs")])  # a folder holding run folders
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith("| method | other flags | seeds | final test acc (%) |")
    rows = {line.split("|")[2].strip(): line for line in lines[2:]}
    assert set(rows) == {"--agreement_threshold 0.0", "--agreement_threshold 1.0"}
    assert "| 2 |" in rows["--agreement_threshold 0.0"] and "| 1 |" in rows["--agreement_threshold 1.0"]
    accs = [json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"] for d in dirs[:2]]
    mean = 100 * sum(accs) / 2
    std = 100 * abs(accs[0] - accs[1]) / 2 ** 0.5
    assert f"| {mean:.1f} ± {std:.1f} |" in rows["--agreement_threshold 0.0"]
    assert "unfinished, left out" in captured.err


def test_rejects_folders_without_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        summarize.main([str(tmp_path)])
    assert "no run folder" in capsys.readouterr().err
