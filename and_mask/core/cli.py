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

from and_mask.core.per_env_grads import ENGINES
from and_mask.core.runfolder import RunFolder, outcome, terminate_as_interrupt
from and_mask.core.runlog import RunLog, default_output_dir, describe, load_weights, read_config
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
    group.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --output_dir, once the new run's setup has succeeded")
    group.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


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
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --output_dir and --overwrite replaces it: pass one of them")
    device = resolve_device(parser, args.use_cuda)
    output_dir = args.output_dir or default_output_dir(f"{package}-{experiment.NAME}-{args.method}")
    mode = "resume" if args.resume else "overwrite" if args.overwrite else "new"
    try:
        with terminate_as_interrupt(), RunFolder(output_dir, mode, vars(args)) as folder:
            seed_everything(args.seed)
            setup = experiment.build(args, device)
            folder.start(describe(vars(args), experiment.NAME, package))
            trainer = Trainer(setup, combiner, hparams, RunLog(folder.path), device, engine=args.grad_engine,
                              chunk_size=args.grad_chunk_size, l1_coef=getattr(args, "l1_coef", 0.0),
                              l2_coef=getattr(args, "l2_coef", 0.0), quiet=args.quiet)
            final = trainer.run(resume=folder.resumes)
    except RunError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt as error:
        ended = outcome(error)
        print(f"{ended['error']}; metrics and the last checkpoint are kept in {output_dir}", file=sys.stderr)
        sys.exit(ended["exit_code"])
    print(f"final: {format_record(final)}  (outputs in {output_dir})")
    return final


def rebuild(run_dir, device="cpu", weights="weights_final.pt"):
    """Rebuild a saved run's TrainSetup from its config.json and load the saved `weights`.

    Returns (setup, flags). Used by analysis tools (loss landscapes) that never retrain.
    """
    import importlib

    config = read_config(run_dir)
    args = argparse.Namespace(**config["flags"])
    try:
        experiment = importlib.import_module(f"and_mask.experiments.{config['experiment']}")
    except ImportError:
        raise RunError(f"{run_dir}/config.json names an unknown experiment {config['experiment']!r}") from None
    state = load_weights(run_dir, weights, map_location=device)
    seed_everything(args.seed)
    try:
        setup = experiment.build(args, torch.device(device))
        setup.model.load_state_dict(state)
    except (AttributeError, TypeError) as error:
        raise RunError(f"{run_dir}/config.json does not describe a run of this code ({error})") from None
    except RuntimeError as error:
        raise RunError(f"{run_dir}/{weights} does not fit the model of config.json "
                       f"({str(error).strip().splitlines()[0]})") from None
    return setup, args
