"""Fault injection on the tools around runs: the ERM/IRM benchmark's --out, summarize, plot_runs, figures.

- ERM/IRM: killed during and after each append of results.jsonl, then rerun; a second process on
  the same --out; damaged results.jsonl and sweep.json.
- summarize and plot_runs: runs that differ in any flag that changes the numbers never share a
  row or a curve (the two tools group alike), several experiments give one section each, an
  unreadable run is skipped with a warning naming it.
- Figure folders: figures of another command are never replaced silently.
"""
import json
import shutil
import signal

import pytest

from and_mask import summarize
from and_mask.core.figures import MANIFEST, run_cli
from and_mask.core.runfolder import STATUS, is_running, read_status
from gen_mask import run_erm_irm
from gen_mask.erm_irm.sweep import RESULTS, SETTINGS, read_results
from tests.support import fault_runner as fr
from tests.support.faults import copy_run, cut_last_line, damage, json_lines, one_line, train
from vizualization import loss_landscape, plot_runs

ERM_IRM = "gen_mask.run_erm_irm"
SEM = ["--dataset", "sem_ac", "--methods", "erm,and_mask", "--n_train", "40,80", "--trials", "2", "--steps", "20",
       "--quiet"]
ERM_EVENTS = {"results_erm": 1, "results_and_mask": 2, "status": 3}  # appends of results, then status.json


def erm_irm(out, *extra):
    try:
        run_erm_irm.main(SEM + ["--out", str(out), *extra])
    except SystemExit as end:
        return end.code
    return None


def results(out) -> dict:
    return {(r["method"], r["n_train"], r["trial"]): r["error"] for r in read_results(out, quiet=True)}


@pytest.fixture(scope="module")
def sweep_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("erm_irm") / "out"
    assert erm_irm(out) is None
    return out


@pytest.mark.parametrize("event", list(ERM_EVENTS))
@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_a_killed_benchmark_resumes_without_losing_or_repeating_a_fit(tmp_path, sweep_reference, event, fraction):
    out = tmp_path / "out"
    assert fr.run(ERM_IRM, SEM + ["--out", out], ERM_EVENTS[event], fraction) == -signal.SIGKILL
    assert not is_running(out)
    kept = results(out)
    assert all(kept[key] == value for key, value in results(sweep_reference).items() if key in kept)
    assert erm_irm(out) is None
    assert results(out) == pytest.approx(results(sweep_reference), rel=1e-6)
    assert len(read_results(out)) == len(results(sweep_reference))  # no fit twice
    assert read_status(out)["status"] == "finished"


def test_a_second_benchmark_on_the_same_out_is_refused(tmp_path, sweep_reference):
    out = tmp_path / "out"
    first = fr.start(ERM_IRM, SEM + ["--out", out], 1, hold_in=out)
    try:
        fr.wait_for(out / "held")
        message = erm_irm(out)
        assert one_line(message) and "is in use by another process" in message and "--out" in message
    finally:
        (out / "release").touch()
        first.join(120)
    assert first.exitcode == 0 and results(out) == pytest.approx(results(sweep_reference), rel=1e-6)


RESULT_DAMAGES = [
    ("random bytes", f"{RESULTS} is damaged"),
    (json_lines({"method": "erm"}), f"{RESULTS} is damaged: line 1 is not a result record"),
    ("other dataset", f"{RESULTS} is damaged: it holds results of sem_cs, not sem_ac"),
    (SETTINGS + " empty", f"{SETTINGS} is damaged: empty"),
    (SETTINGS + " truncated", f"{SETTINGS} is damaged: not valid JSON"),
    (SETTINGS + " random bytes", f"{SETTINGS} is damaged"),
    (SETTINGS + " list", f"{SETTINGS} is damaged: expected a sweep settings object, found a JSON list"),
    (SETTINGS + " missing", f"has {RESULTS} but no {SETTINGS}"),
]


@pytest.mark.parametrize("how, message", RESULT_DAMAGES, ids=[h.split("{")[0] or "wrong record"
                                                               for h, _ in RESULT_DAMAGES])
def test_damaged_benchmark_files_are_one_line_naming_them(tmp_path, sweep_reference, how, message):
    out = copy_run(sweep_reference, tmp_path / "out")
    status = (out / STATUS).read_bytes()
    if how == "other dataset":
        lines = (out / RESULTS).read_text().splitlines()
        (out / RESULTS).write_text("\n".join(lines[:-1] + [lines[-1].replace("sem_ac", "sem_cs")]) + "\n")
    elif how.startswith(SETTINGS):
        kind = how[len(SETTINGS) + 1:]
        if kind == "missing":
            (out / SETTINGS).unlink()
        else:
            damage(out / SETTINGS, "[1]" if kind == "list" else kind)
    else:
        damage(out / RESULTS, how)
    error = erm_irm(out)
    assert one_line(error) and str(out) in error and message in error
    assert (out / STATUS).read_bytes() == status  # a refused process leaves the folder's status alone


@pytest.mark.parametrize("how", ["empty", "truncated", "half-written last line"])
def test_lost_or_cut_results_are_redone(tmp_path, sweep_reference, how):
    out = copy_run(sweep_reference, tmp_path / "out")
    if how == "half-written last line":
        cut_last_line(out / RESULTS)
    else:
        damage(out / RESULTS, how)
    assert erm_irm(out) is None
    assert results(out) == pytest.approx(results(sweep_reference), rel=1e-6)


