"""Accuracy, loss and per-layer mask density curves of saved runs, mean ± std over seeds by method.

python -m vizualization.plot_runs runs/avg_s0 runs/avg_s1 runs/geom_s0 runs/geom_s1 --out figures/

Reads only each run's config.json and metrics.jsonl (it never retrains); a RUN_DIR may also be a
folder holding run folders. Runs are grouped as summarize groups them (`and_mask.core.runsets`:
every flag that changes the numbers, seeds aside), and labelled by the method, its combiner's
hyper-parameters and any other flag that differs between groups; a group of several runs
(seeds) is drawn as its mean with a ± one standard deviation band (sample std). Runs of several
experiments give one set of figures each, named <experiment>_accuracy etc. An unreadable run is
skipped with a warning; an unfinished one is drawn as far as it got, with a warning.

x axis, in epochs of training done: the loop evaluates every evaluation set *before* training
epoch k, so those values sit at k − 1 and the final evaluation at the last epoch; the running
training loss/accuracy and the mask density are averages over epoch k, drawn at k − ½.
Figures: accuracy, loss (one panel per set: train (running), train_eval, test, relabelled, ...)
and mask_density (one panel per parameter tensor).
"""
from __future__ import annotations

import argparse
from collections import OrderedDict

import numpy as np

from and_mask.core.flags import entry_parser
from and_mask.core.errors import RunError
from and_mask.core.files import warn
from and_mask.core.runfolder import CONFIG
from and_mask.core.runsets import Run, find_runs, key_flags, load_runs, sections, varying
from gen_mask.gen_mask_utils import COMBINERS
from vizualization.plotting import add_output_flags, claim_figures, figure, plt, run_cli, save

SHORT = {"agreement_threshold": "τ", "scale_grad_inverse_sparsity": "scale"}  # legend abbreviations
RUNNING = ("train_loss", "train_acc")  # averaged over the epoch's steps, not an evaluation


def hparam_names(method) -> list[str]:
    return [h.name for h in COMBINERS[method].hparams] if method in COMBINERS else []


def method_label(flags: dict) -> str:
    """'geom_mean τ=1 scale=1': the method and its combiner's hyper-parameter values."""
    method = flags.get("method", "?")
    names = hparam_names(method)
    settings = " ".join(f"{SHORT.get(n, n)}={flags[n]}" for n in names if flags.get(n) is not None)
    return f"{method} {settings}".strip()


def group_runs(runs: list[Run]) -> "OrderedDict[str, OrderedDict[str, list[Run]]]":
    """{experiment: {label: runs}}: the shared grouping of `runsets.sections`, labelled.

    A label is the method, its hyper-parameters and the other flags that differ between groups.
    """
    out = OrderedDict()
    for experiment, groups in sections(runs).items():
        differing, labelled = varying(groups), OrderedDict()
        for key, members in groups.items():
            flags = key_flags(key)
            own = {"method", *hparam_names(flags.get("method"))}
            extra = " ".join(f"{k}={v}" for k, v in sorted(differing[key].items()) if k not in own)
            label = f"{method_label(flags)} {extra}".strip()
            labelled[label if label not in labelled else f"{label} [{len(labelled) + 1}]"] = members
        out[experiment] = labelled
    return out


def load(paths) -> list[Run]:
    """The runs under `paths` that have records; the others are skipped with a warning naming them."""
    runs = []
    for path in paths:
        if not find_runs([path]):
            warn(f"skipping {path}: not a run folder (no {CONFIG}) and holds none")
    for run in load_runs(find_runs(paths)):
        if not run.records:
            warn(f"skipping {run.path}: no metrics yet")
            continue
        if not run.finished:
            warn(f"{run.path} is {run.state}: drawn up to epoch {run.records[-1]['epoch']}")
        runs.append(run)
    return runs


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


def mean_std(runs: list[Run], key: str, sub: str | None = None):
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
        x, mean, std = mean_std(runs, key, sub)
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


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser("vizualization.plot_runs", __doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="Output folders of training runs, or folders holding them.")
    add_output_flags(parser)
    return parser


def main(argv=None) -> list:
    args = build_parser().parse_args(argv)
    runs = load(args.runs)
    if not runs:
        raise RunError(f"no run to plot among {', '.join(args.runs)}")
    experiments = group_runs(runs)
    prefixes = {e: "" if len(experiments) == 1 else f"{e}_" for e in experiments}
    figures = claim_figures(args, "vizualization.plot_runs",
                            [prefixes[e] + name for e in experiments for name in ("accuracy", "loss", "mask_density")])
    written = []
    for experiment, groups in experiments.items():
        prefix = prefixes[experiment]
        written += (plot_metric(args, groups, "_acc", "accuracy", prefix + "accuracy")
                    + plot_metric(args, groups, "_loss", "loss", prefix + "loss")
                    + plot_mask_density(args, groups, prefix + "mask_density"))
    figures.finish()
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    run_cli(main)
