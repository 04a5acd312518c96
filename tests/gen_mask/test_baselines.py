"""The paper's baselines (IRMv1, V-REx, DANN) as training objectives: math, runs, resume, rejections."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from and_mask.core import cli
from and_mask.core.objectives import ObjectiveContext, captured_features, objective_loss
from and_mask.datasets.common import env_group_batches
from and_mask.experiments import cifar, colored_mnist, synthetic
from gen_mask import baselines
from gen_mask.gen_mask_utils import METHOD_FLAGS, OBJECTIVES
from tests.support.interrupted_runs import interrupt_then_resume
from tests.support.mnist_files import write_mnist_files

SMALL = ["--examples_per_env", "64", "--n_test", "100", "--n_envs", "4", "--batch_size", "16",
         "--n_hidden_units", "16", "--n_hidden_layers", "2", "--quiet", "--use_cuda", "0"]
SHORT_ANNEAL = {"irm": ["--irm_anneal_steps", "3"], "vrex": ["--vrex_anneal_steps", "3"], "dann": []}


def context(loss_fn=F.binary_cross_entropy_with_logits, n_train_envs=3, n_features=4, total_steps=10,
            l2_term=lambda: 0.0):
    return ObjectiveContext(loss_fn, n_train_envs, n_features, total_steps, l2_term)


def build(name, ctx=None, **hparams):
    objective = OBJECTIVES[name]
    return objective.build({**objective.defaults(), **hparams}, ctx or context())


def test_irm_penalty_has_its_closed_forms():
    torch.manual_seed(0)
    logits, labels = torch.randn(12), torch.randint(0, 2, (12,)).float()
    terms = build("irm").env_terms(logits, labels, None, None)
    # BCE with logits: d/dw mean BCE(w·f, y) at w = 1 is mean (σ(f) − y)·f
    assert torch.allclose(terms["penalty"], ((torch.sigmoid(logits) - labels) * logits).mean() ** 2)
    assert torch.allclose(terms["risk"], F.binary_cross_entropy_with_logits(logits, labels))
    # softmax cross-entropy: one scalar w multiplies every logit; d/dw = mean_i Σ_c (p_ic − 1[y_i = c])·f_ic
    logits, labels = torch.randn(12, 3), torch.randint(0, 3, (12,))
    terms = build("irm", context(F.cross_entropy)).env_terms(logits, labels, None, None)
    slope = ((torch.softmax(logits, 1) - F.one_hot(labels, 3)) * logits).sum(1).mean()
    assert torch.allclose(terms["penalty"], slope ** 2)


def test_irm_and_vrex_anneal_the_penalty_and_rescale_the_loss():
    risks = torch.tensor([0.2, 0.5, 0.8])
    terms = {"risk": risks, "penalty": torch.tensor([0.1, 0.2, 0.3])}
    # IRMv1: the mean risk and penalty; V-REx (its authors' code): the summed risks and the mean over
    # pairs of environments of (R_e − R_f)² (pairs (0.2, 0.5), (0.2, 0.8), (0.5, 0.8))
    vrex_penalty = (0.3 ** 2 + 0.6 ** 2 + 0.3 ** 2) / 3
    for name, risk, penalty in (("irm", risks.mean(), terms["penalty"].mean()), ("vrex", risks.sum(), vrex_penalty)):
        objective = build(name, **{f"{name}_penalty_weight": 100.0, f"{name}_anneal_steps": 2})
        for step, weight in ((0, 1.0), (1, 1.0), (2, 100.0), (5, 100.0)):
            objective.steps_done.fill_(step)
            loss, diagnostics = objective.reduce(terms)
            assert float(diagnostics["penalty_weight"]) == weight
            assert torch.allclose(loss, (risk + weight * penalty) / max(weight, 1.0))


def test_irm_and_vrex_divide_the_run_s_l2_term_with_the_loss():
    """Their reference code's l2·Σ‖θ‖² sits inside the loss that the penalty weight divides."""
    terms = {"risk": torch.tensor([0.2, 0.5]), "penalty": torch.tensor([0.1, 0.3])}
    for name, risk, penalty in (("irm", 0.35, 0.2), ("vrex", 0.7, 0.09)):
        objective = build(name, context(l2_term=lambda: torch.tensor(0.4)), **{f"{name}_penalty_weight": 10.0,
                                                                             f"{name}_anneal_steps": 0})
        loss, _ = objective.reduce(terms)
        assert torch.allclose(loss, torch.tensor((risk + 0.4 + 10 * penalty) / 10))


