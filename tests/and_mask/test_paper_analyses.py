"""The paper's training analyses: their runs are one sweep (resumed, failures reported), each
command's table and figure on tiny settings, and each verdict on numbers where the paper's claim
holds and where it does not."""
import json

import pytest

from and_mask.core.runfolder import read_metrics
from and_mask.paper import env_count, label_noise, memorization, runs, synthetic_results
from tests.support.cifar_files import write_cifar10_files

TINY_SYNTHETIC = "--n_hidden_units 8 --n_hidden_layers 1 --n_test 50 --n_dims 4 --use_cuda 0"


def tiny_spec(name, *extra):
    argv = ("--method", "mean", "--examples_per_env", "32", "--batch_size", "16", "--n_envs", "2", "--epochs", "2",
            "--quiet", *TINY_SYNTHETIC.split(), *extra)
    return runs.RunSpec(name, "gen_mask.run_synthetic", argv, {"method": "mean"})


def parser_stub():
    return env_count.build_parser()


def task_dir(out, task):
    """The run folder of the sweep task `task` in the analysis folder `out`."""
    (run,) = [r for r in json.loads((out / "sweep.json").read_text())["runs"] if r["task"] == task]
    return out / "runs" / run["id"]


def log_lines(out, task):
    run_dir = task_dir(out, task)
    return (out / "logs" / f"{run_dir.name}.log").read_text().splitlines()


def test_the_runs_are_one_sweep_rerun_skips_finished_and_resumes_stopped(tmp_path, capsys):
    spec = tiny_spec("a")
    runs.launch(parser_stub(), [spec], tmp_path, dry_run=False, workers=1)
    assert 'name = "a"' in (tmp_path / "sweep.toml").read_text()
    run_dir = task_dir(tmp_path, "a")
    first = read_metrics(run_dir)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    runs.launch(parser_stub(), [spec], tmp_path, dry_run=False, workers=1)  # nothing to do
    assert sum("start:" in line for line in log_lines(tmp_path, "a")) == 1
    # A run killed before its final evaluation (no status.json, its last record cut off) continues with --resume.
    (run_dir / "status.json").unlink()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    runs.launch(parser_stub(), [spec], tmp_path, dry_run=False, workers=1)
    assert sum("resume:" in line for line in log_lines(tmp_path, "a")) == 1
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in first]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run_dir)] == strip


def test_a_failing_run_is_reported_and_the_others_go_on(tmp_path):
    specs = [tiny_spec("bad", "--lr", "1e30"), tiny_spec("good")]
    runs.launch(parser_stub(), specs, tmp_path, dry_run=False, workers=2)
    results, failures = runs.collect(specs, tmp_path)
    assert [r["name"] for r in results] == ["good"]
    assert len(failures) == 1 and failures[0].startswith("bad: non-finite training loss")


def test_dry_run_prints_the_commands_and_trains_nothing(tmp_path, capfd):
    runs.launch(parser_stub(), [tiny_spec("a")], tmp_path, dry_run=True, workers=1)
    out = capfd.readouterr().out  # the engine's child process prints them
    assert "-m gen_mask.run_synthetic --method mean" in out and f"--output_dir {tmp_path}/runs/" in out
    assert not any((tmp_path / "runs").iterdir())


def test_the_sweep_file_keeps_each_flag_as_typed_and_the_seed_apart():
    spec = runs.RunSpec("x", "gen_mask.run_synthetic", ("--lr", "1e-3", "--quiet", "--seed", "7", "--l1_coef", "-0"))
    assert spec.flags() == ({"lr": "1e-3", "quiet": True, "l1_coef": "-0"}, 7)
    text = runs.sweep_toml([spec])
    assert 'seeds = [7]' in text and 'lr = "1e-3"' in text and "quiet = true" in text


def test_env_count_table_figure_and_rerun(tmp_path, capsys):
    argv = ["--envs", "2,4", "--total_examples", "64", "--examples_per_step", "16", "--epochs", "2", "--seeds", "0",
            f"--run_flags={TINY_SYNTHETIC}", "--out", str(tmp_path), "--workers", "2"]
    cells, first = env_count.main(argv)
    assert set(cells) == {(m, d) for m in ("mean", "and_mask") for d in (2, 4)}
    flags = json.loads((task_dir(tmp_path, "and_mask-envs4-seed0") / "config.json").read_text())["flags"]
    assert (flags["n_envs"], flags["examples_per_env"], flags["batch_size"]) == (4, 16, 4)
    assert flags["protocol"] == "paper" and flags["n_dims"] == 4  # --run_flags override the analysis' own
    text = (tmp_path / "env_count.md").read_text()
    assert "| 4 | 16 |" in text and "- mean: best test accuracy ≥ 90 %" in text
    assert (tmp_path / "env_count.png").stat().st_size > 0
    env_count.main(argv)  # everything finished: only the table and figure again
    assert sum("start:" in line for line in log_lines(tmp_path, "mean-envs2-seed0")) == 1


