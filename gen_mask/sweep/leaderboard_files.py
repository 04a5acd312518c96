"""The collected sweep as files: DIR/leaderboard.md, DIR/leaderboard.csv and DIR/leaderboard.png.

leaderboard.md: per task a table, best first, of the reported rows (every row; with a search,
the setting of each method that the selection rule chose, and the oracle's choice in its own
labelled columns), the methods not run as "n/a" with the reason, and every failed run with the
last line of its error. Cells are mean ± std over seeds with the number of values in brackets.
Each reported row also carries its difference to the reference method (averaging, or ERM) with a
95 % interval and a verdict (`and_mask.core.collect.difference`: paired by seed where both ran
the same seeds). leaderboard.csv: one line per row, every searched setting included, marked by the
rules that chose it, with the difference columns. leaderboard.png: one panel per task, the
reported rows' mean ± std, a filled marker where the row is better than the reference, an open
one where it is worse, a grey one where the seeds cannot tell.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from and_mask.core.collect import (
    CONFIDENCE,
    INCONSISTENCY,
    OUTCOMES,
    REFERENCE_METHODS,
    SELECTIONS,
    Difference,
    Group,
    Stat,
    difference,
    flags_text,
    reference_row,
    stat,
)
from and_mask.core.files import atomic_write, atomic_write_text
from and_mask.core.runsets import differing
from gen_mask.sweep.collect import TaskResult

MARKDOWN, CSV, FIGURE = "leaderboard.md", "leaderboard.csv", "leaderboard.png"
CSV_COLUMNS = ("task", "method", "setting", "metric", "higher_is_better", "mean", "std", "n", "n_finished",
               "n_failed", "n_unfinished", "n_running", "seconds", "seconds_per", "inconsistency", "validation",
               "validation_mean", "selected_by", "reference", "diff_mean", "diff_low", "diff_high", "diff_n",
               "diff_paired", "verdict", "note")
RUNS_HEADER = "runs: finished / failed / unfinished / running"
# The figure's marker of each verdict against the reference row.
MARKERS = {"reference": dict(color="black", mfc="black"), "better": dict(color="tab:green", mfc="tab:green"),
           "worse": dict(color="tab:red", mfc="white"), "not distinguishable": dict(color="grey", mfc="lightgrey")}


def settings(result: TaskResult) -> dict:
    """{id(group): '--flag value ...'}: the flags that tell the task's rows apart, the method aside."""
    shown = differing({id(g): g.flags for g in result.groups.values()})
    return {key: flags_text(flags) for key, flags in shown.items()}


def _rank_key(result: TaskResult, group: Group | None):
    s = group.stat(result.metric.name) if group is not None else None
    if s is None or not math.isfinite(s.mean):
        return (1, 0.0)
    return (0, -s.mean if result.metric.higher_is_better else s.mean)


def reported(result: TaskResult, selection: str) -> list[tuple[str, Group | None, Group | None, list]]:
    """(method, reported row, oracle's row, every candidate) of the task, best first.

    Without a search every row is reported (no oracle, its own candidates); with one, the row
    that `selection` chose among each method's candidates (None when it could not choose).
    """
    if not result.searched:
        rows = [(g.method, g, None, [g]) for g in result.groups.values()]
    else:
        rows = [(candidates[0].method, result.chosen[outer][selection], result.chosen[outer].get("oracle"), candidates)
                for outer, candidates in result.candidates.items()]
    return sorted(rows, key=lambda row: (_rank_key(result, row[1]), row[0]))


def reference_method(result: TaskResult) -> str | None:
    """The task's reference method: the first of REFERENCE_METHODS among its rows."""
    methods = {g.method for g in result.groups.values()}
    return next((m for m in REFERENCE_METHODS if m in methods), None)


