"""Environment parallelism: step time with K ranks against 1, time in communication, bytes per step.

Each rank count is one `torchrun --standalone` launch of this script in worker mode, every rank
with --threads CPU threads (gloo on the CPU). Every step is the training loop's own
(`Trainer._step` and the optimiser step), timed on rank 0 after a barrier, median of --repeats.

- fastresnet: every example of a batch of --batch_size its own environment, BatchNorm exact
  (every rank forwards the whole batch and back-propagates its share), AND-mask τ = 0.2.
- synthetic: the synthetic task's MLP (3 hidden layers of 256), --n_envs environments of 256
  examples, AND-mask τ = 1 (vmap engine: each rank forwards only its environments).
- bytes: the payload of one synthetic step's collectives per combiner, against
  DistributedDataParallel's one all-reduce of the mean gradient (4 bytes per parameter).
  Payload = the bytes handed to the collectives; a ring all-reduce of N bytes sends about
  2(K-1)/K·N per rank, a ring all-gather of N bytes (K·rows·P) about (K-1)/K·N.

    python tests/benchmarks/bench_distributed.py [--ranks 1,2] [--threads 1] [--repeats 20]
        [--batch_size 8] [--n_envs 16] [--cases fastresnet,synthetic,bytes]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from and_mask.core import distributed
from and_mask.core.env_split import EnvSplit
from and_mask.core.optim import AdamFlexibleWeightDecay
from and_mask.core.training import Trainer, TrainSetup
from and_mask.models import MLP, FastResnet
from gen_mask.gen_mask_utils import COMBINERS

ROOT = Path(__file__).resolve().parents[2]
CASES = ("fastresnet", "synthetic", "bytes")
BYTES_METHODS = ("mean", "and_mask", "majority_vote", "geom_mean", "sand_mask", "median", "pcgrad", "mgda")
SYNTHETIC_BATCH, SYNTHETIC_INPUTS = 256, 10


def fastresnet(batch_size):
    torch.manual_seed(0)
    model = FastResnet().train()
    x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
    return model, x, y, batch_size, F.cross_entropy


def synthetic(n_envs):
    torch.manual_seed(0)
    model = MLP(SYNTHETIC_INPUTS, 256, 3, 1)
    x = torch.randn(n_envs * SYNTHETIC_BATCH, SYNTHETIC_INPUTS)
    y = torch.randint(0, 2, (n_envs * SYNTHETIC_BATCH,)).float()
    return model, x, y, n_envs, F.binary_cross_entropy_with_logits


def trainer(world, problem, method, hparams):
    model, x, y, n_envs, loss_fn = problem
    optimizer = AdamFlexibleWeightDecay(model.parameters(), lr=1e-4, weight_decay=0.0, weight_decay_order="before")
    setup = TrainSetup(model, optimizer, loss_fn, None, {}, 1)
    combiner = COMBINERS[method]
    return Trainer(setup, combiner, {**combiner.defaults(), **hparams}, None, world.device, quiet=True,
                   split=EnvSplit(world)), x, y, n_envs


def time_steps(world, problem, method, hparams, repeats):
    """Median seconds per step on rank 0, and communication seconds and bytes per step."""
    run, x, y, n_envs = trainer(world, problem, method, hparams)
    run._step(x, y, n_envs)  # warm-up (vmap tracing, allocator)
    world.traffic.clear()
    times = []
    for _ in range(repeats):
        if world.size > 1:
            dist.barrier()
        start = time.perf_counter()
        run._step(x, y, n_envs)
        run.setup.optimizer.step()
        times.append(time.perf_counter() - start)
    communication = sum(v["seconds"] for v in world.traffic.values()) / repeats
    payload = sum(v["bytes"] for v in world.traffic.values()) / repeats
    return {"step_s": statistics.median(times), "communication_s": communication, "bytes": payload}


def worker(args):
    torch.set_num_threads(args.threads)
    results = {}
    with distributed.shared_world() as world:
        if "fastresnet" in args.cases:
            results["fastresnet"] = time_steps(world, fastresnet(args.batch_size), "and_mask",
                                               {"agreement_threshold": 0.2}, args.repeats)
        if "synthetic" in args.cases:
            results["synthetic"] = time_steps(world, synthetic(args.n_envs), "and_mask",
                                              {"agreement_threshold": 1.0}, args.repeats)
        if "bytes" in args.cases:
            for method in BYTES_METHODS:
                results[f"bytes {method}"] = time_steps(world, synthetic(args.n_envs), method, {}, 1)
        if world.is_leader:
            Path(args.out).write_text(json.dumps(results))


def launch(args, ranks: int, out: str) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               __file__, "--worker", "--out", out, "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--batch_size", str(args.batch_size), "--n_envs", str(args.n_envs), "--cases", ",".join(args.cases)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    return json.loads(Path(out).read_text())


def report(args, results: dict):
    print(f"torch {torch.__version__}, gloo on the CPU, {args.threads} thread(s) per rank")
    for case, label in (("fastresnet", f"FastResnet per-example AND-mask, batch {args.batch_size}"),
                        ("synthetic", f"synthetic MLP AND-mask, {args.n_envs} environments")):
        if case not in args.cases:
            continue
        print(f"\n{label}, median of {args.repeats} steps\n{'ranks':>5} {'ms/step':>9} {'speed-up':>9} "
              f"{'comm ms':>9}")
        one = results[min(results)][case]["step_s"]
        for ranks, by_case in results.items():
            r = by_case[case]
            print(f"{ranks:>5} {1e3 * r['step_s']:>9.1f} {one / r['step_s']:>9.2f} {1e3 * r['communication_s']:>9.2f}")
    if "bytes" in args.cases:
        n_params = sum(p.numel() for p in synthetic(1)[0].parameters())
        print(f"\nbytes per step, synthetic MLP ({n_params} parameters, {args.n_envs} environments), "
              f"against DistributedDataParallel's {4 * n_params} (one float32 all-reduce)")
        ranks = [k for k in results if k > 1]
        print(f"{'combiner':<14}" + "".join(f"{f'K={k} bytes':>14}{'x DDP':>7}" for k in ranks))
        for method in BYTES_METHODS:
            cells = [results[k][f"bytes {method}"]["bytes"] for k in ranks]
            print(f"{method:<14}" + "".join(f"{int(b):>14}{b / (4 * n_params):>7.2f}" for b in cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts to compare")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of every rank")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=8, help="FastResnet: examples = environments per step")
    parser.add_argument("--n_envs", type=int, default=16, help="synthetic: environments per step")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cases = args.cases.split(",")
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        results = {k: launch(args, k, str(Path(tmp) / f"{k}.json")) for k in map(int, args.ranks.split(","))}
    report(args, results)


if __name__ == "__main__":
    main()
