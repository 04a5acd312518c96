"""End-to-end runs of `and_mask.run_cifar` and `gen_mask.run_cifar` on tiny CIFAR-10 files."""
import pytest
import torch

from and_mask.and_mask_utils import METHOD_FLAGS as AND_MASK_FLAGS
from and_mask.core import cli
from and_mask.core.runfolder import read_config, read_metrics
from and_mask.core.training import Trainer
from and_mask.experiments import cifar
from gen_mask.gen_mask_utils import METHOD_FLAGS as GEN_MASK_FLAGS
from tests.support.cifar_files import write_cifar10_files

EVAL_SETS = ("train_eval", "relabelled", "test")


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar10_files(root, n_train_per_batch=2, n_test=4)
    return root


def and_mask_argv(data_path, output_dir, *extra):
    """The original README command, shrunk: 4 training images, all relabelled, batches of 2, 2 epochs."""
    return ["--random_labels_fraction", "1.0", "--agreement_threshold", "0.2", "--method", "and_mask",
            "--epochs", "2", "--weight_decay", "1e-06", "--scale_grad_inverse_sparsity", "1", "--init_lr", "0.0005",
            "--weight_decay_order", "before", "--output_dir", str(output_dir), "--data_path", str(data_path),
            "--batch_size", "2", "--train_subset", "4", "--num_workers", "0", "--download", "0", "--use_cuda", "0",
            "--quiet", *extra]


def set_flag(argv, flag, value):
    """Replace the value of `flag` in `argv`, or drop the flag when `value` is None."""
    i = argv.index(flag)
    argv[i:i + 2] = [] if value is None else [flag, value]
    return argv


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def check_records(run_dir, epochs):
    records = read_metrics(run_dir)
    assert [(r["epoch"], r["phase"]) for r in records] == [(e, "epoch") for e in range(1, epochs + 1)] + [
        (epochs, "final")]
    for record in records:
        assert all(0 <= record[f"{name}_acc"] <= 1 and record[f"{name}_loss"] > 0 for name in EVAL_SETS)
    return records


def test_and_mask_run(data_path, tmp_path):
    final = cli.main(cifar, AND_MASK_FLAGS, "and_mask", and_mask_argv(data_path, tmp_path))
    records = check_records(tmp_path, 2)
    assert all(final[key] == value for key, value in records[-1].items())
    assert records[0]["steps"] == 2
    density = records[0]["mask_density"]
    assert len(density) == len(list(cifar.FastResnet().parameters())) and 0 < min(density.values()) < 1
    flags = read_config(tmp_path)["flags"]
    assert flags["weight_decay_order"] == "before" and flags["grad_chunk_size"] == 16


@pytest.mark.parametrize("method", ["geom_mean", "mean"])
def test_gen_mask_run(data_path, tmp_path, method):
    argv = ["--random_labels_fraction", "1.0", "--method", method, "--epochs", "1", "--weight_decay", "0",
            "--init_lr", "0.001", "--output_dir", str(tmp_path), "--data_path", str(data_path), "--batch_size", "2",
            "--train_subset", "4", "--num_workers", "0", "--download", "0", "--quiet"]
    cli.main(cifar, GEN_MASK_FLAGS, "gen_mask", argv)
    density = check_records(tmp_path, 1)[0]["mask_density"]
    # The mean is one plain backward pass: every coordinate is kept.
    assert (min(density.values()) == 1) == (method == "mean")


def test_learning_rate_drops_after_three_quarters_of_all_steps(data_path):
    parser = cli.build_parser(cifar, AND_MASK_FLAGS, "and_mask")
    args = parser.parse_args(and_mask_argv(data_path, "unused", "--epochs", "3", "--train_subset", "10",
                                           "--batch_size", "3"))
    setup = cifar.build(args, torch.device("cpu"))
    total = 3 * setup.steps_per_epoch  # 3 steps per epoch, milestone at step 3·9//4 = 6
    lrs = []
    for _ in range(total):
        lrs.append(setup.optimizer.param_groups[0]["lr"])
        setup.optimizer.step()  # no gradients: nothing moves, but the scheduler sees a step
        setup.scheduler.step()
    milestone = 3 * total // 4
    assert setup.scheduler_interval == "step"
    assert lrs == pytest.approx([5e-4] * milestone + [5e-5] * (total - milestone))


def test_lr_milestones_drop_the_learning_rate_after_those_epochs(data_path, tmp_path):
    """The paper's schedule (×0.1 after epochs 40 and 60 of 80), shrunk: after epochs 1 and 2 of 3."""
    argv = and_mask_argv(data_path, tmp_path, "--epochs", "3", "--lr_milestones", "2,1", "--agreement_threshold", "0")
    cli.main(cifar, AND_MASK_FLAGS, "and_mask", argv)
    records = check_records(tmp_path, 3)
    assert [r["lr"] for r in records[:3]] == pytest.approx([5e-4, 5e-5, 5e-6])
    assert read_config(tmp_path)["flags"]["lr_milestones"] == [1, 2]


