"""Colored MNIST: a digit's colour predicts its label better than its shape, but not at test time.

Construction, shared by both protocols (numpy Generator seeded from --seed, draws in this order):
1. binary label y = 1[digit >= 5]; flip y with probability 0.25 (label noise: shape predicts y
   at best 75 % of the time);
2. colour c = y flipped with probability p_env (c = 0: red channel, c = 1: green channel), so
   colour agrees with y with probability 1 - p_env: 0.8 and 0.9 in the two training
   environments, 0.1 in the test environment.

Protocols:
- ``original`` (Parascandolo et al.): the first 60 000 training images in order, split into three
  contiguous thirds (envs 0, 1 and test with p = 0.2, 0.1, 0.9); 28×28, 3 channels (the third is
  always empty); pixels x/255 normalised with means (0.1307, 0.1307, 0) and std 0.3081.
- ``irm`` (Arjovsky et al., 2019): the first 5/6 of the training images (50 000) shuffled, even
  positions env 0 (p = 0.2), odd positions env 1 (p = 0.1); the last 1/6 (10 000) the test env
  (p = 0.9); images subsampled to 14×14 (every second row and column), 2 channels, x/255.
  (The IRM code's label is 1[digit < 5]; using 1[digit >= 5] for both only swaps the classes.)
With fewer images (tests) the same fractions apply.

Images are kept as grey uint8 and coloured per batch (a 3-channel float copy of 60 000 images
would take 560 MB). The prepared tensors are cached in <data_path>/cache/ under a name that holds
every construction parameter and a fingerprint of the source files.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from and_mask.core.errors import RunError
from and_mask.core.files import atomic_write, load_torch, warn
from and_mask.datasets.mnist import DEFAULT_DATA_PATH, RAW_FILES, has_raw_files, load_mnist, raw_folder

LABEL_NOISE = 0.25
CACHE_VERSION = 1  # bump when the construction changes, so that old caches are not reused


@dataclass(frozen=True)
class Protocol:
    side: int  # image side after subsampling
    channels: int
    flips: tuple  # colour-flip probability of env 0, env 1, test env
    mean: tuple  # per-channel normalisation of x/255
    std: tuple

    @property
    def n_inputs(self) -> int:
        return self.channels * self.side * self.side


PROTOCOLS = {
    "original": Protocol(28, 3, (0.2, 0.1, 0.9), (0.1307, 0.1307, 0.0), (0.3081, 0.3081, 0.3081)),
    "irm": Protocol(14, 2, (0.2, 0.1, 0.9), (0.0, 0.0), (1.0, 1.0)),
}
TEST_ENV = 2


def _split_indices(n_images: int, protocol: str, rng: np.random.Generator):
    """Indices into the training file of env 0, env 1 and the test env."""
    n = min(n_images, 60000)
    if protocol == "original":
        third = n // 3
        return [np.arange(e * third, (e + 1) * third) for e in range(3)]
    n_test = n // 6
    train = rng.permutation(n - n_test)
    return [train[0::2], train[1::2], np.arange(n - n_test, n)]


def construct(images: torch.Tensor, digits: torch.Tensor, protocol: str, seed: int) -> dict:
    """Environments of Colored MNIST from grey uint8 images (N, 28, 28) and digit labels (N,).

    Returns {"images": uint8 (n, side, side), "labels": int64 (n,), "colors": int64 (n,),
    "envs": int64 (n,) in {0, 1, 2 (test)}}, environments one after the other.
    """
    spec = PROTOCOLS[protocol]
    rng = np.random.default_rng(seed % 2 ** 32)
    envs = _split_indices(len(images), protocol, rng)
    order = np.concatenate(envs)
    env_of = np.concatenate([np.full(len(idx), e) for e, idx in enumerate(envs)])
    flip_p = np.asarray(spec.flips)[env_of]
    labels = (digits.numpy()[order] >= 5).astype(np.int64)
    labels ^= rng.random(len(order)) < LABEL_NOISE
    colors = labels ^ (rng.random(len(order)) < flip_p)
    step = 28 // spec.side
    return {"images": images[torch.from_numpy(order)][:, ::step, ::step].contiguous(),
            "labels": torch.from_numpy(labels), "colors": torch.from_numpy(colors.astype(np.int64)),
            "envs": torch.from_numpy(env_of.astype(np.int64))}


def _fingerprint(folder: Path) -> str:
    """Short hash of the training files' sizes and modification times (detects replaced data)."""
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (folder / n for n in RAW_FILES[:2])]
    return hashlib.sha1(repr(stats).encode()).hexdigest()[:10]


