"""Accuracy, loss and per-layer mask density curves of saved runs, mean ± std over seeds by method.

python -m vizualization.plot_runs runs/avg_s0 runs/avg_s1 runs/geom_s0 runs/geom_s1 --out figures/

Reads only each run's config.json and metrics.jsonl (it never retrains); a RUN_DIR may also be a
folder holding run folders. Runs are grouped as summarize groups them (`and_mask.core.runsets`:
every flag that changes the numbers, seeds aside), and labelled by the method, its combiner's
hyper-parameters and any other flag that differs between groups; a group of several runs
(seeds) is drawn as its mean with a ± one standard deviation band (sample std). Runs of several
experiments give one set of figures each, named <experiment>_accuracy etc. An unreadable run is
skipped with a warning; an unfinished one is drawn as far as it got, with a warning.

x axis, in epochs of training done (`and_mask.core.curves`): evaluations before training epoch k sit
at k − 1, the final one at the last epoch, running training values and mask densities at k − ½.
Figures: accuracy, loss (one panel per set: train (running), train_eval, test, relabelled, ...)
and mask_density (one panel per parameter tensor).
"""
from __future__ import annotations

import argparse
from collections import OrderedDict

from and_mask.core.curves import plot_mask_density, plot_metric
from and_mask.core.errors import RunError
from and_mask.core.figures import add_output_flags, claim_figures, run_cli
from and_mask.core.files import warn
from and_mask.core.flags import entry_parser
from and_mask.core.runfolder import CONFIG
from and_mask.core.runsets import Run, find_runs, key_flags, load_runs, sections, varying
from and_mask.experiments.saved import entry_defaults
from gen_mask.gen_mask_utils import COMBINERS

SHORT = {"agreement_threshold": "τ", "scale_grad_inverse_sparsity": "scale"}  # legend abbreviations


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
    for experiment, groups in sections(runs, entry_defaults).items():
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
