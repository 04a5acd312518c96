"""Environment parallelism: runs split across 2 processes (gloo, CPU) against one process.

One torchrun launch runs every 2-rank task of `distributed_tasks.py` in turn; the 1-rank
references run in this process. The failure tests start their 2 ranks without torchrun (the
variables a launcher exports, as the sweep launcher's SLURM tasks do), so that nothing but the
run itself stops the other rank.
"""
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from and_mask.core.distributed import World, shard_loader
from and_mask.core.env_split import EnvSplit
from and_mask.core.per_env_grads import per_env_grads
from and_mask.core.runfolder import (
    differing_number_flags,
    is_running,
    number_flags,
    read_config,
    read_metrics,
    read_status,
)
from and_mask.datasets.cifar import NormalisedImages, fashion_mnist_as_rgb32
from gen_mask import run_synthetic
from gen_mask.gen_mask_utils import COMBINERS
from tests.support.cifar_files import write_cifar10_files
from tests.support.distributed_tasks import (
    LAYOUTS,
    PLUGIN,
    fastresnet_problem,
    methods_of,
    one_step,
    plugin_registered,
    small_problem,
    vmap_batchnorm_step,
)
from tests.support.interrupted_runs import interrupt
from tests.support.mnist_files import write_mnist_files

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests" / "support" / "distributed_tasks.py"
TIMEOUT_S = 900  # generous: two cold starts of torch on a loaded 2-core machine
SYNTHETIC = ["--n_envs", "5", "--examples_per_env", "48", "--batch_size", "16", "--n_hidden_units", "32",
             "--n_hidden_layers", "2", "--epochs", "3", "--n_test", "200", "--quiet"]
METHODS = {"and_mask": ["--agreement_threshold", "0.6"], "geom_mean": ["--agreement_threshold", "0.6"], "mean": [],
           "pcgrad": [], "mgda": []}
CHECKED = {"pcgrad": ["--dist_check_every", "1"]}  # 2-rank runs that also compare the ranks' parameters each step
RESUMED = "and_mask"  # the method of the runs resumed with another number of ranks
TINY_DATA = ["--num_workers", "0", "--quiet"]
COLORED_MNIST = ["--init_lr", "0.01", "--weight_decay", "0.001", "--batch_size", "20", "--epochs", "2",
                 "--n_hidden_units", "16", *TINY_DATA]
CIFAR = ["--random_labels_fraction", "1.0", "--weight_decay", "1e-06", "--init_lr", "0.0005", "--batch_size", "2",
         "--train_subset", "4", "--epochs", "1", "--download", "0", *TINY_DATA]
MODULES = {  # every other training module, tiny (gen_mask.run_synthetic: METHODS), and its data
    "and_mask.run_synthetic": ["--method", "and_mask", "--agreement_threshold", "0.6", "--scale_grad_inverse_sparsity",
                               "1", "--n_train_envs", "5", "--n_agreement_envs", "5", "--examples_per_env", "24",
                               "--batch_size", "8", "--n_hidden_units", "16", "--epochs", "2", "--n_test", "50",
                               "--quiet"],
    # one environment per example (20 per step, the outer engine)
    "and_mask.run_colored_mnist": ["--method", "and_mask", "--agreement_threshold", "1",
                                   "--scale_grad_inverse_sparsity", "1", "--random_labels_fraction", "0.25",
                                   *COLORED_MNIST],
    "gen_mask.run_colored_mnist": ["--method", "pcgrad", "--random_labels_fraction", "0", "--agreement_envs", "color",
                                   "--protocol", "irm", *COLORED_MNIST],
    # FastResnet: BatchNorm, each rank forwards the whole batch
    "and_mask.run_cifar": ["--method", "and_mask", "--agreement_threshold", "0.2", "--scale_grad_inverse_sparsity",
                           "1", *CIFAR],
    "gen_mask.run_cifar": ["--method", "geom_mean", *CIFAR],
}


def argv(method, output_dir=None, *extra):
    where = [] if output_dir is None else ["--output_dir", str(output_dir)]
    return ["--method", method, *METHODS[method], *SYNTHETIC, *where, *extra]


def environment(**extra):
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)


def plan_file(path, plan):
    path.write_text(json.dumps(plan))
    return str(path)


