"""A saved run rebuilt from its folder, for the tools that analyse trained models and never retrain."""
from __future__ import annotations

import argparse
import functools

import torch

from and_mask.core.cli import add_run_flags, seed_everything
from and_mask.core.errors import RunError
from and_mask.core.experiment import Experiment
from and_mask.core.flags import parser_defaults
from and_mask.core.runfolder import read_config
from and_mask.core.runlog import load_weights
from and_mask.experiments import cifar, colored_mnist, synthetic

EXPERIMENTS: dict[str, Experiment] = {e.NAME: e for e in (synthetic, colored_mnist, cifar)}


@functools.cache
def entry_defaults(package: str, experiment: str) -> dict:
    """The flag defaults of `PACKAGE.run_EXPERIMENT` ({} for an unknown experiment): the experiment's
    and the run flags. The method flags are left out: their defaults are None (a combiner's own
    value), which grouping counts as absent."""
    found = EXPERIMENTS.get(experiment)
    if found is None:
        return {}
    parser = argparse.ArgumentParser()
    found.add_flags(parser, package)
    add_run_flags(parser, found.RUN_FLAG_DEFAULTS, output_dir_required=False)
    return parser_defaults(parser)


def rebuild(run_dir, device="cpu", weights="weights_final.pt"):
    """Rebuild a saved run's TrainSetup from its config.json and load the saved `weights`.

    Returns (setup, flags). Used by analysis tools (loss landscapes, consistency) that never retrain.
    """
    config = read_config(run_dir)
    experiment = EXPERIMENTS.get(config["experiment"])
    if experiment is None:
        raise RunError(f"{run_dir}/config.json names an unknown experiment {config['experiment']!r}")
    # Flags added after the run was made take their defaults.
    parser = argparse.ArgumentParser()
    experiment.add_flags(parser, config["package"])
    args = argparse.Namespace(**{**parser_defaults(parser), **config["flags"]})
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