# ---- summarize and plot_runs -----------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two seeds of one setting, one run that differs only in --epochs, one of another experiment."""
    from and_mask.and_mask_utils import METHOD_FLAGS
    from and_mask.core import cli
    from and_mask.experiments import colored_mnist
    from tests.support.mnist_files import write_mnist_files

    root = tmp_path_factory.mktemp("runs")
    for name, extra in [("s0", []), ("s1", ["--seed", "1"]), ("e1", ["--epochs", "1"])]:
        assert train(root / "synthetic" / name, *extra) is None
    write_mnist_files(root / "data", "mnist", n_train=120, n_test=20)
    cli.main(colored_mnist, METHOD_FLAGS, "and_mask", [
        "--data_path", str(root / "data"), "--output_dir", str(root / "colored" / "c0"), "--init_lr", "0.01",
        "--weight_decay", "0", "--random_labels_fraction", "0", "--num_workers", "0", "--method", "and_mask",
        "--agreement_threshold", "1", "--scale_grad_inverse_sparsity", "1", "--quiet", "--epochs", "1",
        "--batch_size", "10"])
    return root


def groups_of_summarize(root):
    from and_mask.core.runsets import find_runs, load_runs, sections
    from and_mask.experiments.saved import entry_defaults

    loaded = load_runs(find_runs([root]))
    return sorted(sorted(r.path.name for r in members) for groups in sections(loaded, entry_defaults).values()
                  for members in groups.values())


def test_summarize_and_plot_runs_group_alike_and_never_merge_other_settings(runs, tmp_path, capsys):
    summarize.main([str(runs / "synthetic")])
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    assert len(rows) == 2 and any("--epochs 1 " in r and "| 1 |" in r for r in rows) \
        and any("--epochs 2 " in r and "| 2 |" in r for r in rows)
    groups = plot_runs.group_runs(plot_runs.load([runs / "synthetic"]))
    labels = {label: sorted(r.path.name for r in members) for label, members in groups["synthetic"].items()}
    assert sorted(labels.values()) == groups_of_summarize(runs / "synthetic") == [["e1"], ["s0", "s1"]]
    assert all("epochs=" in label for label in labels)


def test_several_experiments_give_one_section_each(runs, tmp_path, capsys):
    summarize.main([str(runs)])
    out = capsys.readouterr().out
    assert "## synthetic\n" in out and "## colored_mnist\n" in out and out.count("| method |") == 2
    written = plot_runs.main([str(runs), "--out", str(tmp_path / "figures"), "--dpi", "20"])
    assert {p.name for p in written} >= {"synthetic_accuracy.png", "colored_mnist_accuracy.png"}


def test_an_unreadable_run_is_skipped_with_a_warning_naming_it(runs, tmp_path, capsys):
    root = tmp_path / "runs"
    for name in ("s0", "s1"):
        copy_run(runs / "synthetic" / name, root / name)
    damage(root / "s1" / "config.json", "truncated")
    shutil.copytree(runs / "synthetic" / "e1", root / "e1")
    damage(root / "e1" / "metrics.jsonl", "random bytes")
    summarize.main([str(root)])
    captured = capsys.readouterr()
    assert f"warning: skipping {root / 's1'}: {root / 's1' / 'config.json'} is damaged" in captured.err
    assert f"warning: skipping {root / 'e1'}: {root / 'e1' / 'metrics.jsonl'} is damaged" in captured.err
    assert "| 1 |" in captured.out  # s0 alone
    assert [run.path for run in plot_runs.load([root])] == [root / "s0"]
    assert f"skipping {root / 's1'}: {root / 's1' / 'config.json'} is damaged" in capsys.readouterr().err


# ---- figure folders --------------------------------------------------------------------------

def plot(out, *run_dirs, extra=()):
    try:
        return run_cli(plot_runs.main, [*map(str, run_dirs), "--out", str(out), "--dpi", "20", *extra])
    except SystemExit as end:
        return end.code


def test_a_figure_folder_never_replaces_another_commands_figures_silently(runs, tmp_path):
    out = tmp_path / "figures"
    s0, s1 = runs / "synthetic" / "s0", runs / "synthetic" / "s1"
    assert len(plot(out, s0, s1, extra=["--pdf"])) == 6
    assert len(plot(out, s0, s1)) == 3  # the same command again: replaced, and its old PDFs removed
    assert sorted(p.name for p in out.glob("*.p*")) == ["accuracy.png", "loss.png", "mask_density.png"]
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    message = plot(out, s0)
    assert one_line(message) and "accuracy.png was made by python -m vizualization.plot_runs with other " \
                                  "settings (runs:" in message and "--overwrite" in message
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before
    made_by = json.loads((out / MANIFEST).read_text())["figures"]["loss.png"]["made_by"]
    assert made_by == {"module": "vizualization.plot_runs", "settings": {"runs": [str(s0), str(s1)]}}
    # Another command with other figure names shares the folder (a gallery).
    loss_landscape.main(["--run", str(s0), "--points_1d", "3", "--points_2d", "3", "--dpi", "20", "--out", str(out)])
    assert set(json.loads((out / MANIFEST).read_text())["figures"]) == {
        "accuracy.png", "loss.png", "mask_density.png", "interpolation.png", "plane.png"}


def test_a_figure_of_unknown_origin_or_a_damaged_manifest_is_refused(runs, tmp_path):
    out = tmp_path / "figures"
    out.mkdir()
    (out / "loss.png").write_bytes(b"a figure made by hand")
    message = plot(out, runs / "synthetic" / "s0")
    assert one_line(message) and "loss.png exists and was not made by this command" in message
    assert (out / "loss.png").read_bytes() == b"a figure made by hand"
    assert len(plot(out, runs / "synthetic" / "s0", extra=["--overwrite"])) == 3
    damage(out / MANIFEST, "truncated")
    message = plot(out, runs / "synthetic" / "s0")
    assert one_line(message) and f"{out / MANIFEST} is damaged" in message
