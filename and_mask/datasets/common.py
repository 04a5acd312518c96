"""Iteration over environments shared by the experiments."""
import numpy as np
import torch


def permutation_groups(items, group_size, rng=np.random):
    """Yield groups of `group_size` items forever, cycling through all items before repeating one.

    Each cycle is a fresh random permutation drawn from `rng` (numpy's global RNG by default, as
    in the original code, seeded from --seed).
    """
    n = len(items)
    if n % group_size:
        raise ValueError(f"{n} items cannot be split into groups of {group_size}")
    while True:
        for idxs in rng.permutation(n).reshape(-1, group_size):
            yield [items[i] for i in idxs]


def env_group_batches(loaders, group_size, rng=np.random):
    """One epoch of training batches drawn from groups of environments.

    Each step takes the next batch of every loader in the current group (groups come from
    `permutation_groups`) and yields (inputs, target, n_envs, env_ids) with the environments
    stacked env after env; env_ids are the indices of the group's loaders. The epoch ends at the
    first exhausted loader, as in the original code.
    """
    iterators = [iter(loader) for loader in loaders]
    groups = permutation_groups(range(len(loaders)), group_size, rng)
    while True:
        group = next(groups)
        try:
            batches = [next(iterators[i]) for i in group]
        except StopIteration:
            return
        yield torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), group_size, tuple(group)
