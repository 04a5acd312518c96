"""Each baseline against its published training loop, step for step.

The references below are written from the published code and share nothing with
`gen_mask.baselines` but the data and the initial weights:
- IRMv1: Arjovsky et al.'s Colored MNIST loop, github.com/facebookresearch/InvariantRiskMinimization,
  code/colored_mnist/main.py;
- V-REx: Krueger et al.'s, the same loop with their penalty, github.com/capybaralet/REx_code_release,
  InvariantRiskMinimization/colored_mnist/main.py (its defaults --rex True --mse True --erm_amount 1);
- DANN: DomainBed's `AbstractDANN.update` (unconditional, no class balance),
  github.com/facebookresearch/DomainBed, domainbed/algorithms.py.
The repository's side is what a real run does: the flags parsed by the entry point, its optimiser
(`make_optimizer`), the method and hyper-parameters that `--method` resolves to, and the Trainer's
training epoch (its step, the objective, `optimizer.step()`). Both sides run in float64, so a
difference of convention cannot hide in rounding and rounding cannot pass for one. The
experiments' learning-rate schedules (a ×0.1 drop late in the run) belong to the experiment, not
to the baseline, and are left out on both sides.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import autograd

from and_mask.core.optim import make_optimizer
from and_mask.core.runlog import RunLog
from and_mask.core.training import Trainer, TrainSetup
from and_mask.models import MLP
from gen_mask import run_colored_mnist, run_synthetic
from gen_mask.gen_mask_utils import METHOD_FLAGS

N_ENVS, PER_ENV, N_INPUTS, HIDDEN = 2, 64, 10, 8
STEPS = 300
RTOL = 1e-5
# The IRM paper's Colored MNIST hyper-parameters (the command), with the warm-up inside the run.
LR, L2, PENALTY_WEIGHT, ANNEAL = 0.0004898536566546834, 0.00110794568, 91257.18613115903, 100
ENTRIES = {  # entry point, the flags it requires, its learning-rate flag
    "colored_mnist": (run_colored_mnist, ["--output_dir", "unused", "--random_labels_fraction", "0",
                                          "--agreement_envs", "color", "--init_lr", str(LR)], "init_lr"),
    "synthetic": (run_synthetic, ["--lr", str(LR)], "lr"),
}


@pytest.fixture(autouse=True)
def float64():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


def batches(n_outputs: int, n_batches: int = 4, seed: int = 0):
    """Batches of N_ENVS environments × PER_ENV examples, stacked env after env; the label
    depends on the input differently in each environment, so the penalties are not zero."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        inputs = torch.randn(N_ENVS * PER_ENV, N_INPUTS, generator=generator)
        env = torch.arange(N_ENVS).repeat_interleave(PER_ENV)
        signal = inputs[:, 0] + (2 * env - 1) * inputs[:, 1] + 0.5 * torch.randn(len(env), generator=generator)
        labels = (signal > 0).long()
        out.append((inputs, labels.double() if n_outputs == 1 else labels))
    return out


