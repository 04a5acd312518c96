"""Cost of one per-example AND-mask step on Colored MNIST, relative to one plain averaged step.

The original protocol's model (logistic regression 3·28·28 → 10 logits, or an MLP with
--n_hidden_layers), a batch of 100 coloured images where every example is its own environment
(E = 100, B = 1). Each step goes through the training loop's own step (`Trainer._step`:
per-environment gradients with the auto engine, AND-mask with τ = 1 and rescaling, written into
param.grad) followed by the AdamFlexibleWeightDecay step; the plain step is the same call with
τ = 0, which the loop runs as one ordinary backward pass. Both are timed in one process with
interleaved repeats, so machine noise affects them alike. No data set is needed (random digits).

    python tests/benchmarks/bench_colored_mnist_step.py [--repeats 200] [--n_hidden_layers 0] [--n_hidden_units 784]
"""
import argparse
import statistics
import time

import torch

from and_mask.and_mask_utils import AND_MASK
from and_mask.core.optim import AdamFlexibleWeightDecay
from and_mask.core.training import Trainer, TrainSetup
from and_mask.datasets.colored_mnist import PROTOCOLS, ColoredImages
from and_mask.experiments.colored_mnist import loss_for
from and_mask.models import MLP

BATCH, N_OUTPUTS = 100, 10


def make_trainer(model, threshold):
    optimizer = AdamFlexibleWeightDecay(model.parameters(), lr=1e-3, weight_decay=1e-3, weight_decay_order="before")
    setup = TrainSetup(model=model, optimizer=optimizer, loss_fn=loss_for(N_OUTPUTS), train_batches=None,
                       eval_loaders={}, epochs=1)
    hparams = {"agreement_threshold": threshold, "scale_grad_inverse_sparsity": 1}
    return Trainer(setup, AND_MASK, hparams, runlog=None, device=torch.device("cpu"), quiet=True)


def timed_step(trainer, x, y):
    start = time.perf_counter()
    trainer._step(x, y, len(y))
    trainer.setup.optimizer.step()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--n_hidden_layers", type=int, default=0)
    parser.add_argument("--n_hidden_units", type=int, default=28 * 28)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = PROTOCOLS["original"]
    images = torch.randint(0, 256, (BATCH, 28, 28), dtype=torch.uint8)
    data = ColoredImages(images, torch.randint(0, 2, (BATCH,)), torch.randint(0, 2, (BATCH,)), "original")
    x, y = data[list(range(BATCH))]
    model = MLP(spec.n_inputs, args.n_hidden_units, args.n_hidden_layers, N_OUTPUTS)
    plain, masked = make_trainer(model, 0.0), make_trainer(model, 1.0)
    assert plain.plain and not masked.plain
    times = {"plain": [], "masked": []}
    for _ in range(10):  # warm-up (vmap tracing, allocator)
        timed_step(plain, x, y), timed_step(masked, x, y)
    for _ in range(args.repeats):
        times["plain"].append(timed_step(plain, x, y))
        times["masked"].append(timed_step(masked, x, y))
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {spec.n_inputs} inputs, {args.n_hidden_layers} hidden layers of {args.n_hidden_units}, "
          f"{N_OUTPUTS} outputs ({n_params} parameters); "
          f"batch {BATCH} examples = {BATCH} environments; {args.threads} thread(s), {args.repeats} repeats")
    print(f"plain step   {1e3 * med['plain']:.2f} ms (median)")
    print(f"masked step  {1e3 * med['masked']:.2f} ms (median)")
    print(f"ratio masked / plain: {med['masked'] / med['plain']:.2f}")


if __name__ == "__main__":
    main()
