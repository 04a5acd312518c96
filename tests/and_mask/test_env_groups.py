"""How a synthetic run draws the groups of environments each step combines (G = --n_agreement_envs,
--envs_per_step in gen_mask), checked draw for draw against the original run_synthetic."""
import json

import numpy as np
import pytest

from and_mask.and_mask_utils import METHOD_FLAGS as AND_MASK_FLAGS
from and_mask.core import cli
from and_mask.experiments import synthetic
from gen_mask.gen_mask_utils import METHOD_FLAGS as GEN_MASK_FLAGS

SMALL = ["--protocol", "original", "--examples_per_env", "64", "--n_test", "50", "--batch_size", "16",
         "--n_hidden_units", "8", "--n_hidden_layers", "1", "--quiet", "--use_cuda", "0"]
PACKAGES = {
    "and_mask": (AND_MASK_FLAGS, ["--n_train_envs", "8", "--n_agreement_envs", "2", "--method", "and_mask",
                                  "--agreement_threshold", "1", "--scale_grad_inverse_sparsity", "1"]),
    "gen_mask": (GEN_MASK_FLAGS, ["--n_envs", "8", "--envs_per_step", "2", "--method", "and_mask"]),
}


def original_groups(n_envs, group_size, batches_per_env, epochs, seed):
    """The groups the original run_synthetic trains on, step by step.

    Written from the original code: numpy's global generator is seeded once; every epoch builds
    fresh loader iterators and a fresh `permutation_groups` generator, which draws
    `np.random.permutation(n_envs)` each time it starts a cycle and yields its consecutive blocks of
    `group_size`; a step calls next() on the group's iterators in order, and the epoch ends at the
    first exhausted one (so the permutation drawn for the group that ends it is consumed too).
    """
    np.random.seed(seed)
    steps = []
    for _ in range(epochs):
        left = [batches_per_env] * n_envs

        def groups():
            while True:
                yield from np.random.permutation(n_envs).reshape(-1, group_size).tolist()

        draws = groups()
        while True:
            group = next(draws)
            exhausted = False
            for env in group:
                if left[env] == 0:
                    exhausted = True
                    break
                left[env] -= 1
            if exhausted:
                break
            steps.append(tuple(group))
    return steps


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_groups_are_drawn_as_the_original_code_draws_them(package, tmp_path, monkeypatch):
    drawn = []

    def recording(loaders, group_size):
        for inputs, target, n_envs, env_ids in real(loaders, group_size):
            drawn.append(env_ids)
            yield inputs, target, n_envs, env_ids

    real = synthetic.env_group_batches
    monkeypatch.setattr(synthetic, "env_group_batches", recording)
    method_flags, flags = PACKAGES[package]
    cli.main(synthetic, method_flags, package, SMALL + flags + ["--epochs", "3", "--seed", "7",
                                                                "--output_dir", str(tmp_path)])
    expected = original_groups(8, 2, 64 // 16, 3, seed=7)
    assert len(drawn) == len(expected) == 3 * 4 * 8 // 2
    assert drawn == expected
    # Each cycle of a permutation uses every environment once, and the drawing is not the identity.
    assert all(sorted(sum(drawn[i:i + 4], ())) == list(range(8)) for i in range(0, len(drawn), 4))
    assert drawn[:4] != [(0, 1), (2, 3), (4, 5), (6, 7)]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_config_records_the_group_size(package, tmp_path):
    method_flags, flags = PACKAGES[package]
    cli.main(synthetic, method_flags, package, SMALL + flags + ["--epochs", "1", "--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "config.json").read_text())["flags"]
    assert saved["n_agreement_envs" if package == "and_mask" else "envs_per_step"] == 2


def test_gen_mask_records_all_environments_when_no_group_size_is_given(tmp_path):
    flags = [f for f in PACKAGES["gen_mask"][1] if f not in ("--envs_per_step", "2")]
    cli.main(synthetic, GEN_MASK_FLAGS, "gen_mask", SMALL + flags + ["--epochs", "1", "--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "config.json").read_text())["flags"]
    assert saved["envs_per_step"] == saved["n_envs"] == 8
