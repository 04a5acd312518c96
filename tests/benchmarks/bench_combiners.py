"""Milliseconds per training step spent in each registered combiner, next to the per-environment
gradients themselves, on the synthetic MLP (16 envs × 256 examples, 3 hidden layers of 256).

Repeats are interleaved over combiners so that machine noise affects all alike; the median is
reported. Combiners are called at their default hyper-parameters through `apply_combiner`; a
combiner that needs Hessian-vector products gets the training loop's exact ones, whose cost it
includes.

    python tests/benchmarks/bench_combiners.py [--repeats 20] [--threads 1]
"""
import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from bench_align_weights import HIDDEN, LAYERS, N_DIMS, N_ENVS, batches  # same model and data

from and_mask.core.combiners import apply_combiner
from and_mask.core.per_env_grads import per_env_grads
from and_mask.core.per_env_hvp import env_hvp
from and_mask.models import MLP
from gen_mask.gen_mask_utils import COMBINERS


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MLP(2 + N_DIMS, HIDDEN, LAYERS, 1)
    inputs, target = next(batches(1))

    def grads_step():
        return per_env_grads(model, inputs, target, F.binary_cross_entropy_with_logits, N_ENVS).grads

    grads = grads_step()
    hvp = env_hvp(model, inputs, target, F.binary_cross_entropy_with_logits, N_ENVS)
    tasks = {"per-env gradients (vmap)": grads_step}
    for name in sorted(COMBINERS):
        combiner = COMBINERS[name]
        tasks[name] = lambda c=combiner: apply_combiner(c, grads, c.defaults(), hvp if c.needs_hvp else None)
    times = {name: [] for name in tasks}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for task in tasks.values():  # warm-up
            task()
        for _ in range(args.repeats):
            for name, task in tasks.items():
                started = time.perf_counter()
                task()
                times[name].append(time.perf_counter() - started)
    print(f"torch threads {torch.get_num_threads()}, {args.repeats} repeats, median ms per step")
    print("| step part | ms |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {1e3 * statistics.median(values):.1f} |")


if __name__ == "__main__":
    main()
