"""Descent fields, trajectories, basin maps and Hessian eigenvalues of a method on a 2-D toy landscape.

python -m vizualization.toy_landscape --landscape ilc_paper --method and_mask --noise 3 --out figures/

Figures (in --out, named after the landscape and method):
- <landscape>_<method>_fields: each environment's loss Z_e with the streamlines of −∇Z_e, the
  summed loss with the average field −mean_e ∇Z_e, and with the method's field −d(θ);
- <landscape>_<method>_trajectory: the heavy-ball trajectory θ ← θ − η v, v ← μ v + d(θ) from
  --start, and each environment's loss along it;
- <landscape>_<method>_basins: from every start cell, the fraction of --repeats noisy runs that
  end at an invariant minimum, a spurious minimum or neither (minima found numerically);
- <landscape>_hessian: smallest and largest Hessian eigenvalue of each Z_e and of the average;
- <landscape>_<method>_consistency: each minimum's ε-regions N^ε_{e,θ*} with the point where
  I^ε(θ*) is attained, and the I^ε of the minimum each basin-map run reaches; prints
  `ILC <method> <value>`, minus the mean I^ε over the converged runs (`toy_consistency`).
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from matplotlib.colors import TwoSlopeNorm

from and_mask.core.combiners import MethodFlags
from and_mask.core.figures import add_output_flags, claim_figures, figure, plt, run_cli, save
from and_mask.core.flags import (
    entry_parser,
    finite_float,
    non_negative_float,
    positive_float,
    positive_int,
    probability,
    seed_int,
)
from vizualization.dynamics import (
    KINDS,
    basin_fractions,
    basin_runs,
    find_minima,
    hessian_eigenvalues,
    method_dynamics,
    reached_minimum,
)
from vizualization.landscapes import DTYPE, LANDSCAPES, default_lr, env_grads, env_losses
from vizualization.toy_consistency import EvaluationGrid, inconsistency, method_ilc
from vizualization.toy_methods import TOY_METHODS, direction

FIGURES = ("fields", "trajectory", "basins", "hessian", "consistency")
METHOD_FLAGS = MethodFlags(TOY_METHODS, required=False, default_method="mean")
MARKERS = {"invariant": ("*", "gold", 16), "spurious": ("X", "red", 10)}


def grid_size(text):
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"needs at least 2 nodes per axis, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser("vizualization.toy_landscape", __doc__)
    group = parser.add_argument_group("landscape and dynamics")
    group.add_argument("--landscape", choices=sorted(LANDSCAPES), default="ilc_paper",
                       help="The 2-D landscape of two environments.")
    group.add_argument("--momentum", type=probability, default=0.0, help="Heavy-ball momentum μ, in [0, 1).")
    group.add_argument("--noise", type=non_negative_float, default=0.0,
                       help="σ of the Gaussian noise added to each environment's gradient (the original used 3 on "
                            "ilc_paper).")
    group.add_argument("--steps", type=positive_int, default=500, help="Steps of the trajectory and of each basin run.")
    group.add_argument("--lr", type=positive_float, default=None,
                       help="Step size η. Default: 1 / the largest Hessian eigenvalue magnitude of any environment on "
                            "the plotting grid.")
    group.add_argument("--start", type=finite_float, nargs=2, metavar=("X", "Y"), default=None,
                       help="Start of the trajectory. Default: the landscape's own start.")
    group.add_argument("--basin_grid", type=positive_int, default=40, help="Start cells per axis of the basin maps.")
    group.add_argument("--repeats", type=positive_int, default=8,
                       help="Noisy runs per start cell (one run when there is no noise).")
    group.add_argument("--radius", type=positive_float, default=1.0,
                       help="An end point within this distance of a minimum has reached it; also the distance "
                            "within which every environment needs a minimum for an invariant one.")
    group.add_argument("--seed", type=seed_int, default=0, help="Seed of the gradient noise.")
    group.add_argument("--figures", nargs="+", choices=FIGURES, default=list(FIGURES), help="The figures to draw.")
    group = parser.add_argument_group("consistency")
    group.add_argument("--eps", type=positive_float, default=1.0,
                       help="ε of the inconsistency I^ε: how far each environment's loss may move inside its region.")
    group.add_argument("--ilc_grid", type=grid_size, default=481,
                       help="Nodes per axis of the evaluation grid on which the ε-regions are flood-filled.")
    METHOD_FLAGS.add_flags(parser)
    add_output_flags(parser)
    return parser


def _grid(landscape):
    """The plotting grid: numpy axes for matplotlib, torch points for the fields."""
    xs, ys, points = landscape.grid()
    return xs.numpy(), ys.numpy(), points


def method_label(method, hparams) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in hparams.items())
    return f"{method.name} ({settings})" if settings else method.name


def _contour(ax, fig, xs, ys, values, title, label="loss"):
    filled = ax.contourf(xs, ys, values, levels=20, cmap="viridis")
    fig.colorbar(filled, ax=ax, label=label)
    ax.set(title=title, xlabel="x", ylabel="y", aspect="equal", xlim=(xs[0], xs[-1]), ylim=(ys[0], ys[-1]))


def _stream(ax, xs, ys, field):
    """Streamlines of the descent direction −field ((ny, nx, 2) array)."""
    ax.streamplot(xs, ys, -field[..., 0], -field[..., 1], color="white", linewidth=0.7, density=1.1, arrowsize=0.8)


def _mark_minima(ax, minima):
    for kind, (marker, colour, size) in MARKERS.items():
        points = np.array([m.point for m in minima if m.kind == kind]).reshape(-1, 2)
        ax.plot(points[:, 0], points[:, 1], marker, color=colour, markersize=size, markeredgecolor="black",
                linestyle="none", label=f"{kind} minimum")


def _legend_below(fig, ax):
    """The minima markers' legend under the panels, where it hides nothing."""
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize="small")


