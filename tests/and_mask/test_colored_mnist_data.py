"""Colored MNIST data: loading from idx files, environment statistics, protocols, relabelling, cache."""
import numpy as np
import pytest
import torch

from and_mask.core.errors import DataNotFoundError
from and_mask.datasets import colored_mnist as cm
from and_mask.datasets import mnist
from tests.support.mnist_files import write_debian_archives, write_mnist_files

N_IMAGES = 6000  # 2000 per environment (original), 2500/2500/1000 (irm)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mnist_files(root, "mnist", n_train=N_IMAGES, n_test=100, seed=3)
    return root


pytestmark = pytest.mark.usefixtures("offline")


def test_load_mnist_reads_the_idx_files(data_root):
    images, labels = mnist.load_mnist("mnist", data_root, train=True)
    assert images.shape == (N_IMAGES, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (N_IMAGES,) and labels.dtype == torch.int64
    expected = np.random.RandomState(3).randint(0, 10, N_IMAGES)  # write_mnist_files' first draw
    assert np.array_equal(labels.numpy(), expected)
    assert mnist.load_mnist("mnist", data_root, train=False)[0].shape == (100, 28, 28)


def test_missing_files_raise_one_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        mnist.load_mnist("mnist", tmp_path, train=True)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "MNIST" / "raw") in message
    assert all(name in message for name in mnist.RAW_FILES)


def test_fashion_mnist_is_taken_from_the_debian_package(tmp_path, monkeypatch):
    source = write_mnist_files(tmp_path / "src", "fashion_mnist", n_train=30, n_test=20, seed=5)
    debian = write_debian_archives(source, tmp_path / "usr_share_datasets_fashion-mnist")
    monkeypatch.setattr(mnist, "DEBIAN_FASHION_MNIST", debian)
    images, labels = mnist.load_mnist("fashion_mnist", tmp_path / "root", train=False)
    assert images.shape == (20, 28, 28)
    assert (tmp_path / "root" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()
    monkeypatch.setattr(mnist, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    with pytest.raises(DataNotFoundError, match="FashionMNIST"):
        mnist.load_mnist("fashion_mnist", tmp_path / "other", train=True)


@pytest.mark.parametrize("protocol, sizes", [("original", (2000, 2000, 2000)), ("irm", (2500, 2500, 1000))])
def test_environment_statistics(data_root, protocol, sizes):
    digits = mnist.load_mnist("mnist", data_root, train=True)[1]
    t = cm.prepared("mnist", protocol, seed=0, data_path=data_root, cache=False)
    envs, labels, colors = t["envs"], t["labels"], t["colors"]
    assert tuple(int((envs == e).sum()) for e in range(3)) == sizes
    for e, agreement in enumerate((0.8, 0.9, 0.1)):
        in_env = envs == e
        assert abs(float((colors[in_env] == labels[in_env]).float().mean()) - agreement) < 0.03
    # Recover each example's source image to measure the label noise against y = 1[digit >= 5].
    images = mnist.load_mnist("mnist", data_root, train=True)[0]
    step = 28 // cm.PROTOCOLS[protocol].side
    flat_sources = images[:, ::step, ::step].reshape(N_IMAGES, -1)
    source_of = {bytes(row.numpy()): i for i, row in enumerate(flat_sources)}
    sources = torch.tensor([source_of[bytes(img.numpy())] for img in t["images"].reshape(len(envs), -1)])
    noise = float((labels != (digits[sources] >= 5).long()).float().mean())
    assert abs(noise - cm.LABEL_NOISE) < 0.02
    if protocol == "original":  # contiguous thirds, in order
        assert torch.equal(sources, torch.arange(N_IMAGES))
    else:  # shuffled first 5/6 split even/odd, then the last 1/6 in order
        assert sorted(sources[:5000].tolist()) == list(range(5000))
        assert torch.equal(sources[5000:], torch.arange(5000, 6000))


@pytest.mark.parametrize("protocol", ["original", "irm"])
def test_colour_channel_and_normalisation(data_root, protocol):
    spec = cm.PROTOCOLS[protocol]
    t = cm.prepared("mnist", protocol, seed=1, data_path=data_root, cache=False)
    data = cm.ColoredImages(t["images"], t["colors"], t["labels"], protocol)
    x, y = data[list(range(50))]
    assert x.shape == (50, spec.n_inputs) and x.dtype == torch.float32 and torch.equal(y, t["labels"][:50])
    x = x.view(50, spec.channels, spec.side, spec.side)
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
    for i in range(50):
        c = int(t["colors"][i])
        grey = t["images"][i].float() / 255
        assert torch.equal(x[i, c], (grey - mean[c]) / std[c])  # the definition's float32 operations, exactly
        for other in set(range(spec.channels)) - {c}:
            assert torch.equal(x[i, other], ((torch.zeros_like(grey) - mean[other]) / std[other]))


def test_construction_depends_only_on_the_seed(data_root):
    a = cm.prepared("mnist", "irm", seed=4, data_path=data_root, cache=False)
    b = cm.prepared("mnist", "irm", seed=4, data_path=data_root, cache=False)
    c = cm.prepared("mnist", "irm", seed=5, data_path=data_root, cache=False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["colors"], c["colors"])


def test_cache_holds_the_parameters_and_is_reused(data_root, monkeypatch):
    fresh = cm.prepared("mnist", "original", seed=7, data_path=data_root)
    files = list((data_root / "cache").glob("*-mnist-original-seed7-*.pt"))
    assert len(files) == 1
    header = torch.load(files[0], weights_only=True)["header"]
    assert header["protocol"] == "original" and header["seed"] == 7 and header["n_source_images"] == N_IMAGES

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been used")
    monkeypatch.setattr(cm, "load_mnist", fail)
    cached = cm.prepared("mnist", "original", seed=7, data_path=data_root)
    assert all(torch.equal(fresh[k], cached[k]) for k in fresh)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 1.0])
def test_relabel_replaces_exactly_that_fraction(fraction):
    labels = torch.from_numpy(np.random.RandomState(0).randint(0, 2, 4001))
    new, chosen = cm.relabel(labels, fraction, 2, seed=3)
    assert len(chosen) == round(fraction * 4001) and len(set(chosen.tolist())) == len(chosen)
    untouched = torch.ones(4001, dtype=torch.bool)
    untouched[chosen] = False
    assert torch.equal(new[untouched], labels[untouched])
    assert set(new.tolist()) <= {0, 1}
    if len(chosen) > 400:  # a uniform label differs from the old one half of the time
        changed = float((new[chosen] != labels[chosen]).float().mean())
        assert abs(changed - 0.5) < 0.08
    again, chosen_again = cm.relabel(labels, fraction, 2, seed=3)
    assert torch.equal(again, new) and torch.equal(chosen_again, chosen)
