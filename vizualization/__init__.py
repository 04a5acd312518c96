"""Figures: 2-D toy landscapes with each combiner's descent field, run curves, loss landscapes.

Every figure is made by a command-line module (`python -m vizualization.<name> --help`) that
writes PNG files (and PDF with `--pdf`) into `--out`, with matplotlib's Agg backend only.
"""
