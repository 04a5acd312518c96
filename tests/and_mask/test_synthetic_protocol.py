"""The synthetic task's protocols: `--protocol original` (unchanged defaults) and `--protocol paper`
(Appendix B: sizes, signature draw, learning-rate schedule, epoch budget, early stop)."""
import argparse
import json
import math

import numpy as np
import pytest
import torch

from and_mask import run_synthetic as and_mask_synthetic
from and_mask.core.runfolder import read_config, read_metrics
from and_mask.experiments import synthetic
from gen_mask import run_synthetic as gen_mask_synthetic

TINY = ["--examples_per_env", "64", "--n_test", "100", "--batch_size", "16", "--n_hidden_units", "16",
        "--n_hidden_layers", "2", "--quiet", "--use_cuda", "0"]
AND_MASK = ["--method", "and_mask", "--agreement_threshold", "0.5", "--scale_grad_inverse_sparsity", "1"]
# The original code's defaults for run_synthetic; --protocol original must keep every one of them.
ORIGINAL = dict(examples_per_env=1024, n_train_envs=16, n_agreement_envs=16, n_dims=8, signature_std=1.0,
                batch_size=256, epochs=150, lr_milestones=[112], stop_train_acc_above=1.0, stop_test_acc_below=0.0)
PAPER = dict(examples_per_env=1280, n_train_envs=32, n_agreement_envs=16, n_dims=32, signature_std=math.sqrt(0.1),
             batch_size=128, epochs=94, lr_milestones=[47, 70], stop_train_acc_above=0.97, stop_test_acc_below=0.6)


def effective(module, argv):
    """The flags in effect after parsing and protocol resolution, as a run records them."""
    parser = module.build_parser()
    args = parser.parse_args(argv)
    synthetic.check(args, parser)
    return vars(args)


def subset(flags, keys):
    return {k: flags[k] for k in keys}


@pytest.mark.parametrize("argv", [[], ["--protocol", "original"]])
def test_original_protocol_keeps_the_original_defaults(argv):
    flags = effective(and_mask_synthetic, AND_MASK + argv)
    assert flags["protocol"] == "original" and subset(flags, ORIGINAL) == ORIGINAL


def test_paper_protocol_values_and_explicit_flags_override_them():
    assert subset(effective(and_mask_synthetic, AND_MASK + ["--protocol", "paper"]), PAPER) == PAPER
    flags = effective(and_mask_synthetic, AND_MASK + ["--protocol", "paper", "--epochs", "20", "--batch_size", "64",
                                                      "--n_dims", "8", "--stop_train_acc_above", "1"])
    assert flags["epochs"] == 20 and flags["lr_milestones"] == [10, 15]  # milestones follow the epochs given
    assert flags["batch_size"] == 64 and flags["n_dims"] == 8 and flags["stop_train_acc_above"] == 1.0
    assert flags["examples_per_env"] == 1280 and flags["n_train_envs"] == 32 and flags["stop_test_acc_below"] == 0.6
    # 3000/D epochs for D training environments (rounded up); gen_mask's --n_envs plays D.
    flags = effective(gen_mask_synthetic, ["--method", "mean", "--protocol", "paper", "--n_envs", "64",
                                         "--lr_milestones", "30,5"])
    assert flags["epochs"] == math.ceil(3000 / 64) == 47 and flags["lr_milestones"] == [5, 30]
    assert flags["envs_per_step"] == 16  # the paper protocol's group size G = min(16, D)
    assert effective(gen_mask_synthetic, ["--method", "mean", "--protocol", "paper", "--n_envs", "8"])["envs_per_step"] == 8
    assert effective(gen_mask_synthetic, ["--method", "mean", "--protocol", "paper", "--envs_per_step", "32"])[
        "envs_per_step"] == 32  # the reading in which every step combines all 32


