"""`python -m gen_mask.sweep collect`: a sweep folder's runs as leaderboard.md, .csv and .png.

Checked against a small sweep folder (tests/support/collect_fixture.py) and its expected tables
(tests/data/collect/), and on the cases around it: every outcome counted, failed runs with their
error, selection that never reads the test metric, rows that would mix other flags, damaged files.
"""
import csv
import io
import json
import random
import statistics

import pytest

from and_mask.core.collect import SELECTIONS, Group, Metric, difference, select
from and_mask.core.runfolder import FolderLock
from and_mask.core.sweepfolder import SweepFolder
from gen_mask.run_synthetic import build_parser
from gen_mask.sweep.cli import main
from tests.support.collect_fixture import DATA, write_fixture


@pytest.fixture
def sweep(tmp_path):
    roles = write_fixture(tmp_path / "sweep")
    return tmp_path / "sweep", roles


def collect(path, *extra, running=None) -> tuple[str, list[dict]]:
    """Collect `path` (holding the lock of run `running`, so that it is seen running); (Markdown, CSV rows)."""
    lock = FolderLock(path / "runs" / running) if running else None
    if lock:
        lock.__enter__()
    try:
        assert main(["collect", str(path), "--quiet", *extra]) == 0
    finally:
        if lock:
            lock.__exit__(None, None, None)
    return (path / "leaderboard.md").read_text(), list(csv.DictReader(io.StringIO((path / "leaderboard.csv").read_text())))


def row(rows, task, method, setting=None):
    (found,) = [r for r in rows if r["task"] == task and r["method"] == method
                and (setting is None or r["setting"] == setting)]
    return found


