"""Spirals with signatures: the synthetic task of Parascandolo et al. (2021), draw for draw.

Each example is a point on one of two interleaved spirals (the label, learnable and shared by
all environments) concatenated with an n_dims "signature" that is a perfect shortcut inside a
training environment (signature = S[env] * (2y - 1)) but differs across environments. The test
set's signatures are pure noise, so only a model that learned the spiral beats 50 %.
"""
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

TEST_SEED = 2 ** 32 - 1


def get_spirals_dataset(n_examples, n_rotations, env, n_envs, n_dims_signatures, seed=None, signature_std=1.0):
    """Return (inputs float32 (n, 2 + n_dims), labels float32 (n,)) for env 0..n_envs-1 or "test".

    numpy RandomState(seed) draws, in this order: the signature matrix S (n_envs, n_dims);
    radii r ~ U(0.08, 1); labels y ~ randint(0, 2); radius noise U(-0.02, 0.02); and, for the
    test env only, random signatures. Angles are 2·n_rotations·π·r + π·y. The two spiral
    coordinates are divided by their per-column standard deviation. Signatures (S and the test
    env's) are standard normal draws times `signature_std`: S_e,i ~ N(0, signature_std²); the
    original code's 1 leaves the draws untouched.
    """
    if not (env == "test" or 0 <= int(env) < n_envs):
        raise ValueError(f"env must be 'test' or an int in [0, {n_envs}), got {env!r}")
    rng = np.random.RandomState(seed)
    signatures_matrix = rng.randn(n_envs, n_dims_signatures) * signature_std
    radii = rng.uniform(0.08, 1, n_examples)
    angles = 2 * n_rotations * np.pi * radii
    labels = rng.randint(0, 2, n_examples)
    angles = angles + np.pi * labels
    radii += rng.uniform(-0.02, 0.02, n_examples)
    spiral = np.stack((np.cos(angles) * radii, np.sin(angles) * radii), axis=1)
    if env == "test":
        signatures = rng.randn(n_examples, n_dims_signatures) * signature_std
    else:
        signatures = signatures_matrix[int(env)] * (labels * 2 - 1).reshape(-1, 1)
    spiral /= spiral.std(axis=0)
    inputs = np.hstack((spiral, signatures))
    return inputs.astype(np.float32), labels.astype(np.float32)


def make_loader(n_examples, env, n_envs, n_revolutions, n_dims, batch_size, seed, train=True, signature_std=1.0):
    inputs, labels = get_spirals_dataset(n_examples, n_revolutions, env, n_envs, n_dims, seed=seed,
                                         signature_std=signature_std)
    return _loader(inputs, labels, batch_size, train)


def _loader(inputs, labels, batch_size, train):
    dataset = TensorDataset(torch.from_numpy(inputs), torch.from_numpy(labels))
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train)


def held_out(examples_per_env: int, holdout_fraction: float) -> int:
    """Examples of each training environment held out for validation: floor(fraction · examples)."""
    return int(holdout_fraction * examples_per_env)


def make_loaders(examples_per_env, n_test, n_envs, n_revolutions, n_dims, batch_size, seed, signature_std=1.0,
                 holdout_fraction=0.0):
    """Training loaders (env e uses seed + e; shuffled, drop_last), the test loader and the validation loader.

    With `holdout_fraction` > 0 the last `held_out(examples_per_env, holdout_fraction)` examples
    drawn for each training environment (a random subset: the draws are independent) are not
    trained on; together they form the validation set, data of the training environments. With 0
    nothing is held out, the draws are exactly those without the split, and the validation loader
    is None.
    """
    train, held = [], []
    n_held = held_out(examples_per_env, holdout_fraction)
    for env in range(n_envs):
        inputs, labels = get_spirals_dataset(examples_per_env, n_revolutions, env, n_envs, n_dims, seed=seed + env,
                                             signature_std=signature_std)
        kept = examples_per_env - n_held
        train.append(_loader(inputs[:kept], labels[:kept], batch_size, train=True))
        held.append((inputs[kept:], labels[kept:]))
    test = make_loader(n_test, "test", n_envs, n_revolutions, n_dims, 1000, TEST_SEED, train=False,
                       signature_std=signature_std)
    val = _loader(np.concatenate([x for x, _ in held]), np.concatenate([y for _, y in held]), 1000,
                  train=False) if n_held else None
    return train, test, val
