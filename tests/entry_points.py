"""Every command-line entry point of the project: `python -m <module>`, each with `build_parser()`.

Tests that check all entry points (flag validation, help defaults, README commands) take the list
from here; `test_entry_points.py` fails when a module with a `__main__` block is missing from it.
"""
import importlib

ENTRY_POINTS = (
    "and_mask.run_synthetic",
    "and_mask.run_colored_mnist",
    "and_mask.run_cifar",
    "and_mask.summarize",
    "gen_mask.run_synthetic",
    "gen_mask.run_colored_mnist",
    "gen_mask.run_cifar",
    "gen_mask.run_erm_irm",
    "gen_mask.sweep",
    "gen_mask.sweep.slurm_cluster",
    "vizualization.toy_landscape",
    "vizualization.plot_runs",
    "vizualization.loss_landscape",
)


def parser_of(module: str):
    """The argparse parser of an entry module."""
    return importlib.import_module(module).build_parser()


def required_argv(parser) -> list[str]:
    """A command line giving every required flag and positional a valid value (the first choice, else 1)."""
    argv = []
    for action in parser._actions:
        if action.required:
            value = str(action.choices[0] if action.choices else 1)
            argv += [action.option_strings[0], value] if action.option_strings else [value]
    return argv
