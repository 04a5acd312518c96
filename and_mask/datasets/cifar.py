"""CIFAR-10 (or Fashion-MNIST as 32×32 RGB) with a seeded fraction of random labels.

CIFAR-10 is read from torchvision's on-disk layout, ROOT/cifar-10-batches-py/{data_batch_1..5,
test_batch} (python pickles with "data", uint8 (N, 3072) in CHW order, and "labels"). When the
files are missing torchvision's download is tried; offline, the error names the expected files.

Random labels (`relabel`): with fraction f of N training images, RandomState(seed) chooses
round(f·N) indices without replacement and then draws a uniform label in 0..9 for each of
them, so a new label equals the true one with probability 1/10. The "relabelled" evaluation
set is the indices whose label actually changed (the original's "mislabeled" subset).

Inputs are normalised as torchvision's ToTensor + Normalize with the ImageNet statistics:
x = (pixel / 255 − mean_c) / std_c.
"""
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, Subset

from and_mask.core.errors import DataNotFoundError, RunError
from and_mask.datasets.mnist import DEFAULT_DATA_PATH, load_mnist

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
N_CLASSES = 10
EVAL_BATCH_SIZE = 1000  # the original's batch size for the relabelled and test loaders
CIFAR_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
DATASETS = ("cifar10", "fashion_mnist")


def _cifar_files(folder: Path, train: bool):
    return [folder / name for name in (TRAIN_FILES if train else TEST_FILES)]


def _missing(folder: Path):
    return [p.name for p in _cifar_files(folder, True) + _cifar_files(folder, False) if not p.is_file()]


def cifar10_present(data_path=None) -> bool:
    """Whether every file of CIFAR-10 is in DATA_PATH (default: the repository's data/ folder)."""
    return not _missing(Path(DEFAULT_DATA_PATH if data_path is None else data_path) / CIFAR_FOLDER)


def read_cifar10(data_path=None, train=True, download=True):
    """Return (images uint8 (N, 3, 32, 32), labels int64 (N,)) of CIFAR-10's train or test split."""
    root = Path(DEFAULT_DATA_PATH if data_path is None else data_path)
    folder = root / CIFAR_FOLDER
    if _missing(folder) and download:
        try:
            torchvision.datasets.CIFAR10(root=str(root), train=train, download=True)
        except (RuntimeError, OSError):
            pass  # offline: fall through to the error that names the expected files
    missing = _missing(folder)
    if missing:
        expected = TRAIN_FILES + TEST_FILES
        lacking = "" if len(missing) == len(expected) else f", missing {', '.join(missing)}"
        raise DataNotFoundError(
            f"CIFAR-10 not found in {folder}: expected {', '.join(expected)} (torchvision's python version)"
            f"{lacking}; the download failed or was disabled: extract cifar-10-python.tar.gz under {root}, "
            f"or pass --data_path")
    batches = [read_batch(path) for path in _cifar_files(folder, train)]
    return (torch.from_numpy(np.concatenate([images for images, _ in batches])),
            torch.from_numpy(np.concatenate([labels for _, labels in batches])))


