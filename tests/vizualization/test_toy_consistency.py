"""I^ε exact on the grid: closed forms on quadratics, connectivity, off-grid points, a ball, the network
estimator against the grid, and ILC."""
import math

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

from and_mask.core.consistency import SearchSettings, estimate_inconsistency
from vizualization import toy_landscape
from vizualization.dynamics import basin_runs, find_minima, reached_minimum
from vizualization.landscapes import DTYPE, LANDSCAPES, Landscape, default_lr
from vizualization.toy_consistency import (
    EvaluationGrid,
    eps_region,
    inconsistency,
    method_ilc,
)
from vizualization.toy_methods import TOY_METHODS

A, B = np.array([-1.5, 0.3]), np.array([1.7, -0.4])
POINT = (0.0123, 0.0456)  # between the grid nodes
EPS = 0.5


def _quadratics(t):
    """L_1 = ½‖θ − a‖², L_2 = ½‖θ − b‖²."""
    a, b = torch.tensor(A, dtype=DTYPE), torch.tensor(B, dtype=DTYPE)
    return torch.stack([0.5 * ((t - a) ** 2).sum(), 0.5 * ((t - b) ** 2).sum()])


QUADRATICS = Landscape("quadratics", _quadratics)


def _closed_form(eps):
    """(E, E) max over N^ε_{e,θ*} of |L_e′ − L_e(θ*)|.

    N^ε_{e,θ*} is the annulus r_in ≤ ‖θ − c_e‖ ≤ r_out around e's centre, ½r² = L_e(θ*) ∓ ε (all
    inside the domain here); on it L_e′ = ½‖θ − c_e′‖² ranges from ½(closest distance)² to
    ½(d + r_out)², d = ‖c_e − c_e′‖.
    """
    centres = [A, B]
    values = np.full((2, 2), eps)  # e = e′: |L_e − L_e(θ*)| reaches ε on both circles
    for e in range(2):
        reference = 0.5 * np.sum((np.array(POINT) - centres[e]) ** 2)
        r_in, r_out = math.sqrt(max(0.0, 2 * (reference - eps))), math.sqrt(2 * (reference + eps))
        other = 1 - e
        d = np.linalg.norm(centres[e] - centres[other])
        closest = d - r_out if d > r_out else (r_in - d if d < r_in else 0.0)
        values[e, other] = max(0.5 * (d + r_out) ** 2 - reference, reference - 0.5 * closest ** 2)
    return values


def test_quadratics_match_the_closed_form_and_converge_with_the_grid():
    exact = _closed_form(EPS)
    errors = []
    for n in (121, 481):
        grid = EvaluationGrid.of(QUADRATICS, n)
        result = inconsistency(QUADRATICS, grid, POINT, EPS)
        assert result.resolved
        # The nodes lie in the true region, so the grid never overestimates; it misses at most
        # one grid step times the largest gradient of L_e′ (≤ ‖θ − c_e′‖ ≤ 6 here).
        assert np.all(result.pair_values <= exact + 1e-9)
        assert np.all(result.pair_values >= exact - 6 * math.sqrt(2) * grid.spacing)
        errors.append(np.abs(result.pair_values - exact).max())
        assert result.value == pytest.approx(result.pair_values.max())
        assert result.pair == (1, 0)  # θ* is farther from b: env 2's annulus is the wider one
    assert errors[1] < errors[0] / 2
    # The maximiser is the point of env 2's outer circle farthest from a.
    reference = 0.5 * np.sum((np.array(POINT) - B) ** 2)
    far = B + math.sqrt(2 * (reference + EPS)) * (B - A) / np.linalg.norm(A - B)
    assert np.linalg.norm(np.array(result.argmax) - far) < 4 * grid.spacing  # flat along the circle


def _two_wells(t):
    """Env 1 has two equally deep wells at x = ±3; env 2 is low around x = −3 and high at x = 3."""
    x, y = t[0], t[1]
    return torch.stack([(x ** 2 - 9) ** 2 / 20 + y ** 2, (x + 3) ** 2 + y ** 2])


def test_the_region_is_the_connected_part_around_the_point():
    landscape = Landscape("two wells", _two_wells)
    grid = EvaluationGrid.of(landscape, 241)
    result = inconsistency(landscape, grid, (-3.0, 0.0), 1.0)
    xs = grid.xs[np.nonzero(result.regions[0])[1]]
    assert xs.max() < 0  # the other well has the same losses of env 1 but is not connected
    # Around x = −3 env 2 changes by at most (distance to (−3, 0))²; at the other well by ≥ 36.
    assert result.pair_values[0, 1] < 4
    both = inconsistency(landscape, grid, (3.0, 0.0), 1.0)
    assert both.pair_values[0, 1] > 30


def test_an_eps_below_the_grid_resolution_is_flagged():
    grid = EvaluationGrid.of(QUADRATICS, 11)
    result = inconsistency(QUADRATICS, grid, POINT, 1e-6)
    assert not result.resolved
    assert result.regions.sum() == 0
    # Only θ* itself is left: the pair values are the gaps at θ*.
    at_point = _quadratics(torch.tensor(POINT, dtype=DTYPE)).numpy()
    np.testing.assert_allclose(result.pair_values[0], np.abs(at_point - at_point[0]))


