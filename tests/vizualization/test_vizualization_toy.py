"""2-D toy landscapes: autograd fields, every method's direction, minima, basins and the command."""
import matplotlib.image
import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from and_mask.core.combiners import apply_combiner
from and_mask.core.figures import PANEL
from and_mask.core.per_env_hvp import hvp_from_hessians
from gen_mask.gen_mask_utils import COMBINERS
from vizualization import toy_landscape
from vizualization.dynamics import KINDS, basin_map, classify, descend, find_minima
from vizualization.landscapes import DTYPE, LANDSCAPES, Landscape, env_grads, env_hessians, env_losses
from vizualization.toy_methods import TOY_METHODS, direction

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _points(n=40, seed=0):
    return torch.empty(n, 2, dtype=DTYPE).uniform_(-5.5, 5.5, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(LANDSCAPES))
def test_autograd_fields_equal_finite_differences(name):
    landscape, points, h = LANDSCAPES[name], _points(), 1e-5
    steps = h * torch.eye(2, dtype=DTYPE)
    fd_grad = torch.stack([(env_losses(landscape, points + s) - env_losses(landscape, points - s)) / (2 * h)
                           for s in steps], dim=-1)
    torch.testing.assert_close(env_grads(landscape, points), fd_grad, rtol=1e-6, atol=1e-6)
    fd_hess = torch.stack([(env_grads(landscape, points + s) - env_grads(landscape, points - s)) / (2 * h)
                           for s in steps], dim=-1)
    torch.testing.assert_close(env_hessians(landscape, points), fd_hess, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TOY_METHODS))
def test_every_method_gives_a_finite_field(name):
    method, landscape, points = TOY_METHODS[name], LANDSCAPES["home_hard"], _points(6)
    field = direction(method, method.defaults(), landscape, points, lr=0.02)
    assert field.shape == (6, 2) and torch.isfinite(field).all()


@pytest.mark.parametrize("name", sorted(COMBINERS))
def test_registry_field_is_the_training_combiner_point_by_point(name):
    combiner, landscape, points = COMBINERS[name], LANDSCAPES["ilc_paper"], _points(8, seed=1)
    grads = env_grads(landscape, points)
    # a rule that needs Hessian-vector products gets them from the exact Hessians
    hvps = [hvp_from_hessians(h) if combiner.needs_hvp else None for h in env_hessians(landscape, points)]
    torch.manual_seed(0)  # randomised combiners draw differently under vmap: compare the deterministic ones
    field = direction(combiner, combiner.defaults(), landscape, points, lr=0.02)
    expected = torch.stack([apply_combiner(combiner, [g], combiner.defaults(), h)[0][0] for g, h in zip(grads, hvps)])
    if not torch.allclose(field, expected, rtol=1e-6, atol=1e-9):
        again = torch.stack([apply_combiner(combiner, [g], combiner.defaults(), h)[0][0] for g, h in zip(grads, hvps)])
        assert not torch.allclose(again, expected), f"{name} is deterministic but its field differs"


def test_reptile_and_lookahead_reduce_to_the_average_gradient():
    landscape, points = LANDSCAPES["home_easy"], _points(10)
    mean = env_grads(landscape, points).mean(1)
    reptile = direction(TOY_METHODS["reptile"], {"reptile_steps": 1}, landscape, points, lr=0.02)
    lookahead = direction(TOY_METHODS["lookahead"], {**TOY_METHODS["lookahead"].defaults(), "lookahead_steps": 0},
                          landscape, points, lr=0.02)  # no step on the weights: the average
    torch.testing.assert_close(reptile, mean)
    torch.testing.assert_close(lookahead, mean)


def test_reptile_equals_explicit_inner_steps():
    landscape, point, lr, k = LANDSCAPES["ilc_paper"], _points(1), 0.02, 3
    phis = []
    for e in range(2):
        phi = point[0].clone()
        for _ in range(k):
            phi = phi - lr * env_grads(landscape, phi[None])[0, e]
        phis.append(phi)
    expected = (point[0] - torch.stack(phis)).mean(0) / (k * lr)
    got = direction(TOY_METHODS["reptile"], {"reptile_steps": k}, landscape, point, lr)[0]
    torch.testing.assert_close(got, expected)


def test_heavy_ball_matches_the_recursion_on_a_quadratic():
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=DTYPE)
    start = _points(3)
    ends = descend(lambda theta: theta @ a, start, steps=25, lr=0.1, momentum=0.7)
    theta, velocity = start.numpy().copy(), np.zeros((3, 2))
    for _ in range(25):
        velocity = 0.7 * velocity + theta @ a.numpy()
        theta = theta - 0.1 * velocity
    np.testing.assert_allclose(ends.numpy(), theta, rtol=1e-10)


