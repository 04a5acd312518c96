"""The benchmark's data and math: Colored MNIST variants, SEM ground truth, IRMv1, fitting."""
import pytest
import torch
import torch.nn.functional as F

from and_mask.core.combiners import apply_combiner
from and_mask.core.errors import RunError
from gen_mask.erm_irm import colored, sem
from gen_mask.erm_irm.fit import BASELINES, FitConfig, combine_stacked, fit, valid_methods
from gen_mask.erm_irm.irm import irm_objective, irmv1_penalty, penalty_weight
from gen_mask.gen_mask_utils import COMBINERS
from tests.support.mnist_files import write_mnist_files

N = 20000
TOL = 0.015  # a proportion over ~10 000 examples has a standard deviation below 0.005


def fake_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 784, generator=g) < 0.3, torch.randint(0, 2, (n,), generator=g)


def rate(condition):
    return float(condition.float().mean())


@pytest.mark.parametrize("p", [0.2, 0.9])
def test_covariate_shift_drops_half_and_keeps_clean_labels(p):
    masks, labels = fake_images(N)
    env = colored.colour_env("cs_cmnist", masks, labels, p, torch.Generator().manual_seed(1))
    assert env.kept_fraction == pytest.approx(0.5, abs=TOL)
    assert len(env.target) == round(env.kept_fraction * N)
    assert torch.equal(env.target.long(), env.clean)
    assert rate(env.colour == env.clean) == pytest.approx(1 - p, abs=TOL)


def test_anti_causal_colour_follows_the_noisy_label():
    masks, labels = fake_images(N)
    env = colored.colour_env("ac_cmnist", masks, labels, 0.1, torch.Generator().manual_seed(2))
    target = env.target.long()
    assert rate(target != env.clean) == pytest.approx(colored.LABEL_NOISE, abs=TOL)
    assert rate(env.colour == target) == pytest.approx(0.9, abs=TOL)


def test_confounded_colour_follows_the_label_flip():
    masks, labels = fake_images(N)
    env = colored.colour_env("cf_cmnist", masks, labels, 0.2, torch.Generator().manual_seed(3))
    flipped = env.target.long() ^ env.clean
    assert rate(flipped == 1) == pytest.approx(colored.LABEL_NOISE, abs=TOL)
    assert rate(env.colour == flipped) == pytest.approx(0.8, abs=TOL)


def test_hybrid_mixes_the_two_mechanisms():
    masks, labels = fake_images(N)
    env = colored.colour_env("hb_cmnist", masks, labels, 0.1, torch.Generator().manual_seed(4))
    target, flipped = env.target.long(), env.target.long() ^ env.clean
    assert rate(env.from_ac) == pytest.approx(colored.AC_SHARE_IN_HB, abs=TOL)
    assert rate(target != env.clean) == pytest.approx(colored.LABEL_NOISE, abs=TOL)
    assert rate(env.colour[env.from_ac] == target[env.from_ac]) == pytest.approx(0.9, abs=TOL)
    assert rate(env.colour[~env.from_ac] == flipped[~env.from_ac]) == pytest.approx(0.9, abs=TOL)


@pytest.mark.parametrize("variant", list(colored.VARIANTS))
def test_mask_is_written_into_the_colour_channel_only(variant):
    masks, labels = fake_images(500)
    env = colored.colour_env(variant, masks, labels, 0.2, torch.Generator().manual_seed(5))
    channels = env.inputs.view(len(env.target), colored.VARIANTS[variant], 784)
    rows = torch.arange(len(env.target))
    assert torch.equal(channels.sum(1), channels[rows, env.colour])
    if variant != "cs_cmnist":  # nothing dropped: the masks keep their order
        assert torch.equal(channels[rows, env.colour].bool(), masks)


def test_env_batches_take_equal_sizes_and_every_example_once_per_pass():
    per_env, schedule = colored.env_batches([10, 7], batch_size=8, steps=7, generator=torch.Generator().manual_seed(0))
    assert per_env == 4 and [s.shape for s in schedule] == [(7, 4), (7, 4)]
    first_pass = schedule[1].flatten()[:7]
    assert sorted(first_pass.tolist()) == list(range(7))
    assert sorted(schedule[0].flatten()[:10].tolist()) == list(range(10))


def test_colored_problem_reads_torchvision_files(tmp_path):
    write_mnist_files(tmp_path, "fashion_mnist", n_train=400, n_test=100)
    colored.binary_images.cache_clear()
    problem = colored.colored_problem("ac_cmnist", 200, trial=0, seed=0, steps=3, batch_size=512, val_fraction=0.2,
                                      image_data="fashion_mnist", data_path=str(tmp_path))
    inputs, target = problem.batch(0)
    assert inputs.shape == (160, 2 * 784) and target.shape == (160,)  # 2 envs × 80 training examples
    with pytest.raises(RunError, match="exceeds"):
        colored.colored_problem("ac_cmnist", 401, 0, 0, 3, 512, 0.2, "fashion_mnist", str(tmp_path))


@pytest.mark.parametrize("name", list(sem.SETUPS))
def test_sem_structure_and_causal_coefficients(name):
    model = sem.LinearSEM.draw(name, torch.Generator().manual_seed(0))
    hidden, child = sem.SETUPS[name]
    assert bool(model.w_yz.abs().sum()) == child
    assert bool(model.w_hy.abs().sum()) == hidden
    if not hidden:
        assert torch.equal(model.w_hx, torch.eye(sem.BLOCK, dtype=torch.float64))
        assert model.optimal_error() == 0
    expected = torch.cat([model.w_xy @ torch.ones(sem.BLOCK, dtype=torch.float64), torch.zeros(sem.BLOCK)])
    assert torch.allclose(model.causal_coefficients(), expected)