def _check_cache(stored, header: dict, spec: Protocol) -> str | None:
    """What is wrong with a loaded cache file, or None."""
    if not isinstance(stored, dict) or not isinstance(stored.get("tensors"), dict):
        return "not a Colored MNIST cache"
    saved = stored.get("header", {})
    if not isinstance(saved, dict) or any(saved.get(k) != v for k, v in header.items()):
        return "built with other parameters"
    tensors = stored["tensors"]
    if not all(isinstance(tensors.get(k), torch.Tensor) for k in ("images", "labels", "colors", "envs")):
        return "tensors missing"
    n = len(tensors["images"])
    if tensors["images"].dtype != torch.uint8 or tensors["images"].shape[1:] != (spec.side, spec.side) \
            or any(tensors[k].shape != (n,) or tensors[k].dtype != torch.int64 for k in ("labels", "colors", "envs")):
        return "tensors of the wrong shape or type"
    if n == 0 or tensors["envs"].min() < 0 or tensors["envs"].max() > TEST_ENV \
            or tensors["colors"].min() < 0 or tensors["colors"].max() >= spec.channels:
        return "values out of range"
    return None


def prepared(dataset: str, protocol: str, seed: int, data_path=None, cache: bool = True) -> dict:
    """`construct` applied to the training file of `dataset`, cached under <data_path>/cache/.

    A damaged cache file (unreadable, or with the wrong content) is rebuilt, with a warning.
    Concurrent runs may build the same file: each writes its own temporary and renames it.
    """
    root = Path(DEFAULT_DATA_PATH if data_path is None else data_path)
    images, digits = None, None
    folder = raw_folder(dataset, root)
    if not has_raw_files(folder):  # load_mnist fetches the files or explains what is missing
        images, digits = load_mnist(dataset, root, train=True)
    path = root / "cache" / (f"colored_mnist-v{CACHE_VERSION}-{dataset}-{protocol}-seed{seed}-"
                             f"src{_fingerprint(folder)}.pt")
    header = {"dataset": dataset, "protocol": protocol, "seed": seed, "label_noise": LABEL_NOISE,
              "version": CACHE_VERSION}
    if cache and path.exists():
        try:
            stored = load_torch(path, "Colored MNIST cache")
            problem = _check_cache(stored, header, PROTOCOLS[protocol])
        except RunError as error:
            problem = str(error)
        if problem is None:
            return stored["tensors"]
        warn(f"rebuilding the damaged cache {path}: {problem}")
    if images is None:
        images, digits = load_mnist(dataset, root, train=True)
    tensors = construct(images, digits, protocol, seed)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = {"header": {**header, "n_source_images": len(images)}, "tensors": tensors}
        atomic_write(path, lambda tmp: torch.save(stored, tmp))
    return tensors


def relabel(labels: torch.Tensor, fraction: float, n_classes: int, seed: int):
    """Give round(fraction·N) examples, chosen without replacement, a uniform label in 0..n_classes-1.

    A fresh label may equal the old one (probability 1/n_classes). Returns (new labels, sorted
    indices of the relabelled examples). Uses its own generator so the construction's draws do
    not depend on the fraction.
    """
    rng = np.random.default_rng([seed % 2 ** 32, 1])
    n = round(fraction * len(labels))
    chosen = np.sort(rng.choice(len(labels), size=n, replace=False))
    new = labels.clone()
    new[torch.from_numpy(chosen)] = torch.from_numpy(rng.integers(0, n_classes, size=n))
    return new, torch.from_numpy(chosen)


class ColoredImages(Dataset):
    """Indexed by a list of positions, returns a whole batch: (inputs float32 (b, C·side²), labels).

    The grey image x/255 goes into the channel of its colour, the other channels stay 0, then
    each channel is normalised (x - mean_c) / std_c and the image is flattened. `rows` selects
    the examples (an environment, the relabelled subset); the tensors are shared, not copied.
    """

    def __init__(self, images, colors, labels, protocol: str, rows=None):
        spec = PROTOCOLS[protocol]
        self.images, self.colors, self.labels, self.protocol = images, colors, labels, protocol
        self.rows = torch.arange(len(labels)) if rows is None else torch.as_tensor(rows)
        self.channels = spec.channels
        self.mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std).view(1, -1, 1, 1)

    def subset(self, positions):
        """The examples at `positions` of this set (positions index self.rows)."""
        return ColoredImages(self.images, self.colors, self.labels, self.protocol, self.rows[positions])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, positions):
        rows = self.rows[torch.as_tensor(positions)]
        colors = self.colors[rows]
        grey = self.images[rows].float() / 255
        # The channels without the image hold (0 − mean_c) / std_c: written once, then the image's
        # channel is normalised alone (the same numbers as normalising every channel, in one pass).
        background = (0 - self.mean) / self.std
        x = background.expand(len(rows), self.channels, *grey.shape[1:]).clone()
        mean, std = self.mean.view(-1)[colors].view(-1, 1, 1), self.std.view(-1)[colors].view(-1, 1, 1)
        x[torch.arange(len(rows)), colors] = (grey - mean) / std
        return x.flatten(1), self.labels[rows]


def batch_loader(dataset, batch_size, train, num_workers=0):
    """Shuffled batches with drop_last for training, sequential batches for evaluation.

    Workers are not kept between epochs: a DataLoader draws its workers' base seed from torch's
    global RNG whenever it starts them, so persistent workers would make the numbers depend on
    whether there are workers, and a resumed run (which starts them again) differ from an
    uninterrupted one.
    """
    sampler = RandomSampler(dataset) if train else SequentialSampler(dataset)
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=train), batch_size=None,
                      num_workers=num_workers)
