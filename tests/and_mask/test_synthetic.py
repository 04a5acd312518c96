"""The synthetic spirals task: generator, flags, end-to-end runs and error paths."""
import json

import numpy as np
import pytest
import torch

from and_mask.and_mask_utils import METHOD_FLAGS as AND_MASK_FLAGS
from and_mask.core import cli
from and_mask.datasets.synthetic import TEST_SEED, get_spirals_dataset
from and_mask.experiments import synthetic
from tests.support.interrupted_runs import interrupt_then_resume

SMALL = ["--examples_per_env", "64", "--n_test", "100", "--n_train_envs", "4", "--n_agreement_envs", "2",
         "--batch_size", "16", "--n_hidden_units", "16", "--n_hidden_layers", "2", "--quiet", "--use_cuda", "0"]
AND_MASK = ["--method", "and_mask", "--agreement_threshold", "0.5", "--scale_grad_inverse_sparsity", "1"]


def run_and_mask(argv):
    return cli.main(synthetic, AND_MASK_FLAGS, "and_mask", argv)


def test_generator_is_deterministic_and_typed():
    a = get_spirals_dataset(200, 3, 2, 8, 5, seed=11)
    b = get_spirals_dataset(200, 3, 2, 8, 5, seed=11)
    c = get_spirals_dataset(200, 3, 2, 8, 5, seed=12)
    assert a[0].shape == (200, 7) and a[1].shape == (200,)
    assert a[0].dtype == np.float32 and a[1].dtype == np.float32
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert set(np.unique(a[1])) == {0.0, 1.0}
    assert np.allclose(a[0][:, :2].std(axis=0), 1.0, atol=1e-5)


def test_signature_is_the_environment_row_of_the_first_draw_times_the_label_sign():
    inputs, labels = get_spirals_dataset(300, 3, 5, 16, 8, seed=7)
    signatures = np.random.RandomState(7).randn(16, 8)  # the generator's first draw
    expected = signatures[5] * (2 * labels[:, None] - 1)
    assert np.allclose(inputs[:, 2:], expected, atol=1e-6)
    # a perfect shortcut inside the environment
    assert np.array_equal(np.sign(inputs[:, 2:] @ signatures[5]) > 0, labels == 1)


def test_spiral_determines_the_label_and_test_signatures_carry_no_information():
    inputs, labels = get_spirals_dataset(2000, 3, "test", 16, 8, seed=TEST_SEED)
    radius = np.hypot(inputs[:, 0], inputs[:, 1])
    assert radius.min() > 0
    # signatures of the test env are noise: no coordinate correlates with the label
    correlations = [abs(np.corrcoef(inputs[:, 2 + d], labels)[0, 1]) for d in range(8)]
    assert max(correlations) < 0.1
    # labels are balanced
    assert 0.45 < labels.mean() < 0.55


def test_generator_rejects_unknown_environment():
    with pytest.raises(ValueError, match="env"):
        get_spirals_dataset(10, 3, 16, 16, 8, seed=0)


