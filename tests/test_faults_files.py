"""Fault injection on every file the project reads: each kind of file damaged in each way.

Damages: empty, truncated (the first half), random bytes, valid format with the wrong content,
and for append-only logs a half-written last line. Expected: one line naming the file and what
is wrong, and a non-zero exit; a damaged cache rebuilt; a half-written last line ignored with a
warning (and cut off by the run that continues the log).
"""
import gzip
import io
import pickle

import numpy as np
import pytest
import torch

from and_mask.core.errors import RunError
from and_mask.core.figures import run_cli
from and_mask.core.runfolder import run_state
from and_mask.datasets import cifar, colored_mnist, mnist
from tests.support import fault_runner as fr
from tests.support.cifar_files import write_cifar10_files
from tests.support.faults import (
    DAMAGES,
    copy_run,
    cut_last_line,
    damage,
    json_lines,
    one_line,
    records,
    same_weights,
    train,
    weights,
)
from tests.support.mnist_files import idx_bytes, write_debian_archives, write_mnist_files
from vizualization import loss_landscape

pytestmark = pytest.mark.usefixtures("offline")


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run, and one of a model with other shapes (for wrong-content checkpoints)."""
    root = tmp_path_factory.mktemp("finished")
    assert train(root / "run") is None
    assert train(root / "wider", "--n_hidden_units", "16") is None
    return root / "run", root / "wider"


# ---- run files, read by --resume -------------------------------------------------------------

RESUME_DAMAGES = [
    ("config.json", "empty", "config.json is damaged: empty"),
    ("config.json", "truncated", "config.json is damaged: not valid JSON"),
    ("config.json", "random bytes", "config.json is damaged: not"),
    ("config.json", "[1, 2]", "config.json is damaged: expected a run configuration, found a JSON list"),
    ("config.json", '{"flags": 3}', "config.json is damaged: expected an object with the run's experiment and flags"),
    ("metrics.jsonl", "empty", "metrics.jsonl is damaged: it does not hold one record of each of the epochs 1..2"),
    ("metrics.jsonl", "truncated", "metrics.jsonl is damaged"),
    ("metrics.jsonl", "random bytes", "metrics.jsonl is damaged"),
    ("metrics.jsonl", json_lines({"loss": 1}), "metrics.jsonl is damaged: line 1 is not a metrics record"),
    ("metrics.jsonl", "[1, 2]\n", "metrics.jsonl is damaged: line 1 is a JSON list, not an object"),
    ("checkpoint.pt", "empty", "checkpoint.pt is damaged: empty"),
    ("checkpoint.pt", "truncated", "checkpoint.pt is damaged: not a readable checkpoint"),
    ("checkpoint.pt", "random bytes", "checkpoint.pt is damaged: not a readable checkpoint"),
    ("checkpoint.pt", torch_bytes({"epoch": 1}), "checkpoint.pt is damaged: not a checkpoint of this project"),
    ("checkpoint.pt", torch_bytes({"epoch": 1, "model": {}, "optimizer": {}, "scheduler": None, "rng": {"torch": 1}}),
     "checkpoint.pt is damaged: its random number generator states cannot be restored"),
    ("checkpoint.pt", "wider", "checkpoint.pt does not fit this run"),
]


@pytest.mark.parametrize("name, how, message", RESUME_DAMAGES,
                         ids=[f"{n}-{h if h in DAMAGES or h == 'wider' else f'wrong content {i}'}"
                              for i, (n, h, _) in enumerate(RESUME_DAMAGES)])
def test_resume_of_a_damaged_run_file_is_one_line_naming_it(tmp_path, finished, name, how, message):
    run, wider = finished
    folder = copy_run(run, tmp_path / "run")
    damage(folder / name, (wider / name).read_bytes() if how == "wider" else how)
    error = train(folder, "--resume")
    assert one_line(error) and error.startswith(f"error: {folder}") and message in error


def test_a_half_written_last_metrics_line_is_ignored_then_cut_off_by_resume(tmp_path, finished):
    run, _ = finished
    folder = copy_run(run, tmp_path / "run")
    cut_last_line(folder / "metrics.jsonl")  # killed while writing the final record
    assert records(folder) == records(run)[:-1]
    assert train(folder, "--resume") is None
    assert (folder / "metrics.jsonl").read_text().count("\n") == len(records(run))  # no piece of the cut line
    assert records(folder) == records(run) and same_weights(weights(folder), weights(run))


def test_reading_a_half_written_line_warns_once_naming_the_file(tmp_path, finished, capsys):
    from and_mask.core.runfolder import read_metrics

    folder = copy_run(finished[0], tmp_path / "run")
    cut_last_line(folder / "metrics.jsonl")
    read_metrics(folder)
    err = capsys.readouterr().err
    assert err == f"warning: ignoring the half-written last line of {folder / 'metrics.jsonl'} (the process writing it was killed)\n"


@pytest.mark.parametrize("how", ["empty", "random bytes", '{"status": "done", "exit_code": 0}'])
def test_a_damaged_status_is_named(tmp_path, finished, how):
    folder = copy_run(finished[0], tmp_path / "run")
    damage(folder / "status.json", how)
    with pytest.raises(RunError, match=f"^{folder / 'status.json'} is damaged"):
        run_state(folder)
    error = train(folder)
    assert one_line(error) and "status.json is damaged" in error


# ---- weights, read by loss landscapes --------------------------------------------------------

WEIGHT_DAMAGES = [(name, how) for name in ("weights_init.pt", "weights_final.pt")
                  for how in ("empty", "truncated", "random bytes", "not tensors", "wider")]


@pytest.mark.parametrize("name, how", WEIGHT_DAMAGES)
def test_damaged_weights_are_one_line_naming_them(tmp_path, finished, name, how):
    run, wider = finished
    folder = copy_run(run, tmp_path / "run")
    content = {"not tensors": torch_bytes({"0.weight": "text"}), "wider": (wider / name).read_bytes()}.get(how, how)
    damage(folder / name, content)
    with pytest.raises(SystemExit) as end:
        run_cli(loss_landscape.main, ["--run", str(folder), "--points_1d", "3", "--points_2d", "3",
                                      "--out", str(tmp_path / "figures")])
    assert one_line(end.value.code) and f"{folder}" in end.value.code and name in end.value.code
    assert not (tmp_path / "figures" / "interpolation.png").exists()


# ---- data files ------------------------------------------------------------------------------

IDX_DAMAGES = [
    ("train-images-idx3-ubyte", "empty", "is damaged: not an idx file"),
    ("train-images-idx3-ubyte", "truncated", "(truncated)"),
    ("train-images-idx3-ubyte", "random bytes", "is damaged"),
    ("train-images-idx3-ubyte", "32x32", "images of 32×32 pixels, expected 28×28"),
    ("train-labels-idx1-ubyte", "empty", "is damaged: not an idx file"),
    ("train-labels-idx1-ubyte", "truncated", "(truncated)"),
    ("train-labels-idx1-ubyte", "random bytes", "is damaged"),
    ("train-labels-idx1-ubyte", "fewer", "is damaged: 30 labels for 60 images"),
    ("train-labels-idx1-ubyte", "label 10", "is damaged: labels outside 0..9"),
]


@pytest.mark.parametrize("name, how, message", IDX_DAMAGES)
def test_damaged_idx_files_are_one_line_naming_them(tmp_path, name, how, message):
    folder = write_mnist_files(tmp_path, "mnist", n_train=60, n_test=20)
    wrong = {"32x32": idx_bytes(np.zeros((60, 32, 32))), "fewer": idx_bytes(np.zeros(30)),
             "label 10": idx_bytes(np.full(60, 10))}
    damage(folder / name, wrong.get(how, how))
    with pytest.raises(RunError) as error:
        mnist.load_mnist("mnist", tmp_path, train=True)
    text = str(error.value)
    assert one_line(text) and str(folder / name) in text and message in text


def test_a_run_on_a_damaged_data_file_exits_with_one_line(tmp_path):
    from and_mask.and_mask_utils import METHOD_FLAGS
    from and_mask.core import cli
    from and_mask.experiments import colored_mnist as experiment

    folder = write_mnist_files(tmp_path / "data", "mnist", n_train=60, n_test=20)
    damage(folder / "train-labels-idx1-ubyte", "truncated")
    with pytest.raises(SystemExit) as end:
        cli.main(experiment, METHOD_FLAGS, "and_mask", [
            "--data_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"), "--init_lr", "0.01",
            "--weight_decay", "0", "--random_labels_fraction", "0", "--num_workers", "0", "--method", "and_mask",
            "--agreement_threshold", "1", "--scale_grad_inverse_sparsity", "1", "--quiet"])
    assert one_line(end.value.code) and "train-labels-idx1-ubyte is damaged" in end.value.code
    assert run_state(tmp_path / "run").status == "failed" and not (tmp_path / "run" / "config.json").exists()


CIFAR_DAMAGES = [
    ("empty", "is damaged: not a readable pickle"),
    ("truncated", "is damaged: not a readable pickle"),
    ("random bytes", "is damaged"),
    (pickle.dumps([1, 2]), "is damaged: expected a CIFAR-10 batch"),
    (pickle.dumps({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}), "is damaged: expected a CIFAR-10 batch"),
    (pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 10]}), "expected 4 labels in 0..9"),
]


@pytest.mark.parametrize("how, message", CIFAR_DAMAGES, ids=["empty", "truncated", "random", "list", "shape", "labels"])
def test_damaged_cifar_batches_are_one_line_naming_them(tmp_path, how, message):
    folder = write_cifar10_files(tmp_path)
    damage(folder / "data_batch_3", how)
    with pytest.raises(RunError) as error:
        cifar.read_cifar10(tmp_path, train=True, download=False)
    text = str(error.value)
    assert one_line(text) and str(folder / "data_batch_3") in text and message in text


def debian_archives(tmp_path):
    source = write_mnist_files(tmp_path / "src", "fashion_mnist", n_train=40, n_test=20, seed=5)
    return source, write_debian_archives(source, tmp_path / "debian")


@pytest.mark.parametrize("how", ["empty", "truncated", "random bytes", "gzip of garbage"])
def test_damaged_debian_archives_are_named_and_never_extracted(tmp_path, monkeypatch, how):
    _, debian = debian_archives(tmp_path)
    archive = debian / "train-images-idx3-ubyte.gz"
    damage(archive, gzip.compress(b"not an idx file") if how == "gzip of garbage" else how)
    monkeypatch.setattr(mnist, "DEBIAN_FASHION_MNIST", debian)
    with pytest.raises(RunError) as error:
        mnist.load_mnist("fashion_mnist", tmp_path / "root", train=True, download=False)
    assert one_line(str(error.value)) and str(archive) in str(error.value) and "is damaged" in str(error.value)
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    assert not (raw / "train-images-idx3-ubyte").exists() and not list(raw.glob(".*.tmp"))


def slow_extraction(debian, root):
    """In a child: extract the archives with a copy slowed down, so that two extractions overlap."""
    import time

    def slow_copy(src, dst):
        while chunk := src.read(4096):
            dst.write(chunk)
            time.sleep(0.005)

    mnist.DEBIAN_FASHION_MNIST = mnist.Path(debian)
    mnist.shutil.copyfileobj = slow_copy
    mnist.load_mnist("fashion_mnist", root, train=True, download=False)


def test_concurrent_first_extractions_are_safe(tmp_path):
    source, debian = debian_archives(tmp_path)
    children = [fr.start_call("tests.test_faults_files:slow_extraction", str(debian), str(tmp_path / "root"))
                for _ in range(2)]
    for child in children:
        child.join(120)
    assert [c.exitcode for c in children] == [0, 0]
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    assert all((raw / n).read_bytes() == (source / n).read_bytes() for n in mnist.RAW_FILES)
    assert not list(raw.glob(".*.tmp"))


@pytest.fixture
def cache(tmp_path):
    write_mnist_files(tmp_path, "mnist", n_train=60, n_test=20)
    fresh = colored_mnist.prepared("mnist", "original", 3, tmp_path)
    path, = (tmp_path / "cache").glob("*.pt")
    return tmp_path, path, fresh


@pytest.mark.parametrize("how", ["empty", "truncated", "random bytes", "other seed", "wrong shapes"])
def test_a_damaged_colored_mnist_cache_is_rebuilt(cache, capsys, how):
    root, path, fresh = cache
    stored = torch.load(path, weights_only=True)
    wrong = {"other seed": torch_bytes({**stored, "header": {**stored["header"], "seed": 4}}),
             "wrong shapes": torch_bytes({**stored, "tensors": {**fresh, "labels": fresh["labels"][:5]}})}
    damage(path, wrong.get(how, how))
    rebuilt = colored_mnist.prepared("mnist", "original", 3, root)
    assert all(torch.equal(rebuilt[k], fresh[k]) for k in fresh)
    assert f"warning: rebuilding the damaged cache {path}" in capsys.readouterr().err
    assert all(torch.equal(colored_mnist.prepared("mnist", "original", 3, root)[k], fresh[k]) for k in fresh)
    assert capsys.readouterr().err == ""  # the rebuilt cache is sound


def build_cache(root):
    colored_mnist.prepared("mnist", "irm", 5, root)


def test_concurrent_cache_builds_are_safe(tmp_path):
    write_mnist_files(tmp_path, "mnist", n_train=600, n_test=20)
    children = [fr.start_call("tests.test_faults_files:build_cache", str(tmp_path)) for _ in range(2)]
    for child in children:
        child.join(120)
    assert [c.exitcode for c in children] == [0, 0]
    cached = colored_mnist.prepared("mnist", "irm", 5, tmp_path)
    fresh = colored_mnist.prepared("mnist", "irm", 5, tmp_path, cache=False)
    assert all(torch.equal(cached[k], fresh[k]) for k in fresh)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # no temporaries left