def fashion_mnist_images(tmp_path):
    """8 Fashion-MNIST test images as run_cifar sees them (the Debian package's, else tiny stand-ins)."""
    try:
        images, labels = fashion_mnist_as_rgb32(tmp_path, train=False, download=False)
    except Exception:  # noqa: BLE001 - no Debian package on this machine
        write_mnist_files(tmp_path, "fashion_mnist", n_train=8, n_test=8)
        images, labels = fashion_mnist_as_rgb32(tmp_path, train=False, download=False)
    data = NormalisedImages(images[:8], labels[:8])
    batch = torch.stack([data[i][0] for i in range(8)]), labels[:8].clone()
    torch.save(batch, tmp_path / "images.pt")
    return tmp_path / "images.pt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One torchrun launch of every 2-rank task, while the 1-rank references run here."""
    tmp = tmp_path_factory.mktemp("distributed")
    write_mnist_files(tmp / "data", "mnist", n_train=240, n_test=20, seed=1)
    write_cifar10_files(tmp / "data", n_train_per_batch=2, n_test=4)
    modules = {module: [*flags, "--data_path", str(tmp / "data")] if "synthetic" not in module else flags
               for module, flags in MODULES.items()}
    with pytest.MonkeyPatch.context() as patch:  # a 1-rank run stopped after epoch 1, resumed by 2 ranks
        interrupt(run_synthetic.main, argv(RESUMED), tmp / "one-then-two", patch, stop_after_epoch=1)
    plan = [{"task": "train", "args": {"module": "gen_mask.run_synthetic",
                                       "argv": argv(m, tmp / f"two-{m}", *CHECKED.get(m, []))}} for m in METHODS]
    plan += [{"task": "train", "args": {"module": module, "argv": [*flags, "--output_dir", str(tmp / f"two-{module}")]}}
             for module, flags in modules.items()]
    plan += [{"task": "train", "args": {"module": "gen_mask.run_synthetic",
                                        "argv": argv(RESUMED, tmp / "one-then-two", "--resume")}},
             *[{"task": "step_every_method", "args": {"out": str(tmp / f"steps-{layout}.pt"), "layout": layout}}
               for layout in LAYOUTS],
             {"task": "batchnorm_grads", "args": {"images": str(fashion_mnist_images(tmp)),
                                                  "out": str(tmp / "bn.pt")}},
             {"task": "traffic", "args": {"out": str(tmp / "traffic.pt")}},
             {"task": "running_statistics", "args": {"out": str(tmp / "running.pt")}},
             {"task": "checksums", "args": {"out": str(tmp / "checksums.pt")}}]
    launch = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(TASKS), plan_file(tmp / "plan.json", plan)], cwd=ROOT, env=environment(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for method in METHODS:
            run_synthetic.main(argv(method, tmp / f"one-{method}"))
        for module, flags in modules.items():
            importlib.import_module(module).main([*flags, "--output_dir", str(tmp / f"one-{module}")])
        stdout, stderr = launch.communicate(timeout=TIMEOUT_S)
    finally:
        if launch.poll() is None:  # torchrun and its ranks
            os.killpg(launch.pid, signal.SIGKILL)
    assert launch.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return tmp


# A mask density is a share of coordinates: a coordinate whose per-example gradients are rounding
# noise may flip its sign when the examples' backward passes run on other processes, which moves
# the density of a 128×128×3×3 weight by 1/147456 ≈ 7e-6 per coordinate.
MASK_DENSITY_ABS = 1e-4


def assert_same_value(got, expected, where):
    """Numbers equal to 1e-5 relative (mask densities to MASK_DENSITY_ABS); anything else
    (strings, booleans, None) exactly."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for name in expected:
            assert_same_value(got[name], expected[name], (*where, name))
    elif isinstance(expected, (int, float)) and not isinstance(expected, bool):
        tolerance = MASK_DENSITY_ABS if where[0] == "mask_density" else 1e-7
        assert got == pytest.approx(expected, rel=1e-5, abs=tolerance), where
    else:
        assert got == expected, where


def assert_same_records(got, expected):
    assert [r["epoch"] for r in got] == [r["epoch"] for r in expected] and got
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a:
            if key != "seconds":
                assert_same_value(a[key], b[key], (key,))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_ranks_give_the_metrics_of_one(runs, method):
    """5 environments over 2 ranks (3 and 2): the same training as one process, epoch by epoch."""
    assert_same_records(read_metrics(runs / f"two-{method}"), read_metrics(runs / f"one-{method}"))
    assert len(read_metrics(runs / f"two-{method}")) == 4  # 3 epochs and the final evaluation
    assert (runs / f"two-{method}" / "weights_final.pt").exists()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_training_module_runs_split_across_two_ranks(runs, module):
    """Each `python -m MODULE` under torchrun: the metrics of one process, a finished 2-rank run folder."""
    run_dir = runs / f"two-{module}"
    assert_same_records(read_metrics(run_dir), read_metrics(runs / f"one-{module}"))
    assert read_config(run_dir)["ranks"] == 2 and read_status(run_dir)["status"] == "finished"


def test_a_one_rank_checkpoint_resumes_with_two_ranks(runs):
    assert_same_records(read_metrics(runs / "one-then-two"), read_metrics(runs / f"one-{RESUMED}"))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_method_across_ranks_equals_one_process(runs, layout):
    """One training step of every combiner (sum rules add up per-rank sums; the others, a plugin that
    declares nothing among them, gather the gradients; lookahead's Hessian-vector products are
    gathered too) and of every objective (their terms gathered, their gradients summed), 5
    environments over 2 ranks; 7 one-example environments take the outer engine, whose factors
    are what travels; one environment leaves rank 1 none (every combiner, also the mean's one
    backward pass)."""
    got = torch.load(runs / f"steps-{layout}.pt")
    with plugin_registered():
        assert set(got) == set(methods_of(layout)) and PLUGIN in got and "mean" in got
        for name, grads in got.items():
            for a, b in zip(grads, one_step(World(), name, layout)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_per_example_batchnorm_gradients_across_ranks(runs):
    """FastResnet, batch 8, one environment per image: exact = one process's shared engine (the whole
    batch's statistics); --dist_bn local = each rank's 4 images normalised on their own. The same for
    the gradient of the mean loss (τ = 0)."""
    got = torch.load(runs / "bn.pt")
    images = runs / "images.pt"
    model, inputs, target = fastresnet_problem(images)
    expected = per_env_grads(model, inputs, target, F.cross_entropy, 8, engine="shared").grads  # = loop's, tested
    for a, b in zip(got["exact"], expected):
        assert_float32_close(a, b)
    halves = [per_env_grads(model, inputs[rows], target[rows], F.cross_entropy, 4, engine="shared").grads
              for rows in HALVES]
    for a, first, second in zip(got["local"], *halves):
        assert_float32_close(a, torch.cat([first, second]))
    assert not torch.allclose(got["local"][0], got["exact"][0], rtol=1e-3)  # a different model indeed
    # τ = 0, one backward pass per rank of its share Σ_{e of r} L_e / E, summed across ranks. exact: the
    # shares' sum in one process; local: the mean of each half's mean-loss gradient, its own statistics.
    output = model(inputs)
    shares = [torch.autograd.grad(F.cross_entropy(output[rows], target[rows], reduction="sum") / 8,
                                  list(model.parameters()), retain_graph=True) for rows in HALVES]
    local = [mean_loss_grads(model, inputs[rows], target[rows]) for rows in HALVES]
    for a, b, *pieces in zip(got["exact mean"], mean_loss_grads(model, inputs, target), *shares):
        assert_float32_close(a, sum(pieces))
        assert (a - b).norm() <= 1e-4 * b.norm()  # the whole batch's mean loss, up to float32 rounding
    for a, *pieces in zip(got["local mean"], *local):
        assert_float32_close(a, sum(pieces) / 2)


HALVES = (slice(0, 4), slice(4, 8))


def assert_float32_close(a, b):
    """Equal up to float32 rounding through BatchNorm, which the thread count of each side changes."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def mean_loss_grads(model, inputs, target):
    return torch.autograd.grad(F.cross_entropy(model(inputs), target), list(model.parameters()))


def test_the_vmap_engine_keeps_the_running_statistics_of_the_whole_batch(runs):
    """Each rank forwards its environments for their gradients, then the whole batch for BatchNorm's
    running statistics: those of one process, on every rank (checked in the task)."""
    for a, b in zip(torch.load(runs / "running.pt"), vmap_batchnorm_step(World())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_ranks_that_differ_are_told_apart(runs):
    message = torch.load(runs / "checksums.pt")
    assert message.startswith("the ranks' parameters differ at the second look")


def test_bytes_per_step_by_kind_of_combiner(runs):
    """Payloads of one step's collectives (P parameters, E = 5 environments, K = 2 ranks), against
    DistributedDataParallel's one all-reduce of the mean gradient (4P bytes in float32); one call
    per round of sums and dtype (sums of all parameters together), one all-gather of all rows."""
    got = torch.load(runs / "traffic.pt")
    model, *_ = small_problem()
    p = sum(t.numel() for t in model.parameters())
    factored = sum(m.in_features + 2 * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    totals = 16  # the step's loss sum and correct count (float64), the batch being split
    sums = {"and_mask": 4 * p + p, "geom_mean": 4 * p + p + 4 * p, "sand_mask": 4 * p + p + 4 * p,
            "majority_vote": p, "mean": 4 * p}  # sign counts travel as int8
    calls = {"and_mask": 2, "geom_mean": 2, "sand_mask": 3, "majority_vote": 1, "mean": 1}  # (round, dtype)s
    for (name, outer), traffic in got.items():
        if name in sums:
            assert traffic.keys() == {"all_reduce"}
            assert traffic["all_reduce"]["bytes"] == sums[name] + totals, (name, outer)
            assert traffic["all_reduce"]["calls"] == calls[name] + 1, (name, outer)
        else:  # gathered: 2 ranks × the larger share of E (5, or 7 one-example environments) rows
            rows = 4 if outer else 3
            assert traffic["all_gather"]["bytes"] == 2 * rows * 4 * (factored if outer else p), (name, outer)
            assert traffic["all_gather"]["calls"] == 1 and traffic["all_reduce"]["bytes"] == totals


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_without_torchrun(plan_path, port):
    return [subprocess.Popen([sys.executable, str(TASKS), plan_path], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE,
                             env=environment(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
            for r in range(2)]


def test_a_failing_rank_stops_every_rank_and_the_run_resumes_with_one(runs, tmp_path):
    """Rank 1 raises at epoch 3 (while rank 0 waits in a collective), or rank 0 refuses a folder that
    holds a run (while rank 1 waits for it): both processes end, non-zero, rank 0 printing the
    message (and writing the failure into status.json); the failed run keeps epochs 1-2 and their
    checkpoint, and one process resumes it to the uninterrupted run's end."""
    shutil.copytree(runs / f"one-{RESUMED}", tmp_path / "taken")
    cases = {"rank 1 fails": ("train_failing", {"rank": 1, "epoch": 3}, "rank 1: planted failure on rank 1 at epoch 3"),
             "taken": ("train", {}, "already holds a run (finished); pass --resume to continue it")}
    launches = {}
    for case, (task, extra, _) in cases.items():
        run_dir = tmp_path / case.replace(" ", "-")
        plan = [{"task": task, "args": {"module": "gen_mask.run_synthetic", "argv": argv(RESUMED, run_dir), **extra}}]
        launches[case] = launch_without_torchrun(plan_file(tmp_path / f"{case}.json", plan), free_port())
    outputs = {}
    try:
        for case, processes in launches.items():
            outputs[case] = [p.communicate(timeout=TIMEOUT_S) for p in processes]
    finally:
        for processes in launches.values():
            for p in processes:
                p.kill()
    for case, (_, _, message) in cases.items():
        assert [p.returncode for p in launches[case]] == [1, 1], (case, outputs[case])
        (_, leader_err), (_, follower_err) = outputs[case]
        last = leader_err.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, (case, leader_err)
        assert "Traceback" not in leader_err + follower_err and "error" not in follower_err, (case, follower_err)
        run_dir = tmp_path / case.replace(" ", "-")
        assert not is_running(run_dir)
        status = read_status(run_dir)
        if case == "taken":
            assert status["status"] == "finished" and len(read_metrics(run_dir)) == 4  # left as it was
            continue
        assert status["status"] == "failed" and message in status["error"]
        assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2] and (run_dir / "checkpoint.pt").exists()
    run_synthetic.main(argv(RESUMED, tmp_path / "rank-1-fails", "--resume"))
    assert_same_records(read_metrics(tmp_path / "rank-1-fails"), read_metrics(runs / f"one-{RESUMED}"))


def test_environments_are_split_in_contiguous_blocks():
    counts = {size: [World(r, size).env_range(5) for r in range(size)] for size in (1, 2, 3, 7)}
    assert counts[1] == [range(0, 5)]
    assert counts[2] == [range(0, 3), range(3, 5)]
    assert counts[3] == [range(0, 2), range(2, 4), range(4, 5)]
    assert [len(r) for r in counts[7]] == [1, 1, 1, 1, 1, 0, 0]


def test_evaluation_batches_are_shared_out_without_loading_the_others():
    data = torch.utils.data.TensorDataset(torch.arange(10.0))
    loader = torch.utils.data.DataLoader(data, batch_size=3)
    shards = [list(shard_loader(loader, World(r, 2))) for r in range(2)]
    assert [len(s) for s in shards] == [2, 2] and len(shard_loader(loader, World(1, 2))) == 2
    seen = sorted(float(x) for shard in shards for (batch,) in shard for x in batch)
    assert seen == [float(i) for i in range(10)]
    assert shard_loader(loader, World()) is loader


def test_sum_rules_add_up_over_any_split_of_the_environments():
    """For every rule declared as sums: the rounds' sums over blocks of environments, added up, then
    finished, equal the rule on all environments (how ranks compute it)."""
    grads = torch.randn(7, 4, 3, dtype=torch.float64)
    grads[:, 0, 0] = 0.0
    for name, combiner in COMBINERS.items():
        if combiner.sums is None:
            continue
        rule, hparams = combiner.sums, combiner.defaults()
        totals = {"n_envs": 7}
        for index in range(len(rule.rounds)):
            blocks = [rule.round_sums(index, grads[rows], totals) for rows in (slice(0, 3), slice(3, 3), slice(3, 7))]
            totals.update({key: sum(block[key] for block in blocks) for key in blocks[0]})
        got, _ = rule.finish(totals, **hparams)
        torch.testing.assert_close(got, combiner.fn(grads, **hparams)[0], msg=name)
    assert PLUGIN not in COMBINERS


def test_the_erm_irm_sweep_refuses_several_processes(monkeypatch, tmp_path):
    from gen_mask import run_erm_irm

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="runs in one process; start it without torchrun"):
        run_erm_irm.main(["--dataset", "sem_hb", "--methods", "erm", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_only_local_batch_statistics_change_the_numbers():
    """--resume and the tables of runs ignore the debugging flags and --dist_bn exact (one process's
    model); --dist_bn local is another model."""
    flags = {"lr": 0.1, "dist_bn": "exact", "dist_check_every": 0, "dist_gather_warn_mb": 1024.0}
    assert number_flags(flags) == {"lr": 0.1}
    assert differing_number_flags(flags, {**flags, "dist_check_every": 5, "dist_gather_warn_mb": 1.0}) == []
    assert differing_number_flags(flags, {**flags, "dist_bn": "local"}) == ["--dist_bn local (run: exact)"]


class TwoRanksHoldingTheSameRows(World):
    """Rank 0 of 2 whose all-gather repeats its own rows (a stand-in for the other rank)."""

    def __init__(self):
        super().__init__(0, 2)

    def all_gather_rows(self, tensors, counts):
        return [torch.cat([t, t]) for t in tensors]


def test_gathering_more_than_the_budget_warns_once():
    split = EnvSplit(TwoRanksHoldingTheSameRows(), gather_warn_mb=1e-4)
    grads = [torch.randn(2, 10, 10), torch.randn(2, 10)]  # 4 environments: 4 × 110 floats = 1760 bytes
    with pytest.warns(UserWarning, match="gathers the gradients of all 4 environments, 0.00168 MB per step"):
        gathered = split.gather(grads, 4)
    assert [g.shape for g in gathered] == [(4, 10, 10), (4, 10)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split.gather(grads, 4)
        EnvSplit(TwoRanksHoldingTheSameRows(), gather_warn_mb=1.0).gather(grads, 4)
