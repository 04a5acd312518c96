"""What every figure command shares: the Agg backend, --out/--dpi/--pdf/--overwrite, saving, errors.

A figure folder (--out) may hold the figures of several commands (the gallery does); it never
mixes them silently:
- figures.json records, for every figure file, the command that made it (module and settings:
  every flag but --out, --dpi, --pdf and --overwrite) and when;
- before computing anything, a command claims the names of the figures it will write: a file of
  that name made by another command (other settings), or of unknown origin, is refused unless
  --overwrite; rerunning the same command replaces its own figures;
- every file is written to a temporary and renamed (a kill never leaves half an image), and at
  the end the files of the claimed names that this run did not write (a PDF of an earlier --pdf
  run, a panel these runs no longer have) are removed, so a name never shows an older picture;
- figures.json is updated under figures.lock, so concurrent commands into one folder are safe.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from and_mask.core.errors import RunError  # noqa: E402
from and_mask.core.files import atomic_write, atomic_write_json, atomic_write_text, locked, make_folder, read_json  # noqa: E402
from and_mask.core.flags import positive_int  # noqa: E402

PANEL = (4.6, 3.8)  # inches per panel; images are exactly figsize × dpi pixels (no tight cropping)


def add_output_flags(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("output")
    group.add_argument("--out", required=True, help="Folder for the figures, created if missing.")
    group.add_argument("--dpi", type=positive_int, default=100, help="Pixels per inch of the PNGs.")
    group.add_argument("--pdf", action="store_true", help="Also write each figure as a PDF.")
    group.add_argument("--overwrite", action="store_true",
                       help="Replace figures of the same names that another command made in --out.")


def figure(nrows: int, ncols: int, title: str | None = None):
    """A constrained-layout figure of nrows × ncols panels of size PANEL; returns (fig, axes 2-D array)."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(PANEL[0] * ncols, PANEL[1] * nrows), squeeze=False,
                             layout="constrained")
    if title:
        fig.suptitle(title)
    return fig, axes


MANIFEST = "figures.json"
MANIFEST_LOCK = "figures.lock"
OUTPUT_FLAGS = ("out", "dpi", "pdf", "overwrite", "figure_folder")
EXTENSIONS = (".png", ".pdf", ".json", ".md")  # a figure, and the numbers or table some commands write beside it


class FigureFolder:
    """The figures one command writes into --out; see the module docstring for the rules."""

    def __init__(self, args, module: str, names):
        self.out, self.pdf, self.dpi = Path(args.out), args.pdf, args.dpi
        settings = {k: v for k, v in vars(args).items() if k not in OUTPUT_FLAGS}
        self.made_by = {"module": module, "settings": json.loads(json.dumps(settings, default=str))}
        self.names, self.written = list(names), []
        make_folder(self.out, "--out")
        with locked(self.out / MANIFEST_LOCK):
            manifest = self._manifest()
            for name in self.names:
                for path in (self.out / (name + ext) for ext in EXTENSIONS):
                    if path.exists() and not args.overwrite:
                        self._check_origin(path, manifest.get(path.name))

    def _manifest(self) -> dict:
        path = self.out / MANIFEST
        return read_json(path, "figure manifest").get("figures", {}) if path.exists() else {}

    def _check_origin(self, path: Path, entry: dict | None):
        if entry is None:
            raise RunError(f"{path} exists and was not made by this command (no entry in {MANIFEST}); pass "
                           f"--overwrite to replace it, or choose another --out")
        made_by = entry.get("made_by", {})
        if made_by == self.made_by:
            return
        theirs, ours = made_by.get("settings", {}), self.made_by["settings"]
        changed = [f"{k}: {theirs.get(k)} there, {ours.get(k)} now" for k in sorted(set(theirs) | set(ours))
                   if theirs.get(k) != ours.get(k)]
        raise RunError(f"{path} was made by python -m {made_by.get('module')} with other settings "
                       f"({'; '.join(changed[:3]) or 'another module'}); pass --overwrite to replace it, or choose "
                       f"another --out")

    def _record(self, update: dict, remove=()):
        with locked(self.out / MANIFEST_LOCK):
            manifest = self._manifest()
            manifest.update(update)
            for name in remove:
                manifest.pop(name, None)
            atomic_write_json(self.out / MANIFEST, {"figures": manifest})

    def save(self, fig, name: str) -> list[Path]:
        if name not in self.names:
            raise ValueError(f"figure {name!r} was not claimed")
        self.out.mkdir(parents=True, exist_ok=True)
        paths = [self.out / f"{name}.png"] + ([self.out / f"{name}.pdf"] if self.pdf else [])
        for path in paths:
            atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=self.dpi, format=path.suffix[1:]))
        time = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self._record({p.name: {"made_by": self.made_by, "time": time} for p in paths})
        self.written += paths
        return paths

    def save_json(self, obj, name: str) -> Path:
        """Write the numbers of claimed name `name` as `name`.json, atomically, recorded like a figure."""
        return self._save_file(name, ".json", lambda path: atomic_write_json(path, obj))

    def save_text(self, text: str, name: str) -> Path:
        """Write the Markdown table of claimed name `name` as `name`.md, atomically, recorded like a figure."""
        return self._save_file(name, ".md", lambda path: atomic_write_text(path, text))

    def _save_file(self, name: str, suffix: str, write) -> Path:
        if name not in self.names:
            raise ValueError(f"{name!r} was not claimed")
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{name}{suffix}"
        write(path)
        time = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self._record({path.name: {"made_by": self.made_by, "time": time}})
        self.written.append(path)
        return path

    def publish(self, text: str, name: str, figures: list[Path]) -> None:
        """The end of a command that writes a table: save `text` as `name`.md, `finish`, then print the
        table and the paths of the figures and the table."""
        paths = [*figures, self.save_text(text, name)]
        self.finish()
        print(text)
        for path in paths:
            print(path)

    def finish(self):
        """Remove the files of the claimed names that this command did not write."""
        stale = [self.out / (name + ext) for name in self.names for ext in EXTENSIONS]
        stale = [p for p in stale if p.exists() and p not in self.written]
        for path in stale:
            path.unlink()
        if stale:
            self._record({}, remove=[p.name for p in stale])


def claim_figures(args, module: str, names) -> FigureFolder:
    """Check that --out may take these figures (before computing them); `save` then writes them."""
    args.figure_folder = FigureFolder(args, module, names)
    return args.figure_folder


def save(fig, args, name: str) -> list[Path]:
    """Write `name`.png (and .pdf with --pdf) into --out; returns the written paths."""
    paths = args.figure_folder.save(fig, name)
    plt.close(fig)
    return paths


def run_cli(main, argv=None):
    """Call `main(argv)`; an expected failure (RunError) becomes one line on stderr and exit status 1."""
    try:
        return main(argv)
    except RunError as error:
        sys.exit(f"error: {error}")
