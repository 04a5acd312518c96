"""Colored MNIST runs: flags, agreement environments, evaluation sets, both packages end to end."""
import importlib
import json

import pytest
import torch

from and_mask import and_mask_utils
from and_mask.and_mask_utils import AND_MASK
from and_mask.and_mask_utils import METHOD_FLAGS as AND_MASK_FLAGS
from and_mask.core import cli
from and_mask.core.optim import AdamFlexibleWeightDecay
from and_mask.core.training import Trainer, TrainSetup
from and_mask.datasets import colored_mnist as cm
from and_mask.experiments import colored_mnist
from gen_mask.gen_mask_utils import METHOD_FLAGS as GEN_MASK_FLAGS
from tests.support.mnist_files import write_mnist_files

N_IMAGES = 1200  # 400 examples per environment


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mnist_files(root, "mnist", n_train=N_IMAGES, n_test=50, seed=1)
    return root


pytestmark = pytest.mark.usefixtures("offline")


def parse(package, argv):
    flags = AND_MASK_FLAGS if package == "and_mask" else GEN_MASK_FLAGS
    parser = cli.build_parser(colored_mnist, flags, package)
    args = parser.parse_args(argv)
    flags.resolve(args, parser)
    colored_mnist.check(args, parser)
    return args


def base_flags(root, tmp_path, *extra):
    return ["--data_path", str(root), "--output_dir", str(tmp_path / "run"), "--init_lr", "0.01",
            "--weight_decay", "0.001", "--random_labels_fraction", "0", "--num_workers", "0", *extra]


AND_MASK_TAU1 = ["--method", "and_mask", "--agreement_threshold", "1", "--scale_grad_inverse_sparsity", "1"]


def test_defaults_follow_the_original(data_root, tmp_path):
    args = parse("and_mask", base_flags(data_root, tmp_path, *AND_MASK_TAU1))
    assert (args.batch_size, args.epochs, args.use_cuda, args.batch_norm, args.dropout_p) == (100, 15, "0", 0, 0.0)
    assert (args.n_hidden_units, args.n_hidden_layers, args.n_outputs, args.l1_coef, args.l2_coef) == (784, 0, 10, 0, 0)
    assert (args.weight_decay_order, args.seed, args.num_workers, args.protocol, args.dataset) == (
        "before", 0, 0, "original", "mnist")
    assert args.agreement_envs == "example"


