"""Run plots and loss landscapes, on tiny training runs made here."""
import json
import shutil

import matplotlib.image
import numpy as np
import pytest
import torch

from and_mask.and_mask_utils import METHOD_FLAGS
from and_mask.core import curves
from and_mask.core.cli import main as train
from and_mask.core.figures import PANEL, run_cli
from and_mask.core.runfolder import read_metrics
from and_mask.core.training import evaluate
from and_mask.experiments import synthetic
from and_mask.experiments.saved import rebuild
from vizualization import loss_landscape, plot_runs

TINY = ["--examples_per_env", "64", "--batch_size", "32", "--n_train_envs", "2", "--n_agreement_envs", "2",
        "--n_hidden_units", "16", "--epochs", "2", "--n_test", "64", "--quiet", "--use_cuda", "0"]
METHODS = {"avg": ["--method", "and_mask", "--agreement_threshold", "0", "--scale_grad_inverse_sparsity", "0"],
           "geom": ["--method", "geom_mean", "--agreement_threshold", "1", "--scale_grad_inverse_sparsity", "1"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, seed in (("avg", 0), ("avg", 1), ("geom", 0)):
        out = root / f"{name}_s{seed}"
        train(synthetic, METHOD_FLAGS, "and_mask", TINY + METHODS[name] + ["--seed", str(seed), "--output_dir", str(out)])
        made[f"{name}_s{seed}"] = out
    return made


def _check_png(path, nrows, ncols, dpi):
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (round(PANEL[1] * nrows * dpi), round(PANEL[0] * ncols * dpi))
    assert image[..., :3].std() > 0.05


def test_runs_are_grouped_by_method_and_averaged_over_seeds(runs):
    (experiment, groups), = plot_runs.group_runs(plot_runs.load(list(runs.values()))).items()
    assert experiment == "synthetic"
    assert {k: len(v) for k, v in groups.items()} == {"and_mask τ=0.0 scale=0": 2, "geom_mean τ=1.0 scale=1": 1}
    x, mean, std = curves.band(groups["and_mask τ=0.0 scale=0"], "test_acc")
    records = [read_metrics(runs[k]) for k in ("avg_s0", "avg_s1")]
    # Evaluations happen before each epoch's training (x = epoch − 1), plus the final one at x = epochs.
    values = np.array([[r["test_acc"] for r in rs] for rs in records])
    np.testing.assert_array_equal(x, [0, 1, 2])
    np.testing.assert_allclose(mean, values.mean(0))
    np.testing.assert_allclose(std, values.std(0, ddof=1))
    x, density, _ = curves.band(groups["geom_mean τ=1.0 scale=1"], "mask_density", "0.weight")
    expected = [r["mask_density"]["0.weight"] for r in read_metrics(runs["geom_s0"]) if r["phase"] == "epoch"]
    np.testing.assert_array_equal(x, [0.5, 1.5])
    np.testing.assert_allclose(density, expected)


def test_a_flag_that_a_run_predates_counts_as_its_default(runs, tmp_path):
    """A run written before a flag existed groups with runs that leave the flag at its default."""
    copies = [tmp_path / name for name in ("avg_s0", "avg_s1")]
    for name, copy in zip(("avg_s0", "avg_s1"), copies):
        shutil.copytree(runs[name], copy)
    config_path = copies[1] / "config.json"
    config = json.loads(config_path.read_text())
    assert config["flags"].pop("consistency_steps") == 50  # the parser's default
    config_path.write_text(json.dumps(config))
    (_, groups), = plot_runs.group_runs(plot_runs.load(copies)).items()
    assert [len(members) for members in groups.values()] == [2]
    config["flags"]["consistency_steps"] = 7
    config_path.write_text(json.dumps(config))
    (_, groups), = plot_runs.group_runs(plot_runs.load(copies)).items()
    assert sorted(len(members) for members in groups.values()) == [1, 1]


def test_plot_runs_writes_figures(runs, tmp_path):
    written = plot_runs.main([str(p) for p in runs.values()] + ["--out", str(tmp_path), "--dpi", "40", "--pdf"])
    names = sorted(p.name for p in written)
    assert names == ["accuracy.pdf", "accuracy.png", "loss.pdf", "loss.png", "mask_density.pdf", "mask_density.png"]
    _check_png(tmp_path / "accuracy.png", 1, 2, 40)  # panels: train (running), test
    _check_png(tmp_path / "mask_density.png", 2, 4, 40)  # 8 parameter tensors of the MLP


def test_plot_runs_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(plot_runs.main, [str(tmp_path), "--out", str(tmp_path / "figures")])
    assert "no run to plot" in str(exit_info.value.code)
    assert f"skipping {tmp_path}: not a run folder" in capsys.readouterr().err


def test_filter_normalised_directions_have_the_weights_filter_norms():
    weights = {"conv": torch.randn(4, 3, 5, 5), "linear": torch.randn(6, 7), "bias": torch.randn(6)}
    direction = loss_landscape.filter_normalized_direction(weights, torch.Generator().manual_seed(0))
    for name in ("conv", "linear"):
        w, d = weights[name], direction[name]
        torch.testing.assert_close(d.reshape(len(d), -1).norm(dim=1), w.reshape(len(w), -1).norm(dim=1))
        assert not torch.allclose(d / d.norm(), w / w.norm())  # random, not the weights themselves
    assert (direction["bias"] == 0).all()


def test_interpolation_ends_are_the_saved_models(runs):
    run = runs["geom_s0"]
    setup, _ = rebuild(run, weights="weights_final.pt")
    batches = loss_landscape.env_batches(setup.env_loaders, 1000)
    end = loss_landscape.trainable(setup.model)
    start = {n: v for n, v in torch.load(run / "weights_init.pt").items() if n in end}
    losses, _ = loss_landscape.interpolation(setup.model, start, end, [0.0, 1.0], batches, setup.loss_fn, "cpu")
    for row, weights in enumerate(("weights_init.pt", "weights_final.pt")):
        reference, _ = rebuild(run, weights=weights)
        expected = evaluate(reference.model, batches, reference.loss_fn, "cpu")
        np.testing.assert_allclose(losses[row], [expected["env1_loss"], expected["env2_loss"]], rtol=1e-5)


def test_loss_landscape_writes_figures(runs, tmp_path):
    written = loss_landscape.main(["--run", str(runs["avg_s0"]), "--points_1d", "5", "--points_2d", "5",
                                   "--dpi", "40", "--out", str(tmp_path)])
    assert sorted(p.name for p in written) == ["interpolation.png", "plane.png"]
    _check_png(tmp_path / "interpolation.png", 1, 2, 40)
    _check_png(tmp_path / "plane.png", 1, 3, 40)


def test_loss_landscape_needs_saved_weights(runs, tmp_path):
    (tmp_path / "config.json").write_text((runs["avg_s0"] / "config.json").read_text())
    with pytest.raises(SystemExit) as exit_info:
        run_cli(loss_landscape.main, ["--run", str(tmp_path), "--out", str(tmp_path / "figures")])
    assert "weights_init.pt" in str(exit_info.value.code)