def plot_fields(args, landscape, method, hparams, lr, minima):
    xs, ys, points = _grid(landscape)
    shape = (len(ys), len(xs))
    losses = env_losses(landscape, points).numpy()
    grads = env_grads(landscape, points).numpy()
    combined = direction(method, hparams, landscape, points, lr).numpy()
    fig, axes = figure(2, 2, f"{landscape.name}: descent fields\n{method_label(method, hparams)}")
    panels = [(losses[:, 0], grads[:, 0], "env 1: $Z_1$ and $-\\nabla Z_1$"),
              (losses[:, 1], grads[:, 1], "env 2: $Z_2$ and $-\\nabla Z_2$"),
              (losses.sum(1), grads.mean(1), "$Z_1 + Z_2$ and the average $-\\mathrm{mean}_e \\nabla Z_e$"),
              (losses.sum(1), combined, f"$Z_1 + Z_2$ and {method.name}'s $-d(\\theta)$")]
    for ax, (loss, field, title) in zip(axes.flat, panels):
        _contour(ax, fig, xs, ys, loss.reshape(shape), title)
        _stream(ax, xs, ys, field.reshape(*shape, 2))
        _mark_minima(ax, minima)
    _legend_below(fig, axes[0, 0])
    return save(fig, args, f"{landscape.name}_{method.name}_fields")


def plot_trajectory(args, landscape, method, hparams, lr, minima):
    start = torch.tensor([args.start or landscape.start], dtype=DTYPE)
    path = method_dynamics(method, hparams, landscape, start, args.steps, lr, args.momentum, args.noise, args.seed,
                           record=True)[:, 0]
    xs, ys, points = _grid(landscape)
    summed = env_losses(landscape, points).sum(1).reshape(len(ys), len(xs)).numpy()
    fig, axes = figure(1, 2, f"{landscape.name}: {method_label(method, hparams)}\n"
                             f"step η={lr:.3g}, momentum μ={args.momentum}, gradient noise σ={args.noise}")
    ax = axes[0, 0]
    _contour(ax, fig, xs, ys, summed, f"trajectory on $Z_1 + Z_2$ ({args.steps} steps)")
    ax.plot(path[:, 0], path[:, 1], color="white", linewidth=1.0)
    ax.plot(*path[0], "o", color="white", markeredgecolor="black", label="start")
    ax.plot(*path[-1], "s", color="orange", markeredgecolor="black", label="end")
    _mark_minima(ax, minima)
    ax.set(xlim=(landscape.low, landscape.high), ylim=(landscape.low, landscape.high))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize="small")
    ax = axes[0, 1]
    along = env_losses(landscape, path).numpy()
    for e in range(along.shape[1]):
        ax.plot(along[:, e], label=f"$Z_{e + 1}$")
    ax.plot(along.mean(1), color="black", linewidth=2, label="mean")
    ax.set(title="environment losses along the trajectory", xlabel="step", ylabel="loss")
    ax.legend()
    return save(fig, args, f"{landscape.name}_{method.name}_trajectory")


