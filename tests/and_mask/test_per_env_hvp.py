"""Per-environment Hessian-vector products (`and_mask.core.per_env_hvp`) against the plain loop:
one double backward pass per environment through the model itself; and the first-order
prediction g_e − η H_e d against the real gradients after the step."""
import copy

import pytest
import torch
import torch.nn.functional as F

from and_mask.core.per_env_grads import env_losses_from_output, per_env_grads
from and_mask.core.per_env_hvp import env_hvp, hvp_from_hessians
from and_mask.models import MLP
from tests.and_mask.test_per_env_grads import BATCH, N_ENVS, assert_close, make_problem


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def reference_products(model, x, y, loss_fn, n_envs, v, own_statistics=False):
    """(E, P) rows H_e v (or H_e v_e), one environment at a time by double backward. With
    `own_statistics` each environment is forwarded alone (BatchNorm on its own batch, as the
    vmap engine does); otherwise all environments go through one forward pass."""
    params = list(model.parameters())
    batch = x.shape[0] // n_envs
    rows = []
    for e in range(n_envs):
        if own_statistics:
            block = slice(e * batch, (e + 1) * batch)
            loss = loss_fn(model(x[block]).reshape(batch, -1).squeeze(-1), y[block])
        else:
            loss = env_losses_from_output(model(x), y, loss_fn, n_envs)[e]
        gradient = flat(torch.autograd.grad(loss, params, create_graph=True))
        rows.append(flat(torch.autograd.grad(gradient @ (v if v.dim() == 1 else v[e]), params)))
    return torch.stack(rows)


@pytest.mark.parametrize("batch_norm,engine,own_statistics", [
    (False, "auto", False), (False, "loop", False),  # independent examples: one path whatever the engine
    (True, "auto", False), (True, "shared", False),  # BatchNorm over the whole batch: the shared graph
    (True, "vmap", True),  # opted-in vmap engine: every environment normalised on its own
])
@pytest.mark.parametrize("n_outputs", [1, 3])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_products_equal_the_double_backward_loop(batch_norm, engine, own_statistics, n_outputs, chunk_size):
    model, x, y, loss_fn = make_problem(batch_norm, n_outputs=n_outputs)
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(n_params(model), generator=g, dtype=torch.float64)
    per_env = torch.randn(N_ENVS, n_params(model), generator=g, dtype=torch.float64)
    running = [b.clone() for b in model.buffers()]
    hvp = env_hvp(model, x, y, loss_fn, N_ENVS, engine, chunk_size)
    products = hvp(shared), hvp(per_env)
    for b, before in zip(model.buffers(), running):  # BatchNorm running statistics untouched
        assert torch.equal(b, before)
    for v, got in zip((shared, per_env), products):
        assert got.shape == (N_ENVS, n_params(model))
        assert_close(got, reference_products(model, x, y, loss_fn, N_ENVS, v, own_statistics))


def test_one_example_per_environment_through_the_outer_engine():
    torch.manual_seed(0)
    model = MLP(5, 6, 1, 1).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 2, (7,)).double()
    v = torch.randn(n_params(model), dtype=torch.float64)
    got = env_hvp(model, x, y, F.binary_cross_entropy_with_logits, 7, engine="outer")(v)
    assert_close(got, reference_products(model, x, y, F.binary_cross_entropy_with_logits, 7, v))


def test_dense_hessians_give_the_same_products():
    hessians = torch.randn(3, 4, 4, dtype=torch.float64)
    v, per_env = torch.randn(4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    hvp = hvp_from_hessians(hessians)
    torch.testing.assert_close(hvp(v), torch.stack([h @ v for h in hessians]))
    torch.testing.assert_close(hvp(per_env), torch.stack([h @ u for h, u in zip(hessians, per_env)]))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_predicted_gradients_after_the_step_match_the_real_ones_to_second_order(batch_norm):
    """g_e(θ − ηd) − (g_e − η H_e d) = O(η²): halving η quarters the error, which is far below
    the change g_e(θ − ηd) − g_e itself (first order in η). A smooth model (tanh): a LeakyReLU
    kink crossed by the step would break any Taylor expansion."""
    torch.manual_seed(3)
    layers = [torch.nn.Linear(7, 12)] + ([torch.nn.BatchNorm1d(12)] if batch_norm else []) + [torch.nn.Tanh(),
                                                                                             torch.nn.Linear(12, 1)]
    model = torch.nn.Sequential(*layers).double()
    _, x, y, loss_fn = make_problem(batch_norm, seed=3)
    grads = flat_env_grads(model, x, y, loss_fn)
    direction = torch.softmax(torch.randn(N_ENVS, generator=torch.Generator().manual_seed(2),
                                          dtype=torch.float64), 0) @ grads
    predicted_change = env_hvp(model, x, y, loss_fn, N_ENVS)(direction)
    errors = []
    for eta in (1e-3, 5e-4):
        after = flat_env_grads(shifted(model, -eta * direction), x, y, loss_fn)
        change = after - grads
        error = (change + eta * predicted_change).norm(dim=1)
        assert (error < 1e-2 * change.norm(dim=1)).all()
        errors.append(error)
    ratio = errors[0] / errors[1]
    assert ((ratio > 3.5) & (ratio < 4.5)).all(), ratio


def flat_env_grads(model, x, y, loss_fn):
    """(E, P) per-environment gradients through one forward pass (the shared engine)."""
    grads = per_env_grads(model, x, y, loss_fn, N_ENVS, engine="shared").grads
    return torch.cat([g.reshape(N_ENVS, -1) for g in grads], dim=1)


def shifted(model, step):
    """A copy of `model` with its flattened parameters moved by `step`."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        offset = 0
        for p in moved.parameters():
            p += step[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
    return moved


def test_active_dropout_is_refused():
    model = MLP(4, 5, 1, 1, dropout_p=0.5)
    x, y = torch.randn(2 * BATCH, 4), torch.randint(0, 2, (2 * BATCH,)).float()
    with pytest.raises(ValueError, match="dropout is active"):
        env_hvp(model, x, y, F.binary_cross_entropy_with_logits, 2)
    model.eval()  # no dropout at evaluation: products allowed
    assert env_hvp(model, x, y, F.binary_cross_entropy_with_logits, 2)(torch.zeros(n_params(model))).shape[0] == 2
