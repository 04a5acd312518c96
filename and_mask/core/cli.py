"""Command-line plumbing shared by every `run_*` module of both packages.

An experiment module provides NAME, `add_flags(parser, package)`, `check(args, parser)` and
`build(args, device) -> TrainSetup`; a package provides the MethodFlags that pick the combiner.
`main` parses, validates (argparse errors, never tracebacks), seeds, trains and reports.
"""
from __future__ import annotations

import argparse
import random
import sys

import numpy as np
import torch

from and_mask.core import consistency
from and_mask.core.per_env_grads import ENGINES
from and_mask.core.runlog import RunLog, default_output_dir
from and_mask.core.errors import RunError
from and_mask.core.training import Trainer, format_record


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative finite number, got {text}")
    return value


def probability(text):
    """A dropout probability or fraction in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def use_cuda_flag(text):
    if text not in ("0", "1", "auto"):
        raise argparse.ArgumentTypeError(f"must be 0, 1 or auto, got {text}")
    return text


def add_run_flags(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("run")
    group.add_argument("--output_dir", default=None,
                       help="folder for config.json, metrics.jsonl and checkpoints (default: a new folder under runs/)")
    group.add_argument("--seed", type=int, default=0, help="seeds torch, numpy and python (default 0)")
    group.add_argument("--use_cuda", type=use_cuda_flag, default="auto",
                       help="1: train on CUDA (error if absent); 0: CPU; auto: CUDA when available (default)")
    group.add_argument("--grad_engine", choices=ENGINES, default="auto",
                       help="per-environment gradient engine: outer (one example per environment, Linear layers "
                            "only), vmap (vectorised, examples independent), shared (exact through BatchNorm batch "
                            "statistics), loop (the original), auto (default: the fastest exact one)")
    group.add_argument("--grad_chunk_size", type=positive_int, default=None,
                       help="environments per vectorised backward pass, to bound memory (default: all at once)")
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --output_dir from its last end-of-epoch checkpoint")
    group.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    group.add_argument("--consistency_eps", type=positive_float, default=None,
                       help="After training, estimate a lower bound on the inconsistency I^ε of the trained weights "
                            "with this ε and add it to the final record of metrics.jsonl (and_mask.core.consistency). "
                            "None: no estimate.")
    consistency.add_search_flags(group, prefix="consistency_")


def resolve_device(parser, use_cuda: str) -> torch.device:
    available = torch.cuda.is_available()
    if use_cuda == "1" and not available:
        parser.error("--use_cuda=1 but CUDA is not available on this machine; use --use_cuda=0 or auto")
    return torch.device("cuda" if use_cuda != "0" and available else "cpu")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def build_parser(experiment, method_flags, package: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {package}.run_{experiment.NAME}",
                                     description=(experiment.__doc__ or "").strip().splitlines()[0])
    experiment.add_flags(parser, package)
    method_flags.add_flags(parser)
    add_run_flags(parser)
    # An experiment may change the default of a run flag (e.g. Colored MNIST: --use_cuda 0).
    parser.set_defaults(**getattr(experiment, "RUN_FLAG_DEFAULTS", {}))
    return parser


def main(experiment, method_flags, package: str, argv=None) -> dict:
    parser = build_parser(experiment, method_flags, package)
    args = parser.parse_args(argv)
    combiner, hparams = method_flags.resolve(args, parser)
    experiment.check(args, parser)
    if args.resume and args.output_dir is None:
        parser.error("--resume needs the --output_dir of the run to continue")
    device = resolve_device(parser, args.use_cuda)
    seed_everything(args.seed)
    output_dir = args.output_dir or default_output_dir(f"{package}-{experiment.NAME}-{args.method}")
    runlog = None
    try:
        runlog = RunLog(output_dir, vars(args), resume=args.resume, experiment=experiment.NAME, package=package)
        setup = experiment.build(args, device)
        final_metrics = None
        if args.consistency_eps is not None:
            final_metrics = consistency.final_metrics(setup, args.consistency_eps,
                                                      consistency.settings_from_args(args, "consistency_"))
        trainer = Trainer(setup, combiner, hparams, runlog, device, engine=args.grad_engine,
                          chunk_size=args.grad_chunk_size, l1_coef=getattr(args, "l1_coef", 0.0),
                          l2_coef=getattr(args, "l2_coef", 0.0), quiet=args.quiet, final_metrics=final_metrics)
        final = trainer.run(resume=args.resume)
    except RunError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        where = f"; metrics and the last checkpoint are kept in {runlog.dir}" if runlog else ""
        sys.exit(f"interrupted{where}")
    print(f"final: {format_record(final)}  (outputs in {runlog.dir})")
    if "inconsistency" in final:
        print(f"inconsistency: I^eps >= {final['inconsistency']:.6g} for eps = {args.consistency_eps}, "
              f"{consistency.LOWER_BOUND_NOTE}")
    return final


def rebuild(run_dir, device="cpu", weights="weights_final.pt"):
    """Rebuild a saved run's TrainSetup from its config.json and load the saved `weights`.

    Returns (setup, flags). Used by analysis tools (loss landscapes) that never retrain.
    """
    import importlib
    from pathlib import Path

    from and_mask.core.runlog import read_config

    config = read_config(run_dir)
    args = argparse.Namespace(**config["flags"])
    experiment = importlib.import_module(f"and_mask.experiments.{config['experiment']}")
    seed_everything(args.seed)
    setup = experiment.build(args, torch.device(device))
    setup.model.load_state_dict(torch.load(Path(run_dir) / weights, map_location=device))
    return setup, args
