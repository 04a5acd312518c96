"""The linear-regression anchor of the paper's notebook: averaging finds the patchwork
solution, AND-mask and the geometric mean the invariant one."""
import pytest
import torch

from and_mask.and_mask_utils import get_grads_from_model


def half_squared_error(output, target):
    return 0.5 * ((output - target) ** 2).mean()


def fit(method, agreement_threshold, engine="auto", seed=0):
    """4 envs of one example, x_e = 3·[one-hot(e) | 0.1], y = 1; GD with lr 0.3·0.9995^t and
    decoupled weight decay θ ← θ − 0.01·lr·θ after each step, 1000 steps, θ₀ ~ 0.1·N(0, I)."""
    torch.manual_seed(seed)
    x = 3 * torch.cat([torch.eye(4), torch.full((4, 1), 0.1)], dim=1).double()
    y = torch.ones(4, dtype=torch.float64)
    model = torch.nn.Linear(5, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(0.1 * torch.randn(1, 5))
    lr = 0.3
    for _ in range(1000):
        get_grads_from_model(model, x, y, half_squared_error, 4, agreement_threshold, method, 0, engine=engine)
        with torch.no_grad():
            model.weight -= lr * model.weight.grad
            model.weight -= 0.01 * lr * model.weight
        lr *= 0.9995
    return model.weight.detach()[0]


@pytest.mark.parametrize("engine", ["vmap", "shared", "loop"])
def test_averaging_converges_to_the_patchwork_solution(engine):
    theta = fit("and_mask", 0.0, engine)
    assert torch.allclose(theta, torch.tensor([0.32, 0.32, 0.32, 0.32, 0.13], dtype=torch.float64), atol=0.01)


@pytest.mark.parametrize("engine", ["vmap", "shared", "loop"])
def test_and_mask_converges_to_the_invariant_solution(engine):
    theta = fit("and_mask", 1.0, engine)
    assert torch.allclose(theta[:4], torch.zeros(4, dtype=torch.float64), atol=0.01)
    assert theta[4] == pytest.approx(3.0, abs=0.05)


def test_geometric_mean_converges_to_the_invariant_solution():
    theta = fit("geom_mean", 1.0)
    assert torch.allclose(theta[:4], torch.zeros(4, dtype=torch.float64), atol=0.02)
    assert 2.8 <= theta[4] <= 3.0
