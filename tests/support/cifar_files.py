"""Tiny CIFAR-10 data sets written to disk for tests (not a test module).

`write_cifar10_files` writes the python-pickle batches of torchvision's layout,
ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}, so that tests go through
the same reading code as real runs. Each class c is a fixed random colour pattern (the same in
train and test) plus pixel noise, so the classes are learnable.
"""
import pickle
from pathlib import Path

import numpy as np

TEMPLATE_SEED = 54321
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_images(labels, rng):
    """uint8 (n, 3072) rows in CHW order: the class template plus uniform noise in [-40, 40]."""
    templates = np.random.RandomState(TEMPLATE_SEED).randint(40, 216, size=(10, 3 * 32 * 32))
    noise = rng.randint(-40, 41, size=(len(labels), 3 * 32 * 32))
    return np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)


def _write_batch(path, images, labels, name):
    with open(path, "wb") as f:
        pickle.dump({"batch_label": name, "labels": [int(v) for v in labels], "data": images,
                     "filenames": [f"{name}_{i}.png" for i in range(len(labels))]}, f)


def write_cifar10_files(root, n_train_per_batch=4, n_test=8, seed=0):
    """Write 5 training batches of `n_train_per_batch` images and one test batch of `n_test`.

    Labels are uniform over 0..9 (RandomState(seed)). Returns the cifar-10-batches-py folder.
    """
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(1, 6):
        labels = rng.randint(0, 10, n_train_per_batch)
        _write_batch(folder / f"data_batch_{i}", make_images(labels, rng), labels, f"training batch {i} of 5")
    labels = rng.randint(0, 10, n_test)
    _write_batch(folder / "test_batch", make_images(labels, rng), labels, "testing batch 1 of 1")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": LABEL_NAMES, "num_cases_per_batch": n_train_per_batch, "num_vis": 3072}, f)
    return folder