def differences(result: TaskResult, selection: str) -> dict:
    """{id(group): Difference} of every row of the task against its reference row.

    The reference rows are the reference method's reported rows (the selected setting where the
    task searches); each row is compared with the one that shares most of its flags.
    """
    method = reference_method(result)
    if method is None:
        return {}
    references = [g for m, g, _, _ in reported(result, selection) if m == method and g is not None]
    out = {}
    for group in result.groups.values():
        reference = reference_row(group, references)
        if reference is not None and reference is not group:
            found = difference(group.keyed(result.metric.name), reference.keyed(result.metric.name),
                               result.metric.higher_is_better)
            if found is not None:
                out[id(group)] = found
    return out


def _seconds(groups: list[Group]) -> Stat | None:
    return stat(s["seconds"] for g in groups for s in g.samples if "seconds" in s)


def _counts(groups: list[Group]) -> str:
    return " / ".join(str(sum(g.counts[o] for g in groups)) for o in OUTCOMES)


def task_markdown(result: TaskResult, selection: str) -> str:
    metric, shown = result.metric, settings(result)
    rule = SELECTIONS[selection]
    inconsistency = any("inconsistency" in s for g in result.groups.values() for s in g.samples)
    lines = [f"## {result.name}", "",
             f"`{result.module}`: {metric.label()}, {metric.direction()}; mean ± std over seeds (values); "
             f"{RUNS_HEADER}."]
    header = ["#", "method", "setting", metric.label()]
    reference, diffs = reference_method(result), differences(result, selection)
    if reference is not None:
        lines[-1] += (f" Against {reference}: the difference of the means with its {100 * CONFIDENCE:.0f} % "
                      f"Student-t interval, paired by seed where both rows ran the same seeds (Welch's otherwise), "
                      f"and whether the row is better, worse or not distinguishable at this number of seeds.")
        header.append(f"− {reference} [{100 * CONFIDENCE:.0f} % interval]")
    reads = rule.reads(metric)
    if result.searched:
        how = (f"the mean of {reads}, {'higher' if metric.higher_is_better else 'lower'} is better" if reads
               else "impossible: the task has no validation metric")
        lines[-1] += (f" Searched: {', '.join(result.searched)}; each method's setting is chosen by {rule.label} "
                      f"({how}); the oracle columns choose by {metric.name} itself, for reference only.")
        header += ([f"{reads} (selection)"] if reads else []) + ["oracle: setting", f"oracle: {metric.label()}",
                                                                 "settings"]
    header += [RUNS_HEADER, f"s/{result.seconds_unit}"] + ([INCONSISTENCY] if inconsistency else [])
    lines += ["", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    rank = 0
    for method, group, oracle, candidates in reported(result, selection):
        s = group.stat(metric.name) if group is not None else None
        rank += s is not None
        cells = [str(rank) if s is not None else "", method,
                 (shown[id(group)] or "–") if group is not None else "no setting could be chosen", metric.cell(s)]
        if reference is not None:
            found = diffs.get(id(group)) if group is not None else None
            cells.append(found.cell(metric) if found else "reference" if method == reference else "–")
        if result.searched:
            if reads:
                cells.append(metric.cell(group.stat(reads)) if group is not None else "–")
            cells += [(shown[id(oracle)] or "–") if oracle is not None else "–",
                      metric.cell(oracle.stat(metric.name) if oracle is not None else None), str(len(candidates))]
        seconds = _seconds([group] if group is not None else candidates)
        cells += [_counts(candidates), f"{seconds.mean:.2g}" if seconds else "–"]
        if inconsistency:
            bound = group.stat("inconsistency") if group is not None else None
            cells.append(f"{bound.mean:.3g} ± {bound.std:.2g} ({bound.n})" if bound else "–")
        lines.append("| " + " | ".join(cells) + " |")
    for method, reason in sorted(result.not_run.items()):
        lines.append("| " + " | ".join(["", method, f"n/a: {reason}"] + ["–"] * (len(header) - 3)) + " |")
    failures = [(g, error) for g in result.groups.values() for error in g.errors]
    if failures:
        lines += ["", f"Failed runs ({len(failures)}):", ""]
        lines += [f"- {g.method} {shown[id(g)]}".rstrip() + f", {error}" for g, error in failures]
    return "\n".join(lines) + "\n"


def markdown(results: list[TaskResult], selection: str, figure: str | None = FIGURE) -> str:
    head = ["# Leaderboard", "",
            "Collected from the sweep folder's runs (`python -m gen_mask.sweep collect`); every task's table is "
            "ranked by its headline metric.", ""]
    if figure:
        head += [f"![mean ± std of each task's headline metric]({figure})", ""]
    return "\n".join(head + [task_markdown(r, selection) for r in results])


def _number(value) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else repr(float(value))


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _difference_cells(reference: str | None, found: Difference | None) -> list:
    if found is None:
        return [reference or "", "", "", "", "", "", ""]
    return [reference, _number(found.mean), _number(found.low), _number(found.high), found.n, _bool(found.paired),
            found.verdict]


def csv_text(results: list[TaskResult], selection: str = "training_domain") -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for result in results:
        shown, metric = settings(result), result.metric
        reference, diffs = reference_method(result), differences(result, selection)
        for group in result.groups.values():
            s, seconds = group.stat(metric.name), _seconds([group])
            bound = group.stat("inconsistency")
            validation = group.stat(metric.validation) if metric.validation else None
            chosen = [name for picks in result.chosen.values() for name, g in picks.items() if g is group]
            writer.writerow([result.name, group.method, shown[id(group)], metric.name, _bool(metric.higher_is_better),
                             _number(s and s.mean), _number(s and s.std), s.n if s else 0,
                             *(group.counts[o] for o in OUTCOMES), _number(seconds and seconds.mean),
                             result.seconds_unit, _number(bound and bound.mean), metric.validation or "",
                             _number(validation and validation.mean), ";".join(chosen),
                             *_difference_cells(reference, diffs.get(id(group))), " | ".join(group.errors)])
        for method, reason in sorted(result.not_run.items()):
            writer.writerow([result.name, method, "", metric.name, _bool(metric.higher_is_better), "", "", 0, 0, 0, 0, 0,
                             "", result.seconds_unit, "", metric.validation or "", "", "",
                             *_difference_cells(reference, None), f"n/a: {reason}"])
    return out.getvalue()


def plot(results: list[TaskResult], selection: str, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [len(reported(r, selection)) + len(r.not_run) for r in results]
    fig, axes = plt.subplots(len(results), 1, figsize=(7.0, sum(0.22 * h + 0.9 for h in heights)), squeeze=False,
                             gridspec_kw={"height_ratios": [h + 2 for h in heights]}, layout="constrained")
    for ax, result in zip(axes[:, 0], results):
        rows = reported(result, selection)
        labels = [m for m, *_ in rows] + [f"{m} (n/a)" for m in sorted(result.not_run)]
        scale = 100 if result.metric.is_accuracy else 1
        diffs = differences(result, selection)
        for y, (_, group, _, _) in enumerate(rows):
            s = group.stat(result.metric.name) if group is not None else None
            if s is not None:
                verdict = diffs[id(group)].verdict if id(group) in diffs else "reference"
                style = MARKERS.get(verdict, MARKERS["not distinguishable"])
                ax.errorbar(scale * s.mean, y, xerr=scale * s.std, fmt="o", ms=5, capsize=2, **style)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylim(len(labels) - 0.5, -0.5)
        ax.set_title(f"{result.name}: {result.metric.label()}, {result.metric.direction()}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    fig.legend(handles=[plt.Line2D([], [], ls="", marker="o", label=name, **style) for name, style in MARKERS.items()],
               loc="outside lower center", ncols=len(MARKERS), fontsize=7, title=f"against the reference "
               f"({' or '.join(REFERENCE_METHODS)}), {100 * CONFIDENCE:.0f} % interval over seeds", title_fontsize=7)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def write(path, results: list[TaskResult], selection: str) -> str:
    """Write the three files into the sweep folder `path`; returns the Markdown."""
    path = Path(path)
    text = markdown(results, selection)
    atomic_write_text(path / CSV, csv_text(results, selection))
    plot(results, selection, path / FIGURE)
    atomic_write_text(path / MARKDOWN, text)
    return text
