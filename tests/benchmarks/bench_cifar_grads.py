"""Cost of one per-example AND-mask step of FastResnet per engine, relative to the original loop.

Every example of a CIFAR-sized batch is its own environment (τ > 0 in run_cifar). One step =
per-example gradients + AND-mask (τ = 0.2, rescaling) + AdamFlexibleWeightDecay step, in
training mode (BatchNorm batch statistics). `loop` and `shared` are exact; `vmap` normalises
every example with its own statistics (a different model: opt-in only). "plain" is one ordinary
backward pass of the batch's mean loss (τ = 0). Engines are interleaved within each repeat in
one process, so machine noise affects them alike; the ratios are what to compare.

    python tests/benchmarks/bench_cifar_grads.py [--batch_size 8] [--chunk_size 4] [--repeats 5] [--device cpu]
"""
import argparse
from functools import partial

import torch
import torch.nn.functional as F
from timing import and_mask_step, interleaved_medians, print_ratios

from and_mask.core.optim import AdamFlexibleWeightDecay
from and_mask.models import FastResnet

HPARAMS = {"agreement_threshold": 0.2, "scale_grad_inverse_sparsity": 1}


def plain_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def masked_step(engine, chunk_size=None):
    return and_mask_step(engine, F.cross_entropy, HPARAMS, chunk_size=chunk_size)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=8, help="examples per step = environments")
    parser.add_argument("--chunk_size", type=int, default=4,
                        help="environments per batched backward of 'shared, chunks of N'")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = FastResnet().to(device).train()
    opt = AdamFlexibleWeightDecay(model.parameters(), lr=5e-4, weight_decay=1e-6, weight_decay_order="before")
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    steps = {"plain (tau=0)": plain_step, "loop": masked_step("loop"), "shared": masked_step("shared"),
             f"shared, chunks of {args.chunk_size}": masked_step("shared", args.chunk_size),
             "vmap (opt-in)": masked_step("vmap")}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    medians = interleaved_medians({name: partial(step, model, opt, x, y) for name, step in steps.items()},
                                  args.repeats, warmup=1, synchronise=sync)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, FastResnet, batch {args.batch_size} (one environment per "
          f"example), median of {args.repeats}")
    print_ratios(medians, "loop", unit="s")

if __name__ == "__main__":
    main()
