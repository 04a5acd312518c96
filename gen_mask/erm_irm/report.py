"""Table and plot of a sweep, read from its results.jsonl (never retrains).

table.md: one row per method, one column per training size, mean ± standard deviation (over
trials, ddof = 1; the mean alone for a single trial) of the error, and a last row with the
optimal invariant error.
error_vs_n.png: error against n (log scale), one line per method with ± std bars, the optimum
dashed; the SEMs' error axis is logarithmic above 1e-2 and linear below.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from and_mask.core.collect import Group, stat
from and_mask.core.files import atomic_write, atomic_write_text

TABLE = "table.md"
PLOT = "error_vs_n.png"
METRIC = {True: "‖ŵ − w*‖²", False: "test error"}


def record_groups(records: list[dict]) -> dict:
    """{(method, n_train): collect.Group} of result records, in order of appearance; each trial
    is a sample {"error", "optimum", "seconds" (of its fit)}."""
    groups = {}
    for r in records:
        group = groups.setdefault((r["method"], r["n_train"]), Group(r["dataset"], r["method"],
                                                                     {"n_train": r["n_train"]}, seconds_unit="fit"))
        seconds = {"seconds": r["seconds"]} if isinstance(r.get("seconds"), (int, float)) else {}
        group.add({"error": r["error"], "optimum": r["optimum"], **seconds}, r["trial"])  # trials share draws
    return groups


def summarise(records: list[dict]):
    """(methods in order of appearance, sorted sizes, {(method, n): collect.Group}, {n: mean optimum})."""
    groups = record_groups(records)
    methods = list(dict.fromkeys(method for method, _ in groups))
    optima = {n: stat(r["optimum"] for r in records if r["n_train"] == n).mean
              for n in sorted({r["n_train"] for r in records})}
    return methods, list(optima), groups, optima


def format_table(records: list[dict], is_sem: bool, digits: int = 3) -> str:
    methods, sizes, groups, optima = summarise(records)
    size_name = "n per env" if is_sem else "n"
    lines = [f"| method \\ {size_name} | " + " | ".join(str(n) for n in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for method in methods:
        cells = []
        for n in sizes:
            s = groups[(method, n)].stat("error") if (method, n) in groups else None
            if s is None:
                cells.append("–")
            else:
                cells.append(f"{s.mean:.{digits}f} ± {s.std:.{digits}f}" if s.n > 1 else f"{s.mean:.{digits}f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("| optimum | " + " | ".join(f"{optima[n]:.{digits}f}" for n in sizes) + " |")
    trials = sorted({len(g.samples) for g in groups.values()})
    spread = "one trial" if trials == [1] else f"mean ± std over {'/'.join(map(str, trials))} trials"
    return "\n".join(lines) + f"\n\n{METRIC[is_sem]}, {spread}.\n"


def plot(records: list[dict], is_sem: bool, title: str, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, sizes, groups, optima = summarise(records)
    palette = plt.get_cmap("tab20").colors
    colours = palette[0::2] + palette[1::2]  # the ten strong colours first, then their light pairs
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=90)
    for i, method in enumerate(methods):
        ns = [n for n in sizes if (method, n) in groups]
        stats = np.array([(s.mean, s.std) for s in (groups[(method, n)].stat("error") for n in ns)])
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