def test_a_disc_cuts_the_region_to_its_part_connected_to_the_point():
    grid = EvaluationGrid.of(QUADRATICS, 241)
    free = inconsistency(QUADRATICS, grid, POINT, EPS)
    gy, gx = np.meshgrid(grid.xs, grid.xs, indexing="ij")
    distance = np.hypot(gx - POINT[0], gy - POINT[1])
    previous = np.zeros_like(free.pair_values)
    for radius in (0.5, 1.0, 2.0):
        cut = inconsistency(QUADRATICS, grid, POINT, EPS, radius)
        assert cut.resolved
        assert (distance[cut.regions.any(axis=0)] <= radius).all()
        assert not (cut.regions & ~free.regions).any()  # a part of the unrestricted region
        # Each region is the flood fill of the in-disc feasible nodes, nothing less.
        for e in range(2):
            region = eps_region(grid, e, float(_quadratics(torch.tensor(POINT, dtype=DTYPE))[e]), EPS, POINT, radius)
            np.testing.assert_array_equal(cut.regions[e], region)
        assert np.all(cut.pair_values >= previous) and np.all(cut.pair_values <= free.pair_values)
        previous = cut.pair_values
    # A disc that holds the whole domain changes nothing: I^ε_ρ = I^ε once the disc holds every region.
    whole = inconsistency(QUADRATICS, grid, POINT, EPS, 100.0)
    np.testing.assert_array_equal(whole.pair_values, free.pair_values)
    np.testing.assert_array_equal(whole.regions, free.regions)


@pytest.mark.parametrize("radius", [0.0, -1.0, math.inf])
def test_a_radius_must_be_positive_and_finite(radius):
    grid = EvaluationGrid.of(QUADRATICS, 11)
    with pytest.raises(ValueError, match="radius must be a positive finite number"):
        inconsistency(QUADRATICS, grid, POINT, EPS, radius)


class LandscapeModel(nn.Module):
    """A toy landscape as a network: one 2-vector parameter θ; the input is environment e's one-hot row,
    the output L_e(θ), the loss its mean."""

    def __init__(self, landscape: Landscape, point):
        super().__init__()
        self.landscape = landscape
        self.theta = nn.Parameter(torch.tensor(point, dtype=DTYPE))

    def forward(self, one_hot):
        return one_hot @ self.landscape.env_losses(self.theta)


def _mean_output(output, target):
    return output.mean()


@pytest.mark.parametrize("radius", [None, 1.0, 2.0])
def test_the_network_estimator_reaches_the_exact_value_within_a_ball_from_below(radius):
    grid = EvaluationGrid.of(QUADRATICS, 481)
    exact = inconsistency(QUADRATICS, grid, POINT, EPS, radius)
    data = [(torch.eye(2, dtype=DTYPE)[e:e + 1], torch.zeros(1, dtype=DTYPE)) for e in range(2)]
    estimate = estimate_inconsistency(LandscapeModel(QUADRATICS, POINT), data, _mean_output, EPS,
                                      SearchSettings(steps=300, step_length=0.05, metric="euclidean", restarts=2,
                                                     radius=radius))
    values = estimate.values.numpy()
    # The grid's nodes lie in the true region, which it misses by at most about one cell diagonal
    # times the largest gradient of L_e′ (≤ ‖θ − c_e′‖ ≤ 6 here): the estimator's lower bound lies
    # below the grid value plus that (measured: at most 0.06 above it here).
    assert np.all(values <= exact.pair_values + 6 * math.sqrt(2) * grid.spacing)
    # It finds the maximum (measured: ≥ 0.99 of the grid value for every pair). The estimator only
    # climbs L_e′; at these radii the largest gap lies on that side (at ρ = 0.5 env 2's largest one
    # is the fall of L_1 below L_2(θ*), which it does not search).
    assert np.all(values >= 0.9 * exact.pair_values)
    assert estimate.lower_bound >= 0.9 * exact.value


def test_ilc_is_minus_the_mean_over_converged_runs():
    assert method_ilc([1.0, 5.0], [0, 1, 1, -1]) == (pytest.approx(-11 / 3), 3)
    ilc, converged = method_ilc([1.0], [-1, -1])
    assert math.isnan(ilc) and converged == 0


def test_command_prints_the_ilc_of_the_basin_runs_and_writes_the_figure(tmp_path, capsys, monkeypatch):
    found = []
    monkeypatch.setattr(toy_landscape, "find_minima", lambda *a, **k: found.append(find_minima(*a, **k)) or found[0])
    flags = ["--landscape", "home_hard", "--method", "mean", "--noise", "1", "--steps", "200", "--basin_grid", "5",
             "--repeats", "2", "--seed", "3", "--eps", "2", "--ilc_grid", "121"]
    written = toy_landscape.main(flags + ["--figures", "consistency", "--dpi", "30", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    [line] = [line for line in lines if line.startswith("ILC ")]
    _, method, value = line.split()
    # The same runs and minima, computed here: −mean of the reached minima's I^ε.
    landscape = LANDSCAPES["home_hard"]
    lr, [minima] = default_lr(landscape), found
    ends = basin_runs(TOY_METHODS["mean"], {}, landscape, 5, 2, 200, lr, noise=1.0, seed=3)
    reached = reached_minimum(ends, minima).numpy()
    grid = EvaluationGrid.of(landscape, 121)
    values = np.array([inconsistency(landscape, grid, m.point, 2.0).value for m in minima])
    assert method == "mean"
    assert float(value) == pytest.approx(-values[reached[reached >= 0]].mean(), rel=1e-5)
    [png] = [p for p in written if p.name == "home_hard_mean_consistency.png"]
    image = matplotlib.image.imread(png)
    assert image[..., :3].std() > 0.05


@pytest.mark.parametrize("flags", [["--eps", "0"], ["--eps", "nan"], ["--ilc_grid", "1"]])
def test_bad_consistency_flags_are_argparse_errors(tmp_path, flags):
    with pytest.raises(SystemExit) as exit_info:
        toy_landscape.main(["--out", str(tmp_path), "--figures", "consistency"] + flags)
    assert exit_info.value.code == 2
