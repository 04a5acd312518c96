"""Every fast path against the plain per-environment loop (the original algorithm)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from and_mask import and_mask_utils
from and_mask.and_mask_utils import get_grads, get_grads_from_model
from and_mask.core.errors import RunError
from and_mask.core.per_env_grads import OuterProducts, per_env_grads, resolve_engine
from and_mask.models import MLP

REPO = Path(__file__).resolve().parents[2]
N_ENVS, BATCH = 6, 5


def reference_get_grads(agreement_threshold, batch_size, loss_fn, n_envs, params, output, target, method,
                        scale_grad_inverse_sparsity):
    """The original algorithm written out plainly: one backward per environment, then per tensor
    mask = |mean sign| >= τ, and_mask = mask * mean, geom_mean = mask * sign(mean) * exp(mean log(|g|+1e-10))."""
    outputs = output.view(n_envs, batch_size, -1).squeeze(-1)
    targets = target.view(n_envs, batch_size, -1).squeeze(-1)
    per_env = [torch.autograd.grad(loss_fn(o, t), params, retain_graph=True) for o, t in zip(outputs, targets)]
    updates, masks, losses = [], [], [loss_fn(o, t).item() for o, t in zip(outputs, targets)]
    for i in range(len(params)):
        g = torch.stack([env[i] for env in per_env])
        mask = (torch.sign(g).mean(0).abs() >= agreement_threshold).float()
        if method == "and_mask":
            update = mask * g.mean(0)
        else:
            update = mask * torch.sign(g.mean(0)) * torch.exp(torch.log(g.abs() + 1e-10).sum(0) / n_envs)
        if scale_grad_inverse_sparsity:
            update = update / (1e-10 + mask.sum() / mask.numel())
        updates.append(update)
        masks.append(mask)
    return sum(losses) / n_envs, updates, masks, per_env


def make_problem(batch_norm, seed=0, n_outputs=1):
    torch.manual_seed(seed)
    model = MLP(7, 12, 2, n_outputs, batch_norm=batch_norm).double()
    x = torch.randn(N_ENVS * BATCH, 7, dtype=torch.float64)
    if n_outputs == 1:
        y = torch.randint(0, 2, (N_ENVS * BATCH,)).double()
        loss_fn = F.binary_cross_entropy_with_logits
    else:
        y = torch.randint(0, n_outputs, (N_ENVS * BATCH,))
        loss_fn = F.cross_entropy
    return model, x, y, loss_fn


def assert_close(actual, expected, rtol=1e-5):
    scale = expected.abs().max().clamp_min(1e-8)  # gradients that vanish analytically are pure rounding
    assert ((actual - expected).abs().max() / scale) <= rtol


def assert_masks_equal(actual, expected, per_env_grads_of_tensor):
    """Masks must agree exactly, except where a gradient is at rounding-noise level (its sign is noise)."""
    g = torch.stack(per_env_grads_of_tensor)
    noisy = (g.abs() <= 1e-9 * g.abs().max().clamp_min(1e-30)).any(0) & (g != 0).any(0)
    assert torch.equal(actual[~noisy], expected[~noisy])


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("n_outputs", [1, 3])
def test_engines_give_the_loop_gradients(batch_norm, n_outputs):
    model, x, y, loss_fn = make_problem(batch_norm, n_outputs=n_outputs)
    ref = per_env_grads(model, x, y, loss_fn, N_ENVS, engine="loop")
    engines = ["shared", "auto"] + ([] if batch_norm else ["vmap"])
    for engine in engines:
        for chunk in (None, 1, 4, N_ENVS):
            got = per_env_grads(model, x, y, loss_fn, N_ENVS, engine=engine, chunk_size=chunk)
            assert_close(got.env_losses, ref.env_losses)
            for a, b in zip(got.grads, ref.grads):
                assert a.shape == b.shape
                assert_close(a, b)
            assert_close(got.output, ref.output)


def test_auto_engine_choice():
    assert resolve_engine(MLP(3, 4, 1), "auto") == "vmap"
    assert resolve_engine(MLP(3, 4, 1, batch_norm=True), "auto") == "shared"
    assert resolve_engine(MLP(3, 4, 1, dropout_p=0.5), "auto") == "shared"
    assert resolve_engine(MLP(3, 4, 1, batch_norm=True).eval(), "auto") == "vmap"
    with pytest.raises(ValueError, match="valid"):
        resolve_engine(MLP(3, 4, 1), "fast")


def test_vmap_with_batchnorm_normalises_each_environment_separately():
    """Opt-in vmap under BatchNorm is a different model: each env uses its own batch statistics."""
    model, x, y, loss_fn = make_problem(True)
    vm = per_env_grads(model, x, y, loss_fn, N_ENVS, engine="vmap")
    for e in range(N_ENVS):
        rows = slice(e * BATCH, (e + 1) * BATCH)
        alone = per_env_grads(model, x[rows], y[rows], loss_fn, 1, engine="loop")
        for a, b in zip(vm.grads, alone.grads):
            assert_close(a[e], b[0])


@pytest.mark.parametrize("method", ["and_mask", "geom_mean"])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("scale", [0, 1])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_get_grads_equals_original_algorithm(method, threshold, scale, batch_norm):
    model, x, y, loss_fn = make_problem(batch_norm, seed=int(threshold * 10) + scale)
    params = list(model.parameters())
    ref_loss, ref_updates, ref_masks, per_env = reference_get_grads(
        threshold, BATCH, loss_fn, N_ENVS, params, model(x), y, method, scale)
    for engine in ("shared", "loop"):
        loss, masks = get_grads(threshold, BATCH, loss_fn, N_ENVS, params, model(x), y, method, scale, engine=engine)
        assert float(loss) == pytest.approx(ref_loss, rel=1e-6)
        for i, (p, ref_u, ref_m, m) in enumerate(zip(params, ref_updates, ref_masks, masks)):
            assert_masks_equal(m, ref_m, [env[i] for env in per_env])
            assert_close(p.grad, ref_u)
    for engine in (["auto", "shared"] if batch_norm else ["auto", "vmap", "shared", "loop"]):
        model.zero_grad()
        loss, masks = get_grads_from_model(model, x, y, loss_fn, N_ENVS, threshold, method, scale, engine=engine)
        assert float(loss) == pytest.approx(ref_loss, rel=1e-6)
        for i, (p, ref_u, ref_m, m) in enumerate(zip(params, ref_updates, ref_masks, masks)):
            assert_masks_equal(m, ref_m, [env[i] for env in per_env])
            assert_close(p.grad, ref_u)


def test_and_mask_at_tau_zero_is_the_plain_mean_gradient():
    model, x, y, loss_fn = make_problem(False)
    params = list(model.parameters())
    mean_loss = torch.stack([loss_fn(o, t) for o, t in zip(model(x).view(N_ENVS, BATCH), y.view(N_ENVS, BATCH))]).mean()
    plain = torch.autograd.grad(mean_loss, params)
    for scale in (0, 1):
        get_grads_from_model(model, x, y, loss_fn, N_ENVS, 0.0, "and_mask", scale)
        for p, g in zip(params, plain):
            assert_close(p.grad, g, rtol=1e-9)
    assert and_mask_utils.AND_MASK.reduces_to_mean(agreement_threshold=0.0, scale_grad_inverse_sparsity=1)
    assert not and_mask_utils.AND_MASK.reduces_to_mean(agreement_threshold=0.5, scale_grad_inverse_sparsity=1)


def test_exact_zero_gradient_counts_as_sign_zero():
    grads = torch.tensor([[1.0, 2.0, -1.0, 0.0],
                          [3.0, 0.0, -2.0, 0.0],
                          [2.0, 1.0, -3.0, 0.0]])
    update, diag = and_mask_utils.and_mask(grads, agreement_threshold=1.0, scale_grad_inverse_sparsity=0)
    # coordinate 1 has an exact zero in env 1: agreement 2/3 < 1, masked; coordinate 3 is all zero.
    assert diag["mask"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert update.tolist() == [2.0, 0.0, -2.0, 0.0]
    update, diag = and_mask_utils.and_mask(grads, agreement_threshold=0.6, scale_grad_inverse_sparsity=1)
    assert diag["mask"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert torch.allclose(update, grads.mean(0) / 0.75)


def test_geom_mean_magnitude_is_the_geometric_mean():
    grads = torch.tensor([[1.0, -4.0], [4.0, -1.0], [2.0, -2.0]])
    update, diag = and_mask_utils.geom_mean(grads, agreement_threshold=1.0, scale_grad_inverse_sparsity=0)
    assert torch.allclose(update, torch.tensor([2.0, -2.0]), rtol=1e-5)


def test_get_grads_rejects_bad_method_and_shapes():
    model, x, y, loss_fn = make_problem(False)
    with pytest.raises(ValueError, match="method"):
        get_grads(1.0, BATCH, loss_fn, N_ENVS, list(model.parameters()), model(x), y, "median", 0)
    with pytest.raises(ValueError, match="rows"):
        get_grads(1.0, BATCH + 1, loss_fn, N_ENVS, list(model.parameters()), model(x), y, "and_mask", 0)


@pytest.mark.parametrize("engine", ["vmap", "shared"])
def test_float32_masks_match_the_loop_on_the_synthetic_mlp(engine):
    torch.manual_seed(3)
    model = MLP(10, 64, 3, 1)
    x, y = torch.randn(8 * 32, 10), torch.randint(0, 2, (8 * 32,)).float()
    loss_fn = F.binary_cross_entropy_with_logits
    ref = per_env_grads(model, x, y, loss_fn, 8, engine="loop")
    got = per_env_grads(model, x, y, loss_fn, 8, engine=engine)
    for a, b in zip(got.grads, ref.grads):
        assert_close(a, b)
        for tau in (0.3, 0.5, 1.0):
            m_got = and_mask_utils.agreement_mask(a, tau)
            m_ref = and_mask_utils.agreement_mask(b, tau)
            noisy = (b.abs() <= 1e-6 * b.abs().max()).any(0) & (b != 0).any(0)
            assert torch.equal(m_got[~noisy], m_ref[~noisy])


@pytest.mark.parametrize("hidden_layers", [0, 2])
def test_outer_engine_gives_the_loop_gradients_per_example(hidden_layers):
    torch.manual_seed(4)
    model = MLP(9, 11, hidden_layers, 3).double()
    x, y = torch.randn(20, 9, dtype=torch.float64), torch.randint(0, 3, (20,))
    ref = per_env_grads(model, x, y, F.cross_entropy, 20, engine="loop")
    got = per_env_grads(model, x, y, F.cross_entropy, 20, engine="auto", accepts_outer=True)
    assert resolve_engine(model, "auto", 20, 20, accepts_outer=True) == "outer"
    assert_close(got.env_losses, ref.env_losses)
    for g, r in zip(got.grads, ref.grads):
        dense = g.materialize() if isinstance(g, OuterProducts) else g
        assert dense.shape == r.shape
        assert_close(dense, r)
        if isinstance(g, OuterProducts):
            assert_close(g.mean(), r.mean(0))


def test_outer_engine_applies_only_where_exact():
    assert resolve_engine(MLP(3, 4, 1), "auto", 8, 8, accepts_outer=True) == "outer"
    assert resolve_engine(MLP(3, 4, 1), "auto", 8, 8) == "vmap"  # caller cannot take factors
    assert resolve_engine(MLP(3, 4, 1), "auto", 16, 8, accepts_outer=True) == "vmap"  # 2 examples per env
    assert resolve_engine(MLP(3, 4, 1, batch_norm=True), "auto", 8, 8, accepts_outer=True) == "shared"
    with pytest.raises(RunError, match="outer needs one example per environment"):
        resolve_engine(MLP(3, 4, 1, dropout_p=0.2), "outer", 8, 8, accepts_outer=True)


def test_a_run_that_asks_for_outer_where_it_does_not_apply_ends_with_one_line(tmp_path):
    command = [sys.executable, "-m", "gen_mask.run_synthetic", "--method", "and_mask", "--grad_engine", "outer",
               "--batch_norm", "1", "--epochs", "1", "--examples_per_env", "16", "--batch_size", "8",
               "--n_test", "16", "--quiet", "--use_cuda", "0", "--output_dir", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["error: --grad_engine outer needs one example per environment, a model "
                                                "whose trainable parameters all sit in nn.Linear layers (no BatchNorm, "
                                                "no active dropout), and a caller that accepts factored gradients"]


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("scale", [0, 1])
def test_factored_and_mask_equals_and_mask_on_materialised_gradients(threshold, scale):
    torch.manual_seed(5)
    delta = torch.randn(50, 7)
    inputs = torch.randn(50, 13)
    inputs[:, 0] = 0.0  # exact zeros: sign 0 in every example
    inputs[:10, 1] = 0.0
    factors = OuterProducts(delta, inputs)
    fast, fast_diag = and_mask_utils.and_mask_outer(factors, threshold, scale)
    slow, slow_diag = and_mask_utils.and_mask(factors.materialize(), threshold, scale)
    assert torch.equal(fast_diag["mask"], slow_diag["mask"])
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["and_mask", "geom_mean"])
def test_per_example_get_grads_from_model_matches_the_original_algorithm(method):
    torch.manual_seed(6)
    model = MLP(8, 10, 1, 2).double()
    x, y = torch.randn(12, 8, dtype=torch.float64), torch.randint(0, 2, (12,))
    params = list(model.parameters())
    _, ref_updates, ref_masks, per_env = reference_get_grads(0.3, 1, F.cross_entropy, 12, params, model(x), y,
                                                             method, 1)
    _, masks = get_grads_from_model(model, x, y, F.cross_entropy, 12, 0.3, method, 1, engine="outer")
    for i, (p, u, m, got) in enumerate(zip(params, ref_updates, ref_masks, masks)):
        assert_masks_equal(got, m, [env[i] for env in per_env])
        assert_close(p.grad, u)
