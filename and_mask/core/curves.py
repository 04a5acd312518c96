"""Curves of runs against epochs: the mean over a group's runs (seeds) with a ± one standard deviation
band, for `vizualization.plot_runs` and the paper analyses.

x axis, in epochs of training done: the loop evaluates every evaluation set *before* training
epoch k, so those values sit at k − 1 and the final evaluation at the last epoch; the running
training loss/accuracy and the mask density are averages over epoch k, drawn at k − ½.
A group is {label: [runsets.Run]}; the figures are saved through `and_mask.core.figures`.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from and_mask.core.figures import figure, plt, save
from and_mask.core.runsets import Run

RUNNING = ("train_loss", "train_acc")  # averaged over the epoch's steps, not an evaluation


def series(records: list, key: str, sub: str | None = None) -> dict:
    """{x: value} of one metric (or one entry `sub` of a dict-valued metric) of one run."""
    points = {}
    for record in records:
        value = record.get(key)
        if sub is not None:
            value = value.get(sub) if isinstance(value, dict) else None
        if value is None:
            continue
        if key in RUNNING or key == "mask_density":
            x = record["epoch"] - 0.5
        else:
            x = record["epoch"] if record.get("phase") == "final" else record["epoch"] - 1
        points[x] = value
    return points


def band(runs: list[Run], key: str, sub: str | None = None):
    """(x, mean, std) over the runs at the x values that every run has; std is 0 for one run."""
    per_run = [series(run.records, key, sub) for run in runs]
    xs = sorted(set.intersection(*(set(p) for p in per_run)))
    values = np.array([[p[x] for x in xs] for p in per_run], dtype=float).reshape(len(runs), len(xs))
    std = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(xs))
    return np.array(xs), values.mean(axis=0), std


def _metric_keys(runs: list[Run], suffix: str) -> list[str]:
    keys = {k for run in runs for r in run.records for k in r if k.endswith(suffix)}
    return sorted(keys, key=lambda k: (k not in RUNNING, k))


def _panels(n: int):
    ncols = min(n, 4)
    return (n + ncols - 1) // ncols, ncols


def _draw(ax, groups, key, sub=None, bounds=(-np.inf, np.inf)):
    """Mean line and ± std band of every group; the band is clipped to the metric's possible range."""
    for colour, (label, runs) in zip(_colours(), groups.items()):
        x, mean, std = band(runs, key, sub)
        ax.plot(x, mean, color=colour, label=f"{label} (n={len(runs)})")
        ax.fill_between(x, np.clip(mean - std, *bounds), np.clip(mean + std, *bounds), color=colour, alpha=0.25,
                        linewidth=0)


def _colours():
    return plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10


def plot_metric(args, groups, suffix: str, ylabel: str, name: str):
    runs = [r for rs in groups.values() for r in rs]
    keys = _metric_keys(runs, suffix)
    if not keys:
        return []
    fig, axes = figure(*_panels(len(keys)), f"{ylabel}, mean ± std over runs")
    for ax, key in zip(axes.flat, keys):
        _draw(ax, groups, key, bounds=(0, 1) if suffix == "_acc" else (0, np.inf))
        title = key[: -len(suffix)] + (" (running, during the epoch)" if key in RUNNING else "")
        ax.set(title=title, xlabel="epochs trained", ylabel=ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize="small")
    return save(fig, args, name)


def plot_mask_density(args, groups, figure_name="mask_density"):
    runs = [r for rs in groups.values() for r in rs]
    names = list(OrderedDict.fromkeys(n for run in runs for r in run.records for n in r.get("mask_density", {})))
    if not names:
        return []
    fig, axes = figure(*_panels(len(names)), "fraction of coordinates kept by the mask, per parameter tensor")
    for ax, name in zip(axes.flat, names):
        _draw(ax, groups, "mask_density", name, bounds=(0, 1))
        ax.set(title=name, xlabel="epochs trained", ylabel="mask density", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize="small")
    return save(fig, args, figure_name)