def read_batch(path):
    """(uint8 (n, 3, 32, 32), int64 (n,)) of one python batch file; RunError naming it if damaged."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
    except Exception as error:  # a damaged pickle can fail in any way; the file is what matters
        raise RunError(f"{path} is damaged: not a readable pickle ({type(error).__name__}: "
                       f"{str(error)[:120]})") from None
    labels = batch.get("labels", batch.get("fine_labels")) if isinstance(batch, dict) else None
    data = np.asarray(batch.get("data")) if isinstance(batch, dict) else None
    if labels is None or data is None or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise RunError(f"{path} is damaged: expected a CIFAR-10 batch, a dict with uint8 'data' of shape "
                       f"(n, 3072) and 'labels'")
    labels = np.asarray(labels)
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer) \
            or (len(labels) and not 0 <= labels.min() <= labels.max() < N_CLASSES):
        raise RunError(f"{path} is damaged: expected {len(data)} labels in 0..{N_CLASSES - 1}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def fashion_mnist_as_rgb32(data_path=None, train=True, download=True):
    """Fashion-MNIST resized from 28×28 to 32×32 (bilinear) and repeated to 3 channels, uint8."""
    images, labels = load_mnist("fashion_mnist", data_path, train=train, download=download)
    resized = F.interpolate(images[:, None].float(), size=(32, 32), mode="bilinear", align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous(), labels


def load_images(dataset, data_path=None, train=True, download=True):
    """(uint8 (N, 3, 32, 32), int64 (N,)) of `dataset` in DATASETS."""
    if dataset == "cifar10":
        return read_cifar10(data_path, train, download)
    if dataset == "fashion_mnist":
        return fashion_mnist_as_rgb32(data_path, train, download)
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


def relabel(labels: torch.Tensor, fraction: float, seed: int, n_classes: int = N_CLASSES):
    """Give a seeded random label to round(fraction·N) examples.

    Returns (new labels, chosen indices, relabelled indices): `chosen` are the round(f·N)
    indices drawn without replacement, `relabelled` (sorted) those whose label changed.
    """
    rng = np.random.RandomState(seed)
    n = labels.shape[0]
    chosen = rng.choice(n, int(round(fraction * n)), replace=False)
    random_labels = rng.randint(0, n_classes, len(chosen))
    new = labels.clone()
    new[torch.from_numpy(chosen)] = torch.from_numpy(random_labels).to(labels.dtype)
    relabelled = torch.nonzero(new != labels).flatten()
    return new, torch.from_numpy(chosen), relabelled


class NormalisedImages(Dataset):
    """uint8 images kept in memory; item i = ((image_i / 255 − mean) / std as float32, label_i)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self):
        return self.labels.shape[0]

    def __getitem__(self, index):
        return (self.images[index].float() / 255 - self.mean) / self.std, self.labels[index]


@dataclass
class RandomLabelData:
    train: Dataset  # the (partly) relabelled training set
    relabelled: Dataset  # the training examples whose label changed
    test: Dataset
    n_chosen: int  # round(fraction · N)


def make_random_label_data(dataset, data_path, fraction, seed, train_subset=None, test_subset=None, download=True):
    """Training set (the first `train_subset` images) relabelled with `relabel`, and the test set."""
    images, labels = load_images(dataset, data_path, train=True, download=download)
    if train_subset is not None:
        images, labels = images[:train_subset], labels[:train_subset]
    new_labels, chosen, relabelled = relabel(labels, fraction, seed)
    train = NormalisedImages(images, new_labels)
    test_images, test_labels = load_images(dataset, data_path, train=False, download=download)
    if test_subset is not None:
        test_images, test_labels = test_images[:test_subset], test_labels[:test_subset]
    return RandomLabelData(train, Subset(train, relabelled.tolist()), NormalisedImages(test_images, test_labels),
                           len(chosen))


def make_loaders(data: RandomLabelData, batch_size, num_workers):
    """train (shuffled, drop_last), train_eval (whole training set), relabelled and test loaders.

    Shuffling draws from torch's global RNG, which the checkpoints save, so a resumed run sees
    the same batches. Workers are not persistent: every epoch's iterators consume the global RNG
    in the same way, before and after a resume.
    """
    def loader(dataset, size, shuffle=False):
        return DataLoader(dataset, batch_size=size, shuffle=shuffle, drop_last=shuffle, num_workers=num_workers)

    train = loader(data.train, batch_size, shuffle=True)
    evals = {"train_eval": loader(data.train, EVAL_BATCH_SIZE), "test": loader(data.test, EVAL_BATCH_SIZE)}
    if len(data.relabelled):
        evals = {"train_eval": evals["train_eval"], "relabelled": loader(data.relabelled, EVAL_BATCH_SIZE),
                 "test": evals["test"]}
    return train, evals
