"""Timing shared by the benchmarks: interleaved repeats in one process, medians and ratios.

Each repeat runs every step once, in turn, so that load from other processes on a shared
machine affects all steps alike; the ratios to a reference step are what to compare.
"""
import statistics
import time

from and_mask.and_mask_utils import AND_MASK
from and_mask.core.combiners import apply_combiner
from and_mask.core.per_env_grads import per_env_grads


def and_mask_step(engine, loss_fn, hparams, n_envs=None, chunk_size=None):
    """A training step: per-environment gradients (`engine`), AND-mask, optimiser step.

    `n_envs` None makes every example its own environment."""
    def step(model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        result = per_env_grads(model, x, y, loss_fn, n_envs or x.shape[0], engine=engine, chunk_size=chunk_size)
        combined, _ = apply_combiner(AND_MASK, result.grads, hparams)
        for p, g in zip(model.parameters(), combined):
            p.grad = g
        opt.step()
    return step


def interleaved_medians(steps: dict, repeats: int, warmup: int = 3, synchronise=lambda: None) -> dict:
    """Median seconds of each zero-argument callable in `steps` over `repeats` interleaved runs."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronise()
            start = time.perf_counter()
            step()
            synchronise()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def print_ratios(medians: dict, reference: str, unit: str = "ms"):
    scale = 1000 if unit == "ms" else 1
    width = max(len(name) for name in medians) + 2
    print(f"{'step':<{width}}{unit:>9}{'x ' + reference:>{max(9, len(reference) + 4)}}")
    for name, seconds in medians.items():
        print(f"{name:<{width}}{scale * seconds:>9.2f}{seconds / medians[reference]:>{max(9, len(reference) + 4)}.2f}")