def plot_basins(args, landscape, method, hparams, lr, minima, ends):
    repeats = args.repeats if args.noise > 0 else 1
    fractions = basin_fractions(ends, minima, args.basin_grid, args.radius).numpy()
    overall = ", ".join(f"{kind} {fraction.mean():.3f}" for kind, fraction in zip(KINDS, fractions))
    print(f"basins of {method_label(method, hparams)}, fraction of all runs: {overall}")
    xs, ys, points = _grid(landscape)
    summed = env_losses(landscape, points).sum(1).reshape(len(ys), len(xs)).numpy()
    fig, axes = figure(1, 3, f"{landscape.name}: where {method_label(method, hparams)} ends\n"
                             f"step η={lr:.3g}, momentum μ={args.momentum}, gradient noise σ={args.noise}, "
                             f"{args.steps} steps, {repeats} runs per start cell")
    extent = (landscape.low, landscape.high, landscape.low, landscape.high)
    for ax, kind, fraction in zip(axes.flat, KINDS, fractions):
        image = ax.imshow(fraction, origin="lower", extent=extent, vmin=0, vmax=1, cmap="magma")
        fig.colorbar(image, ax=ax, label="fraction of runs")
        ax.contour(xs, ys, summed, levels=15, colors="white", linewidths=0.4, alpha=0.5)
        _mark_minima(ax, minima)
        ax.set(title=f"reaches {kind}" + (" minimum" if kind != "neither" else ""), xlabel="x", ylabel="y")
    _legend_below(fig, axes[0, 0])
    return save(fig, args, f"{landscape.name}_{method.name}_basins")


def plot_consistency(args, landscape, method, hparams, minima, ends):
    """Each minimum's ε-regions and maximising points; the I^ε reached from each start cell."""
    grid = EvaluationGrid.of(landscape, args.ilc_grid)
    found = [inconsistency(landscape, grid, m.point, args.eps) for m in minima]
    for m, result in zip(minima, found):
        e, other = result.pair
        note = "" if result.resolved else "  (not resolved: some ε-region holds no grid node; use a finer --ilc_grid)"
        print(f"I^eps of the {m.kind} minimum at ({m.point[0]:.3f}, {m.point[1]:.3f}): {result.value:.4g} "
              f"(pair env {e + 1} -> env {other + 1}){note}")
    reached = reached_minimum(ends, minima, args.radius).numpy()
    ilc, converged = method_ilc([r.value for r in found], reached)
    print(f"ILC {method.name} {ilc:.6g}")
    print(f"  over {converged} of {len(reached)} runs that converged (ended within --radius of a minimum), "
          f"eps={args.eps}, grid {args.ilc_grid}x{args.ilc_grid}")
    ncols = min(len(minima) + 1, 3)
    fig, axes = figure(-(-(len(minima) + 1) // ncols), ncols,
                       f"{landscape.name}: $I^ε$ (ε={args.eps}) of the minima, and where "
                       f"{method_label(method, hparams)} ends\nILC = {ilc:.4g} over {converged} of "
                       f"{len(reached)} runs that converged; regions on a {args.ilc_grid}² grid")
    colours = plt.get_cmap("tab10")(np.arange(landscape.n_envs) % 10)
    xs, ys, points = _grid(landscape)
    summed = env_losses(landscape, points).sum(1).reshape(len(ys), len(xs)).numpy()
    for ax, m, result in zip(axes.flat, minima, found):
        ax.contour(xs, ys, summed, levels=15, colors="grey", linewidths=0.4, alpha=0.6)
        for e, colour in enumerate(colours):
            region = result.regions[e].astype(float)
            if region.any():
                ax.contourf(grid.xs, grid.xs, region, levels=[0.5, 1.5], colors=[colour], alpha=0.3)
            ax.plot([], [], "s", color=colour, alpha=0.5, label=f"$N^ε$ of env {e + 1}")
            # The point of env e's region farthest in loss from L_e(θ*), over every e′.
            ax.plot(*result.pair_points[e, result.pair_values[e].argmax()], "o", color=colour,
                    markeredgecolor="black", markersize=6 if e != result.pair[0] else 10,
                    label="its maximising θ (largest: $I^ε$)" if e == 0 else None)
        _mark_minima(ax, [m])
        e, other = result.pair
        ax.set(title=f"{m.kind} ({m.point[0]:.2f}, {m.point[1]:.2f}): $I^ε$ = {result.value:.3g}\n"
                     f"pair env {e + 1} → env {other + 1}" + ("" if result.resolved else " (not resolved)"),
               xlabel="x", ylabel="y", aspect="equal", xlim=(landscape.low, landscape.high),
               ylim=(landscape.low, landscape.high))
    ax = axes.flat[len(minima)]
    values = np.array([r.value for r in found] + [np.nan])[reached]  # index −1: no minimum reached
    values = values.reshape(-1, args.basin_grid, args.basin_grid)
    with warnings.catch_warnings():  # a start cell none of whose runs converged stays blank (NaN)
        warnings.simplefilter("ignore", RuntimeWarning)
        per_cell = np.nanmean(values, axis=0)
    image = ax.imshow(per_cell, origin="lower", extent=(landscape.low, landscape.high, landscape.low, landscape.high),
                      cmap="viridis")
    fig.colorbar(image, ax=ax, label="mean $I^ε$ of the minimum reached")
    ax.contour(xs, ys, summed, levels=15, colors="white", linewidths=0.4, alpha=0.5)
    _mark_minima(ax, minima)
    ax.set(title="from each start cell (blank: no run converged)", xlabel="x", ylabel="y")
    for extra in axes.flat[len(minima) + 1:]:
        extra.set_axis_off()
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize="small")
    return save(fig, args, f"{landscape.name}_{method.name}_consistency")


