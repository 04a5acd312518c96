"""Table and plot of a sweep, read from its results.jsonl (never retrains).

table.md: one row per method, one column per training size, mean ± standard deviation (over
trials, ddof = 1; the mean alone for a single trial) of the error, and a last row with the
optimal invariant error.
error_vs_n.png: error against n (log scale), one line per method with ± std bars, the optimum
dashed; the SEMs' error axis is logarithmic above 1e-2 and linear below.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from and_mask.core.files import atomic_write, atomic_write_text

TABLE = "table.md"
PLOT = "error_vs_n.png"
METRIC = {True: "‖ŵ − w*‖²", False: "test error"}


def summarise(records: list[dict]):
    """(methods in order of appearance, sorted sizes, {(method, n): errors}, {n: mean optimum})."""
    errors, optima = defaultdict(list), defaultdict(list)
    methods = list(dict.fromkeys(r["method"] for r in records))
    for r in records:
        errors[(r["method"], r["n_train"])].append(r["error"])
        optima[r["n_train"]].append(r["optimum"])
    sizes = sorted(optima)
    return methods, sizes, errors, {n: float(np.mean(v)) for n, v in optima.items()}


def _mean_std(values):
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def format_table(records: list[dict], is_sem: bool, digits: int = 3) -> str:
    methods, sizes, errors, optima = summarise(records)
    size_name = "n per env" if is_sem else "n"
    lines = [f"| method \\ {size_name} | " + " | ".join(str(n) for n in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for method in methods:
        cells = []
        for n in sizes:
            values = errors.get((method, n))
            if values:
                mean, std = _mean_std(values)
                cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}")
            else:
                cells.append("–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("| optimum | " + " | ".join(f"{optima[n]:.{digits}f}" for n in sizes) + " |")
    trials = sorted({len(v) for v in errors.values()})
    spread = "one trial" if trials == [1] else f"mean ± std over {'/'.join(map(str, trials))} trials"
    return "\n".join(lines) + f"\n\n{METRIC[is_sem]}, {spread}.\n"


def plot(records: list[dict], is_sem: bool, title: str, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, sizes, errors, optima = summarise(records)
    palette = plt.get_cmap("tab20").colors
    colours = palette[0::2] + palette[1::2]  # the ten strong colours first, then their light pairs
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=90)
    for i, method in enumerate(methods):
        ns = [n for n in sizes if errors.get((method, n))]
        stats = np.array([_mean_std(errors[(method, n)]) for n in ns])
        ax.errorbar(ns, stats[:, 0], yerr=stats[:, 1], label=method, color=colours[i % 20], marker="o", ms=3,
                    capsize=2, lw=1.2)
    ax.plot(sizes, [optima[n] for n in sizes], "k--", lw=1.5, label="optimum")
    ax.set_xscale("log")
    if is_sem:  # errors span 1e-2 to 2; linear below 1e-2 so that an optimum of 0 stays visible
        ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("n per environment" if is_sem else "n (training images)")
    ax.set_ylabel(METRIC[is_sem])
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def write_report(out, records: list[dict], is_sem: bool, title: str) -> str:
    """Write OUT/table.md and OUT/error_vs_n.png; returns the table."""
    table = f"### {title}\n\n" + format_table(records, is_sem)
    atomic_write_text(Path(out, TABLE), table)
    plot(records, is_sem, title, Path(out, PLOT))
    return table
