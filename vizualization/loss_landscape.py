"""Each training environment's loss around a trained model: is its minimum shared by all of them?

python -m vizualization.loss_landscape --run runs/geom_s0 --out figures/

The run is rebuilt from its config.json (`and_mask.experiments.saved.rebuild`) and evaluated, never
retrained, on up to --examples_per_env examples of each training environment (the setup's
env_loaders), in eval mode, with the loop's own `evaluate`.

- interpolation: θ(α) = θ₀ + α (θ₁ − θ₀) from the initial weights θ₀ (α = 0) to the trained
  weights θ₁ (α = 1); each environment's loss and accuracy, and their averages.
- plane: θ₁ + a·d₁ + b·d₂ for two random Gaussian directions, filter-normalised (Li et al.,
  "Visualizing the loss landscape of neural nets", 2018): every filter d[i] (slice i along the
  output dimension 0) of a weight tensor of dimension ≥ 2 is rescaled to the norm of the
  weights' filter, d[i] ← d[i] · ‖θ₁[i]‖ / ‖d[i]‖; 1-D tensors (biases, normalisation
  parameters) are left fixed, d = 0. Panels: the average loss, the standard deviation of the
  environments' losses, and each environment's boundary of {L_e < ℓ} for one level ℓ (the
  20th percentile of the average over the plane): where the environments agree, the curves
  coincide. Buffers (BatchNorm statistics) stay at their trained values.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from and_mask.core.errors import RunError
from and_mask.core.figures import add_output_flags, claim_figures, figure, plt, run_cli, save
from and_mask.core.flags import entry_parser, finite_float, positive_float, positive_int, seed_int
from and_mask.core.runfolder import is_running
from and_mask.core.runlog import load_weights
from and_mask.core.training import evaluate
from and_mask.experiments.saved import rebuild

INIT, FINAL = "weights_init.pt", "weights_final.pt"
LEVEL_QUANTILE = 0.2


def trainable(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def filter_normalized_direction(weights: dict, generator: torch.Generator) -> dict:
    """A Gaussian direction with every filter rescaled to the norm of the weights' filter; 0 on 1-D tensors."""
    direction = {}
    for name, w in weights.items():
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
        if w.dim() <= 1:
            d.zero_()
        else:
            w_norm = w.reshape(w.shape[0], -1).norm(dim=1)
            d_norm = d.reshape(d.shape[0], -1).norm(dim=1)
            d = d * (w_norm / (d_norm + 1e-10)).reshape(-1, *[1] * (w.dim() - 1))
        direction[name] = d
    return direction


def env_batches(env_loaders, max_examples: int) -> dict:
    """{"env1": [(inputs, target)], ...}: the first batches of each environment, up to max_examples."""
    batches = {}
    for e, loader in enumerate(env_loaders):
        inputs, targets, count = [], [], 0
        for x, y in loader:
            inputs.append(x)
            targets.append(y)
            count += y.shape[0]
            if count >= max_examples:
                break
        batches[f"env{e + 1}"] = [(torch.cat(inputs)[:max_examples], torch.cat(targets)[:max_examples])]
    return batches


@torch.no_grad()
def env_metrics(model, params: dict, batches: dict, loss_fn, device) -> tuple[np.ndarray, np.ndarray]:
    """((E,) losses, (E,) accuracies) of the model with its trainable parameters set to `params`."""
    named = dict(model.named_parameters())
    for name, value in params.items():
        named[name].copy_(value)
    result = evaluate(model, batches, loss_fn, device)
    return (np.array([result[f"{name}_loss"] for name in batches]),
            np.array([result[f"{name}_acc"] for name in batches]))


def interpolation(model, start: dict, end: dict, alphas, batches, loss_fn, device):
    """(len(alphas), E) losses and accuracies along θ₀ + α (θ₁ − θ₀)."""
    rows = [env_metrics(model, {n: start[n] + a * (end[n] - start[n]) for n in end}, batches, loss_fn, device)
            for a in alphas]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def plane(model, centre: dict, d1: dict, d2: dict, coords, batches, loss_fn, device) -> np.ndarray:
    """(len(coords), len(coords), E) losses at θ₁ + a d₁ + b d₂ (rows: b, columns: a)."""
    return np.stack([np.stack([env_metrics(model, {n: centre[n] + a * d1[n] + b * d2[n] for n in centre},
                                           batches, loss_fn, device)[0] for a in coords]) for b in coords])


def _env_colours(n):
    return plt.get_cmap("tab10" if n <= 10 else "tab20")(np.arange(n) % 20)


def plot_interpolation(args, alphas, losses, accuracies):
    fig, axes = figure(1, 2, f"{Path(args.run).name}: from initial (α = 0) to trained (α = 1) weights")
    n_envs = losses.shape[1]
    for ax, values, ylabel in ((axes[0, 0], losses, "loss"), (axes[0, 1], accuracies, "accuracy")):
        for e, colour in enumerate(_env_colours(n_envs)):
            label = f"env {e + 1}" if n_envs <= 8 else (f"each of the {n_envs} environments" if e == 0 else None)
            ax.plot(alphas, values[:, e], color=colour, linewidth=0.9, label=label)
        ax.plot(alphas, values.mean(1), color="black", linewidth=2.2, label="average over environments")
        for a in (0, 1):
            ax.axvline(a, color="grey", linestyle=":")
        ax.set(xlabel="α", ylabel=ylabel, title=f"each environment's {ylabel}")
        ax.grid(alpha=0.3)
    axes[0, 0].set_yscale("log")
    axes[0, 0].legend(fontsize="small")
    return save(fig, args, "interpolation")


