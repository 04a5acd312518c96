"""Lookahead alignment (`gen_mask.lookahead`): its inner steps against the original 2-D draft's
objective differentiated by autograd, closed-form answers on quadratics, the 2-D toy and the
training loop computing the same weights, end-to-end runs and the combinations it refuses."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from and_mask.core.per_env_grads import per_env_grads
from and_mask.core.per_env_hvp import env_hvp, hvp_from_hessians
from and_mask.core.training import Trainer, TrainSetup
from gen_mask import run_synthetic
from gen_mask.gen_mask_utils import COMBINERS
from gen_mask.lookahead import lookahead
from tests.gen_mask.test_gen_mask_combiners import random_hessians
from tests.gen_mask.test_gen_mask_run import SMALL
from vizualization.landscapes import DTYPE, LANDSCAPES, env_grads, env_hessians
from vizualization.toy_methods import TOY_METHODS, direction

LOOKAHEAD = COMBINERS["lookahead"]


def draft_objective(logits, grads, hessians, eta, lam):
    """The original repository's 2-D draft, for any E and P: J(softmax(s)) with explicit Hessians."""
    u = torch.softmax(logits, dim=0) @ grads
    scale = grads.norm(dim=1).mean() + 1e-12
    after = grads - eta * torch.einsum("eij,j->ei", hessians, u)
    unit = after / (after.norm(dim=1, keepdim=True) + 1e-12)
    cos = unit @ unit.T
    n_envs = grads.shape[0]
    return torch.sqrt(u @ u + 1e-12) / scale - lam * (cos.sum() - cos.diagonal().sum()) / (n_envs * (n_envs - 1))


def draft_weights(grads, hessians, eta, lam, steps, weight_lr):
    """Gradient steps on the logits, the gradient by autograd through the dense Hessians."""
    logits = torch.zeros(grads.shape[0], dtype=grads.dtype)
    for _ in range(steps):
        logits = logits - weight_lr * grad(draft_objective)(logits, grads, hessians, eta, lam)
    return torch.softmax(logits, dim=0)


def hparams(**changes):
    return {**LOOKAHEAD.defaults(), **changes}


@pytest.mark.parametrize("n_envs,n_params", [(2, 3), (4, 6), (7, 20)])
def test_inner_steps_follow_the_autograd_gradient_of_the_objective(n_envs, n_params):
    gen = torch.Generator().manual_seed(n_envs)
    grads = torch.randn(n_envs, n_params, generator=gen, dtype=torch.float64) + 0.3
    hessians = random_hessians(n_envs, n_params, seed=n_envs)
    settings = dict(eta=0.3, lam=2.0, steps=6, weight_lr=0.7)
    update, diagnostics = lookahead(grads, hvp_from_hessians(hessians), 0.3, 2.0, 6, 0.7)
    weights = draft_weights(grads, hessians, **settings)
    torch.testing.assert_close(diagnostics["weights"], weights, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(update, weights @ grads, rtol=1e-9, atol=1e-12)
    assert (weights - 1 / n_envs).abs().max() > 1e-3  # the steps did move the weights
    # the objective went down from the average
    assert draft_objective(weights.log(), grads, hessians, 0.3, 2.0) < draft_objective(
        torch.zeros(n_envs, dtype=torch.float64), grads, hessians, 0.3, 2.0)


def test_quadratics_the_weights_after_which_the_environments_agree_exactly():
    """L_e = ½(θ − c_e)ᵀH_e(θ − c_e): g_e − ηH_e d is the exact gradient after the step, and
    g'_1(t) ∥ g'_2(t) (both linear in t = w_1) where cross(g'_1, g'_2) = 0, a quadratic in t whose
    root t* ≈ 0.394 is the agreement maximum. With λ large the weights converge to it (steps small
enough not to jump over the narrow maximum)."""
    hessians = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.5, 0.0], [0.0, 3.0]]], dtype=torch.float64)
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    theta, eta = torch.tensor([-2.0, -1.0], dtype=torch.float64), 0.5
    g = torch.einsum("eij,ej->ei", hessians, theta - centres)
    # g'_e(t) = p_e + t·q_e with d = t·g_1 + (1 − t)·g_2
    p = g - eta * hessians @ g[1]
    q = -eta * hessians @ (g[0] - g[1])

    def cross(a, b):
        return a[0] * b[1] - a[1] * b[0]

    coefficients = [cross(q[0], q[1]), cross(p[0], q[1]) + cross(q[0], p[1]), cross(p[0], p[1])]
    roots = torch.linalg.eigvals(torch.tensor([[-coefficients[1] / coefficients[0], -coefficients[2] / coefficients[0]],
                                               [1.0, 0.0]], dtype=torch.float64)).real
    (t_star,) = [float(t) for t in roots if 0 < t < 1 and (p[0] + t * q[0]) @ (p[1] + t * q[1]) > 0]
    update, diagnostics = lookahead(g, hvp_from_hessians(hessians), eta, 1e3, 100, 2e-4)
    assert abs(float(diagnostics["weights"][0]) - t_star) < 1e-4
    after = torch.einsum("eij,ej->ei", hessians, theta - eta * update - centres)  # the real gradients
    assert F.cosine_similarity(after[0], after[1], dim=0) > 1 - 1e-6
    assert F.cosine_similarity(g[0] - eta * hessians[0] @ g.mean(0), g[1] - eta * hessians[1] @ g.mean(0), dim=0) < 0.9


