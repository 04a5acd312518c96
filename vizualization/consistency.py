"""A lower bound on the inconsistency I^ε of a trained model, per ordered pair of environments.

python -m vizualization.consistency --run runs/geom_s0 --eps 0.1 --out figures/

The run is rebuilt from its config.json with its final weights (`and_mask.experiments.saved.rebuild`),
never retrained. For every ordered pair (e, e′) of training environments, paths start at the
trained weights θ* and climb |L_e′(θ) − L_e(θ*)| while every evaluated point keeps
|L_e(θ) − L_e(θ*)| ≤ ε, consecutive points at most --step_length apart
(`and_mask.core.consistency`). The result is a lower bound on I^ε(θ*) up to the path's
discretisation: the segments between evaluated points are not checked. With --radius ρ the
paths stay in the ball B_ρ(θ*) and the result bounds I^ε_ρ(θ*) ≤ I^ε(θ*), which unlike I^ε is
finite on a ReLU network, so the bound stops growing with the budget.

Writes OUT/consistency.json (the bound, every pair's value and the length of the path that
reached it, the search settings, the maximising pair's path) and OUT/consistency.png (the pairs'
values as a matrix; both losses along the maximising pair's path).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from and_mask.core.consistency import (
    LOWER_BOUND_NOTE,
    add_search_flags,
    env_data,
    estimate_inconsistency,
    settings_from_args,
)
from and_mask.core.errors import RunError
from and_mask.core.figures import add_output_flags, claim_figures, figure, run_cli, save
from and_mask.core.flags import entry_parser, positive_float, seed_int
from and_mask.experiments.saved import rebuild

FINAL = "weights_final.pt"


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser("vizualization.consistency", __doc__)
    parser.add_argument("--run", required=True, help="Output folder of a training run (config.json and weights).")
    parser.add_argument("--eps", type=positive_float, required=True,
                        help="ε: how far each environment's loss may move from its value at the trained weights.")
    group = parser.add_argument_group("search budget")
    add_search_flags(group)
    group.add_argument("--seed", type=seed_int, default=0, help="Seed of the restarts' random directions.")
    add_output_flags(parser)
    return parser


def plot(args, estimate) -> list[Path]:
    e, other = estimate.pair
    settings = estimate.settings
    symbol, ball = ("$I^ε$", "") if settings.radius is None else \
        ("$I^ε_ρ$", f", in the ball ρ = {settings.radius} ({settings.metric} metric)")
    fig, axes = figure(1, 2, f"{Path(args.run).name}: inconsistency {symbol} ≥ {estimate.lower_bound:.4g} "
                             f"(ε = {estimate.eps}), a lower bound up to the path's discretisation\n"
                             f"paths of ≤ {settings.steps} steps of length ≤ {settings.step_length}, "
                             f"{settings.restarts} per pair{ball}; ‖θ*‖ = {estimate.weights_norm:.3g}")
    ax = axes[0, 0]
    values = estimate.values.numpy()
    image = ax.imshow(values, cmap="viridis", origin="upper")
    fig.colorbar(image, ax=ax, label="max found of $|L_{e′}(θ) − L_e(θ^*)|$")
    ticks = np.arange(values.shape[0])
    ax.set(xticks=ticks, yticks=ticks, xticklabels=ticks + 1, yticklabels=ticks + 1, xlabel="env e′",
           ylabel="env e (the constraint)", title="each ordered pair")
    ax.plot(other, e, "s", markerfacecolor="none", markeredgecolor="red", markersize=10)
    ax = axes[0, 1]
    length, loss_e, loss_other = (t.numpy() for t in estimate.traces[(e, other)])
    accepted = ~np.isnan(loss_e)
    reference = estimate.reference_losses[e]
    ax.plot(length[accepted], np.abs(loss_e[accepted] - reference), ".-", label=f"$|L_{{{e + 1}}} − L_{{{e + 1}}}(θ^*)|$")
    ax.plot(length[accepted], np.abs(loss_other[accepted] - reference), ".-",
            label=f"$|L_{{{other + 1}}} − L_{{{e + 1}}}(θ^*)|$")
    ax.axhline(estimate.eps, color="grey", linestyle=":", label="ε")
    ax.set_yscale("symlog", linthresh=estimate.eps)
    ax.set(xlabel=f"path length from θ* ({settings.metric} metric)", ylabel="loss gap", ylim=(0, None),
           title=f"best path of env {e + 1} → env {other + 1}")
    ax.legend(fontsize="small")
    return save(fig, args, "consistency")


def main(argv=None) -> list:
    args = build_parser().parse_args(argv)
    for name in (FINAL, "config.json"):
        if not (Path(args.run) / name).exists():
            raise RunError(f"{args.run} has no {name}; the consistency estimate needs a finished run's folder")
    figures = claim_figures(args, "vizualization.consistency", ["consistency"])
    setup, _ = rebuild(args.run, "cpu", weights=FINAL)
    settings = settings_from_args(args, seed=args.seed)
    estimate = estimate_inconsistency(setup.model, env_data(setup.env_loaders, settings.examples_per_env),
                                      setup.loss_fn, args.eps, settings)
    e, other = estimate.pair
    record = estimate.record()
    # The maximising pair's path: after each proposal, its length and both losses (null: rejected).
    length, loss_e, loss_other = ([None if np.isnan(v) else v for v in t.tolist()] for t in estimate.traces[(e, other)])
    record["best_path"] = {"length": length, "loss_env": loss_e, "loss_other_env": loss_other}
    path = figures.save_json(record, "consistency")
    bounded = "I^eps" if settings.radius is None else \
        f"I^eps_rho (rho = {settings.radius}, {settings.metric} metric; I^eps_rho <= I^eps)"
    print(f"{bounded} >= {estimate.lower_bound:.6g} for eps = {args.eps} (pair env {e + 1} -> env {other + 1}): "
          f"{LOWER_BOUND_NOTE}")
    written = [path] + plot(args, estimate)
    figures.finish()
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    run_cli(main)
