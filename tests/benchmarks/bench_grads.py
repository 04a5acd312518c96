"""Cost of one masked training step per engine, relative to one plain averaged step.

The synthetic MLP (16 envs × 256 examples, 3 hidden layers of 256) on the same batch; every
step = per-environment gradients + AND-mask (τ = 1, rescaling) + Adam step. Ratios are measured
in one process with interleaved repeats, so machine noise affects all engines alike.

    python tests/benchmarks/bench_grads.py [--repeats 30] [--threads N]
"""
import argparse
from functools import partial

import torch
import torch.nn.functional as F
from timing import and_mask_step, interleaved_medians, print_ratios

from and_mask.core.per_env_grads import env_losses_from_output
from and_mask.models import MLP

N_ENVS, BATCH, N_DIMS, HIDDEN, LAYERS = 16, 256, 8, 256, 3
HPARAMS = {"agreement_threshold": 1.0, "scale_grad_inverse_sparsity": 1}


def plain_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    env_losses_from_output(model(x), y, F.binary_cross_entropy_with_logits, N_ENVS).mean().backward()
    opt.step()


def masked_step(engine):
    return and_mask_step(engine, F.binary_cross_entropy_with_logits, HPARAMS, N_ENVS)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MLP(2 + N_DIMS, HIDDEN, LAYERS, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(N_ENVS * BATCH, 2 + N_DIMS)
    y = torch.randint(0, 2, (N_ENVS * BATCH,)).float()
    steps = {"plain": plain_step, **{f"auto ({engine})" if engine == "vmap" else engine: masked_step(engine)
                                     for engine in ("vmap", "shared", "loop")}}
    medians = interleaved_medians({name: partial(step, model, opt, x, y) for name, step in steps.items()},
                                  args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {N_ENVS} envs x {BATCH} examples, "
          f"MLP {LAYERS}x{HIDDEN}, median of {args.repeats}")
    print_ratios(medians, "plain")

if __name__ == "__main__":
    main()
