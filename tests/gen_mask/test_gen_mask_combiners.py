"""Every combiner of the gen_mask registry: generic properties (driven by the registry, so a rule
someone adds is checked too) and the closed-form / optimality properties of each rule.

To check combiners defined in your own module as well: GEN_MASK_PLUGINS=my_rule pytest tests/gen_mask/test_gen_mask_combiners.py
(gen_mask.gen_mask_utils imports the modules GEN_MASK_PLUGINS names).
"""
import itertools
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize, minimize_scalar

from and_mask.core.combiners import apply_combiner
from and_mask.core.per_env_hvp import hvp_from_hessians
from gen_mask import solvers
from gen_mask.gen_mask_utils import COMBINERS

NAMES = sorted(COMBINERS)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [(3, 4), (5,), (1,), (2, 3, 2)]


def random_hessians(n_envs, n_params, dtype=torch.float64, seed=0):
    """(E, P, P) symmetric matrices of spectral scale ~1: each environment's own curvature."""
    a = torch.randn(n_envs, n_params, n_params, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return (a + a.transpose(1, 2)) / (2 * n_params ** 0.5)


def combine(name, grads, device="cpu", hessians=None, **hparams):
    """Combine a list of (E, *shape) tensors with the registered rule `name` (defaults + hparams).

    A rule that needs Hessian-vector products gets them from `hessians` (E, P, P), by default
    random symmetric ones."""
    combiner = COMBINERS[name]
    hp = {**combiner.defaults(), **hparams}
    hvp = None
    if combiner.needs_hvp:
        n_envs, n_params = grads[0].shape[0], sum(g[0].numel() for g in grads)
        if hessians is None:
            hessians = random_hessians(n_envs, n_params, grads[0].dtype)
        hvp = hvp_from_hessians(hessians.to(device))
    return apply_combiner(combiner, [g.to(device) for g in grads], hp, hvp)


def nonzero_gradients(n_envs, generator, dtype=torch.float32):
    """Random per-environment gradients without zero coordinates."""
    grads = []
    for shape in SHAPES:
        g = torch.randn(n_envs, *shape, generator=generator, dtype=dtype)
        grads.append(torch.where(g.abs() < 1e-3, torch.full_like(g, 0.5), g))
    return grads


# ---- generic properties, one case per registered combiner -----------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_envs", [1, 2, 7])
@pytest.mark.parametrize("name", NAMES)
def test_output_has_the_parameter_shapes_and_is_finite(name, n_envs, dtype, device):
    torch.manual_seed(0)
    grads = nonzero_gradients(n_envs, torch.Generator().manual_seed(n_envs), dtype)
    grads[1][:, 0] = 0.0  # a coordinate whose gradient is exactly zero in every environment
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray warnings at the defaults (e.g. variance with E = 1)
        combined, diagnostics = combine(name, grads, device)
    assert len(combined) == len(grads) and len(diagnostics) == len(grads)
    for out, g, diag in zip(combined, grads, diagnostics):
        assert out.shape == g.shape[1:] and out.dtype == dtype and out.device.type == device
        assert torch.isfinite(out).all()
        assert isinstance(diag, dict)
        if "mask" in diag:
            assert diag["mask"].shape == g.shape[1:] and torch.isfinite(diag["mask"]).all()


@pytest.mark.parametrize("n_envs", [1, 4])
@pytest.mark.parametrize("name", NAMES)
def test_identical_environments_give_back_their_gradient(name, n_envs):
    torch.manual_seed(0)
    common = nonzero_gradients(1, torch.Generator().manual_seed(3), torch.float64)
    grads = [g.expand(n_envs, *g.shape[1:]).clone() for g in common]
    combined, _ = combine(name, grads)
    g_flat, out_flat = torch.cat([g[0].flatten() for g in common]), torch.cat([c.flatten() for c in combined])
    if COMBINERS[name].keeps_consensus:
        torch.testing.assert_close(out_flat, g_flat, rtol=1e-6, atol=1e-8)
    else:  # still a descent direction for the common loss
        assert out_flat @ g_flat > 0


@pytest.mark.parametrize("name", NAMES)
def test_every_hyper_parameter_is_documented_and_its_default_allowed(name):
    combiner = COMBINERS[name]
    assert combiner.summary, f"{name} needs a docstring: its first line is the --help text"
    for hp in combiner.hparams:
        assert hp.help and hp.check(hp.default) is None
        assert isinstance(hp.default, hp.type)


# ---- averaging and the AND-mask ---------------------------------------------------------------

def test_mean_is_averaging():
    grads = nonzero_gradients(5, torch.Generator().manual_seed(1))
    combined, _ = combine("mean", grads)
    for out, g in zip(combined, grads):
        torch.testing.assert_close(out, g.mean(dim=0))


@pytest.mark.parametrize("scale", [0, 1])
def test_and_mask_at_threshold_zero_is_the_mean(scale):
    grads = nonzero_gradients(6, torch.Generator().manual_seed(2))
    grads[0][:, 0, 0] = 0.0
    for out, ref in zip(combine("and_mask", grads, agreement_threshold=0.0, scale_grad_inverse_sparsity=scale)[0],
                        combine("mean", grads)[0]):
        torch.testing.assert_close(out, ref)
    assert COMBINERS["and_mask"].reduces_to_mean(agreement_threshold=0.0, scale_grad_inverse_sparsity=scale)


def test_and_mask_and_geom_mean_are_the_and_mask_package_implementation():
    from and_mask import and_mask_utils

    assert COMBINERS["and_mask"] is and_mask_utils.COMBINERS["and_mask"]
    assert COMBINERS["geom_mean"] is and_mask_utils.COMBINERS["geom_mean"]


# ---- align_weights: the exact LP ----------------------------------------------------------------

@pytest.mark.parametrize("n_envs", [1, 2, 3, 8, 16, 33])
@pytest.mark.parametrize("bound", [1.0, 2.0, 3.5])
def test_box_simplex_lp_is_optimal_against_linprog(n_envs, bound):
    rng = np.random.RandomState(n_envs)
    for trial in range(5):
        c = rng.randn(n_envs) * 10 ** rng.uniform(-3, 3)
        if trial == 4 and n_envs > 2:
            c[1] = c[0]  # ties
        x = solvers.box_simplex_lp(torch.tensor(c), total=1.0, bound=bound).numpy()
        ref = linprog(-c, A_eq=np.ones((1, n_envs)), b_eq=[1.0], bounds=[(-bound, bound)] * n_envs, method="highs")
        assert ref.status == 0
        assert abs(x.sum() - 1) < 1e-9 and x.min() >= -bound - 1e-12 and x.max() <= bound + 1e-12
        assert c @ x >= -ref.fun - 1e-9 * max(1.0, abs(ref.fun))
        assert np.sum((x > -bound) & (x < bound)) <= 1  # at most one fractional weight


def test_box_simplex_lp_batches_over_leading_dims_and_rejects_infeasible_bounds():
    c = torch.randn(4, 6, dtype=torch.float64)
    x = solvers.box_simplex_lp(c, bound=2.0)
    for row, xr in zip(c, x):
        torch.testing.assert_close(xr, solvers.box_simplex_lp(row, bound=2.0))
    with pytest.raises(ValueError, match="infeasible"):
        solvers.box_simplex_lp(torch.randn(3), total=1.0, bound=0.2)


def test_align_weights_is_the_weighted_sum_of_the_lp_solution():
    grads = nonzero_gradients(5, torch.Generator().manual_seed(4), torch.float64)
    combined, diagnostics = combine("align_weights", grads)
    for out, g, diag in zip(combined, grads, diagnostics):
        flat = g.reshape(5, -1)
        w = diag["weights"]
        torch.testing.assert_close(out.flatten(), w @ flat)
        c = (flat @ flat.sum(0)).numpy()
        ref = linprog(-c, A_eq=np.ones((1, 5)), b_eq=[1.0], bounds=[(-2, 2)] * 5, method="highs")
        assert float(c @ w.numpy()) >= -ref.fun - 1e-9 * max(1.0, abs(ref.fun))


# ---- SAND-mask -----------------------------------------------------------------------------------

def test_sand_mask_matches_its_formula():
    grads = nonzero_gradients(5, torch.Generator().manual_seed(5), torch.float64)
    tau, k = 0.3, 1e-3
    combined, diagnostics = combine("sand_mask", grads, agreement_threshold=tau, sand_k=k, scale_grad_inverse_sparsity=0)
    for out, g, diag in zip(combined, grads, diagnostics):
        agreement = torch.sign(g).mean(0).abs()
        mask = torch.clamp(torch.tanh(k * (agreement - tau) / g.var(dim=0, unbiased=True)), min=0)
        torch.testing.assert_close(diag["mask"], mask)
        torch.testing.assert_close(out, mask * g.mean(0))
    # with rescaling, each tensor is divided by its mask density
    rescaled, diagnostics = combine("sand_mask", grads, agreement_threshold=tau, sand_k=k)
    for out, plain, diag in zip(rescaled, combined, diagnostics):
        if diag["mask"].sum() > 0:
            torch.testing.assert_close(out, plain / (1e-10 + diag["mask"].mean()))


def test_sand_mask_at_threshold_one_warns_and_masks_everything():
    grads = nonzero_gradients(4, torch.Generator().manual_seed(6))
    with pytest.warns(UserWarning, match="masks every coordinate"):
        combined, diagnostics = combine("sand_mask", grads, agreement_threshold=1.0)
    assert all(float(out.abs().max()) == 0 for out in combined)
    assert all(float(d["mask"].max()) == 0 for d in diagnostics)


# ---- sign voting and robust statistics ---------------------------------------------------------

def test_majority_vote_is_the_sign_of_the_vote_count():
    g = torch.tensor([[1.0, -2.0, 3.0, 0.0, 1.0], [2.0, -1.0, -3.0, 0.0, -1.0], [5.0, 4.0, -1.0, 0.0, 0.0]])
    out, diag = combine("majority_vote", [g])
    assert out[0].tolist() == [1.0, -1.0, -1.0, 0.0, 0.0]
    assert diag[0]["mask"].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("n_envs", list(range(1, 34)))
def test_sorting_network_equals_torch_sort(n_envs):
    values = torch.randint(-3, 4, (n_envs, 40), generator=torch.Generator().manual_seed(n_envs)).double()
    values[:, :20] = torch.randn(n_envs, 20, dtype=torch.float64)  # ties and distinct values
    assert torch.equal(solvers.sort_environments(values), torch.sort(values, dim=0).values)


@pytest.mark.parametrize("n_envs", [1, 2, 5, 6])
def test_median_matches_numpy(n_envs):
    g = torch.randn(n_envs, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(n_envs))
    out, _ = combine("median", [g])
    np.testing.assert_allclose(out[0].numpy(), np.median(g.numpy(), axis=0))


def test_trimmed_mean_drops_the_extremes_and_resists_an_outlier_environment():
    g = torch.randn(10, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out, _ = combine("trimmed_mean", [g], trim_fraction=0.2)
    ordered = np.sort(g.numpy(), axis=0)
    np.testing.assert_allclose(out[0].numpy(), ordered[2:8].mean(axis=0))
    torch.testing.assert_close(combine("trimmed_mean", [g], trim_fraction=0.0)[0][0], g.mean(0))
    corrupted = g.clone()
    corrupted[3] = 1e6
    for name in ("trimmed_mean", "median"):
        assert float(combine(name, [corrupted])[0][0].abs().max()) < 10


# ---- whole-model rules ----------------------------------------------------------------------------

def pcgrad_reference(grads, order):
    projected = grads.clone()
    for i in range(len(grads)):
        for j in order[i]:
            dot = projected[i] @ grads[j]
            if dot < 0:
                projected[i] -= dot / (grads[j] @ grads[j]) * grads[j]
    return projected.mean(0)


def test_pcgrad_removes_the_conflicting_components_of_two_environments():
    g1, g2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([-1.0, 1.0], dtype=torch.float64)
    out, _ = combine("pcgrad", [torch.stack([g1, g2])])
    g1p = g1 - (g1 @ g2) / (g2 @ g2) * g2  # = [0.5, 0.5], orthogonal to g2
    g2p = g2 - (g2 @ g1) / (g1 @ g1) * g1  # = [0, 1], orthogonal to g1
    torch.testing.assert_close(out[0], (g1p + g2p) / 2)
    assert out[0] @ g1 >= -1e-12 and out[0] @ g2 >= -1e-12
    # without conflict PCGrad is the mean
    agreeing = torch.tensor([[1.0, 0.2], [0.5, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(combine("pcgrad", [agreeing])[0][0], agreeing.mean(0))


def test_pcgrad_equals_the_sequential_algorithm_in_its_random_order():
    grads = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(11)
    out, diag = combine("pcgrad", [grads])
    torch.manual_seed(11)
    scores = torch.rand(6, 6)
    scores.fill_diagonal_(float("inf"))
    order = torch.argsort(scores, dim=1)[:, :5].tolist()
    torch.testing.assert_close(out[0], pcgrad_reference(grads, order))
    assert diag[0]["conflicts"] > 0


def test_pcgrad_sees_the_whole_model():
    # conflict only visible on the concatenation of the two tensors
    a = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.5], [0.0, 0.5]], dtype=torch.float64)
    out, _ = combine("pcgrad", [a, b])
    flat = torch.cat([a, b], dim=1)
    torch.testing.assert_close(torch.cat(out), pcgrad_reference(flat, [[1], [0]]))


def min_norm_reference(grads):
    q = (grads @ grads.T).numpy()
    n = len(q)
    res = minimize(lambda w: w @ q @ w, np.full(n, 1 / n), jac=lambda w: 2 * q @ w, method="SLSQP",
                   bounds=[(0, 1)] * n, constraints={"type": "eq", "fun": lambda w: w.sum() - 1}, tol=1e-14)
    return res.x


@pytest.mark.parametrize("n_envs,dim", [(2, 3), (5, 3), (8, 40), (16, 100)])
def test_mgda_is_the_minimum_norm_point_of_the_convex_hull(n_envs, dim):
    gen = torch.Generator().manual_seed(n_envs)
    grads = torch.randn(n_envs, dim, dtype=torch.float64, generator=gen) + 0.3
    out, diag = combine("mgda", [grads])
    w = diag[0]["weights"]
    assert float(w.min()) >= 0 and abs(float(w.sum()) - 1) < 1e-12  # in the convex hull
    torch.testing.assert_close(out[0], w @ grads)
    q = grads @ grads.T
    norm2 = float(w @ q @ w)
    assert float((q @ w).min()) >= norm2 - 1e-9 * float(q.diagonal().max())  # optimality (KKT)
    w_ref = torch.tensor(min_norm_reference(grads))
    assert norm2 <= float(w_ref @ q @ w_ref) + 1e-10
    random_w = torch.distributions.Dirichlet(torch.ones(n_envs, dtype=torch.float64)).sample((500,))
    assert norm2 <= float(((random_w @ grads) ** 2).sum(1).min()) + 1e-12


def test_mgda_of_two_environments_has_the_closed_form():
    g1, g2 = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    out, _ = combine("mgda", [torch.stack([g1, g2])])
    alpha = float(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)))  # weight of g1
    torch.testing.assert_close(out[0], alpha * g1 + (1 - alpha) * g2)
    # origin inside the hull: the minimum-norm point is zero
    out, _ = combine("mgda", [torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)])
    assert float(out[0].norm()) < 1e-10


