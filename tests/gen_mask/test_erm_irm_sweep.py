"""The sweep: resume after an interruption, refused setting changes, tiny end-to-end runs, flags."""
import json

import pytest

from gen_mask import run_erm_irm
from gen_mask.erm_irm import colored
from gen_mask.erm_irm.report import PLOT, TABLE
from gen_mask.erm_irm.sweep import RESULTS, read_results, run_sweep
from tests.support.mnist_files import write_mnist_files

SEM_ARGS = ["--dataset", "sem_ac", "--methods", "erm,irm,and_mask", "--n_train", "40,80", "--trials", "2",
            "--steps", "200", "--quiet"]


def keys(records):
    return [(r["method"], r["n_train"], r["trial"]) for r in records]


def test_tiny_sem_sweep_end_to_end(tmp_path):
    table = run_erm_irm.main(SEM_ARGS + ["--out", str(tmp_path)])
    records = read_results(tmp_path)
    assert sorted(keys(records)) == sorted((m, n, t) for m in ("erm", "irm", "and_mask") for n in (40, 80)
                                           for t in (0, 1))
    assert all(r["error"] >= 0 and r["dataset"] == "sem_ac" for r in records)
    assert all((r["penalty_weight"] is not None) == (r["method"] == "irm") for r in records)
    assert (tmp_path / TABLE).read_text() == table
    assert (tmp_path / PLOT).stat().st_size > 0
    for method in ("erm", "irm", "and_mask", "optimum"):
        assert f"| {method} |" in table


def test_interrupted_sweep_resumes_where_it_stopped(tmp_path):
    full = tmp_path / "full"
    _, sweep = run_erm_irm.parse(SEM_ARGS + ["--out", str(full)])
    reference = {(r["method"], r["n_train"], r["trial"]): r for r in run_sweep(sweep, full, quiet=True)}
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "sweep.json").write_text((full / "sweep.json").read_text())
    lines = (full / RESULTS).read_text().splitlines()
    kept = lines[:5]  # five finished fits, then a line cut short by the interruption
    (cut / RESULTS).write_text("\n".join(kept) + "\n" + lines[5][:30])
    resumed = run_sweep(sweep, cut, quiet=True)
    assert len(resumed) == len(reference) and len(set(keys(resumed))) == len(reference)
    assert (cut / RESULTS).read_text().splitlines()[:5] == kept  # finished fits were not redone
    for record in resumed:
        expected = reference[(record["method"], record["n_train"], record["trial"])]
        assert record["error"] == pytest.approx(expected["error"], rel=1e-5)


def test_rerun_with_other_settings_is_refused(tmp_path):
    run_erm_irm.main(SEM_ARGS + ["--out", str(tmp_path), "--methods", "erm", "--trials", "1"])
    with pytest.raises(SystemExit, match="other settings"):
        run_erm_irm.main(SEM_ARGS + ["--out", str(tmp_path), "--lr", "0.5"])
    more = run_erm_irm.main(SEM_ARGS + ["--out", str(tmp_path)])  # more methods and trials: allowed
    assert "| irm |" in more


def test_tiny_colored_sweep_end_to_end(tmp_path):
    write_mnist_files(tmp_path / "data", "fashion_mnist", n_train=300, n_test=100)
    colored.binary_images.cache_clear()
    args = ["--dataset", "hb_cmnist", "--image_data", "fashion_mnist", "--data_path", str(tmp_path / "data"),
            "--methods", "erm,irm,geom_mean", "--n_train", "200", "--trials", "1", "--steps", "6",
            "--anneal_steps", "3", "--batch_size", "64", "--out", str(tmp_path / "out"), "--quiet"]
    table = run_erm_irm.main(args)
    records = read_results(tmp_path / "out")
    assert keys(records) == [("erm", 200, 0), ("irm", 200, 0), ("geom_mean", 200, 0)]
    assert all(0 <= r["error"] <= 1 and r["optimum"] == 0.25 for r in records)
    assert "| optimum | 0.250 |" in table
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["image_data"] == "fashion_mnist"


@pytest.mark.parametrize("flags, message", [
    (["--methods", "erm,not_a_rule"], "valid: erm, irm,"),
    (["--methods", "erm,lookahead"], "lookahead need(s) per-environment Hessian-vector products"),
    (["--steps", "100"], "must exceed --anneal_steps"),
    (["--n_train", "0,50"], "positive integers"),
    (["--val_fraction", "1"], "must lie in"),
])
def test_bad_flags_are_argparse_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        run_erm_irm.main(["--dataset", "sem_cs", "--out", str(tmp_path)] + flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_too_many_images_is_a_one_line_error(tmp_path):
    write_mnist_files(tmp_path, "fashion_mnist", n_train=100, n_test=50)
    colored.binary_images.cache_clear()
    with pytest.raises(SystemExit, match="exceeds the 100 training images"):
        run_erm_irm.main(["--dataset", "cs_cmnist", "--image_data", "fashion_mnist", "--data_path", str(tmp_path),
                          "--n_train", "500", "--trials", "1", "--methods", "erm", "--out", str(tmp_path / "o"),
                          "--quiet"])
