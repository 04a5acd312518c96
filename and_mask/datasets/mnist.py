"""MNIST and Fashion-MNIST images through torchvision's loaders and folder layout.

Files are looked up where torchvision keeps them: ROOT/MNIST/raw/ and ROOT/FashionMNIST/raw/
(uncompressed idx files). When they are missing, Fashion-MNIST is first taken from the Debian
package `dataset-fashion-mnist` (gzip files in /usr/share/datasets/fashion-mnist/), then
torchvision's own download is tried; if both fail the error names the files that are expected.
Files are checked before use (idx header, size, 28×28 images, as many labels as images, labels
0..9): a damaged one is a one-line error naming it. Concurrent first-time extractions are safe
(one process extracts under a lock; files appear complete or not at all).
"""
import gzip
import math
import shutil
import struct
import zlib
from pathlib import Path

import torch
import torchvision

from and_mask.core.errors import DataNotFoundError, RunError
from and_mask.core.files import atomic_write, locked

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


def idx_shape(path, ndim: int, shown_as=None) -> tuple:
    """The shape stored in a uint8 idx file of `ndim` dimensions; RunError naming it if damaged.

    idx format: magic (0, 0, 0x08 = uint8, ndim), ndim big-endian int32 sizes, then the bytes.
    """
    path = Path(path)
    name = shown_as or path
    with open(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
    if len(header) < 4 + 4 * ndim or header[:4] != bytes((0, 0, 8, ndim)):
        raise RunError(f"{name} is damaged: not an idx file of {ndim}-dimensional uint8 data")
    shape = struct.unpack(f">{ndim}i", header[4:])
    expected = len(header) + math.prod(shape)
    size = path.stat().st_size
    if size != expected:
        raise RunError(f"{name} is damaged: {size} bytes where an idx file of shape {shape} has {expected}"
                       + (" (truncated)" if size < expected else ""))
    return shape


def check_split(folder, train: bool):
    """Check the image and label files of a split: 28×28 images, one label per image."""
    prefix = "train" if train else "t10k"
    images = idx_shape(Path(folder) / f"{prefix}-images-idx3-ubyte", 3)
    labels = idx_shape(Path(folder) / f"{prefix}-labels-idx1-ubyte", 1)
    if images[1:] != (28, 28):
        raise RunError(f"{folder}/{prefix}-images-idx3-ubyte is damaged: images of {images[1]}×{images[2]} "
                       f"pixels, expected 28×28")
    if images[0] != labels[0]:
        raise RunError(f"{folder}/{prefix}-labels-idx1-ubyte is damaged: {labels[0]} labels for {images[0]} images")


def _extract_debian_fashion_mnist(folder):
    """Decompress the Debian package's gzip files into `folder`; True if all four were there.

    Under a lock, so that concurrent first runs extract once; each file is checked, then
    renamed into place, so that an interrupted or damaged extraction is never taken as data.
    """
    source = DEBIAN_FASHION_MNIST
    if not all((source / f"{name}.gz").is_file() for name in RAW_FILES):
        return False
    with locked(folder.parent / ".extract.lock"):
        if has_raw_files(folder):  # another process extracted them while this one waited
            return True
        folder.mkdir(parents=True, exist_ok=True)
        for name in RAW_FILES:
            archive = source / f"{name}.gz"

            def extract(tmp):
                try:
                    with gzip.open(archive, "rb") as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                except (OSError, EOFError, zlib.error) as error:
                    raise RunError(f"{archive} is damaged: not a readable gzip archive ({error})") from None
                idx_shape(tmp, 3 if "images" in name else 1, shown_as=f"{archive} (decompressed)")

            atomic_write(folder / name, extract)
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
    check_split(folder, train)
    data = DATASETS[dataset](root=str(root), train=train, download=False)
    labels = data.targets.to(torch.int64)
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
        raise RunError(f"{folder}/{'train' if train else 't10k'}-labels-idx1-ubyte is damaged: labels outside 0..9")
    return data.data.to(torch.uint8), labels