def cagrad_objective(w, q, c):
    b = np.full(len(q), 1 / len(q))
    return w @ q @ b + c * np.sqrt(b @ q @ b) * np.sqrt(w @ q @ w)


def test_cagrad_weights_minimise_its_dual_and_the_update_has_its_form():
    grads = torch.randn(6, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    c = 0.4
    out, diag = combine("cagrad", [grads], cagrad_c=c, cagrad_rescale=0)
    w = diag[0]["weights"].numpy()
    q = (grads @ grads.T).numpy()
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-9
    best = cagrad_objective(w, q, c)
    candidates = np.vstack([np.eye(6), np.random.RandomState(0).dirichlet(np.ones(6), 2000)])
    assert best <= min(cagrad_objective(v, q, c) for v in candidates) + 1e-9
    g0, g_w = grads.mean(0), torch.tensor(w) @ grads
    torch.testing.assert_close(out[0], g0 + c * g0.norm() / g_w.norm() * g_w, rtol=1e-6, atol=1e-9)
    # rescaling and the two special cases
    for rescale, divisor in ((1, 1 + c ** 2), (2, 1 + c)):
        torch.testing.assert_close(combine("cagrad", [grads], cagrad_c=c, cagrad_rescale=rescale)[0][0],
                                   out[0] / divisor, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(combine("cagrad", [grads], cagrad_c=0.0)[0][0], g0)
    same = grads[:1].expand(3, -1)
    torch.testing.assert_close(combine("cagrad", [same], cagrad_c=c, cagrad_rescale=2)[0][0], grads[0])


def cagrad_by_enumeration(q, c):
    """CAGrad's dual min_{w ∈ simplex} wᵀa + r√(wᵀQw) by trying every support S (small E only).

    On a support the stationarity conditions a_S + (r/s)·Q_SS w_S = μ·1, 1ᵀw_S = 1 with
    s² = w_SᵀQ_SS w_S reduce to a quadratic in μ; the best feasible candidate over all supports
    (vertices included) is the minimum.
    """
    n = len(q)
    a = q @ np.full(n, 1 / n)
    r = c * np.sqrt(a.mean())
    best = min((np.eye(n)[i] for i in range(n)), key=lambda w: cagrad_objective(w, q, c))
    for size in range(2, n + 1):
        for support in itertools.combinations(range(n), size):
            support = list(support)
            q_s = q[np.ix_(support, support)]
            if np.linalg.matrix_rank(q_s) < size:
                continue
            p, q_inv_a = np.linalg.solve(q_s, np.ones(size)), np.linalg.solve(q_s, a[support])
            for mu in np.roots([p.sum(), -2 * q_inv_a.sum(), q_inv_a @ a[support] - r ** 2]):
                t = mu.real * p.sum() - q_inv_a.sum()
                if abs(mu.imag) > 1e-12 * abs(mu) or t <= 0:
                    continue
                w = np.zeros(n)
                w[support] = (mu.real * p - q_inv_a) / t
                if w.min() >= 0 and cagrad_objective(w, q, c) < cagrad_objective(best, q, c):
                    best = w
    return best


def cagrad_update(grads, w, c):
    g0, g_w = grads.mean(0), w @ grads
    return (g0 + c * np.linalg.norm(g0) * g_w / np.linalg.norm(g_w)) / (1 + c ** 2)


def test_cagrad_resolves_a_tiny_optimal_g_w():
    # The optimum lies on the face of the two small gradients, where ‖g_w‖ ≈ 1e-3 is 2e-6 of the
    # RMS gradient norm: a solver that adds a constant to ‖g_w‖² at unit scale cannot see it.
    grads = np.array([[1000, 0], [0, 1], [-9e-4, -5e-4]], dtype=np.float64)
    q, c = grads @ grads.T, 0.5
    reference = cagrad_by_enumeration(q, c)
    # independently: the best point of the face {w_1 = 0} by a bounded scalar search
    face = minimize_scalar(lambda s: cagrad_objective(np.array([0, s, 1 - s]), q, c), bounds=(0, 1),
                           method="bounded", options={"xatol": 1e-14})
    assert abs(reference[1] - face.x) < 1e-9 and reference[0] == 0
    expected = cagrad_update(grads, reference, c)
    np.testing.assert_allclose(expected, [133.3337, -0.11994], rtol=1e-4)
    out, diag = combine("cagrad", [torch.tensor(grads)], cagrad_c=c)
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-6)
    for scale in (1e-6, 1e6):  # scale-free: the same weights at any scale of the gradients
        w = solvers.cagrad_weights(torch.tensor(q * scale ** 2), c)
        torch.testing.assert_close(w, diag[0]["weights"], rtol=1e-9, atol=1e-12)


def test_cagrad_weights_match_the_enumeration_on_badly_scaled_gradients():
    rng = np.random.RandomState(1)
    for _ in range(40):
        n_envs, dim = rng.randint(2, 6), rng.randint(1, 8)
        grads = rng.randn(n_envs, dim) * 10.0 ** rng.uniform(-6, 3, size=(n_envs, 1))
        c = rng.uniform(0.1, 0.9)
        q = grads @ grads.T
        w = solvers.cagrad_weights(torch.tensor(q), c).numpy()
        reference = cagrad_by_enumeration(q, c)
        assert cagrad_objective(w, q, c) <= cagrad_objective(reference, q, c) + 1e-12 * abs(
            cagrad_objective(reference, q, c))
        update, expected = cagrad_update(grads, w, c), cagrad_update(grads, reference, c)
        assert np.linalg.norm(update - expected) <= 1e-7 * np.linalg.norm(grads.mean(0))


def test_gaf_fuses_agreeing_environments_and_skips_when_none_agrees():
    g = torch.tensor([[1.0, 0.0], [1.0, 0.2], [-1.0, 0.0], [0.8, 0.4]], dtype=torch.float64)
    out, diag = combine("gaf", [g], cos_distance_threshold=0.5)
    expected = ((g[0] + g[1]) / 2 + g[3]) / 2  # env 2 points the other way and is filtered out
    torch.testing.assert_close(out[0], expected)
    assert float(diag[0]["agreed"]) == 2
    opposed = torch.tensor([[1.0, 0.0], [-1.0, 0.1]])
    out, diag = combine("gaf", [opposed], cos_distance_threshold=1.0)
    assert float(out[0].abs().max()) == 0 and float(diag[0]["agreed"]) == 0


@pytest.mark.parametrize("threshold", [0.6, 0.9, 1.0, 1.1])
def test_gaf_equals_the_authors_sequential_filter(threshold):
    grads = torch.randn(9, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) + 0.05
    fused, agreed = grads[0], 0
    for g in grads[1:]:  # step_GAF of the authors' code, on flattened gradients
        if 1 - torch.nn.functional.cosine_similarity(fused, g, dim=0) <= threshold:
            fused, agreed = (fused + g) / 2, agreed + 1
    out, diag = combine("gaf", [grads[:, :10], grads[:, 10:]], cos_distance_threshold=threshold)
    torch.testing.assert_close(torch.cat(out), fused if agreed else torch.zeros_like(fused))
    assert float(diag[0]["agreed"]) == agreed


# ---- registry behaviour ------------------------------------------------------------------------------

def test_unknown_combiner_fails_with_the_valid_names():
    with pytest.raises(KeyError) as error:
        COMBINERS["no_such_rule"]
    for name in NAMES:
        assert name in str(error.value)


def test_a_rule_that_needs_hessian_vector_products_must_be_whole_model_and_gets_them():
    with pytest.raises(ValueError, match="only a model-scope combiner"):
        COMBINERS.register("per_tensor_hvp", needs_hvp=True)(lambda grads, hvp: (grads.mean(0), {}))
    assert "per_tensor_hvp" not in COMBINERS
    with pytest.raises(ValueError, match="needs the environments' Hessian-vector products: pass hvp"):
        apply_combiner(COMBINERS["lookahead"], [torch.ones(2, 3)], COMBINERS["lookahead"].defaults())


def test_a_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="already registered"):
        COMBINERS.register("mean")(lambda grads: (grads.mean(0), {}))


