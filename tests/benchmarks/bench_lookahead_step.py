"""Cost of one lookahead-alignment training step, as a multiple of one plain averaged step.

The synthetic task's model and optimiser (MLP with 3 hidden layers of 256, 10 inputs, Adam) on
16 environments × 256 examples of random data (the cost does not depend on the values). Every
step is the training loop's own (`Trainer._step`, then the optimiser step):

- mean:           one ordinary backward pass of the mean loss (the reference, ratio 1);
- and_mask:       per-environment gradients (auto engine) and the AND-mask (τ = 1);
- lookahead K=k:  the same gradients, then k inner steps on the environment weights, each with
                  two exact Hessian-vector products per environment (`and_mask.core.per_env_hvp`).

With --batch_norm 1 the model has BatchNorm, so gradients and products go through the shared
graph. Timed in one process with interleaved repeats, so machine noise affects all steps alike.

    python tests/benchmarks/bench_lookahead_step.py [--inner_steps 1 5] [--repeats 20] [--threads 1]
"""
import argparse

import torch
import torch.nn.functional as F
from timing import interleaved_medians, print_ratios

from and_mask.core.training import Trainer, TrainSetup
from and_mask.models import MLP
from gen_mask.gen_mask_utils import COMBINERS


def make_step(model, method, hparams, x, y, n_envs):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    setup = TrainSetup(model=model, optimizer=optimizer, loss_fn=F.binary_cross_entropy_with_logits,
                       train_batches=None, eval_loaders={}, epochs=1)
    combiner = COMBINERS[method]
    trainer = Trainer(setup, combiner, {**combiner.defaults(), **hparams}, runlog=None, device=torch.device("cpu"),
                      quiet=True)

    def step():
        trainer._step(x, y, n_envs)
        optimizer.step()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner_steps", type=int, nargs="+", default=[1, 5], help="values of --lookahead_steps")
    parser.add_argument("--n_envs", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=256, help="examples per environment")
    parser.add_argument("--n_hidden_units", type=int, default=256)
    parser.add_argument("--n_hidden_layers", type=int, default=3)
    parser.add_argument("--batch_norm", type=int, choices=[0, 1], default=0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_inputs = 2 + 8
    x = torch.randn(args.n_envs * args.batch_size, n_inputs)
    y = torch.randint(0, 2, (args.n_envs * args.batch_size,)).float()
    model = MLP(n_inputs, args.n_hidden_units, args.n_hidden_layers, 1, bool(args.batch_norm))
    steps = {"mean": make_step(model, "mean", {}, x, y, args.n_envs),
             "and_mask": make_step(model, "and_mask", {"agreement_threshold": 1.0}, x, y, args.n_envs)}
    for k in args.inner_steps:
        steps[f"lookahead K={k}"] = make_step(model, "lookahead", {"lookahead_steps": k}, x, y, args.n_envs)
    medians = interleaved_medians(steps, args.repeats)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"MLP {n_inputs} → {args.n_hidden_layers} × {args.n_hidden_units} → 1 ({n_params} parameters"
          f"{', BatchNorm' if args.batch_norm else ''}), {args.n_envs} environments × {args.batch_size} examples, "
          f"{args.threads} thread(s), median of {args.repeats} interleaved repeats")
    print_ratios(medians, "mean")


if __name__ == "__main__":
    main()