@pytest.mark.parametrize("name", ["sem_cs", "sem_hb"])
def test_regression_on_x_is_the_same_in_both_environments(name):
    """Least squares of the target on x alone, in each environment, recovers w_inv (= w* without h)."""
    model = sem.LinearSEM.draw(name, torch.Generator().manual_seed(1))
    data = torch.Generator().manual_seed(2)
    w_inv = model.invariant_coefficients()[:sem.BLOCK]
    for sigma in sem.ENV_SIGMAS:
        features, target = model.sample(200_000, sigma, data)
        ols = torch.linalg.lstsq(features[:, :sem.BLOCK], target[:, None]).solution[:, 0]
        assert torch.allclose(ols, w_inv, atol=0.01)
    if name == "sem_hb":
        assert model.optimal_error() > 0


def test_compress_keeps_loss_gradient_and_penalty():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 10, generator=g, dtype=torch.float64), torch.randn(300, generator=g, dtype=torch.float64)
    cx, cy = sem.compress(x, y)
    assert cx.shape == (11, 10)
    w = torch.randn(10, dtype=torch.float64, generator=g, requires_grad=True)
    for fx, fy in ((x, y), (cx, cy)):
        loss = sem.squared_risk(fx @ w, fy)
        grad, = torch.autograd.grad(loss, w)
        penalty = irmv1_penalty(fx @ w, fy, sem.squared_risk)
        if fx is x:
            reference = (loss, grad, penalty)
    for a, b in zip(reference, (loss, grad, penalty)):
        assert torch.allclose(a, b)


def test_irmv1_penalty_closed_forms():
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    expected = (2 * ((f - y) * f).mean(0)).pow(2)  # squared loss, one value per model (column)
    assert torch.allclose(irmv1_penalty(f, y, sem.squared_risk), expected)
    logits, labels = torch.randn(64, generator=g), (torch.rand(64, generator=g) < 0.5).float()
    expected = ((torch.sigmoid(logits) - labels) * logits).mean().pow(2)
    assert torch.allclose(irmv1_penalty(logits, labels, F.binary_cross_entropy_with_logits), expected)


def test_penalty_schedule_and_rescaling():
    weights = torch.tensor([1e4, 0.5])
    assert torch.equal(penalty_weight(189, weights, 190), torch.ones(2))
    assert torch.equal(penalty_weight(190, weights, 190), weights)
    risks, penalties = torch.tensor([[1.0, 1.0], [3.0, 3.0]]), torch.tensor([[2.0, 2.0], [4.0, 4.0]])
    loss = irm_objective(risks, penalties, weights)
    assert torch.allclose(loss, torch.tensor([(2 + 1e4 * 3) / 1e4, 2 + 0.5 * 3]))


def sem_test_problem(pairs=((60, 0), (60, 1), (300, 0))):
    return sem.sem_problem("sem_cf", list(pairs), seed=0, val_fraction=0.2)[0]


def test_erm_fit_reaches_least_squares():
    problem = sem_test_problem()
    model = problem.make_model()
    config = FitConfig(steps=2000, lr=1e-2, l2=0.0, penalty_weights=(1e4,), anneal_steps=190)
    result = fit(problem, "erm", config)
    x, y = problem.batch(0)
    ols = torch.stack([torch.linalg.lstsq(x[:, m].double(), y[:, m].double()).solution for m in range(x.shape[1])])
    w_star = problem.test_error(model)  # model at 0: the error is ‖w*‖²
    assert w_star.shape == result.error.shape
    model.weight.data = ols.float()
    assert torch.allclose(result.error, problem.test_error(model), rtol=1e-3, atol=1e-5)


def test_mean_combiner_equals_erm():
    problem = sem_test_problem()
    config = FitConfig(steps=60, lr=1e-2, l2=1e-3, penalty_weights=(1e4,), anneal_steps=190)
    assert torch.allclose(fit(problem, "mean", config).error, fit(problem, "erm", config).error, rtol=1e-5)


def test_every_combiner_without_hessian_vector_products_is_a_method():
    assert set(valid_methods()) == set(BASELINES) | {n for n, c in COMBINERS.items() if not c.needs_hvp}
    assert "lookahead" in COMBINERS and "lookahead" not in valid_methods()


@pytest.mark.parametrize("name", [m for m in valid_methods() if m not in BASELINES])
def test_combine_stacked_equals_one_call_per_model(name):
    combiner = COMBINERS[name]
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, generator=g)]  # (E, M, *shape)
    combined, _ = combine_stacked(combiner, grads, combiner.defaults())
    for m in range(4):
        expected, _ = apply_combiner(combiner, [grads[0][:, m], grads[1][:, m]], combiner.defaults())
        assert torch.allclose(combined[0][m], expected[0], atol=1e-6)
        assert torch.allclose(combined[1][m], expected[1], atol=1e-6)


def test_irm_branches_equal_separate_runs_and_pick_the_best():
    problem = sem_test_problem()
    problem.validation_loss = problem.test_error  # so that the choice is visible in the error
    config = dict(steps=260, lr=1e-2, l2=0.0, anneal_steps=190)
    separate = torch.stack([fit(problem, "irm", FitConfig(penalty_weights=(w,), **config)).error for w in (1e2, 1e5)])
    both = fit(problem, "irm", FitConfig(penalty_weights=(1e2, 1e5), **config))
    assert torch.allclose(both.error, separate.min(0).values)
    assert torch.equal(both.penalty_weight, torch.tensor([1e2, 1e5])[separate.argmin(0)])
