"""ERM, IRMv1 and the gradient combiners against training size, on the benchmark of "Empirical or
Invariant Risk Minimization? A Sample Complexity Perspective" (Ahuja et al., ICLR 2021).

    python -m gen_mask.run_erm_irm --dataset sem_hb --methods erm,irm,and_mask --out runs/sem_hb

Writes OUT/results.jsonl (one line per finished method, size and trial; a rerun resumes),
OUT/table.md and OUT/error_vs_n.png; OUT/run.lock refuses a second process at once and
OUT/status.json records how the last one ended, as in a training run's folder. See gen_mask/erm_irm/ for the data and the methods.
"""
from __future__ import annotations

import argparse
import sys

from and_mask.core.cli import non_negative_float, non_negative_int, positive_float, positive_int
from and_mask.core.errors import RunError
from and_mask.core.runfolder import FolderLock, holds_run, outcome, terminate_as_interrupt
from gen_mask.erm_irm.fit import FitConfig, check_methods, valid_methods
from gen_mask.erm_irm.irm import ANNEAL_STEPS, PENALTY_WEIGHTS
from gen_mask.erm_irm.report import write_report
from gen_mask.erm_irm.sweep import DATASETS, Sweep, check_out, run_sweep

# Defaults per kind of data set, as in SPEC section 8 (steps: optimiser steps of every method).
DEFAULTS = {
    "sem": dict(n_train=[50, 200, 500, 1000, 1500, 2000],  # examples per environment
                trials=25, steps=2000, lr=1e-2,  # full batch, linear model
                l2=0.0),
    "cmnist": dict(n_train=[1000, 5000, 10000, 30000, 60000],  # images, split into two environments
                   trials=10, steps=1000, lr=4.9e-4,  # minibatches of --batch_size, MLP 390-390
                   l2=1.1e-3),
}


def positive_list(cast, what):
    """argparse type: comma-separated positive values, sorted, without repeats."""
    def parse(text):
        try:
            values = [cast(v) for v in text.split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text}")
        if not values or min(values) <= 0:
            raise argparse.ArgumentTypeError(f"expected positive {what}, got {text}")
        return tuple(sorted(set(values)))
    return parse


int_list = positive_list(int, "integers")
weight_list = positive_list(float, "numbers")


def val_fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gen_mask.run_erm_irm", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--methods", default="erm,irm,and_mask",
                        help=f"comma-separated, from: {', '.join(valid_methods())} (default erm,irm,and_mask); "
                             "combiners use their default hyper-parameters")
    parser.add_argument("--n_train", type=int_list, default=None,
                        help="comma-separated training sizes; SEMs: examples per environment (default "
                             "50,200,500,1000,1500,2000); Colored MNIST: images drawn before the split into two "
                             "environments (default 1000,5000,10000,30000,60000)")
    parser.add_argument("--trials", type=positive_int, default=None, help="trials per size (default SEM 25, CMNIST 10)")
    parser.add_argument("--out", required=True, help="folder for results.jsonl, table.md, error_vs_n.png")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="base seed; trial t of size n draws from (seed, t, n)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="Adam steps of every method, IRM's warm-up included (default SEM 2000, CMNIST 1000)")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="Adam learning rate (default SEM 1e-2, CMNIST 4.9e-4)")
    parser.add_argument("--l2", type=non_negative_float, default=None,
                        help="coefficient of l2·‖θ‖² (default SEM 0, CMNIST 1.1e-3)")
    parser.add_argument("--batch_size", type=positive_int, default=512,
                        help="CMNIST: examples per step, half from each environment (SEMs are full batch)")
    parser.add_argument("--penalty_weights", type=weight_list, default=PENALTY_WEIGHTS,
                        help="IRM's candidate penalty weights, one chosen per trial on validation data "
                             "(default 1e4,3.3e4,6.6e4,1e5)")
    parser.add_argument("--anneal_steps", type=positive_int, default=ANNEAL_STEPS,
                        help="IRM's warm-up steps with penalty weight 1 (default 190)")
    parser.add_argument("--val_fraction", type=val_fraction, default=0.2,
                        help="share of each training environment held out for IRM's choice (default 0.2)")
    parser.add_argument("--image_data", choices=["mnist", "fashion_mnist"], default="mnist",
                        help="images of the Colored variants (default mnist)")
    parser.add_argument("--data_path", default=None, help="torchvision data root (default: the repository's data/)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
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


def main(argv=None) -> str:
    args, sweep = parse(argv)
    title = sweep.dataset + ("" if sweep.is_sem else f" ({sweep.image_data})")
    try:
        if holds_run(args.out):
            raise RunError(f"{args.out} holds a training run; choose another --out")
        with terminate_as_interrupt(), FolderLock(args.out, "--out") as folder:
            check_out(sweep, args.out)  # a refused folder keeps its status
            folder.start()
            records = run_sweep(sweep, args.out, quiet=args.quiet)
            table = write_report(args.out, records, sweep.is_sem, title)
    except RunError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt as error:
        ended = outcome(error)
        print(f"{ended['error']}; finished fits are kept in {args.out}/results.jsonl, rerun the command to resume",
              file=sys.stderr)
        sys.exit(ended["exit_code"])
    print(table)
    return table


if __name__ == "__main__":
    main()