# The Gram matrix (scaled) of 8 per-example gradients on which CAGrad's inner minimum-norm problem
# stopped with scipy's default NNLS iteration limit (label-noise task of the quick leaderboard,
# seed 2): seven examples were fitted, their gradients ≈ 0.
STALLING_GRAM = [[0.516705431923175, 1.0738078078330454e-08, -3.978858363935567e-09, -2.7982049903919116e-05, 0.9398780444167983, -0.00018840340492587554, 4.378010156884686e-05, 0.06012786954158369], [1.0738078078330454e-08, 5.704921006439017e-14, -2.2058750861963211e-16, -1.60431626867468e-12, 4.0446260224979925e-08, -1.1792331374909519e-11, 8.24754417948977e-12, 2.3060146708640583e-09], [-3.978858363935567e-09, -2.2058750861963211e-16, 1.078237940427744e-14, 1.7782356099406073e-11, -1.348252485770734e-08, 3.711081537491512e-11, -1.375253964741292e-11, -9.4930677349362e-10], [-2.7982049903919116e-05, -1.60431626867468e-12, 1.7782356099406073e-11, 8.469895181193642e-08, -0.00013034343032133233, 1.2619252164024018e-07, -6.411887610452436e-08, -6.359993125378294e-06], [0.9398780444167983, 4.0446260224979925e-08, -1.348252485770734e-08, -0.00013034343032133233, 7.4495492865680575, -0.0015145662583331597, 0.00020940710720439596, 0.19871372008733665], [-0.00018840340492587554, -1.1792331374909519e-11, 3.711081537491512e-11, 1.2619252164024018e-07, -0.0015145662583331597, 4.387484004522806e-06, -1.6439414049047132e-07, -4.156017330499441e-05], [4.378010156884686e-05, 8.24754417948977e-12, -1.375253964741292e-11, -6.411887610452436e-08, 0.00020940710720439596, -1.6439414049047132e-07, 2.7710619752940273e-07, 8.859773837862991e-06], [0.06012786954158369, 2.3060146708640583e-09, -9.4930677349362e-10, -6.359993125378294e-06, 0.19871372008733665, -4.156017330499441e-05, 8.859773837862991e-06, 0.03374060261576977]]


def test_min_norm_weights_solve_a_gram_matrix_that_stalls_the_default_nnls():
    gram = torch.tensor(STALLING_GRAM, dtype=torch.float64)
    w = solvers.min_norm_weights(gram)
    assert torch.all(w >= 0) and float(w.sum()) == pytest.approx(1.0)
    qw = gram @ w  # optimality: (Qw)_e ≥ wᵀQw, equality where w_e > 0
    assert torch.all(qw >= w @ qw - 1e-9) and torch.allclose(qw[w > 1e-9], w @ qw, atol=1e-9)
    cagrad = solvers.cagrad_weights(gram, 0.5)
    assert torch.all(cagrad >= 0) and float(cagrad.sum()) == pytest.approx(1.0)