def test_vrex_gradient_is_its_definition_and_a_weighted_sum_of_environment_gradients():
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(4 * 5, 3), torch.randint(0, 2, (4 * 5,)).float()
    beta = 7.0
    objective = build("vrex", vrex_penalty_weight=beta, vrex_anneal_steps=0)
    loss, risk, _ = objective_loss(objective, model(x), y, 4)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    # the definition: Σ_e R_e + β·mean over pairs e < f of (R_e − R_f)², divided by β > 1
    risks = torch.stack([F.binary_cross_entropy_with_logits(model(xe).squeeze(1), ye)
                         for xe, ye in zip(x.view(4, 5, 3), y.view(4, 5))])
    pairs = torch.stack([(risks[e] - risks[f]) ** 2 for e in range(4) for f in range(e + 1, 4)])
    definition = (risks.sum() + beta * pairs.mean()) / beta
    for g, d in zip(grads, torch.autograd.grad(definition, list(model.parameters()), retain_graph=True)):
        assert torch.allclose(g, d, atol=1e-6)
    # the decomposition a distributed run would use: Σ_e c_e ∇R_e, c_e = (1 + 4β(R_e − R̄)/(E − 1))/β
    weights = (1 + 4 * beta * (risks - risks.mean()) / 3).detach() / beta
    env_grads = [torch.autograd.grad(r, list(model.parameters()), retain_graph=True) for r in risks]
    for i, g in enumerate(grads):
        assert torch.allclose(g, sum(w * eg[i] for w, eg in zip(weights, env_grads)), atol=1e-6)
    assert torch.allclose(risk, risks)


def test_gradient_reversal_flips_the_feature_extractor_gradient_of_the_domain_loss():
    torch.manual_seed(2)
    extractor = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
    x = torch.randn(6, 3)
    objective = build("dann", context(n_features=4), dann_lambda=0.7, dann_grl_schedule="constant")
    classifier = list(objective.domain_classifier.parameters())

    def domain_grads(reverse):
        features = extractor(x)
        if reverse:
            logits = objective.domain_classifier(baselines.reverse_gradient(features, 0.7))
        else:
            logits = objective.domain_classifier(features)
        loss = F.cross_entropy(logits, torch.full((6,), 2))
        return torch.autograd.grad(loss, list(extractor.parameters()) + classifier)

    plain, reversed_ = domain_grads(False), domain_grads(True)
    n_extractor = len(list(extractor.parameters()))
    for p, r in zip(plain[:n_extractor], reversed_[:n_extractor]):
        assert torch.allclose(r, -0.7 * p)  # the feature extractor maximises the domain loss
    for p, r in zip(plain[n_extractor:], reversed_[n_extractor:]):
        assert torch.equal(r, p)  # the domain classifier still minimises it
    terms = objective.env_terms(torch.zeros(6), torch.zeros(6), extractor(x), 2)
    assert torch.allclose(terms["domain_loss"], F.cross_entropy(objective.domain_classifier(extractor(x)),
                                                                torch.full((6,), 2)))


def test_dann_schedule_ramps_from_zero_to_lambda():
    objective = build("dann", context(total_steps=100), dann_lambda=2.0, dann_grl_schedule="ganin")
    objective.steps_done.fill_(0)
    assert objective.grl_weight() == 0.0
    objective.steps_done.fill_(100)
    assert objective.grl_weight() == pytest.approx(2.0 * (2 / (1 + math.exp(-10)) - 1))
    objective.steps_done.fill_(250)  # past the end: stays at the end's value
    assert objective.grl_weight() == pytest.approx(2.0 * (2 / (1 + math.exp(-10)) - 1))


def test_features_are_the_input_of_the_final_linear_layer():
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1))
    x = torch.randn(7, 3)
    with captured_features(model) as store:
        model(x)
    assert torch.equal(store["features"], torch.relu(model[0](x)))
    model(x)  # the hook is gone after the block
    assert len(model[2]._forward_pre_hooks) == 0


def test_env_group_batches_name_the_environment_of_each_block():
    loaders = [[(torch.full((2, 1), float(e)), torch.zeros(2))] * 3 for e in range(4)]
    for inputs, _, n_envs, env_ids in env_group_batches(loaders, 2):
        assert n_envs == 2 and inputs.view(2, 2)[:, 0].tolist() == [float(e) for e in env_ids]


def run_synthetic(argv):
    return cli.main(synthetic, METHOD_FLAGS, "gen_mask", argv)


def read(run_dir, name="metrics.jsonl"):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run_dir / name).read_text().splitlines()]


@pytest.mark.parametrize("name", ["irm", "vrex", "dann"])
def test_each_baseline_trains_on_the_synthetic_task(tmp_path, name):
    final = run_synthetic(SMALL + ["--method", name, *SHORT_ANNEAL[name], "--epochs", "3",
                                   "--output_dir", str(tmp_path)])
    records = read(tmp_path)
    terms = records[-2]["objective_terms"]
    assert math.isfinite(terms["objective"]) and 0 <= final["test_acc"] <= 1
    assert records[-2]["train_loss"] < records[0]["train_loss"]
    if name != "dann":
        assert terms["penalty_weight"] == 1e4  # past the warm-up of 3 steps (4 steps per epoch)
    else:  # λ constant, as DomainBed's
        assert terms["grl_weight"] == 1.0 and 0 <= terms["domain_acc"] <= 1


