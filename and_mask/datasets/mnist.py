"""MNIST and Fashion-MNIST images through torchvision's loaders and folder layout.

Files are looked up where torchvision keeps them: ROOT/MNIST/raw/ and ROOT/FashionMNIST/raw/
(uncompressed idx files). When they are missing, Fashion-MNIST is first taken from the Debian
package `dataset-fashion-mnist` (gzip files in /usr/share/datasets/fashion-mnist/), then
torchvision's own download is tried; if both fail the error names the files that are expected.
"""
import gzip
import os
import shutil
from pathlib import Path

import torch
import torchvision

from and_mask.core.errors import DataNotFoundError

DEFAULT_DATA_PATH = Path(__file__).resolve().parents[2] / "data"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

DATASETS = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST}

RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def raw_folder(dataset, data_path):
    """ROOT/MNIST/raw or ROOT/FashionMNIST/raw: where torchvision reads the idx files."""
    return Path(data_path) / DATASETS[dataset].__name__ / "raw"


def has_raw_files(folder):
    return all((folder / name).is_file() for name in RAW_FILES)


def _extract_debian_fashion_mnist(folder):
    """Decompress the Debian package's gzip files into `folder`; True if all four were there."""
    source = DEBIAN_FASHION_MNIST
    if not all((source / f"{name}.gz").is_file() for name in RAW_FILES):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    for name in RAW_FILES:
        # Write to a temporary name first so that an interrupted copy is never taken as data.
        partial = folder / f"{name}.partial"
        with gzip.open(source / f"{name}.gz", "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(partial, folder / name)
    return True


def load_mnist(dataset, data_path=None, train=True, download=True):
    """Return (images uint8 (N, 28, 28), labels int64 (N,)) of the training or test split.

    dataset: "mnist" or "fashion_mnist"; data_path: torchvision root (default: the repository's
    data/ folder). Raises DataNotFoundError, naming the expected files, when they are missing
    and can neither be copied from the Debian package (Fashion-MNIST) nor downloaded.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
    root = Path(DEFAULT_DATA_PATH if data_path is None else data_path)
    folder = raw_folder(dataset, root)
    if not has_raw_files(folder) and dataset == "fashion_mnist":
        _extract_debian_fashion_mnist(folder)
    if not has_raw_files(folder) and download:
        try:
            DATASETS[dataset](root=str(root), train=train, download=True)
        except (RuntimeError, OSError):
            pass  # offline: fall through to the error that names the expected files
    if not has_raw_files(folder):
        raise DataNotFoundError(
            f"{dataset} not found: expected {', '.join(RAW_FILES)} in {folder} "
            f"(download failed or disabled; copy the files there, uncompressed)")
    data = DATASETS[dataset](root=str(root), train=train, download=False)
    return data.data.to(torch.uint8), data.targets.to(torch.int64)