def test_collect_writes_the_expected_tables(sweep):
    path, roles = sweep
    markdown, _ = collect(path, running=roles["running"])
    assert markdown == (DATA / "leaderboard.md").read_text()
    assert (path / "leaderboard.csv").read_text() == (DATA / "leaderboard.csv").read_text()
    assert (path / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def final_values(path, run_ids, name):
    return [json.loads((path / "runs" / r / "metrics.jsonl").read_text().splitlines()[-1])[name] for r in run_ids]


def test_each_row_holds_the_finished_runs_of_one_setting_over_seeds(sweep):
    path, roles = sweep
    _, rows = collect(path, running=roles["running"])
    runs = SweepFolder(path).read()["runs"]
    high = [r["id"] for r in runs if r["task"] == "spirals" and r["flags"]["method"] == "and_mask"
            and r["flags"]["lr"] > 0.01 and r["id"] != roles["killed"]]
    values = final_values(path, high, "test_acc")
    got = row(rows, "spirals", "and_mask", "--lr 0.0377011")
    assert len(values) == int(got["n"]) == int(got["n_finished"]) == 2 and got["n_unfinished"] == "1"
    assert float(got["mean"]) == pytest.approx(statistics.fmean(values))
    assert float(got["std"]) == pytest.approx(statistics.stdev(values))
    assert float(got["inconsistency"]) == pytest.approx(statistics.fmean(final_values(path, high, "inconsistency")))
    assert (got["metric"], got["higher_is_better"], got["seconds_per"]) == ("test_acc", "true", "epoch")
    sem = row(rows, "sem", "irm")
    assert (sem["metric"], sem["higher_is_better"], sem["n"], sem["n_finished"]) == ("error", "false", "2", "1")


def test_every_outcome_is_counted_and_a_failed_run_shows_its_error(sweep):
    path, roles = sweep
    markdown, rows = collect(path, running=roles["running"])
    low = row(rows, "spirals", "mean", "--lr 0.00478516")  # running, never started, finished
    assert (low["n_finished"], low["n_failed"], low["n_unfinished"], low["n_running"]) == ("1", "0", "1", "1")
    failed = row(rows, "spirals", "mean", "--lr 0.0377011")
    assert failed["n_failed"] == "1" and "NonFiniteLossError: non-finite training loss (nan)" in failed["note"]
    assert f"seed 1 (run {roles['failed']}): NonFiniteLossError: non-finite training loss (nan)" in markdown
    assert "| lookahead | n/a: needs Hessian-vector products |" in markdown
    assert row(rows, "sem", "lookahead")["note"] == "n/a: needs Hessian-vector products"
    _, rows = collect(path)  # nobody holds the lock: that run has finished
    low = row(rows, "spirals", "mean", "--lr 0.00478516")
    assert (low["n"], low["n_finished"], low["n_running"]) == ("2", "2", "0")


def test_training_domain_selection_never_reads_the_test_metric(sweep):
    path, roles = sweep
    _, rows = collect(path)
    chosen = {(r["task"], r["method"], r["setting"]) for r in rows if "training_domain" in r["selected_by"]}
    oracle = {(r["task"], r["method"], r["setting"]) for r in rows if "oracle" in r["selected_by"]}
    assert chosen != oracle  # the fixture's validation and test accuracies disagree for mean
    poison = random.Random(0)
    for metrics in path.glob("runs/*/metrics.jsonl"):
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        for record in records:
            record.update(test_acc=poison.random(), test_loss=poison.random())
        metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    _, poisoned = collect(path)
    assert {(r["task"], r["method"], r["setting"]) for r in poisoned if "training_domain" in r["selected_by"]} == chosen


class Spy(dict):
    """A sample that records which of its numbers are read."""

    read = set()

    def __getitem__(self, name):
        Spy.read.add(name)
        return super().__getitem__(name)


def test_a_selection_rule_sees_only_the_number_it_compares():
    candidates = [Group("t", "m", {"lr": lr}, samples=[Spy(val_acc=v, test_acc=t)]) for lr, v, t in
                  [(1, 0.9, 0.1), (2, 0.5, 0.9)]]
    metric = Metric("test_acc", True, "val_acc")
    Spy.read = set()
    assert select(candidates, metric, SELECTIONS["training_domain"]).flags == {"lr": 1} and Spy.read == {"val_acc"}
    assert select(candidates, metric, SELECTIONS["oracle"]).flags == {"lr": 2}
    assert select(candidates, Metric("error", False, None), SELECTIONS["training_domain"]) is None
    assert not any(s.reads_test for name, s in SELECTIONS.items() if name != "oracle")


def test_without_a_validation_metric_no_setting_is_chosen_but_the_oracle_is_shown(sweep):
    path, _ = sweep
    saved = json.loads((path / "sweep.json").read_text())
    saved["tasks"][0]["report"]["validation"] = ""
    (path / "sweep.json").write_text(json.dumps(saved))
    markdown, rows = collect(path)
    assert "impossible: the task has no validation metric" in markdown
    assert "| and_mask | no setting could be chosen | – |" in markdown
    assert not any("training_domain" in r["selected_by"] for r in rows)
    assert row(rows, "spirals", "and_mask", "--lr 0.0377011")["selected_by"] == "oracle"


def test_runs_of_one_row_whose_other_flags_differ_are_never_mixed(sweep, capsys):
    path, roles = sweep
    runs = [r for r in SweepFolder(path).read()["runs"] if r["task"] == "spirals" and r["seed"] == 2
            and r["flags"]["method"] == "and_mask" and r["flags"]["lr"] > 0.01]
    config = path / "runs" / runs[0]["id"] / "config.json"
    edited = json.loads(config.read_text())
    edited["flags"]["n_dims"] = 16  # as a run made by code with another default would record it
    config.write_text(json.dumps(edited))
    _, rows = collect(path)
    assert "differ in n_dims" in capsys.readouterr().err
    split = [r for r in rows if r["method"] == "and_mask" and "0.0377011" in r["setting"]]
    assert sorted(r["n_finished"] for r in split) == ["1", "1"] and any("--n_dims 16" in r["setting"] for r in split)


def test_a_cut_off_last_line_is_skipped_with_a_warning(sweep, capsys):
    path, roles = sweep
    expected = collect(path)
    finished = next(p for p in path.glob("runs/*/metrics.jsonl") if '"final"' in p.read_text())
    with open(finished, "a") as f:
        f.write('{"epoch": 3, "phase": "ep')
    assert collect(path) == expected
    assert "ignoring the half-written last line" in capsys.readouterr().err


def test_a_damaged_finished_run_is_reported_failed_not_dropped(sweep, capsys):
    path, roles = sweep
    finished = next(p for p in path.glob("runs/*/metrics.jsonl") if '"final"' in p.read_text())
    finished.write_text(finished.read_text().replace('"phase": "final"', '"phase": "epoch"'))
    _, rows = collect(path)
    assert "lacks the numbers of a finished run" in capsys.readouterr().err
    assert sum(int(r["n_failed"]) for r in rows) == 2


def test_collect_needs_a_sweep_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["collect", str(tmp_path)])
    assert "holds no sweep (no sweep.json)" in capsys.readouterr().err.strip().splitlines()[-1]