def test_without_the_agreement_term_the_step_shrinks_to_the_minimum_norm_point():
    """λ = 0: J = ‖d‖/σ, minimised over the simplex by MGDA's point; two environments: w_1 =
    (g_2 − g_1)·g_2 / ‖g_1 − g_2‖² in closed form."""
    g = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.5]], dtype=torch.float64)
    _, diagnostics = lookahead(g, hvp_from_hessians(random_hessians(2, 3)), 0.5, 0.0, 200, 10.0)
    w1 = float((g[1] - g[0]) @ g[1] / ((g[0] - g[1]) @ (g[0] - g[1])))
    assert abs(float(diagnostics["weights"][0]) - w1) < 1e-4


def test_special_cases_and_scale_invariance():
    g = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hvp = hvp_from_hessians(random_hessians(5, 8))
    update, diagnostics = lookahead(g, hvp, lookahead_steps=0)
    torch.testing.assert_close(update, g.mean(0))
    assert LOOKAHEAD.reduces_to_mean(**hparams(lookahead_steps=0))
    assert LOOKAHEAD.reduces_to_mean(**hparams(lookahead_weight_lr=0.0))
    assert not LOOKAHEAD.reduces_to_mean(**hparams())
    update, diagnostics = lookahead(g[:1], hvp)
    torch.testing.assert_close(update, g[0])
    # multiplying every gradient by c (and so every product) gives the same weights
    _, reference = lookahead(g, hvp)
    _, scaled = lookahead(1e-4 * g, lambda v: hvp(v))  # products are linear: H(cv) = cH(v)
    torch.testing.assert_close(scaled["weights"], reference["weights"])


class LandscapeModel(nn.Module):
    """A toy landscape as a model: θ ∈ R² is the parameter, an example is an environment index
    and its output that environment's loss Z_e(θ); with the loss `mean_output`, environment e's
    loss is Z_e(θ)."""

    def __init__(self, landscape, point):
        super().__init__()
        self.landscape = landscape
        self.theta = nn.Parameter(point.clone())

    def forward(self, env_index):
        return self.landscape.env_losses(self.theta)[env_index.squeeze(-1)]


def mean_output(output, target):
    return output.mean()


@pytest.mark.parametrize("name", sorted(LANDSCAPES))
def test_the_toy_and_the_training_loop_compute_the_same_weights_and_direction(name):
    landscape = LANDSCAPES[name]
    points = torch.empty(3, 2, dtype=DTYPE).uniform_(-5.5, 5.5, generator=torch.Generator().manual_seed(1))
    settings = hparams(lookahead_eta=0.02, lookahead_lambda=2.0, lookahead_steps=5, lookahead_weight_lr=0.5)
    toy = direction(TOY_METHODS["lookahead"], settings, landscape, points, lr=0.02)
    grads, hessians = env_grads(landscape, points), env_hessians(landscape, points)
    n_envs = landscape.n_envs
    envs, target = torch.arange(n_envs)[:, None], torch.zeros(n_envs, dtype=DTYPE)
    for point, toy_direction, g, h in zip(points, toy, grads, hessians):
        model = LandscapeModel(landscape, point)
        setup = TrainSetup(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.02), loss_fn=mean_output,
                           train_batches=None, eval_loaders={}, epochs=1)
        trainer = Trainer(setup, LOOKAHEAD, settings, runlog=None, device=torch.device("cpu"), quiet=True)
        trainer._step(envs, target, n_envs)  # the training loop's step: engines, products, combiner
        torch.testing.assert_close(model.theta.grad, toy_direction, rtol=1e-9, atol=1e-12)
        # the same weights, from the training engines' products and from the dense Hessians
        result = per_env_grads(model, envs, target, mean_output, n_envs)
        torch.testing.assert_close(result.grads[0], g)
        trained = lookahead(result.grads[0], env_hvp(model, envs, target, mean_output, n_envs), 0.02, 2.0, 5, 0.5)
        dense = lookahead(g, hvp_from_hessians(h), 0.02, 2.0, 5, 0.5)
        torch.testing.assert_close(trained[1]["weights"], dense[1]["weights"], rtol=1e-9, atol=1e-12)
    # and the original draft, on all points at once
    weights = vmap(draft_weights, in_dims=(0, 0, None, None, None, None))(grads, hessians, 0.02, 2.0, 5, 0.5)
    torch.testing.assert_close(toy, torch.einsum("ne,nei->ni", weights, grads), rtol=1e-9, atol=1e-9)
    assert (toy - grads.mean(1)).norm(dim=1).max() > 1e-2  # not the average


def test_short_synthetic_runs_with_and_without_batch_norm(tmp_path):
    for batch_norm in ("0", "1"):  # per-environment products, then the shared graph
        out = tmp_path / batch_norm
        final = run_synthetic.main(SMALL + ["--epochs", "1", "--method", "lookahead", "--lookahead_steps", "2",
                                            "--batch_norm", batch_norm, "--output_dir", str(out)])
        assert final["phase"] == "final" and 0 <= final["test_acc"] <= 1
        assert (out / "weights_final.pt").exists()


def test_refused_combinations_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        run_synthetic.main(SMALL + ["--method", "lookahead", "--dropout_p", "0.5", "--output_dir", str(tmp_path / "a")])
    assert str(done.value.code) == ("error: --method lookahead: Hessian-vector products need a deterministic model, "
                                    "but dropout is active (train with dropout 0)")
    with pytest.raises(SystemExit) as done:
        run_synthetic.main(SMALL + ["--method", "lookahead", "--lookahead_steps", "-1"])
    assert done.value.code == 2 and "lookahead_steps must be >= 0" in capsys.readouterr().err
    # with no inner step it is the average, and needs no products
    final = run_synthetic.main(SMALL + ["--epochs", "1", "--method", "lookahead", "--lookahead_steps", "0",
                                        "--dropout_p", "0.5", "--output_dir", str(tmp_path / "b")])
    assert final["phase"] == "final"
