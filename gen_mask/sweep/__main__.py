"""python -m gen_mask.sweep: the subcommands run and collect (`gen_mask.sweep.cli`)."""
from gen_mask.sweep.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    main()