def plot_plane(args, coords, losses):
    mean, spread = losses.mean(-1), losses.std(-1)
    level = float(np.quantile(mean, LEVEL_QUANTILE))
    fig, axes = figure(1, 3, f"{Path(args.run).name}: plane of filter-normalised directions around the trained weights")
    for ax, values, title, label in ((axes[0, 0], np.log10(mean), "average loss", "log10 average loss"),
                                     (axes[0, 1], spread, "std of the environments' losses", "std")):
        filled = ax.contourf(coords, coords, values, levels=25, cmap="viridis")
        fig.colorbar(filled, ax=ax, label=label)
        ax.set(title=title)
    ax = axes[0, 2]
    n_envs = losses.shape[-1]
    for e, colour in enumerate(_env_colours(n_envs)):
        ax.contour(coords, coords, losses[..., e], levels=[level], colors=[colour], linewidths=1.2)
        label = f"env {e + 1}" if n_envs <= 8 else (f"one colour per environment ({n_envs})" if e == 0 else None)
        ax.plot([], [], color=colour, label=label)
    ax.contour(coords, coords, mean, levels=[level], colors="black", linewidths=2.2, linestyles="--")
    ax.plot([], [], color="black", linestyle="--", label="average")
    ax.set(title=f"level set loss = {level:.3g}")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower right", ncol=min(n_envs + 1, 5) if n_envs <= 8
               else 2, fontsize="small")
    for ax in axes.flat:
        ax.plot(0, 0, "*", color="white", markeredgecolor="black", markersize=12)
        ax.set(xlabel="a (direction 1)", ylabel="b (direction 2)", aspect="equal")
    return save(fig, args, "plane")


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser("vizualization.loss_landscape", __doc__)
    parser.add_argument("--run", required=True, help="Output folder of a training run, with config.json and weights.")
    parser.add_argument("--points_1d", type=positive_int, default=31, help="Values of α on the interpolation line.")
    parser.add_argument("--alpha_range", type=finite_float, nargs=2, default=[-0.25, 1.25], metavar=("LOW", "HIGH"),
                        help="Interval of α, LOW < HIGH (α = 0: initial weights, α = 1: trained weights).")
    parser.add_argument("--points_2d", type=positive_int, default=21, help="Grid points per axis of the plane.")
    parser.add_argument("--span", type=positive_float, default=1.0, help="The plane covers a, b ∈ [−span, span].")
    parser.add_argument("--examples_per_env", type=positive_int, default=1024,
                        help="Examples of each training environment evaluated at every point.")
    parser.add_argument("--seed", type=seed_int, default=0, help="Seed of the random directions.")
    add_output_flags(parser)
    return parser


def main(argv=None) -> list:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.alpha_range[0] < args.alpha_range[1]:
        parser.error(f"--alpha_range needs LOW < HIGH, got {args.alpha_range[0]} {args.alpha_range[1]}")
    for name in (INIT, FINAL, "config.json"):
        if not (Path(args.run) / name).exists():
            raise RunError(f"{args.run} has no {name}; loss landscapes need a finished run's folder")
    if is_running(args.run):
        raise RunError(f"{args.run} is still running; its weights_final.pt may be of an earlier run")
    figures = claim_figures(args, "vizualization.loss_landscape", ["interpolation", "plane"])
    device = torch.device("cpu")
    setup, _ = rebuild(args.run, device, weights=FINAL)
    if not setup.env_loaders:
        raise RunError(f"the experiment of {args.run} exposes no per-environment loaders (TrainSetup.env_loaders)")
    model = setup.model
    end = trainable(model)
    initial = load_weights(args.run, INIT, map_location=device)
    if any(name not in initial or initial[name].shape != w.shape for name, w in end.items()):
        raise RunError(f"{Path(args.run) / INIT} does not fit the model of {FINAL}")
    start = {name: initial[name] for name in end}
    batches = env_batches(setup.env_loaders, args.examples_per_env)
    alphas = np.linspace(*args.alpha_range, args.points_1d)
    losses, accuracies = interpolation(model, start, end, alphas, batches, setup.loss_fn, device)
    written = plot_interpolation(args, alphas, losses, accuracies)
    generator = torch.Generator().manual_seed(args.seed)
    d1, d2 = filter_normalized_direction(end, generator), filter_normalized_direction(end, generator)
    coords = np.linspace(-args.span, args.span, args.points_2d)
    written += plot_plane(args, coords, plane(model, end, d1, d2, coords, batches, setup.loss_fn, device))
    figures.finish()
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    run_cli(main)