@pytest.mark.parametrize("milestones, message", [("3", "must be below --epochs (3)"), ("0", "positive epochs or none, got 0"),
                                                  ("1.5", "comma-separated positive epochs")])
def test_bad_lr_milestones_are_argparse_errors(tmp_path, milestones, message, capsys):
    argv = and_mask_argv(tmp_path, tmp_path / "run", "--epochs", "3", "--lr_milestones", milestones)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(cifar, AND_MASK_FLAGS, "and_mask", argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(data_path, tmp_path, monkeypatch):
    uninterrupted = tmp_path / "uninterrupted"
    cli.main(cifar, AND_MASK_FLAGS, "and_mask", and_mask_argv(data_path, uninterrupted, "--epochs", "3"))

    # Interrupt after epoch 2 was logged but before its checkpoint was written: the resumed run
    # must drop that record, restart from the epoch-1 checkpoint and redo epochs 2 and 3.
    save_checkpoint = Trainer._checkpoint

    def interrupt_at_epoch_2(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        save_checkpoint(self, epoch)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(Trainer, "_checkpoint", interrupt_at_epoch_2)
    with pytest.raises(SystemExit, match="^130$"):  # 128 + SIGINT
        cli.main(cifar, AND_MASK_FLAGS, "and_mask", and_mask_argv(data_path, resumed, "--epochs", "3"))
    monkeypatch.setattr(Trainer, "_checkpoint", save_checkpoint)
    assert [r["epoch"] for r in read_metrics(resumed)] == [1, 2]
    torch.manual_seed(12345)  # the resumed process starts from another RNG state
    cli.main(cifar, AND_MASK_FLAGS, "and_mask", and_mask_argv(data_path, resumed, "--epochs", "3", "--resume"))
    assert without_timing(read_metrics(resumed)) == without_timing(check_records(uninterrupted, 3))
    final_a = torch.load(uninterrupted / "weights_final.pt")
    final_b = torch.load(resumed / "weights_final.pt")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_worker_processes_give_the_same_run(data_path, tmp_path):
    """DataLoader workers draw their seeds from torch's RNG exactly as the main-process loader does."""
    for workers in ("0", "2"):
        argv = and_mask_argv(data_path, tmp_path / workers, "--epochs", "1", "--agreement_threshold", "0")
        set_flag(argv, "--num_workers", workers)
        cli.main(cifar, AND_MASK_FLAGS, "and_mask", argv)
    assert without_timing(read_metrics(tmp_path / "0")) == without_timing(read_metrics(tmp_path / "2"))


@pytest.mark.parametrize("package", ["and_mask", "gen_mask"])
def test_missing_data_is_a_one_line_error(tmp_path, package):
    flags = AND_MASK_FLAGS if package == "and_mask" else GEN_MASK_FLAGS
    with pytest.raises(SystemExit, match=r"^error: CIFAR-10 not found in .*data_batch_1"):
        cli.main(cifar, flags, package, and_mask_argv(tmp_path / "empty", tmp_path / "run"))


@pytest.mark.parametrize("change", [["--batch_size", "5"], ["--output_dir", None], ["--random_labels_fraction", "1.5"],
                                    ["--weight_decay_order", "middle"]])
def test_bad_flags_are_argparse_errors(tmp_path, change, capsys):
    argv = set_flag(and_mask_argv(tmp_path, tmp_path / "run"), *change)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(cifar, AND_MASK_FLAGS, "and_mask", argv)
    assert exit_info.value.code == 2 and change[0] in capsys.readouterr().err


TEMPORAL = ["--optimizer", "temporal_and_mask_adam", "--beta3", "0.9", "--temporal_threshold", "0.5"]


@pytest.mark.parametrize("extra, message", [
    (["--envs_per_step", "1"], "--envs_per_step is not available for cifar"),
    (TEMPORAL, "--weight_decay_order before is not available"),
])
def test_one_environment_per_step_and_coupled_decay_with_the_temporal_mask_are_refused(tmp_path, capsys, extra,
                                                                                      message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(cifar, AND_MASK_FLAGS, "and_mask", and_mask_argv(tmp_path / "empty", tmp_path / "run", *extra))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_temporal_and_mask_adam_run(data_path, tmp_path):
    argv = set_flag(and_mask_argv(data_path, tmp_path, *TEMPORAL), "--weight_decay_order", None)
    cli.main(cifar, AND_MASK_FLAGS, "and_mask", set_flag(argv, "--epochs", "1"))
    records = check_records(tmp_path, 1)
    assert 0 < records[0]["temporal_mask_density"] <= 1
    assert read_config(tmp_path)["flags"]["weight_decay_order"] == "after"


def test_consistency_estimate_is_refused_before_training(data_path, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="env_loaders"):
        cli.main(cifar, AND_MASK_FLAGS, "and_mask", and_mask_argv(data_path, out, "--consistency_eps", "0.1"))
    assert read_metrics(out) == []
