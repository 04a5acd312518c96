"""CIFAR-10 reading, random labels and loaders, on tiny files in torchvision's layout."""
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from and_mask.core.errors import DataNotFoundError
from and_mask.datasets.cifar import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_images,
    make_loaders,
    make_random_label_data,
    read_cifar10,
    relabel,
)
from and_mask.datasets.mnist import load_mnist
from tests.support.cifar_files import write_cifar10_files
from tests.support.mnist_files import write_mnist_files


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar10_files(root, n_train_per_batch=6, n_test=10)
    return root


def test_read_cifar10_matches_the_pickled_batches(cifar_root):
    images, labels = read_cifar10(cifar_root, train=True, download=False)
    assert images.shape == (30, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    with open(cifar_root / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    # Rows are CHW: the first 1024 bytes are the red channel, row after row.
    assert torch.equal(images[6:12], torch.from_numpy(batch["data"]).view(6, 3, 32, 32))
    assert labels[6:12].tolist() == batch["labels"]
    test_images, test_labels = read_cifar10(cifar_root, train=False, download=False)
    assert test_images.shape == (10, 3, 32, 32) and test_labels.shape == (10,)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_relabel_counts(fraction):
    labels = torch.from_numpy(np.random.RandomState(1).randint(0, 10, 1000))
    new, chosen, relabelled = relabel(labels, fraction, seed=7)
    assert len(chosen) == round(fraction * 1000) and len(set(chosen.tolist())) == len(chosen)
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[chosen] = False
    assert torch.equal(new[untouched], labels[untouched])
    assert relabelled.tolist() == sorted(set(chosen.tolist()) & set(torch.nonzero(new != labels).flatten().tolist()))
    assert new.min() >= 0 and new.max() <= 9
    # A uniform new label keeps the true one with probability 1/10.
    if fraction > 0:
        kept = 1 - len(relabelled) / len(chosen)
        assert abs(kept - 0.1) < 4 * (0.1 * 0.9 / len(chosen)) ** 0.5


def test_relabel_is_seeded():
    labels = torch.arange(100) % 10
    first, second, other = relabel(labels, 0.5, 3), relabel(labels, 0.5, 3), relabel(labels, 0.5, 4)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


def test_loaders_shapes_subsets_and_normalisation(cifar_root):
    data = make_random_label_data("cifar10", cifar_root, 0.5, seed=0, train_subset=20, test_subset=7, download=False)
    assert data.n_chosen == 10 and len(data.train) == 20 and len(data.test) == 7
    train, evals = make_loaders(data, batch_size=6, num_workers=0)
    assert list(evals) == ["train_eval", "relabelled", "test"]
    batches = list(train)
    assert len(batches) == 3 and all(x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 for x, _ in batches)
    assert sum(len(y) for _, y in evals["train_eval"]) == 20 and sum(len(y) for _, y in evals["test"]) == 7
    relabelled_labels = torch.cat([y for _, y in evals["relabelled"]])
    images, true_labels = read_cifar10(cifar_root, train=True, download=False)
    _, _, relabelled = relabel(true_labels[:20], 0.5, seed=0)
    assert len(relabelled_labels) == len(relabelled) > 0
    assert torch.all(relabelled_labels != true_labels[relabelled])
    # Normalisation equals torchvision's ToTensor + Normalize on the PIL image.
    reference = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    pil = Image.fromarray(images[3].permute(1, 2, 0).numpy())
    assert torch.allclose(data.train[3][0], reference(pil), atol=1e-6)


def test_without_relabelled_images_there_is_no_relabelled_loader(cifar_root):
    data = make_random_label_data("cifar10", cifar_root, 0.0, seed=0, download=False)
    assert list(make_loaders(data, 4, 0)[1]) == ["train_eval", "test"]


def test_fashion_mnist_as_32x32_rgb(tmp_path):
    write_mnist_files(tmp_path, "fashion_mnist", n_train=12, n_test=5)
    images, labels = load_images("fashion_mnist", tmp_path, train=True, download=False)
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (12,)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    # Bilinear resizing keeps the mean brightness of each image (up to rounding and borders).
    original, _ = load_mnist("fashion_mnist", tmp_path, train=True, download=False)
    assert torch.allclose(images[:, 0].float().mean((1, 2)), original.float().mean((1, 2)), atol=6)


def test_missing_cifar_names_the_expected_files(tmp_path):
    with pytest.raises(DataNotFoundError, match="data_batch_1.*test_batch"):
        read_cifar10(tmp_path, train=True, download=False)
    folder = write_cifar10_files(tmp_path, n_train_per_batch=1, n_test=1)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match="missing data_batch_3;"):
        read_cifar10(tmp_path, train=False, download=False)
