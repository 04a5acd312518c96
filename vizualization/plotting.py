"""What every figure command shares: the Agg backend, --out/--dpi/--pdf, saving, errors."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from and_mask.core.cli import positive_int  # noqa: E402
from and_mask.core.errors import RunError  # noqa: E402

PANEL = (4.6, 3.8)  # inches per panel; images are exactly figsize × dpi pixels (no tight cropping)


def add_output_flags(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("output")
    group.add_argument("--out", required=True, help="Folder for the figures, created if missing.")
    group.add_argument("--dpi", type=positive_int, default=100, help="Pixels per inch of the PNGs.")
    group.add_argument("--pdf", action="store_true", help="Also write each figure as a PDF.")


def figure(nrows: int, ncols: int, title: str | None = None):
    """A constrained-layout figure of nrows × ncols panels of size PANEL; returns (fig, axes 2-D array)."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(PANEL[0] * ncols, PANEL[1] * nrows), squeeze=False,
                             layout="constrained")
    if title:
        fig.suptitle(title)
    return fig, axes


def save(fig, args, name: str) -> list[Path]:
    """Write `name`.png (and .pdf with --pdf) into --out; returns the written paths."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png"] + ([out / f"{name}.pdf"] if args.pdf else [])
    for path in paths:
        fig.savefig(path, dpi=args.dpi)
    plt.close(fig)
    return paths


def run_cli(main, argv=None):
    """Call `main(argv)`; an expected failure (RunError) becomes one line on stderr and exit status 1."""
    try:
        return main(argv)
    except RunError as error:
        sys.exit(f"error: {error}")