def test_dann_trains_its_domain_classifier_and_resumes_exactly(tmp_path, monkeypatch):
    argv = SMALL + ["--method", "dann", "--epochs", "3"]
    run_synthetic(argv + ["--output_dir", str(tmp_path / "whole")])
    checkpoint = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    groups = checkpoint["optimizer"]["param_groups"]
    assert len(groups) == 2  # the model's and the domain classifier's, on the same schedule
    assert groups[0]["lr"] == groups[1]["lr"] == pytest.approx(1e-3)  # ×0.1 after 3/4 of the epochs
    assert tuple(groups[1]["betas"]) == (0.5, 0.9) and groups[1]["weight_decay"] == 0.0  # DomainBed's for D
    assert int(checkpoint["objective"]["steps_done"]) == 3 * 4
    interrupt_then_resume(run_synthetic, argv, tmp_path / "split", monkeypatch, stop_after_epoch=1)
    assert read(tmp_path / "split") == read(tmp_path / "whole")
    resumed = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    for key, value in checkpoint["objective"].items():
        assert torch.equal(resumed["objective"][key], value)


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mnist_files(root, "mnist", n_train=600, n_test=50, seed=1)
    return root


def colored_argv(root, tmp_path, *extra):
    return ["--data_path", str(root), "--output_dir", str(tmp_path / "run"), "--init_lr", "0.01", "--weight_decay",
            "0.001", "--random_labels_fraction", "0", "--num_workers", "0", "--quiet", "--epochs", "2",
            "--batch_size", "25", "--n_hidden_layers", "1", "--n_hidden_units", "16", "--n_outputs", "2", *extra]


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("name", ["irm", "vrex", "dann"])
def test_each_baseline_trains_on_colored_mnist_colour_environments(mnist_root, tmp_path, name):
    argv = colored_argv(mnist_root, tmp_path, "--method", name, "--agreement_envs", "color", *SHORT_ANNEAL[name])
    final = cli.main(colored_mnist, METHOD_FLAGS, "gen_mask", argv)
    records = read(tmp_path / "run")
    assert records[0]["steps"] == 200 // 25 and math.isfinite(records[-2]["objective_terms"]["objective"])
    assert 0 <= final["test_acc"] <= 1


@pytest.mark.parametrize("experiment, argv, message", [
    (colored_mnist, ["--method", "irm"], "irm needs --agreement_envs color"),
    (colored_mnist, ["--method", "dann", "--agreement_envs", "color", "--n_hidden_layers", "0"],
     "dann needs features"),
    (colored_mnist, ["--method", "vrex", "--agreement_envs", "color", "--envs_per_step", "1"],
     "vrex needs at least 2 environments per step"),
    (synthetic, ["--method", "dann", "--envs_per_step", "1"], "dann needs at least 2 environments per step"),
    (cifar, ["--method", "vrex"], "vrex is a training objective over environments"),
    (synthetic, ["--method", "mean", "--irm_penalty_weight", "3"], "not a hyper-parameter of --method mean"),
    (synthetic, ["--method", "irm", "--irm_penalty_weight", "-1"], "--irm_penalty_weight must be >= 0.0"),
    (synthetic, ["--method", "dann", "--dann_grl_schedule", "linear"], "must be one of ['ganin', 'constant']"),
])
def test_where_a_baseline_does_not_apply_the_run_stops_with_one_line(tmp_path, capsys, experiment, argv, message):
    # The data path is empty: the error must come before any data is looked for.
    common = {synthetic: SMALL,
              colored_mnist: colored_argv(tmp_path / "no_data", tmp_path)[:-4],
              cifar: ["--random_labels_fraction", "0", "--init_lr", "0.1", "--weight_decay", "0", "--output_dir",
                      str(tmp_path / "run"), "--data_path", str(tmp_path / "no_data"), "--download", "0"]}[experiment]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(experiment, METHOD_FLAGS, "gen_mask", common + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "".join(err)


def test_help_lists_the_baselines_beside_the_combiners(capsys):
    with pytest.raises(SystemExit):
        run_synthetic(["--help"])
    out = capsys.readouterr().out
    for flag in ("irm", "vrex", "dann", "--irm_penalty_weight", "--vrex_anneal_steps", "--dann_lambda"):
        assert flag in out


def test_a_checkpoint_whose_optimiser_decayed_an_irm_run_is_refused(tmp_path):
    # Saved before IRM's weight decay moved into its loss: resuming would decay twice.
    argv = SMALL + ["--method", "irm", "--epochs", "2", "--weight_decay", "0.01", "--output_dir", str(tmp_path)]
    run_synthetic(argv)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert all(group["weight_decay"] == 0 for group in checkpoint["optimizer"]["param_groups"])
    checkpoint["epoch"] = 1
    for group in checkpoint["optimizer"]["param_groups"]:
        group["weight_decay"] = 0.01
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    (tmp_path / "status.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        run_synthetic(argv + ["--resume"])
    assert "left the weight decay to the optimiser, not to its loss" in str(exit_info.value.code)