@pytest.mark.parametrize("bad, message", [
    (["--n_train_envs", "24"], "--n_train_envs (24) must be a multiple of --n_agreement_envs (16, the --protocol "
                               "paper default; give --n_agreement_envs)"),
    (["--n_train_envs", "24", "--n_agreement_envs", "16"], "must be a multiple of --n_agreement_envs (16)"),
    (["--lr_milestones", "94"], "must be below --epochs (94)"),
    (["--lr_milestones", "0"], "expected comma-separated positive epochs or none, got 0"),
    (["--lr_milestones", "1,x"], "expected comma-separated positive epochs or none, got 1,x"),
    (["--stop_test_acc_below", "1.5"], "[0, 1]"),
    (["--signature_std", "nan"], "positive finite"),
    (["--protocol", "iclr"], "invalid choice"),
])
def test_bad_protocol_flags_are_one_line_errors(bad, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        effective(and_mask_synthetic, AND_MASK + ["--protocol", "paper"] + bad)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_paper_protocol_data_follow_appendix_b():
    """32 environments × 1280 examples, signatures ±S_e with S_e,i ~ N(0, 0.1), 2000 test examples."""
    parser = and_mask_synthetic.build_parser()
    args = parser.parse_args(AND_MASK + ["--protocol", "paper"])
    synthetic.check(args, parser)
    setup = synthetic.build(args, torch.device("cpu"))
    envs = [loader.dataset.tensors for loader in setup.env_loaders]
    assert len(envs) == 32 and all(x.shape == (1280, 34) and y.shape == (1280,) for x, y in envs)
    rows = []
    for x, y in envs:
        sign = (2 * y - 1)[:, None]
        row = (x[:, 2:] * sign)[0]  # the environment's signature S_e
        assert torch.equal(x[:, 2:], sign * row)  # a perfect shortcut inside the environment
        rows.append(row)
    entries = torch.stack(rows).double()  # 32 × 32 independent N(0, 0.1) draws
    assert abs(entries.mean()) < 0.05 and abs(entries.std() - math.sqrt(0.1)) < 0.03
    labels = torch.cat([y for _, y in envs])
    assert abs(labels.mean() - 0.5) < 0.02
    x_test, y_test = setup.eval_loaders["test"].dataset.tensors
    assert x_test.shape == (2000, 34)
    assert abs(x_test[:, 2:].double().std() - math.sqrt(0.1)) < 0.01  # test signatures: the same law, i.i.d.
    correlations = [abs(np.corrcoef(x_test[:, 2 + d], y_test)[0, 1]) for d in range(32)]
    assert max(correlations) < 0.1
    assert torch.allclose(x_test[:, :2].std(dim=0), torch.ones(2), atol=1e-3)  # standardised spiral


def run(tmp_path, name, argv, module=and_mask_synthetic):
    out = tmp_path / name
    final = module.main(argv + ["--output_dir", str(out)])
    return final, read_metrics(out), out


def test_paper_learning_rate_drops_at_one_half_and_three_quarters(tmp_path):
    _, records, out = run(tmp_path, "lr", TINY + AND_MASK + ["--protocol", "paper", "--n_train_envs", "4",
                                                              "--n_agreement_envs", "2", "--n_dims", "4",
                                                              "--epochs", "8", "--stop_train_acc_above", "1"])
    assert [r["lr"] for r in records if r["phase"] == "epoch"] == pytest.approx([1e-2] * 4 + [1e-3] * 2 + [1e-4] * 2)
    assert read_config(out)["flags"]["lr_milestones"] == [4, 6]


def test_early_stop_ends_cleanly_with_its_reason_and_a_final_evaluation(tmp_path):
    # Thresholds that any run meets after its first epoch (train accuracy > 0, test accuracy < 1).
    argv = TINY + AND_MASK + ["--n_train_envs", "4", "--n_agreement_envs", "2", "--epochs", "5",
                              "--stop_train_acc_above", "0", "--stop_test_acc_below", "1"]
    final, records, out = run(tmp_path, "stop", argv)
    assert [(r["epoch"], r["phase"]) for r in records] == [(1, "epoch"), (1, "final")]
    reason = records[-1]["stopped_early"]
    assert reason.startswith("early stop: running train_acc") and "test_acc" in reason and "\n" not in reason
    assert final["stopped_early"] == reason and final["epoch"] == 1
    assert (out / "weights_final.pt").exists() and (out / "checkpoint.pt").exists()
    # Resuming a stopped run trains no further: the same final evaluation again.
    and_mask_synthetic.main(argv + ["--output_dir", str(out), "--resume"])
    again = read_metrics(out)
    assert [(r["epoch"], r["phase"]) for r in again] == [(1, "epoch"), (1, "final")]
    assert {k: v for k, v in again[-1].items()} == records[-1]


def test_a_rule_that_never_fires_changes_nothing(tmp_path):
    base = TINY + AND_MASK + ["--n_train_envs", "4", "--n_agreement_envs", "2", "--epochs", "2", "--seed", "3"]

    def strip(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    _, plain, a = run(tmp_path, "plain", base)
    _, never, b = run(tmp_path, "never", base + ["--stop_train_acc_above", "0.5", "--stop_test_acc_below", "0"])
    assert strip(plain) == strip(never) and "stopped_early" not in plain[-1]


def test_original_protocol_runs_are_bit_identical_to_the_default_and_to_explicit_flags(tmp_path):
    """`--protocol original`, no --protocol, and every original value spelled out give the same run."""
    base = TINY + AND_MASK + ["--n_train_envs", "4", "--n_agreement_envs", "2", "--epochs", "3", "--seed", "5"]
    spelled = ["--n_dims", "8", "--signature_std", "1", "--lr_milestones", "2", "--stop_train_acc_above", "1",
               "--stop_test_acc_below", "0"]
    runs = {name: run(tmp_path, name, base + extra) for name, extra in
            [("default", []), ("original", ["--protocol", "original"]), ("spelled", spelled)]}

    def strip(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    weights = {name: torch.load(out / "weights_final.pt") for name, (_, _, out) in runs.items()}
    for name in ("original", "spelled"):
        assert strip(runs[name][1]) == strip(runs["default"][1])
        assert all(torch.equal(weights[name][k], weights["default"][k]) for k in weights["default"])
    flags = read_config(runs["default"][2])["flags"]
    assert flags["protocol"] == "original" and flags["lr_milestones"] == [2] and flags["signature_std"] == 1.0


def test_config_from_before_the_protocol_flags_rebuilds_as_the_original(tmp_path):
    """A saved config without the protocol flags (older runs) resolves to the original protocol."""
    args = argparse.Namespace(**{k: v for k, v in effective(gen_mask_synthetic, ["--method", "mean"]).items()
                                 if k not in ("protocol", "signature_std", "lr_milestones", "stop_train_acc_above",
                                              "stop_test_acc_below")})
    synthetic.resolve_protocol(args)
    assert args.protocol == "original" and args.lr_milestones == [112] and args.signature_std == 1.0
    assert synthetic.stop_rule(args) is None
    json.dumps(vars(args))  # what config.json stores
