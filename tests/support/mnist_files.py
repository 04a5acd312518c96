"""Tiny MNIST-format data sets written to disk for tests (not a test module).

`write_mnist_files` writes the four uncompressed idx files that torchvision's MNIST/FashionMNIST
loaders read (ROOT/MNIST/raw/ or ROOT/FashionMNIST/raw/), so that tests exercise the real loading
path. Each class c has a fixed random 28×28 stroke template (the same in train and test); an image
is its class template with 10 % of the pixels flipped, so a linear model can learn the classes.
"""
import gzip
import shutil
import struct
from pathlib import Path

import numpy as np

FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
TEMPLATE_SEED = 12345
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array) -> bytes:
    """idx format: magic (0, 0, 0x08 = uint8, ndim), big-endian int32 sizes, then the raw bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def _write_idx(path, array):
    Path(path).write_bytes(idx_bytes(array))


def class_templates():
    """(10, 28, 28) binary templates: each class lights a random 30 % of the central 20×20 pixels."""
    rng = np.random.RandomState(TEMPLATE_SEED)
    templates = np.zeros((10, 28, 28), dtype=bool)
    templates[:, 4:24, 4:24] = rng.rand(10, 20, 20) < 0.3
    return templates


def make_images(labels, rng):
    """uint8 (n, 28, 28): the template of each label with 10 % of its pixels flipped."""
    images = class_templates()[labels]
    images ^= rng.rand(*images.shape) < 0.1
    return images.astype(np.uint8) * 255


def write_mnist_files(root, dataset="mnist", n_train=600, n_test=200, seed=0):
    """Write {train,t10k}-{images-idx3,labels-idx1}-ubyte under ROOT/<MNIST|FashionMNIST>/raw/.

    Labels are uniform over 0..9 (RandomState(seed)). Returns the raw folder.
    """
    folder = Path(root) / FOLDERS[dataset] / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.randint(0, 10, n)
        _write_idx(folder / f"{split}-images-idx3-ubyte", make_images(labels, rng))
        _write_idx(folder / f"{split}-labels-idx1-ubyte", labels)
    return folder


def write_debian_archives(source, folder):
    """Gzip the four idx files of `source` into `folder`, as the Debian package ships Fashion-MNIST."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in IDX_NAMES:
        with open(Path(source) / name, "rb") as src, gzip.open(folder / f"{name}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    return folder
