"""Every command-line entry point of the project: `python -m <module>`, each with `build_parser()`.

Tests that check all entry points (flag validation, help defaults, README commands) take the list
from here; `test_entry_points.py` fails when a module with a `__main__` block is missing from it.
An entry with subcommands is listed itself and once per subcommand, as "module subcommand".
"""
import argparse
import importlib

ENTRY_POINTS = (
    "and_mask.run_synthetic",
    "and_mask.run_colored_mnist",
    "and_mask.run_cifar",
    "and_mask.summarize",
    "and_mask.paper.masked_noise",
    "and_mask.paper.env_count",
    "and_mask.paper.group_size",
    "and_mask.paper.synthetic_results",
    "and_mask.paper.memorization",
    "and_mask.paper.label_noise",
    "gen_mask.run_synthetic",
    "gen_mask.run_colored_mnist",
    "gen_mask.run_cifar",
    "gen_mask.run_erm_irm",
    "gen_mask.sweep",
    "gen_mask.sweep run",
    "gen_mask.sweep collect",
    "gen_mask.sweep.slurm_cluster",
    "gen_mask.leaderboard",
    "vizualization.toy_landscape",
    "vizualization.plot_runs",
    "vizualization.loss_landscape",
    "vizualization.consistency",
)


def parser_of(entry: str):
    """The argparse parser of an entry module, or of its subcommand: "module subcommand"."""
    module, *subcommand = entry.split()
    found = importlib.import_module(module)
    if not hasattr(found, "build_parser"):  # a package run as `python -m PACKAGE`: its __main__ has it
        found = importlib.import_module(f"{module}.__main__")
    parser = found.build_parser()
    for name in subcommand:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def required_argv(parser) -> list[str]:
    """A command line giving every required flag and positional a valid value (the first choice, else 1)."""
    argv = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):  # the first subcommand, with its own required flags
            name, subparser = next(iter(action.choices.items()))
            argv += [name, *required_argv(subparser)]
        elif action.required:
            value = str(action.choices[0] if action.choices else 1)
            argv += [action.option_strings[0], value] if action.option_strings else [value]
    return argv