def repository_run(entry: str, argv: list, n_outputs: int, data: list, tmp_path):
    """(initial model, initial objective, the trainer after training) of the repository's method, trained
    as a real run trains it: STEPS steps of the Trainer cycling over `data`, both environments in every step."""
    module, required, lr_flag = ENTRIES[entry]
    parser = module.build_parser()
    args = parser.parse_args(required + ["--n_outputs", str(n_outputs)] * (entry == "colored_mnist") + argv)
    method, hparams = METHOD_FLAGS.resolve(args, parser)
    module.ENTRY.experiment.check(args, parser)
    torch.manual_seed(0)
    model = MLP(N_INPUTS, HIDDEN, 1, n_outputs)
    initial = copy.deepcopy(model)
    optimizer = make_optimizer(args, model.parameters(), getattr(args, lr_flag), args.weight_decay)
    loss_fn = F.binary_cross_entropy_with_logits if n_outputs == 1 else F.cross_entropy
    steps = [(x, y, N_ENVS, tuple(range(N_ENVS))) for x, y in data] * (STEPS // len(data))
    env_loaders = [[(x.view(N_ENVS, PER_ENV, -1)[e], y.view(N_ENVS, PER_ENV)[e]) for x, y in data]
                   for e in range(N_ENVS)]
    setup = TrainSetup(model=model, optimizer=optimizer, loss_fn=loss_fn, train_batches=lambda epoch: steps,
                       eval_loaders={}, epochs=1, steps_per_epoch=len(steps), env_loaders=env_loaders)
    trainer = Trainer(setup, method, hparams, RunLog(tmp_path), torch.device("cpu"), quiet=True,
                      l1_coef=getattr(args, "l1_coef", 0.0), l2_coef=getattr(args, "l2_coef", 0.0))
    initial_objective = copy.deepcopy(trainer.objective)
    record = trainer.train_epoch(1)
    assert record["steps"] == STEPS
    return initial, initial_objective, trainer


def assert_same_weights(ours, reference):
    """Every parameter tensor equal to RTOL relative to its largest entry."""
    gaps = {name: float((p - q).detach().abs().max() / q.detach().abs().max())
            for (name, p), q in zip(ours.named_parameters(), reference.parameters())}
    worst = max(gaps, key=gaps.get)
    assert gaps[worst] <= RTOL, f"{worst} differs from the reference by {gaps[worst]:.3g} (relative); all: {gaps}"


# ---- IRMv1 and V-REx: the IRM authors' loop --------------------------------------------------------

def mean_nll(logits, y):
    return F.binary_cross_entropy_with_logits(logits, y)


def irm_penalty(logits, y):
    scale = torch.tensor(1.).requires_grad_()
    loss = mean_nll(logits * scale, y)
    grad = autograd.grad(loss, [scale], create_graph=True)[0]
    return torch.sum(grad ** 2)


def irm_reference(mlp, data, lr, l2_regularizer_weight, penalty_weight, penalty_anneal_iters, rex=False):
    """The published loop: torch's Adam without weight decay, the L2 term inside the rescaled loss.

    rex=False: Arjovsky et al.'s IRMv1. rex=True: Krueger et al.'s V-REx, whose loss is
    erm_amount·(nll_1 + nll_2) + l2·‖θ‖² + w·(nll_1 − nll_2)², erm_amount = 1.
    """
    optimizer = torch.optim.Adam(mlp.parameters(), lr=lr)
    for step in range(STEPS):
        x, y = data[step % len(data)]
        envs = []
        for images, labels in zip(x.view(N_ENVS, PER_ENV, -1), y.view(N_ENVS, PER_ENV)):
            logits = mlp(images)
            envs.append({"nll": mean_nll(logits, labels[:, None]), "penalty": irm_penalty(logits, labels[:, None])})
        train_nll = torch.stack([envs[0]["nll"], envs[1]["nll"]]).mean()
        train_penalty = torch.stack([envs[0]["penalty"], envs[1]["penalty"]]).mean()
        weight_norm = torch.tensor(0.)
        for w in mlp.parameters():
            weight_norm += w.norm().pow(2)
        if rex:
            loss1, loss2 = envs[0]["nll"], envs[1]["nll"]
            loss = 0.0
            loss += 1.0 * (loss1 + loss2)
        else:
            loss = train_nll.clone()
        loss += l2_regularizer_weight * weight_norm
        weight = penalty_weight if step >= penalty_anneal_iters else 1.0
        if rex:
            loss += weight * (loss1.mean() - loss2.mean()) ** 2
        else:
            loss += weight * train_penalty
        if weight > 1.0:
            # Rescale the entire loss to keep gradients in a reasonable range
            loss /= weight
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return mlp


@pytest.mark.parametrize("entry, extra", [
    ("colored_mnist", []),  # AdamFlexibleWeightDecay, its decay before the moments (the default order)
    ("colored_mnist", ["--weight_decay_order", "after"]),  # the order of the optimiser's decay does not apply
    ("synthetic", []),  # torch's Adam with coupled decay
])
def test_irm_equals_the_irm_authors_loop(tmp_path, entry, extra):
    data = batches(n_outputs=1)
    initial, _, trainer = repository_run(entry, [
        "--method", "irm", "--irm_penalty_weight", str(PENALTY_WEIGHT), "--irm_anneal_steps", str(ANNEAL),
        "--weight_decay", str(L2), *extra], 1, data, tmp_path)
    assert int(trainer.objective.steps_done) == STEPS > ANNEAL  # the switch to λ happened inside the run
    assert_same_weights(trainer.setup.model, irm_reference(initial, data, LR, L2, PENALTY_WEIGHT, ANNEAL))


def test_vrex_equals_the_rex_authors_loop(tmp_path):
    data = batches(n_outputs=1)
    initial, _, trainer = repository_run("colored_mnist", [
        "--method", "vrex", "--vrex_penalty_weight", "1000", "--vrex_anneal_steps", str(ANNEAL),
        "--weight_decay", str(L2)], 1, data, tmp_path)
    assert_same_weights(trainer.setup.model, irm_reference(initial, data, LR, L2, 1000.0, ANNEAL, rex=True))


# ---- DANN: DomainBed's loop ----------------------------------------------------------------------

def domainbed_mlp(n_inputs, n_outputs, width, depth):
    """DomainBed's networks.MLP with no dropout: input Linear, ReLU, (depth − 2) hidden, output Linear."""
    layers = [torch.nn.Linear(n_inputs, width), torch.nn.ReLU()]
    for _ in range(depth - 2):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, n_outputs))


