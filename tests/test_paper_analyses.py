"""The paper's training analyses: ordinary runs in sub-folders (resumed, failures reported), and
each command's table and figure on tiny settings."""
import json

import pytest

from and_mask.core.runfolder import read_metrics
from and_mask.paper import env_count, label_noise, memorization, runs, synthetic_results
from cifar_files import write_cifar10_files

TINY_SYNTHETIC = "--n_hidden_units 8 --n_hidden_layers 1 --n_test 50 --n_dims 4 --use_cuda 0"


def tiny_spec(name, *extra):
    argv = ("--method", "mean", "--examples_per_env", "32", "--batch_size", "16", "--n_envs", "2", "--epochs", "2",
            "--quiet", *TINY_SYNTHETIC.split(), *extra)
    return runs.RunSpec(name, "gen_mask.run_synthetic", argv, {"method": "mean"})


def test_finished_runs_are_skipped_and_started_ones_resumed(tmp_path, capsys, monkeypatch):
    import gen_mask.run_synthetic

    calls, main = [], gen_mask.run_synthetic.main
    monkeypatch.setattr(gen_mask.run_synthetic, "main", lambda argv: calls.append(argv) or main(argv))
    spec = tiny_spec("a")
    assert runs.run_all([spec], tmp_path) == []
    first = read_metrics(tmp_path / "a")
    assert runs.is_finished(tmp_path / "a")
    capsys.readouterr()
    assert runs.run_all([spec], tmp_path) == [] and "[a]" not in capsys.readouterr().out  # nothing to do
    # A run cut off before its final evaluation is continued with --resume, to the same end.
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "a" / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    assert runs.run_all([spec], tmp_path) == []
    assert len(calls) == 2 and "--resume" not in calls[0] and calls[1][-1] == "--resume"
    command = json.loads((tmp_path / "a" / "config.json").read_text())["command"]  # the run's start, kept on resume
    assert command.startswith("run_synthetic.py --method mean") and "--resume" not in command
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in first]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / "a")] == strip


def test_a_failing_run_is_reported_and_the_others_go_on(tmp_path, capsys):
    failures = runs.run_all([tiny_spec("bad", "--lr", "1e30"), tiny_spec("good")], tmp_path)
    assert len(failures) == 1 and failures[0].startswith("bad: error: non-finite training loss")
    assert runs.is_finished(tmp_path / "good") and not runs.is_finished(tmp_path / "bad")
    assert [r["name"] for r in runs.collect([tiny_spec("bad"), tiny_spec("good")], tmp_path)] == ["good"]


def test_an_interrupt_ends_the_whole_analysis(tmp_path, monkeypatch):
    import gen_mask.run_synthetic

    started = []

    def interrupted(argv):
        started.append(argv)
        raise SystemExit(130)  # what a run stopped by Ctrl-C exits with

    monkeypatch.setattr(gen_mask.run_synthetic, "main", interrupted)
    with pytest.raises(SystemExit) as stopped:
        runs.run_all([tiny_spec("a"), tiny_spec("b")], tmp_path)
    assert stopped.value.code == 130 and len(started) == 1


def test_dry_run_prints_the_commands_and_trains_nothing(tmp_path, capsys):
    runs.run_all([tiny_spec("a")], tmp_path, dry_run=True)
    out = capsys.readouterr().out
    assert out.startswith("python -m gen_mask.run_synthetic --method mean") and f"--output_dir {tmp_path}/a" in out
    assert not (tmp_path / "a").exists()


def test_env_count_table_figure_and_rerun(tmp_path, capsys):
    argv = ["--envs", "2,4", "--total_examples", "64", "--examples_per_step", "16", "--epochs", "2", "--seeds", "0",
            f"--run_flags={TINY_SYNTHETIC}", "--out", str(tmp_path)]
    cells, first = env_count.main(argv)
    assert set(cells) == {(m, d) for m in ("mean", "and_mask") for d in (2, 4)}
    flags = json.loads((tmp_path / "and_mask-envs4-seed0" / "config.json").read_text())["flags"]
    assert (flags["n_envs"], flags["examples_per_env"], flags["batch_size"]) == (4, 16, 4)
    assert flags["protocol"] == "paper" and flags["n_dims"] == 4  # --run_flags override the analysis' own
    text = (tmp_path / "env_count.md").read_text()
    assert "| 4 | 16 |" in text and "- mean: best test accuracy ≥ 90 %" in text
    assert (tmp_path / "env_count.png").stat().st_size > 0
    capsys.readouterr()
    env_count.main(argv)  # everything finished: only the table and figure again
    assert "[mean-envs2-seed0]" not in capsys.readouterr().out