@pytest.mark.parametrize("package, argv, message", [
    ("and_mask", ["--method", "and_mask", "--agreement_threshold", "1", "--init_lr", "0.1"], "required"),
    ("gen_mask", ["--method", "mean", "--init_lr", "0.1", "--weight_decay", "0", "--random_labels_fraction", "0"],
     "--output_dir"),
    ("gen_mask", ["--method", "mean", "--init_lr", "0.1", "--weight_decay", "0", "--random_labels_fraction", "1.5",
                  "--output_dir", "x"], "random_labels_fraction"),
    ("gen_mask", ["--method", "mean", "--init_lr", "0.1", "--weight_decay", "0", "--random_labels_fraction", "0",
                  "--output_dir", "x", "--protocol", "irm", "--n_dims", "2352"], "n_dims"),
    ("gen_mask", ["--method", "mean", "--init_lr", "0.1", "--weight_decay", "0", "--random_labels_fraction", "0",
                  "--output_dir", "x", "--envs_per_step", "1"], "--envs_per_step needs --agreement_envs color"),
    ("gen_mask", ["--method", "mean", "--init_lr", "0.1", "--weight_decay", "0", "--random_labels_fraction", "0",
                  "--output_dir", "x", "--optimizer", "temporal_and_mask_adam", "--beta3", "0.9",
                  "--temporal_threshold", "0.5", "--weight_decay_order", "before"],
     "--weight_decay_order before is not available"),
])
def test_bad_flags_are_argparse_errors(package, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(package, argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["original", "irm"])
def test_agreement_environments(data_root, tmp_path, protocol):
    args = parse("gen_mask", base_flags(data_root, tmp_path, "--method", "mean", "--protocol", protocol,
                                        "--batch_size", "20"))
    setup = colored_mnist.build(args, torch.device("cpu"))
    n_inputs = cm.PROTOCOLS[protocol].n_inputs
    n_train = sum(len(loader.dataset) for loader in setup.env_loaders)
    batches = list(setup.train_batches(1))
    assert len(batches) == setup.steps_per_epoch == n_train // 20
    x, y, n_envs = batches[0]
    assert x.shape == (20, n_inputs) and n_envs == 20  # every example is an environment

    args.agreement_envs = "color"
    setup = colored_mnist.build(args, torch.device("cpu"))
    env_rows = [set(map(tuple, loader.dataset[list(range(len(loader.dataset)))][0].tolist()))
                for loader in setup.env_loaders]
    batches = list(setup.train_batches(1))
    assert len(batches) == setup.steps_per_epoch == min(len(loader.dataset) for loader in setup.env_loaders) // 20
    for x, y, n_envs, env_ids in batches[:3]:
        assert x.shape == (40, n_inputs) and n_envs == 2 and sorted(env_ids) == [0, 1]
        halves = [set(map(tuple, x[:20].tolist())), set(map(tuple, x[20:].tolist()))]
        # one colour environment per half, in the order env_ids says (drawn at random each step)
        assert halves[0] <= env_rows[env_ids[0]] and halves[1] <= env_rows[env_ids[1]]


def test_one_colour_environment_per_step(data_root, tmp_path):
    args = parse("gen_mask", base_flags(data_root, tmp_path, "--method", "mean", "--batch_size", "20",
                                        "--agreement_envs", "color", "--envs_per_step", "1"))
    setup = colored_mnist.build(args, torch.device("cpu"))
    batches = list(setup.train_batches(1))
    assert len(batches) == setup.steps_per_epoch == 2 * (N_IMAGES // 3 // 20)
    assert all(n_envs == 1 and len(y) == 20 for _, y, n_envs, _ in batches)
    assert sorted(ids[0] for _, _, _, ids in batches) == [0] * (len(batches) // 2) + [1] * (len(batches) // 2)


def test_temporal_and_mask_adam_with_decoupled_decay(data_root, tmp_path):
    argv = base_flags(data_root, tmp_path, "--method", "and_mask", "--agreement_threshold", "0.5",
                      "--scale_grad_inverse_sparsity", "1", "--optimizer", "temporal_and_mask_adam", "--beta3", "0.9",
                      "--temporal_threshold", "0.3", "--epochs", "2", "--quiet", "--batch_size", "40")
    cli.main(colored_mnist, AND_MASK_FLAGS, "and_mask", argv)
    records = read_metrics(tmp_path / "run")
    assert all(0 < r["temporal_mask_density"] <= 1 for r in records[:2])
    assert json.load(open(tmp_path / "run" / "config.json"))["flags"]["weight_decay_order"] == "after"


def test_random_labels_are_applied_and_trained_on(data_root, tmp_path):
    args = parse("and_mask", base_flags(data_root, tmp_path, *AND_MASK_TAU1) + ["--random_labels_fraction", "0.3"])
    setup = colored_mnist.build(args, torch.device("cpu"))
    clean = cm.prepared("mnist", "original", 0, data_root)
    train_rows = (clean["envs"] < 2).nonzero().squeeze(1)
    assert list(setup.eval_loaders) == ["train_eval", "relabelled", "test"]
    relabelled = setup.eval_loaders["relabelled"].dataset
    assert len(relabelled) == round(0.3 * len(train_rows))
    # The training data carries the new labels: those of the relabelled examples differ from the
    # construction about half the time, all others are unchanged.
    train_labels = setup.eval_loaders["train_eval"].dataset.labels
    changed = train_labels != clean["labels"]
    assert not changed[~torch.isin(torch.arange(len(changed)), relabelled.rows)].any()
    assert 0.35 < float(changed[relabelled.rows].float().mean()) < 0.65
    # Training draws from the whole training set, relabelled examples included.
    assert len(setup.eval_loaders["train_eval"].dataset) == len(train_rows)
    seen = torch.cat([y for _, y, _ in setup.train_batches(1)])
    assert len(seen) == len(train_rows) // 100 * 100


def test_l2_coef_adds_l2_times_theta_to_the_combined_gradient():
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randint(0, 2, (8,))
    grads = []
    for l2 in (0.0, 0.3):
        torch.manual_seed(1)
        model = torch.nn.Linear(5, 2)
        opt = AdamFlexibleWeightDecay(model.parameters(), lr=0.1, weight_decay_order="before")
        setup = TrainSetup(model, opt, torch.nn.functional.cross_entropy, None, {}, 1)
        trainer = Trainer(setup, AND_MASK, {"agreement_threshold": 0.5, "scale_grad_inverse_sparsity": 1}, None,
                          torch.device("cpu"), l2_coef=l2)
        trainer._step(x, y, 8)
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1, p in zip(grads[0], grads[1], model.parameters()):
        assert torch.allclose(g1 - g0, 0.3 * p.detach(), atol=1e-6)


@pytest.mark.parametrize("tau", [0.0, 0.3, 1.0])
def test_per_example_agreement_mask_matches_its_definition(tau):
    """100 environments (one per example) on the logistic model's weight span several sign blocks."""
    grads = torch.randn(100, 10, 2352)
    grads[:, 0, :5] = 0.0  # exact zeros count as sign 0
    grads[:, 1, :7] = grads[:, 1, :7].abs()  # unanimous coordinates
    expected = (torch.sign(grads).sum(0).abs() / 100 >= tau).float()
    got = and_mask_utils.agreement_mask(grads, tau)
    assert torch.equal(got, expected) and got.shape == (10, 2352)
    assert got[1, :7].eq(1).all() and (tau == 0 or not got[0, :5].any())


def read_metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_and_mask_end_to_end_learns_and_reports(data_root, tmp_path):
    argv = base_flags(data_root, tmp_path, "--method", "and_mask", "--agreement_threshold", "0",
                      "--scale_grad_inverse_sparsity", "0", "--random_labels_fraction", "0.2", "--epochs", "4",
                      "--n_outputs", "2", "--quiet", "--batch_size", "40")
    final = cli.main(colored_mnist, AND_MASK_FLAGS, "and_mask", argv)
    records = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 4] and records[-1]["phase"] == "final"
    for key in ("train_eval_acc", "relabelled_acc", "test_acc", "train_loss", "train_acc"):
        assert key in records[0]
    # Colour (80 %/90 % agreement) and shape (75 %) are both learnable: well above chance on the
    # training set; the colour flips at test time.
    assert final["train_eval_acc"] > 0.7
    lr_drop = [r["lr"] for r in records if r.get("phase") == "epoch"]
    assert lr_drop[0] == 0.01 and lr_drop[-1] == pytest.approx(0.001)  # ×0.1 at 3/4 of all steps


@pytest.mark.parametrize("method, extra", [("and_mask", ["--agreement_threshold", "0.5"]), ("align_weights", [])])
def test_gen_mask_end_to_end_on_colour_environments(data_root, tmp_path, method, extra):
    argv = base_flags(data_root, tmp_path, "--method", method, *extra, "--agreement_envs", "color", "--protocol",
                      "irm", "--epochs", "2", "--quiet", "--n_hidden_layers", "1", "--n_hidden_units", "16",
                      "--batch_size", "50")
    final = cli.main(colored_mnist, GEN_MASK_FLAGS, "gen_mask", argv)
    assert 0 <= final["test_acc"] <= 1 and "relabelled_acc" not in final
    config = json.load(open(tmp_path / "run" / "config.json"))
    assert config["package"] == "gen_mask" and config["flags"]["agreement_envs"] == "color"


ORIGINAL_README = {  # the original README's commands, with --use_cuda=0 and a temporary --output_dir
    "and_mask": ["--method=and_mask", "--agreement_threshold=1.", "--batch_size=256",
                 "--random_labels_fraction=0.25", "--scale_grad_inverse_sparsity=1", "--use_cuda=0",
                 "--n_hidden_units=256", "--init_lr=0.01", "--weight_decay=1e-3"],
    "gen_mask": ["--method=and_mask", "--batch_size=256", "--random_labels_fraction=0.25", "--use_cuda=0",
                 "--n_hidden_units=256", "--init_lr=0.01", "--weight_decay=1e-3"],
}


@pytest.mark.parametrize("package", ["and_mask", "gen_mask"])
def test_original_readme_commands_run(data_root, tmp_path, monkeypatch, package):
    monkeypatch.setattr(colored_mnist, "DEFAULT_DATA_PATH", data_root)  # "given the data"
    run_module = importlib.import_module(f"{package}.run_colored_mnist")
    final = run_module.main(ORIGINAL_README[package] + [f"--output_dir={tmp_path / 'run'}", "--quiet"])
    records = read_metrics(tmp_path / "run")
    assert len(records) == 16 and "relabelled_acc" in final  # 15 epochs and the final evaluation
    assert records[0]["steps"] == (2 * N_IMAGES // 3) // 256


def test_missing_data_is_a_one_line_error(tmp_path):
    argv = base_flags(tmp_path / "empty", tmp_path, "--method", "mean", "--quiet")
    with pytest.raises(SystemExit) as exit_:
        cli.main(colored_mnist, GEN_MASK_FLAGS, "gen_mask", argv)
    message = str(exit_.value.code)
    assert message.startswith("error: mnist not found") and "train-images-idx3-ubyte" in message
    assert "\n" not in message



def learning_rates(setup):
    """The learning rate at each step of the run, stepping the optimiser without gradients (nothing moves)."""
    lrs = []
    for _ in range(setup.epochs * setup.steps_per_epoch):
        lrs.append(setup.optimizer.param_groups[0]["lr"])
        setup.optimizer.step()
        setup.scheduler.step()
    return lrs


@pytest.mark.parametrize("protocol, extra, drops_at", [
    ("original", [], "3/4"),                       # the original code: ×0.1 after 3/4 of all iterations
    ("irm", [], None),                             # the IRM authors' script: a constant rate
    ("original", ["--lr_milestones", "none"], None),
    ("irm", ["--lr_milestones", "2"], "epoch 2"),
])
def test_learning_rate_schedule_follows_the_protocol(data_root, tmp_path, protocol, extra, drops_at):
    args = parse("gen_mask", base_flags(data_root, tmp_path, "--method", "mean", "--protocol", protocol,
                                        "--batch_size", "50", "--epochs", "3", *extra))
    setup = colored_mnist.build(args, torch.device("cpu"))
    lrs = learning_rates(setup)
    total, steps = len(lrs), setup.steps_per_epoch
    drop = {"3/4": 3 * total // 4, "epoch 2": 2 * steps, None: total}[drops_at]
    assert lrs == pytest.approx([0.01] * drop + [0.001] * (total - drop))
    assert args.lr_milestones == {"3/4": None, "epoch 2": [2], None: []}[drops_at]


def test_an_irm_protocol_run_made_with_the_old_drop_is_not_resumed(data_root, tmp_path, capsys):
    """A run whose config.json predates --lr_milestones had the drop at 3/4: the new default differs."""
    argv = base_flags(data_root, tmp_path, "--method", "mean", "--protocol", "irm", "--agreement_envs", "color",
                      "--epochs", "1", "--batch_size", "100", "--quiet", "--n_hidden_layers", "1",
                      "--n_hidden_units", "8")
    cli.main(colored_mnist, GEN_MASK_FLAGS, "gen_mask", argv)
    config_path = tmp_path / "run" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["flags"]["lr_milestones"] == []
    del config["flags"]["lr_milestones"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(colored_mnist, GEN_MASK_FLAGS, "gen_mask", [*argv, "--resume"])
    assert "--resume refused" in str(exit_info.value.code) and "--lr_milestones none" in str(exit_info.value.code)


def test_train_and_test_subsets_keep_the_first_examples_of_each_environment(data_root, tmp_path):
    full = colored_mnist.build(parse("gen_mask", base_flags(data_root, tmp_path, "--method", "mean", "--agreement_envs",
                                                            "color", "--batch_size", "10")), torch.device("cpu"))
    args = parse("gen_mask", base_flags(data_root, tmp_path, "--method", "mean", "--agreement_envs", "color",
                                        "--batch_size", "10", "--train_subset", "30", "--test_subset", "20",
                                        "--random_labels_fraction", "0.5"))
    setup = colored_mnist.build(args, torch.device("cpu"))
    for small, whole in zip(setup.env_loaders, full.env_loaders):
        assert torch.equal(small.dataset.rows, whole.dataset.rows[:30])
    assert torch.equal(setup.eval_loaders["test"].dataset.rows, full.eval_loaders["test"].dataset.rows[:20])
    assert len(setup.eval_loaders["train_eval"].dataset) == 60 and setup.steps_per_epoch == 3
    # the relabelled set holds the kept examples given random labels, and only those
    relabelled = set(setup.eval_loaders["relabelled"].dataset.rows.tolist())
    assert relabelled and relabelled <= set(setup.eval_loaders["train_eval"].dataset.rows.tolist())


@pytest.mark.parametrize("envs, batch, message", [("color", "31", "exceeds the 30 training examples that "
                                                   "--train_subset 30 leaves in each colour environment"),
                                                  ("example", "61", "exceeds the 60 training examples")])
def test_a_batch_larger_than_the_subset_is_refused(data_root, tmp_path, envs, batch, message):
    argv = base_flags(data_root, tmp_path, "--method", "mean", "--agreement_envs", envs, "--batch_size", batch,
                      "--train_subset", "30", "--quiet")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(colored_mnist, GEN_MASK_FLAGS, "gen_mask", argv)
    assert message in str(exit_info.value.code)