def _wells(t):
    """A well at (−3, 0) in both environments and one own well per environment at (3, ±3)."""
    def well(cx, cy):
        return -5.0 * torch.exp(-((t[0] - cx) ** 2 + (t[1] - cy) ** 2) / 2)
    bowl = 0.05 * (t[0] ** 2 + t[1] ** 2)
    return torch.stack([well(-3, 0) + well(3, 3) + bowl, well(-3, 0) + well(3, -3) + bowl])


WELLS = Landscape("wells", _wells)


def _reference_minimum(start, env=None):
    def loss(p):
        values = _wells(torch.tensor(p, dtype=DTYPE))
        return float(values.mean() if env is None else values[env])
    return minimize(loss, start, method="BFGS", options={"gtol": 1e-10}).x


def _gradient_flow_ends(starts, lr=0.05, steps=2000, h=1e-6):
    """Small-step descent on the mean loss with central finite differences, all starts at once."""
    theta, shifts = starts.clone(), h * torch.eye(2, dtype=DTYPE)
    for _ in range(steps):
        grad = torch.stack([(_wells((theta + s).T).mean(0) - _wells((theta - s).T).mean(0)) / (2 * h)
                            for s in shifts], dim=1)
        theta = theta - lr * grad
    return theta


def test_minima_found_numerically_and_classified():
    minima = find_minima(WELLS, lr=0.2, n_starts=12, steps=400)
    invariant = [m for m in minima if m.kind == "invariant"]
    assert len(invariant) == 1
    np.testing.assert_allclose(invariant[0].point, _reference_minimum([-3.0, 0.0]), atol=1e-3)
    spurious = np.array([m.point for m in minima if m.kind == "spurious"])
    for env, centre in ((0, [3.0, 3.0]), (1, [3.0, -3.0])):
        reference = _reference_minimum(centre, env)
        assert np.linalg.norm(spurious - reference, axis=1).min() < 1e-3
    assert len(minima) == 1 + len(spurious)


def test_basin_map_follows_gradient_flow_of_the_average():
    minima = find_minima(WELLS, lr=0.2, n_starts=12, steps=400)
    n = 8
    fractions = basin_map(TOY_METHODS["mean"], {}, WELLS, minima, n, repeats=1, steps=400, lr=0.2)
    assert fractions.shape == (3, n, n)
    torch.testing.assert_close(fractions.sum(0), torch.ones(n, n, dtype=DTYPE))
    _, _, starts = WELLS.grid(n)
    ends = _gradient_flow_ends(starts)
    expected = classify(ends, minima).reshape(n, n)
    np.testing.assert_array_equal(fractions.argmax(0).numpy(), expected.numpy())
    assert (expected == KINDS.index("invariant")).any() and (expected == KINDS.index("spurious")).any()


def _expected_size(nrows, ncols, dpi):
    return round(PANEL[1] * nrows * dpi), round(PANEL[0] * ncols * dpi)


def test_command_writes_readable_figures(tmp_path):
    dpi = 40
    written = toy_landscape.main(["--landscape", "home_easy", "--method", "and_mask", "--agreement_threshold", "0.9",
                                  "--noise", "1", "--momentum", "0.5", "--steps", "30", "--basin_grid", "6",
                                  "--repeats", "2", "--dpi", str(dpi), "--pdf", "--out", str(tmp_path)])
    shapes = {"fields": (2, 2), "trajectory": (1, 2), "basins": (1, 3), "hessian": (2, 3)}
    for figure_name, (nrows, ncols) in shapes.items():
        [png] = [p for p in written if p.suffix == ".png" and p.stem.endswith(figure_name)]
        image = matplotlib.image.imread(png)
        assert image.shape[:2] == _expected_size(nrows, ncols, dpi)
        assert image[..., :3].std() > 0.05  # not a blank canvas
        assert png.with_suffix(".pdf").stat().st_size > 0


@pytest.mark.parametrize("flags", [["--momentum", "1.0"], ["--noise", "-1"], ["--agreement_threshold", "2"],
                                   ["--method", "no_such_rule"], ["--method", "mean", "--reptile_steps", "2"]])
def test_bad_flags_are_argparse_errors(tmp_path, flags):
    with pytest.raises(SystemExit) as exit_info:
        toy_landscape.main(["--out", str(tmp_path), "--method", "and_mask"] + flags)
    assert exit_info.value.code == 2
