"""Argparse types and help formatting of every entry point: a leaf module (standard library only).

Every flag of the project is parsed by one of these types, so that an impossible value (a
negative size, NaN, a probability of 2, a seed numpy refuses) ends the command with argparse's
one-line error before anything runs; `entry_parser` gives every entry point the same --help,
which appends each flag's real default.
"""
from __future__ import annotations

import argparse
import math

# numpy's RandomState takes seeds in [0, 2**32 - 1], the narrowest range of the generators seeded
# (torch takes [-2**63, 2**64 - 1], Python's random any integer).
MAX_SEED = 2 ** 32 - 1


class HelpFormatter(argparse.HelpFormatter):
    """--help that appends each flag's real default, "Default: X.", X written as it is typed.

    Nothing is appended for a required flag, a switch (store_true: absent means off, which its
    help describes) or a flag whose default is None: such a help says in words what happens
    without the flag. Help texts therefore never state a default themselves.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.required or action.nargs == 0 or action.default is None
                or action.default == argparse.SUPPRESS):
            return text
        return f"{text} Default: {default_as_typed(action).replace('%', '%%')}.".lstrip()  # argparse %-formats help


def default_as_typed(action) -> str:
    """An action's default as it would be typed: nargs values space-separated, a list type's comma-separated."""
    default = action.default
    if isinstance(default, (list, tuple)):
        return (" " if action.nargs not in (None, "?") else ",").join(map(str, default))
    return str(default)


def first_paragraph(doc: str) -> str:
    """The first paragraph of a docstring as one line: a parser's description, never cut mid-sentence."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def entry_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The parser of the entry point `python -m module`, described by the first paragraph of `doc`."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=first_paragraph(doc),
                                     formatter_class=HelpFormatter, add_help=False)
    parser.add_argument("-h", "--help", action="help", help="Show this help message and exit.")
    return parser


def finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


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


def seed_int(text):
    """A seed that numpy, torch and Python all accept: an integer in [0, MAX_SEED]."""
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32 - 1] (numpy's seed range), got {text}")
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
    """A number in [0, 1): a dropout probability, a momentum."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def proper_fraction(text):
    """A share strictly between 0 and 1, e.g. of examples held out."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def positive_list(cast, what):
    """argparse type: comma-separated values of the typed parser `cast`, sorted, without repeats (a tuple)."""
    def parse(text):
        try:
            values = [cast(v) for v in text.split(",") if v]
        except (ValueError, argparse.ArgumentTypeError):
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text}")
        return tuple(sorted(set(values)))
    return parse


def lr_milestones(text):
    """argparse type of --lr_milestones: sorted epochs, or `none` (an empty tuple: a constant learning rate)."""
    if text == "none":
        return ()
    return positive_list(positive_int, "positive epochs or none")(text)


def add_lr_milestones_flag(group, none_means: str):
    """--lr_milestones: epochs after which the learning rate is multiplied by 0.1; `none_means` says what None does."""
    group.add_argument("--lr_milestones", type=lr_milestones, default=None,
                       help="Comma-separated epochs after which the learning rate is multiplied by 0.1, each below "
                            f"--epochs; none keeps it constant. Default: {none_means}")


def check_lr_milestones(parser, args):
    """Refuse a milestone at or after the last epoch (it would never apply); store them as a list,
    so that config.json holds a JSON list that compares equal on --resume."""
    if args.lr_milestones is None:
        return
    late = [m for m in args.lr_milestones if m >= args.epochs]
    if late:
        parser.error(f"--lr_milestones {','.join(map(str, late))} must be below --epochs ({args.epochs})")
    args.lr_milestones = list(args.lr_milestones)


def use_cuda_flag(text):
    if text not in ("0", "1", "auto"):
        raise argparse.ArgumentTypeError(f"must be 0, 1 or auto, got {text}")
    return text


def parser_defaults(parser: argparse.ArgumentParser) -> dict:
    """{flag: default} of every flag of `parser`."""
    return {action.dest: action.default for action in parser._actions if action.dest != "help"}