def test_env_count_steps_combine_groups_of_at_most_g_environments():
    parser = env_count.build_parser()
    args = parser.parse_args(["--out", "unused", "--envs", "2,8", "--envs_per_step", "4", "--seeds", "0"])
    specs = env_count.specs_of(args, parser, runs.run_options(parser, args))
    groups = {spec.labels["envs"]: spec.flags()[0]["envs_per_step"] for spec in specs}
    assert groups == {2: "2", 8: "4"}
    args = parser.parse_args(["--out", "unused", "--envs", "2,64", "--seeds", "0"])
    specs = env_count.specs_of(args, parser, runs.run_options(parser, args))
    assert {spec.labels["envs"]: spec.flags()[0]["envs_per_step"] for spec in specs} == {2: "2", 64: "64"}  # all D


def test_env_count_at_the_paper_scale_keeps_the_environments_and_the_protocol_s_epochs():
    parser = env_count.build_parser()
    args = parser.parse_args(["--out", "unused", "--envs", "2,1024", "--examples_per_env", "1280", "--seeds", "0"])
    flags = {spec.labels["envs"]: spec.flags()[0] for spec in env_count.specs_of(args, parser, runs.run_options(
        parser, args))}
    assert {d: (f["examples_per_env"], f["n_envs"]) for d, f in flags.items()} == {2: ("1280", "2"),
                                                                                 1024: ("1280", "1024")}
    assert not any("epochs" in f or "batch_size" in f for f in flags.values())  # the protocol's: ⌈3000/D⌉, 128


@pytest.mark.parametrize("bad, message", [
    (["--envs", "3"], "do not divide"),
    (["--examples_per_env", "1280", "--total_examples", "4096"], "excludes --total_examples"),
    (["--envs", "8,32", "--envs_per_step", "3"], "--envs_per_step 3 does not divide 8 environments"),
    (["--methods", "no_such_rule"], "the sweep engine refused the runs"),
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
    results = synthetic_results.main(["--methods", "and_mask,mean", "--seeds", "0,1", run_flags, "--workers", "2",
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
    return ["--data_path", str(path), "--train_subset", "4", "--batch_size", "2", "--epochs", epochs, "--workers", "2",
            "--run_flags=--num_workers 0 --download 0 --use_cuda 0"]


def test_memorization_sweeps_tau_on_true_and_random_labels(cifar_path, tmp_path):
    cells = memorization.main(["--taus", "0.5", "--seeds", "0", "--out", str(tmp_path), *cifar_scale(cifar_path)])
    assert set(cells) == {("true", 0.5), ("random", 0.5)}
    flags = json.loads((task_dir(tmp_path, "random-tau0.5-seed0") / "config.json").read_text())["flags"]
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


@pytest.mark.parametrize("method, accs, expected", [
    ("and_mask", [0.99, 0.97], "holds here"),  # the paper: perfect test accuracy
    ("and_mask", [0.99, 0.55], "does not hold here"),  # a mean of 77 %: the claim fails
    ("mean", [0.5, 0.52], "holds here"),  # the baseline at chance
    ("mean", [0.9, 0.95], "does not hold here"),  # a baseline that learns the spiral refutes it
    ("dann", [0.58, 0.6], "holds here"),
    ("irm", [0.5, 0.99], "no verdict"),  # the paper gives no number
    ("pcgrad", [0.5], "no verdict"),  # not in the paper's comparison
])
def test_synthetic_results_verdicts_hold_where_the_claim_does_and_only_there(method, accs, expected):
    assert synthetic_results.verdict(method, accs, learned=0.95, chance=0.6).endswith(expected)


@pytest.mark.parametrize("method, relabelled, expected", [
    ("and_mask", [0.05, 0.08], "holds here"),  # below chance (10 %) on the wrong labels
    ("and_mask", [0.05, 0.2], "does not hold here"),  # a mean of 12.5 %: above chance
    ("mean", [0.98, 0.9], "holds here"),  # memorises the wrong labels
    ("mean", [0.3, 0.4], "does not hold here"),
    ("geom_mean", [0.1], "no verdict"),
])
def test_label_noise_verdicts_hold_where_the_claim_does_and_only_there(method, relabelled, expected):
    assert label_noise.verdict(method, relabelled, memorised=0.5).endswith(expected)