def test_end_to_end_run_writes_its_files(tmp_path, capsys):
    out = tmp_path / "run"
    final = run_and_mask(SMALL + AND_MASK + ["--epochs", "2", "--output_dir", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["experiment"] == "synthetic" and config["package"] == "and_mask"
    assert config["flags"]["agreement_threshold"] == 0.5 and "torch" in config["versions"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 2] and records[-1]["phase"] == "final"
    for r in records[:2]:
        assert {"test_loss", "test_acc", "train_loss", "train_acc", "mask_density", "seconds"} <= set(r)
        assert r["steps"] == (64 // 16) * 4 // 2
        assert all(0.0 <= d <= 1.0 for d in r["mask_density"].values())
        assert set(r["mask_density"]) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    assert final["test_acc"] == records[-1]["test_acc"]
    for name in ("checkpoint.pt", "weights_init.pt", "weights_final.pt"):
        assert (out / name).exists()
    assert "final:" in capsys.readouterr().out


def test_same_seed_same_metrics_other_seed_other_metrics(tmp_path):
    def metrics(seed, name):
        run_and_mask(SMALL + AND_MASK + ["--epochs", "2", "--seed", str(seed), "--output_dir", str(tmp_path / name)])
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    first = metrics(3, "a")
    assert first == metrics(3, "b")
    assert first != metrics(4, "c")


TEMPORAL = ["--optimizer", "temporal_and_mask_adam", "--beta3", "0.9", "--temporal_threshold", "0.6"]


@pytest.mark.parametrize("optimizer", [[], TEMPORAL], ids=["adam", "temporal_and_mask_adam"])
def test_interrupted_run_resumes_to_the_same_metrics(tmp_path, monkeypatch, optimizer):
    argv = SMALL + AND_MASK + ["--epochs", "3"] + optimizer
    run_and_mask(argv + ["--output_dir", str(tmp_path / "whole")])
    interrupt_then_resume(run_and_mask, argv, tmp_path / "split", monkeypatch, stop_after_epoch=2)

    def load(name):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert load("split") == load("whole")
    whole, split = (torch.load(tmp_path / name / "weights_final.pt") for name in ("whole", "split"))
    assert all(torch.equal(whole[key], split[key]) for key in whole)


def test_temporal_and_mask_adam_masks_and_reports_the_kept_fraction(tmp_path):
    run_and_mask(SMALL + AND_MASK + ["--epochs", "2", "--output_dir", str(tmp_path)] + TEMPORAL)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["temporal_mask_density"] < 1 for r in records[:2])
    flags = json.loads((tmp_path / "config.json").read_text())["flags"]
    assert (flags["optimizer"], flags["beta3"], flags["temporal_threshold"]) == ("temporal_and_mask_adam", 0.9, 0.6)


def test_one_environment_per_step():
    parser = cli.build_parser(synthetic, AND_MASK_FLAGS, "and_mask")
    args = parser.parse_args(SMALL + AND_MASK + ["--envs_per_step", "1"])  # the alias of --n_agreement_envs
    assert args.n_agreement_envs == 1
    setup = synthetic.build(args, torch.device("cpu"))
    batches = list(setup.train_batches(1))
    assert len(batches) == setup.steps_per_epoch == 64 // 16 * 4
    assert all(n_envs == 1 and len(x) == 16 for x, _, n_envs, _ in batches)
    assert sorted(ids[0] for _, _, _, ids in batches[:4]) == [0, 1, 2, 3]  # each environment once per cycle


def test_resume_with_different_flags_is_refused(tmp_path, capsys):
    run_and_mask(SMALL + AND_MASK + ["--epochs", "1", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        run_and_mask(SMALL + AND_MASK + ["--epochs", "1", "--lr", "0.5", "--output_dir", str(tmp_path), "--resume"])
    assert "differ" in str(exit_info.value.code) and "lr" in str(exit_info.value.code)


@pytest.mark.parametrize("bad, message", [
    (["--agreement_threshold", "1.5"], "agreement_threshold must be <= 1.0"),
    (["--agreement_threshold", "-0.1"], "agreement_threshold must be >= 0.0"),
    (["--n_agreement_envs", "3"], "multiple of --n_agreement_envs"),
    (["--batch_size", "0"], "positive integer"),
    (["--batch_size", "128"], "exceeds --examples_per_env"),
    (["--epochs", "-2"], "positive integer"),
    (["--lr", "0"], "positive finite"),
    (["--dropout_p", "1.0"], "[0, 1)"),
    (["--scale_grad_inverse_sparsity", "2"], "must be one of [0, 1]"),
    (["--method", "median"], "invalid choice"),
    (["--optimizer", "temporal_and_mask_adam"], "needs --beta3 and --temporal_threshold"),
    (["--optimizer", "temporal_and_mask_adam", "--beta3", "0.9"], "needs --temporal_threshold"),
    (["--beta3", "0.9"], "belong to --optimizer temporal_and_mask_adam"),
    (["--optimizer", "temporal_and_mask_adam", "--beta3", "1", "--temporal_threshold", "0.5"], "[0, 1)"),
    (["--optimizer", "temporal_and_mask_adam", "--beta3", "0.9", "--temporal_threshold", "1.5"], "[0, 1]"),
    (["--optimizer", "adam_flexible_weight_decay"], "invalid choice"),
])
def test_bad_flags_are_one_line_argparse_errors(bad, message, capsys):
    argv = SMALL + AND_MASK + ["--epochs", "1"]
    for i in range(0, len(bad), 2):
        index = argv.index(bad[i]) if bad[i] in argv else None
        if index is None:
            argv += bad[i:i + 2]
        else:
            argv[index + 1] = bad[i + 1]
    with pytest.raises(SystemExit) as exit_info:
        run_and_mask(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "".join(err)


def test_required_and_mask_flags(capsys):
    with pytest.raises(SystemExit):
        run_and_mask(SMALL + ["--method", "and_mask", "--agreement_threshold", "1"])
    assert "--scale_grad_inverse_sparsity" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_asking_for_absent_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_and_mask(SMALL[:-2] + AND_MASK + ["--use_cuda", "1"])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_metrics(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_and_mask(SMALL + ["--method", "and_mask", "--agreement_threshold", "0", "--scale_grad_inverse_sparsity",
                              "0", "--epochs", "4", "--lr", "1e30", "--output_dir", str(tmp_path)])
    message = str(exit_info.value.code)
    assert message.startswith("error: non-finite training loss") and "\n" not in message
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_module_entry_point_runs_as_a_subprocess(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "and_mask.run_synthetic", *SMALL, *AND_MASK, "--epochs", "1",
                           "--output_dir", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "final:" in done.stdout and "test_acc" in done.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
