"""ERM, IRMv1 and the gradient combiners against training size, on the benchmark of "Empirical or
Invariant Risk Minimization? A Sample Complexity Perspective" (Ahuja et al., ICLR 2021).

The command line of `python -m gen_mask.run_erm_irm` (its --help description is the paragraph
above): its flags, their per-kind defaults, and the parsed benchmark (`parse`), which the sweep
collector also uses to read a run's methods and sizes.
"""
from __future__ import annotations

import argparse

from and_mask.core.flags import (
    entry_parser,
    non_negative_float,
    positive_float,
    positive_int,
    positive_list,
    proper_fraction,
    seed_int,
)
from gen_mask.erm_irm.fit import FitConfig, check_methods, valid_methods
from gen_mask.erm_irm.irm import ANNEAL_STEPS, PENALTY_WEIGHTS
from gen_mask.erm_irm.sweep import DATASETS, Sweep

# Defaults per kind of data set, following Ahuja et al. (steps: optimiser steps of every method).
DEFAULTS = {
    "sem": dict(n_train=[50, 200, 500, 1000, 1500, 2000],  # examples per environment
                trials=25, steps=2000, lr=1e-2,  # full batch, linear model
                l2=0.0),
    "cmnist": dict(n_train=[1000, 5000, 10000, 30000, 60000],  # images, split into two environments
                   trials=10, steps=1000, lr=4.9e-4,  # minibatches of --batch_size, MLP 390-390
                   l2=1.1e-3),
}


int_list = positive_list(positive_int, "positive integers")
weight_list = positive_list(positive_float, "positive finite numbers")


def per_kind_default(name: str) -> str:
    """The help's sentence on a flag whose default depends on the kind of data set (DEFAULTS)."""
    sem, cmnist = (",".join(map(str, v)) if isinstance(v, list) else str(v)
                   for v in (DEFAULTS["sem"][name], DEFAULTS["cmnist"][name]))
    return f"Default: {sem} for the SEMs, {cmnist} for Colored MNIST."


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser("gen_mask.run_erm_irm", __doc__)
    parser.add_argument("--dataset", required=True, choices=DATASETS,
                        help="A linear SEM (sem_*) or a Colored MNIST variant (*_cmnist) of the benchmark.")
    parser.add_argument("--methods", default="erm,irm,and_mask",
                        help=f"Comma-separated methods, from: {', '.join(valid_methods())}; each combiner runs with "
                             "the hyper-parameters its registry entry gives it.")
    parser.add_argument("--n_train", type=int_list, default=None,
                        help="Comma-separated training sizes: for the SEMs examples per environment, for Colored MNIST "
                             "images drawn before the split into two environments. " + per_kind_default("n_train"))
    parser.add_argument("--trials", type=positive_int, default=None,
                        help="Trials per size. " + per_kind_default("trials"))
    parser.add_argument("--out", required=True, help="Folder for results.jsonl, table.md and error_vs_n.png.")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="Base seed: trial t of size n draws from (seed, t, n).")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="Adam steps of every method, IRM's warm-up included. " + per_kind_default("steps"))
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="Adam's learning rate. " + per_kind_default("lr"))
    parser.add_argument("--l2", type=non_negative_float, default=None,
                        help="Coefficient of l2·‖θ‖². " + per_kind_default("l2"))
    parser.add_argument("--batch_size", type=positive_int, default=512,
                        help="Colored MNIST: examples per step, half from each environment (the SEMs are trained full "
                             "batch).")
    parser.add_argument("--penalty_weights", type=weight_list, default=PENALTY_WEIGHTS,
                        help="IRM's comma-separated candidate penalty weights; one is chosen per trial on validation "
                             "data.")
    parser.add_argument("--anneal_steps", type=positive_int, default=ANNEAL_STEPS,
                        help="IRM's warm-up steps with penalty weight 1.")
    parser.add_argument("--val_fraction", type=proper_fraction, default=0.2,
                        help="Share of each training environment held out for IRM's choice of penalty weight.")
    parser.add_argument("--image_data", choices=["mnist", "fashion_mnist"], default="mnist",
                        help="Images of the Colored MNIST variants.")
    parser.add_argument("--data_path", default=None,
                        help="Torchvision data root. Default: the repository's data/ folder.")
    parser.add_argument("--quiet", action="store_true", help="Show no progress bar.")
    return parser


def parse(argv=None) -> tuple[argparse.Namespace, Sweep]:
    parser = build_parser()
    args = parser.parse_args(argv)
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    problem = check_methods(methods) if methods else "--methods is empty"
    if problem:
        parser.error(problem)
    defaults = DEFAULTS["sem" if args.dataset.startswith("sem_") else "cmnist"]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if "irm" in methods and args.steps <= args.anneal_steps:
        parser.error(f"--steps ({args.steps}) must exceed --anneal_steps ({args.anneal_steps}) for irm")
    config = FitConfig(steps=args.steps, lr=args.lr, l2=args.l2, penalty_weights=args.penalty_weights,
                       anneal_steps=args.anneal_steps)
    sweep = Sweep(dataset=args.dataset, methods=methods, n_train=args.n_train, trials=args.trials, seed=args.seed,
                  fit=config, batch_size=args.batch_size, val_fraction=args.val_fraction, image_data=args.image_data,
                  data_path=args.data_path)
    return args, sweep