@pytest.mark.parametrize("bad, message", [
    (["--envs", "3"], "do not divide"),
    (["--methods", "no_such_rule"], "refuses the flags of run"),
    (["--method_flags", "irm=--lr 1"], "NAME one of --methods"),
    (["--seeds", "0,x"], "comma-separated integers"),
    (["--run_flags=--lr 'unbalanced"], "--run_flags"),
])
def test_bad_analysis_flags_are_one_line_errors(tmp_path, bad, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        env_count.main(["--out", str(tmp_path), "--dry_run", *bad])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_synthetic_results_table_with_verdicts(tmp_path):
    run_flags = f"--run_flags={TINY_SYNTHETIC} --examples_per_env 32 --batch_size 16 --n_envs 2 --epochs 2"
    results = synthetic_results.main(["--methods", "and_mask,mean", "--seeds", "0,1", run_flags,
                                      "--method_flags", "and_mask=--agreement_threshold 0.5", "--out", str(tmp_path)])
    assert sorted(r["name"] for r in results) == ["and_mask-seed0", "and_mask-seed1", "mean-seed0", "mean-seed1"]
    assert results[0]["flags"]["agreement_threshold"] == 0.5 and results[0]["flags"]["weight_decay"] == 1e-4
    text = (tmp_path / "synthetic_results.md").read_text()
    assert "| and_mask |" in text and "perfect test accuracy (Fig. 6): " in text and "(2) |" in text
    assert (tmp_path / "accuracy.png").exists()


@pytest.fixture(scope="module")
def cifar_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_files(root, n_train_per_batch=2, n_test=4)
    return root


def cifar_scale(path, epochs="2"):
    return ["--data_path", str(path), "--train_subset", "4", "--batch_size", "2", "--epochs", epochs,
            "--run_flags=--num_workers 0 --download 0 --use_cuda 0"]


def test_memorization_sweeps_tau_on_true_and_random_labels(cifar_path, tmp_path):
    cells = memorization.main(["--taus", "0.5", "--seeds", "0", "--out", str(tmp_path), *cifar_scale(cifar_path)])
    assert set(cells) == {("true", 0.5), ("random", 0.5)}
    flags = json.loads((tmp_path / "random-tau0.5-seed0" / "config.json").read_text())["flags"]
    assert flags["random_labels_fraction"] == 1.0 and flags["agreement_threshold"] == 0.5
    assert flags["lr_milestones"] == [1] and flags["init_lr"] == 5e-4  # 1/2 and 3/4 of 2 epochs
    text = (tmp_path / "memorization.md").read_text()
    assert "| 0.5 |" in text and "true labels: train" in text and "| 0 |" not in text
    assert (tmp_path / "memorization.png").stat().st_size > 0


def test_label_noise_scores_the_relabelled_part(cifar_path, tmp_path):
    results = label_noise.main(["--seeds", "0", "--out", str(tmp_path), *cifar_scale(cifar_path, epochs="1")])
    assert {r["method"] for r in results} == {"mean", "and_mask"}
    flags = {r["method"]: r["flags"] for r in results}
    assert flags["and_mask"]["agreement_threshold"] == 0.2 and flags["and_mask"]["init_lr"] == 5e-3
    assert flags["mean"]["init_lr"] == 1e-3 and flags["mean"]["random_labels_fraction"] == 0.25
    assert all("relabelled_acc" in r["final"] for r in results)
    text = (tmp_path / "label_noise.md").read_text()
    assert "well below chance on the relabelled part (Fig. 9): " in text


def test_cifar_milestones_must_fit_the_epochs(cifar_path, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        label_noise.main(["--out", str(tmp_path), "--lr_milestones", "60", *cifar_scale(cifar_path)])
    assert exit_info.value.code == 2 and "must be below --epochs (2)" in capsys.readouterr().err
