"""Command-line plumbing shared by every `run_*` module of both packages.

An experiment module satisfies `and_mask.core.experiment.Experiment`; a package provides the
MethodFlags that pick the method (a combiner or an objective). An entry module is one
`EntryPoint` of the two. `main` parses, validates (argparse errors, never tracebacks), seeds,
trains and reports.
"""
from __future__ import annotations

import argparse
import random
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from and_mask.core import consistency, distributed
from and_mask.core.combiners import MethodFlags
from and_mask.core.env_split import DIST_BN, EnvSplit
from and_mask.core.errors import RunError
from and_mask.core.experiment import Experiment
from and_mask.core.flags import (
    entry_parser,
    non_negative_int,
    parser_defaults,
    positive_float,
    positive_int,
    seed_int,
    use_cuda_flag,
)
from and_mask.core.objectives import Objective
from and_mask.core.per_env_grads import ENGINES
from and_mask.core.runfolder import RunFolder, outcome, terminate_as_interrupt
from and_mask.core.runlog import RunLog, default_output_dir, describe
from and_mask.core.training import Trainer, format_record


def add_run_flags(parser: argparse.ArgumentParser, defaults: dict, output_dir_required: bool):
    """The flags of every training run; an experiment may change their `defaults` and require --output_dir."""
    group = parser.add_argument_group("run")
    group.add_argument("--output_dir", default=None, required=output_dir_required,
                       help="Folder for config.json, metrics.jsonl, the checkpoint and the weights."
                            + ("" if output_dir_required else " Default: a new, uniquely named folder under runs/."))
    group.add_argument("--seed", type=seed_int, default=0,
                       help="Seed of torch, numpy and Python's random module, and of the data's random draws.")
    group.add_argument("--use_cuda", type=use_cuda_flag, default="auto", metavar="{0,1,auto}",
                       help="Where to train: 1 on CUDA (an error if it is absent), 0 on the CPU, auto on CUDA when "
                            "it is available.")
    group.add_argument("--grad_engine", choices=ENGINES, default="auto",
                       help="Engine of the per-environment gradients: outer (one example per environment, Linear "
                            "layers only), vmap (vectorised, examples independent), shared (exact through BatchNorm "
                            "batch statistics), loop (the original's loop) or auto (outer where it applies, else vmap "
                            "where it is exact, else shared).")
    chunk_help = ("Environments per batched backward pass of the shared engine, or per vectorised chunk of the vmap "
                  "engine, to bound memory; the loop engine takes one at a time and outer all at once.")
    if defaults.get("grad_chunk_size") is None:
        chunk_help += (" Default: shared takes all environments at once on CUDA and one at a time on the CPU "
                       "(faster there); vmap takes all at once.")
    group.add_argument("--grad_chunk_size", type=positive_int, default=None, help=chunk_help)
    group.add_argument("--resume", action="store_true",
                       help="Continue the run in --output_dir from its last end-of-epoch checkpoint.")
    group.add_argument("--overwrite", action="store_true",
                       help="Replace the run already in --output_dir, once the new run's setup has succeeded.")
    group.add_argument("--quiet", action="store_true", help="Print no progress bars and no per-epoch lines.")
    group.add_argument("--consistency_eps", type=positive_float, default=None,
                       help="After training, estimate a lower bound on the inconsistency I^ε of the trained weights "
                            "with this ε and add it to the final record of metrics.jsonl (and_mask.core.consistency)."
                            " Default: no estimate.")
    consistency.add_search_flags(group, prefix="consistency_")
    add_dist_flags(parser)
    parser.set_defaults(**defaults)


def add_dist_flags(parser: argparse.ArgumentParser):
    """Flags of a run split across processes by torchrun (and_mask.core.env_split); a single process ignores them."""
    group = parser.add_argument_group("processes (under torchrun: the environments of each step are split across "
                                      "the processes)")
    group.add_argument("--dist_bn", choices=DIST_BN, default="exact",
                       help="BatchNorm (and dropout) with several processes. exact: every process forwards the whole "
                            "batch, so the batch statistics are those of one process, and back-propagates only its "
                            "environments' losses. local: every process forwards only its own examples and normalises "
                            "them with their own statistics, as DistributedDataParallel does: a different model.")
    group.add_argument("--dist_check_every", type=non_negative_int, default=0,
                       help="Debugging aid: every N steps, compare the parameters of all processes and stop if they "
                            "differ; 0 never compares.")
    group.add_argument("--dist_gather_warn_mb", type=positive_float, default=1024.0,
                       help="Warn when a combiner that is not a sum over environments makes every process gather "
                            "more than this many megabytes of per-environment gradients per step.")