def dann_reference(featurizer, classifier, discriminator, data, hparams, gen_adam):
    """DomainBed's AbstractDANN.update, conditional=False and class_balance=False, for STEPS updates.

    `gen_adam` is the featurizer's and classifier's optimiser: DomainBed's is
    Adam(lr_g, weight_decay_g, betas=(beta1, 0.9)); the repository trains the model with the
    experiment's optimiser, so the test passes the experiment's Adam settings here.
    """
    disc_opt = torch.optim.Adam(discriminator.parameters(), lr=hparams["lr_d"],
                                weight_decay=hparams["weight_decay_d"], betas=(hparams["beta1"], 0.9))
    gen_opt = torch.optim.Adam(list(featurizer.parameters()) + list(classifier.parameters()), **gen_adam)
    update_count = 0
    for step in range(STEPS):
        x, y = data[step % len(data)]
        minibatches = list(zip(x.view(N_ENVS, PER_ENV, -1), y.view(N_ENVS, PER_ENV)))
        update_count += 1
        all_x = torch.cat([x for x, y in minibatches])
        all_y = torch.cat([y for x, y in minibatches])
        all_z = featurizer(all_x)
        disc_input = all_z
        disc_out = discriminator(disc_input)
        disc_labels = torch.cat([torch.full((x.shape[0], ), i, dtype=torch.int64)
                                 for i, (x, y) in enumerate(minibatches)])
        disc_loss = F.cross_entropy(disc_out, disc_labels)
        input_grad = autograd.grad(F.cross_entropy(disc_out, disc_labels, reduction='sum'),
                                   [disc_input], create_graph=True)[0]
        grad_penalty = (input_grad ** 2).sum(dim=1).mean(dim=0)
        disc_loss += hparams['grad_penalty'] * grad_penalty
        d_steps_per_g = hparams['d_steps_per_g_step']
        if update_count % (1 + d_steps_per_g) < d_steps_per_g:
            disc_opt.zero_grad()
            disc_loss.backward()
            disc_opt.step()
        else:
            all_preds = classifier(all_z)
            classifier_loss = F.cross_entropy(all_preds, all_y)
            gen_loss = (classifier_loss + (hparams['lambda'] * -disc_loss))
            disc_opt.zero_grad()
            gen_opt.zero_grad()
            gen_loss.backward()
            gen_opt.step()


@pytest.mark.parametrize("d_steps_per_g_step", [1, 2])
def test_dann_equals_domainbed_s_loop(tmp_path, d_steps_per_g_step):
    hparams = {"lambda": 0.7, "d_steps_per_g_step": d_steps_per_g_step, "grad_penalty": 0.3, "beta1": 0.5,
               "weight_decay_d": 1e-3, "lr_d": LR, "mlp_width": 16, "mlp_depth": 3}
    weight_decay = 1e-3  # the experiment's --weight_decay, DomainBed's weight_decay_g
    data = batches(n_outputs=2)
    initial, initial_objective, trainer = repository_run("colored_mnist", [
        "--method", "dann", "--dann_lambda", str(hparams["lambda"]),
        "--dann_d_steps_per_g_step", str(d_steps_per_g_step), "--dann_grad_penalty", str(hparams["grad_penalty"]),
        "--dann_disc_beta1", str(hparams["beta1"]), "--dann_disc_weight_decay", str(hparams["weight_decay_d"]),
        "--dann_hidden_units", str(hparams["mlp_width"]), "--dann_hidden_layers", str(hparams["mlp_depth"] - 1),
        "--weight_decay", str(weight_decay)], 2, data, tmp_path)
    discriminator = domainbed_mlp(HIDDEN, N_ENVS, hparams["mlp_width"], hparams["mlp_depth"])
    repository_discriminator = initial_objective.domain_classifier
    assert [p.shape for p in discriminator.parameters()] == [p.shape for p in repository_discriminator.parameters()]
    discriminator.load_state_dict(dict(zip(discriminator.state_dict(), repository_discriminator.state_dict().values())))
    featurizer = torch.nn.Sequential(*list(initial)[:-1])  # the same modules: training them trains `initial`
    dann_reference(featurizer, initial[-1], discriminator, data, hparams,
                   gen_adam={"lr": LR, "weight_decay": weight_decay, "betas": (0.9, 0.999)})
    assert_same_weights(trainer.setup.model, initial)
    assert_same_weights(trainer.objective.domain_classifier, discriminator)


def test_dann_defaults_are_domainbed_s():
    """DomainBed's DANN hyper-parameters (hparams_registry.py): lambda 1, d_steps_per_g_step 1, grad_penalty 0,
    beta1 0.5, weight_decay_d 0, mlp_width 256, mlp_depth 3 (two hidden layers), λ constant."""
    assert METHOD_FLAGS.entry("dann").defaults() == {
        "dann_lambda": 1.0, "dann_d_steps_per_g_step": 1, "dann_grad_penalty": 0.0, "dann_disc_beta1": 0.5,
        "dann_disc_weight_decay": 0.0, "dann_hidden_units": 256, "dann_hidden_layers": 2,
        "dann_grl_schedule": "constant"}