def plot_hessian(args, landscape):
    xs, ys, points = _grid(landscape)
    eigenvalues = hessian_eigenvalues(landscape, points).numpy()
    names = [f"$Z_{e + 1}$" for e in range(eigenvalues.shape[1] - 1)] + ["mean"]
    fig, axes = figure(2, len(names), f"{landscape.name}: Hessian eigenvalues")
    for row, which in enumerate(("smallest", "largest")):
        for col, name in enumerate(names):
            values = eigenvalues[:, col, row].reshape(len(ys), len(xs))
            bound = max(abs(values.min()), abs(values.max()), 1e-12)
            ax = axes[row, col]
            image = ax.pcolormesh(xs, ys, values, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -bound, bound),
                                  shading="nearest")
            fig.colorbar(image, ax=ax, label="eigenvalue")
            ax.set(title=f"{which} eigenvalue of {name}", xlabel="x", ylabel="y", aspect="equal")
    return save(fig, args, f"{landscape.name}_hessian")


def main(argv=None) -> list:
    parser = build_parser()
    args = parser.parse_args(argv)
    method, hparams = METHOD_FLAGS.resolve(args, parser)
    landscape = LANDSCAPES[args.landscape]
    names = [f"{landscape.name}_hessian" if kind == "hessian" else f"{landscape.name}_{method.name}_{kind}"
             for kind in args.figures]
    figures = claim_figures(args, "vizualization.toy_landscape", names)
    lr = args.lr or default_lr(landscape)
    # The minima are a property of the landscape: search them with the stable default step.
    minima = find_minima(landscape, default_lr(landscape), radius=args.radius)
    for minimum in minima:
        print(f"{minimum.kind} minimum of {minimum.source} at ({minimum.point[0]:.3f}, {minimum.point[1]:.3f})")
    written = []
    if "fields" in args.figures:
        written += plot_fields(args, landscape, method, hparams, lr, minima)
    if "trajectory" in args.figures:
        written += plot_trajectory(args, landscape, method, hparams, lr, minima)
    if {"basins", "consistency"} & set(args.figures):
        repeats = args.repeats if args.noise > 0 else 1  # without noise every repeat is the same run
        ends = basin_runs(method, hparams, landscape, args.basin_grid, repeats, args.steps, lr, args.momentum,
                          args.noise, args.seed)
    if "basins" in args.figures:
        written += plot_basins(args, landscape, method, hparams, lr, minima, ends)
    if "hessian" in args.figures:
        written += plot_hessian(args, landscape)
    if "consistency" in args.figures:
        written += plot_consistency(args, landscape, method, hparams, minima, ends)
    figures.finish()
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    run_cli(main)