def resolve_device(parser, use_cuda: str) -> torch.device:
    available = torch.cuda.is_available()
    if use_cuda == "1" and not available:
        parser.error("--use_cuda=1 but CUDA is not available on this machine; use --use_cuda=0 or auto")
    return torch.device("cuda" if use_cuda != "0" and available else "cpu")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def build_parser(experiment: Experiment, method_flags: MethodFlags, package: str) -> argparse.ArgumentParser:
    parser = entry_parser(f"{package}.run_{experiment.NAME}", experiment.__doc__)
    experiment.add_flags(parser, package)
    method_flags.add_flags(parser)
    # An experiment may change the default of a run flag (e.g. Colored MNIST: --use_cuda 0).
    add_run_flags(parser, experiment.RUN_FLAG_DEFAULTS, output_dir_required=experiment.OUTPUT_DIR_REQUIRED)
    return parser


def main(experiment: Experiment, method_flags: MethodFlags, package: str, argv=None) -> dict:
    parser = build_parser(experiment, method_flags, package)
    args = parser.parse_args(argv)
    method, hparams = method_flags.resolve(args, parser)
    experiment.check(args, parser)
    if isinstance(method, Objective):
        problem = experiment.check_objective(args, method)
        if problem:
            parser.error(problem)
    if args.resume and args.output_dir is None:
        parser.error("--resume needs the --output_dir of the run to continue")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --output_dir and --overwrite replaces it: pass one of them")
    device = resolve_device(parser, args.use_cuda)
    return _train(experiment, method, hparams, args, package, parser, join_world(parser, device))


@dataclass(frozen=True)
class EntryPoint:
    """One `python -m PACKAGE.run_EXPERIMENT` module: an experiment trained with a package's methods.

    `build_parser` and `main` build the flags when called, so that a combiner registered before
    the call (a plugin) is a valid --method.
    """

    experiment: Experiment
    method_flags: MethodFlags
    package: str

    def build_parser(self) -> argparse.ArgumentParser:
        """The argparse parser of this entry point."""
        return build_parser(self.experiment, self.method_flags, self.package)

    def main(self, argv=None) -> dict:
        """Parse the flags (`argv`, else the command line), train, return the final evaluation."""
        return main(self.experiment, self.method_flags, self.package, argv)


def join_world(parser, device: torch.device) -> distributed.World:
    """This process's World: one process, or a rank of the run torchrun (or SLURM) started."""
    try:
        return distributed.init_world(device.type == "cuda")
    except ValueError as error:
        parser.error(str(error))


def _train(experiment, method, hparams, args, package, parser, world) -> dict:
    # Rank 0 alone holds the run folder; the other ranks know its name, for messages.
    output_dir = world.broadcast_object(args.output_dir or default_output_dir(
        f"{package}-{experiment.NAME}-{args.method}"))
    mode = "resume" if args.resume else "overwrite" if args.overwrite else "new"
    try:
        defaults = parser_defaults(parser)
        holding = RunFolder(output_dir, mode, vars(args), defaults=defaults) if world.is_leader else nullcontext()
        # A failure on any rank (rank 0's refusal of the folder too) ends every rank.
        with terminate_as_interrupt(), distributed.stop_together(world), holding as folder:
            if folder is not None:  # another rank's failure, recorded by rank 0's watcher
                world.on_failure.append(lambda message: folder.record(RunError(message)))
            seed_everything(args.seed)
            with distributed.leader_first(world):  # rank 0 downloads or prepares the data before the others read it
                setup = experiment.build(args, world.device)
            if folder is not None:
                folder.start({**describe(vars(args), experiment.NAME, package), "ranks": world.size})
            final_metrics = None
            if args.consistency_eps is not None:
                final_metrics = consistency.final_metrics(setup, args.consistency_eps,
                                                          consistency.settings_from_args(args, "consistency_"))
            resumes = world.broadcast_object(folder.resumes if folder is not None else None)
            runlog = distributed.rank_runlog(world, RunLog(folder.path) if folder is not None else None, output_dir)
            trainer = Trainer(setup, method, hparams, runlog, world.device, engine=args.grad_engine,
                              chunk_size=args.grad_chunk_size, l1_coef=getattr(args, "l1_coef", 0.0),
                              l2_coef=getattr(args, "l2_coef", 0.0), quiet=args.quiet or not world.is_leader,
                              final_metrics=final_metrics,
                              split=EnvSplit(world, args.dist_bn, args.dist_check_every, args.dist_gather_warn_mb))
            final = trainer.run(resume=resumes)
    except RunError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt as error:
        ended = outcome(error)
        print(f"{ended['error']}; metrics and the last checkpoint are kept in {output_dir}", file=sys.stderr)
        sys.exit(ended["exit_code"])
    if world.is_leader:
        print(f"final: {format_record(final)}  (outputs in {output_dir})")
        if "inconsistency" in final:
            print(f"inconsistency: I^eps >= {final['inconsistency']:.6g} for eps = {args.consistency_eps}, "
                  f"{consistency.LOWER_BOUND_NOTE}")
    return final
