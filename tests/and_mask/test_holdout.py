"""--holdout_fraction: validation data held out from the training environments (synthetic, Colored MNIST).

Its default (0) leaves every draw as it was before the flag existed: the training data, its
loaders and the evaluation sets are those of the recipe the experiments used before; a share
> 0 holds out examples of every training environment, never trained on, evaluated as `val`.
"""
import json

import pytest
import torch

from and_mask.core import cli
from and_mask.datasets import colored_mnist as cm
from and_mask.datasets.synthetic import get_spirals_dataset, make_loader
from and_mask.experiments import colored_mnist, synthetic
from gen_mask.gen_mask_utils import METHOD_FLAGS
from tests.support.mnist_files import write_mnist_files

SYNTHETIC = ["--examples_per_env", "64", "--n_test", "100", "--n_envs", "4", "--batch_size", "16",
             "--n_hidden_units", "16", "--n_hidden_layers", "1", "--epochs", "2", "--quiet", "--use_cuda", "0",
             "--method", "and_mask", "--seed", "3"]


def parse(experiment, argv):
    parser = cli.build_parser(experiment, METHOD_FLAGS, "gen_mask")
    args = parser.parse_args(argv)
    METHOD_FLAGS.resolve(args, parser)
    experiment.check(args, parser)
    return args


def tensors(loader):
    return loader.dataset.tensors


def same_loader(a, b):
    return (a.batch_size, a.drop_last, type(a.sampler), type(a.batch_sampler)) == \
        (b.batch_size, b.drop_last, type(b.sampler), type(b.batch_sampler))


def test_synthetic_default_holds_nothing_out_and_draws_as_before():
    args = parse(synthetic, SYNTHETIC)
    assert args.holdout_fraction == 0
    setup = synthetic.build(args, torch.device("cpu"))
    # The recipe before the flag: one make_loader per environment (seed + e), the test set alone.
    before = [make_loader(64, env, 4, 3, 8, 16, 3 + env) for env in range(4)]
    for now, then in zip(setup.env_loaders, before, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(tensors(now), tensors(then), strict=True))
        assert same_loader(now, then)
    assert list(setup.eval_loaders) == ["test"]
    assert setup.steps_per_epoch == 64 // 16
    cli.seed_everything(0)
    now = [x for x, _, _, _ in setup.train_batches(1)]
    cli.seed_everything(0)
    then = [x for x, _, _, _ in synthetic.env_group_batches(before, 4)]
    assert len(now) == len(then) == 4 and all(torch.equal(a, b) for a, b in zip(now, then))


def test_synthetic_holdout_is_the_end_of_each_environment_s_draw(tmp_path):
    args = parse(synthetic, SYNTHETIC + ["--holdout_fraction", "0.25"])
    setup = synthetic.build(args, torch.device("cpu"))
    assert list(setup.eval_loaders) == ["val", "test"]
    val_x, val_y = tensors(setup.eval_loaders["val"])
    assert len(val_x) == 4 * 16
    for env, loader in enumerate(setup.env_loaders):
        inputs, labels = get_spirals_dataset(64, 3, env, 4, 8, seed=3 + env)
        assert torch.equal(tensors(loader)[0], torch.from_numpy(inputs[:48]))  # trained on: the first 48
        assert torch.equal(val_x[16 * env:16 * (env + 1)], torch.from_numpy(inputs[48:]))
        assert torch.equal(val_y[16 * env:16 * (env + 1)], torch.from_numpy(labels[48:]))
    assert setup.steps_per_epoch == 48 // 16
    cli.main(synthetic, METHOD_FLAGS, "gen_mask", SYNTHETIC + ["--holdout_fraction", "0.25", "--output_dir",
                                                               str(tmp_path)])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("val_acc" in r and "val_loss" in r for r in records) and len(records) == 3


def test_synthetic_holdout_leaving_too_few_examples_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse(synthetic, SYNTHETIC + ["--holdout_fraction", "0.9"])
    assert "exceeds --examples_per_env (64) less the 57 held out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(synthetic, SYNTHETIC + ["--holdout_fraction", "1"])
    assert "--holdout_fraction: must lie in [0, 1)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mnist_files(root, "mnist", n_train=600, n_test=30, seed=2)
    return root


def colored_argv(root, *extra):
    return ["--data_path", str(root), "--output_dir", "unused", "--init_lr", "0.01", "--weight_decay", "0",
            "--random_labels_fraction", "0.3", "--num_workers", "0", "--method", "mean", "--agreement_envs", "color",
            "--batch_size", "20", *extra]


@pytest.mark.usefixtures("offline")
def test_colored_mnist_default_holds_nothing_out_and_draws_as_before(data_root):
    args = parse(colored_mnist, colored_argv(data_root))
    assert args.holdout_fraction == 0
    setup = colored_mnist.build(args, torch.device("cpu"))
    built = cm.prepared("mnist", "original", 0, data_root)
    envs = built["envs"]
    train_idx = (envs < 2).nonzero().squeeze(1)
    _, relabelled = cm.relabel(built["labels"][train_idx], 0.3, 2, 0)
    # The recipe before the flag: the environments, the training set and its relabelled part as drawn.
    assert [torch.equal(loader.dataset.rows, (envs == e).nonzero().squeeze(1))
            for e, loader in enumerate(setup.env_loaders)] == [True, True]
    assert torch.equal(setup.eval_loaders["train_eval"].dataset.rows, train_idx)
    assert torch.equal(setup.eval_loaders["relabelled"].dataset.rows, train_idx[relabelled])
    assert list(setup.eval_loaders) == ["train_eval", "relabelled", "test"]


@pytest.mark.usefixtures("offline")
def test_colored_mnist_holdout_takes_a_share_of_each_colour_environment(data_root, tmp_path):
    args = parse(colored_mnist, colored_argv(data_root, "--holdout_fraction", "0.2"))
    setup = colored_mnist.build(args, torch.device("cpu"))
    envs = cm.prepared("mnist", "original", 0, data_root)["envs"]
    assert list(setup.eval_loaders) == ["train_eval", "relabelled", "val", "test"]
    val = set(setup.eval_loaders["val"].dataset.rows.tolist())
    trained = set(setup.eval_loaders["train_eval"].dataset.rows.tolist())
    assert val and not val & trained
    assert set(setup.eval_loaders["relabelled"].dataset.rows.tolist()) <= trained
    for env, loader in enumerate(setup.env_loaders):
        size = int((envs == env).sum())
        assert len(loader.dataset) == size - int(0.2 * size)
        assert sum(int(envs[row]) == env for row in val) == int(0.2 * size)
    argv = colored_argv(data_root, "--holdout_fraction", "0.2", "--epochs", "1", "--quiet")
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "run")
    cli.main(colored_mnist, METHOD_FLAGS, "gen_mask", argv)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("val_acc" in r for r in records)