def test_a_flag_that_older_runs_lack_counts_as_its_default(sweep, capsys):
    path, _ = sweep
    expected = collect(path)
    config = next(path.glob("runs/*/config.json"))
    edited = json.loads(config.read_text())
    edited["flags"]["dropout_p"] = build_parser().get_default("dropout_p")  # recorded by newer code, absent in the others
    config.write_text(json.dumps(edited))
    assert collect(path) == expected
    assert "differ in" not in capsys.readouterr().err


def keyed(values, seeds=None):
    return list(zip(seeds if seeds is not None else range(len(values)), values))


def test_difference_of_identical_rows_is_not_distinguishable():
    values = [0.5, 0.52, 0.49, 0.51, 0.5]
    found = difference(keyed(values), keyed(values), higher_is_better=True)
    assert found.paired and found.mean == 0 and found.verdict == "not distinguishable"


def test_a_shift_of_ten_standard_deviations_is_better_and_its_mirror_worse():
    rng = random.Random(0)
    base = [rng.gauss(0.5, 0.01) for _ in range(3)]
    shifted = [b + 0.1 + rng.gauss(0, 0.01) for b in base]  # +10 σ, paired by seed
    assert difference(keyed(shifted), keyed(base), higher_is_better=True).verdict == "better"
    assert difference(keyed(shifted), keyed(base), higher_is_better=False).verdict == "worse"
    assert difference(keyed(base), keyed(shifted), higher_is_better=True).verdict == "worse"


def test_the_paired_interval_is_the_student_t_interval_of_the_differences():
    from scipy import stats

    x, r = [0.9, 0.7, 0.8, 0.95], [0.5, 0.45, 0.6, 0.5]
    d = [a - b for a, b in zip(x, r)]
    expected = stats.ttest_rel(x, r).confidence_interval(0.95)
    found = difference(keyed(x), keyed(r), higher_is_better=True)
    assert found.paired and found.n == 4
    assert (found.low, found.high) == pytest.approx((expected.low, expected.high), rel=1e-12)
    assert found.mean == pytest.approx(statistics.fmean(d))


def test_rows_of_other_seeds_get_welchs_interval():
    from scipy import stats

    x, r = [0.9, 0.7, 0.8], [0.5, 0.45, 0.6, 0.5]
    expected = stats.ttest_ind(x, r, equal_var=False).confidence_interval(0.95)
    found = difference(keyed(x, [0, 1, 2]), keyed(r, [0, 1, 2, 3]), higher_is_better=True)
    assert not found.paired
    assert (found.low, found.high) == pytest.approx((expected.low, expected.high), rel=1e-9)


def test_one_seed_is_too_few_and_an_empty_row_has_no_difference():
    assert difference(keyed([0.9]), keyed([0.5]), higher_is_better=True).verdict == "too few seeds"
    assert difference([], keyed([0.5, 0.6]), higher_is_better=True) is None


def test_noise_without_a_shift_is_mostly_not_distinguishable():
    rng = random.Random(1)
    verdicts = [difference(keyed([rng.gauss(0, 1) for _ in range(5)]), keyed([rng.gauss(0, 1) for _ in range(5)]),
                           higher_is_better=True).verdict for _ in range(400)]
    assert 0.9 < verdicts.count("not distinguishable") / len(verdicts) < 0.99  # a 95 % interval
