"""One run across processes, GPUs and nodes: the ranks of a run and what crosses between them.

A run started by `torchrun` (or by any launcher that exports RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT, as the sweep launcher's SLURM tasks do) has K processes, its
"ranks". Every rank runs the same command, builds the same data from the same seed and keeps
the same model; the environments of each step are split across the ranks
(`and_mask.core.env_split`). This module holds the `World` of a run: its rank, its device (one
GPU per rank, `cuda:LOCAL_RANK`, with NCCL; gloo on the CPU), the collectives it uses, and how
an error on one rank stops all of them. A process started without a launcher is the World of
size 1, whose collectives do nothing.

Stopping: a rank whose command fails publishes its one-line message in the run's key-value
store before it exits. A watcher thread on every rank polls the store; on a message from
another rank, rank 0 records the failure (its `on_failure` callbacks: the run folder's status)
and prints it, then every rank exits at once, even one blocked in a collective. A failing rank
other than 0 waits (up to ACK_TIMEOUT_S) until rank 0 has recorded its failure before it exits,
so that a launcher which stops the other ranks when one exits never stops rank 0 first; a
failing rank 0 waits until the others have seen its failure, since the store may live in its
own process.

Traffic: every collective adds its payload (the bytes of the tensors handed to it) and the time
spent in it to `World.traffic`, per kind, for the benchmarks and the tests.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from and_mask.core.errors import RunError
from and_mask.core.runlog import restore_rng

ABORT_KEY = "and_mask/failure"  # "rank<TAB>message" of the first rank that failed
ACK_KEY = "and_mask/failure_recorded"  # set by rank 0 once the failure is recorded
LEFT_KEY = "and_mask/ranks_left"  # how many ranks other than 0 no longer need the store
POLL_S = 0.1  # seconds between two looks of the watcher at the store
ACK_TIMEOUT_S = 15.0
BUCKET_ELEMENTS = 2 ** 24  # elements per all-reduce call at most (64 MiB in float32)


class World:
    """The ranks of one run as seen from one of them. `World()` is a single process."""

    def __init__(self, rank: int = 0, size: int = 1, device: torch.device | None = None, store=None):
        self.rank, self.size = rank, size
        self.device = device if device is not None else torch.device("cpu")
        self.store = store
        self.traffic = defaultdict(lambda: {"calls": 0, "bytes": 0, "seconds": 0.0})
        self.on_failure = []  # callables(message) run on rank 0 when another rank fails
        self._failed = False
        self._left = False
        self._stop = threading.Event()
        self._watcher = None

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    # ---- how the environments of a step are split ---------------------------------------------

    def env_counts(self, n_envs: int) -> list[int]:
        """Environments of each rank: contiguous blocks, the first E mod K ranks one more."""
        base, extra = divmod(n_envs, self.size)
        return [base + (r < extra) for r in range(self.size)]

    def env_range(self, n_envs: int) -> range:
        """This rank's environments of a step of `n_envs` (maybe none when E < K)."""
        counts = self.env_counts(n_envs)
        start = sum(counts[:self.rank])
        return range(start, start + counts[self.rank])

    # ---- collectives ----------------------------------------------------------------------------

    @contextmanager
    def _collective(self, kind: str, tensors):
        start = time.perf_counter()
        try:
            yield
        except RuntimeError as error:  # the backend's errors: a rank died or the network failed
            lines = str(error).strip().splitlines()
            raise RunError(f"lost contact with the other ranks during {kind} (did one of them die?): "
                           f"{lines[0] if lines else type(error).__name__}") from None
        record = self.traffic[kind]
        record["calls"] += 1
        record["bytes"] += sum(t.numel() * t.element_size() for t in tensors)
        record["seconds"] += time.perf_counter() - start

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Σ over ranks of each tensor, in place: tensors of one dtype travel together, in buckets."""
        if self.size == 1 or not tensors:
            return tensors
        for bucket in _by_dtype_in_buckets(tensors):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            with self._collective("all_reduce", [flat]):
                dist.all_reduce(flat)
            _unflatten_into(flat, bucket)
        return tensors

    def all_gather_rows(self, tensors: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
        """Stack every rank's rows: tensors of shape (counts[rank], ...) become (Σ counts, ...), in rank order.

        The rows of all tensors travel in one call per dtype, padded to the largest count.
        """
        if self.size == 1:
            return tensors
        rows = max(counts)
        gathered = [None] * len(tensors)
        by_dtype = defaultdict(list)
        for i, t in enumerate(tensors):
            by_dtype[t.dtype].append(i)
        for dtype, indices in by_dtype.items():
            widths = [tensors[i].shape[1:].numel() for i in indices]
            local = torch.zeros(rows, sum(widths), dtype=dtype, device=self.device)
            if counts[self.rank]:
                local[:counts[self.rank]] = torch.cat([tensors[i].reshape(counts[self.rank], -1) for i in indices], 1)
            pieces = [torch.empty_like(local) for _ in range(self.size)]
            with self._collective("all_gather", pieces):
                dist.all_gather(pieces, local)
            stacked = torch.cat([piece[:count] for piece, count in zip(pieces, counts)])
            for i, column in zip(indices, torch.split(stacked, widths, dim=1)):
                gathered[i] = column.reshape(-1, *tensors[i].shape[1:])
        return gathered

    def barrier(self):
        if self.size > 1:
            with self._collective("barrier", []):
                dist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (pickled: checkpoints, summaries)."""
        if self.size == 1:
            return obj
        box = [obj]
        with self._collective("broadcast_object", []):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_state(self, module: torch.nn.Module, buffers_only: bool = False):
        """Copy rank 0's parameters (unless `buffers_only`) and buffers into every rank's module."""
        if self.size == 1:
            return
        tensors = [] if buffers_only else [p.data for p in module.parameters()]
        tensors += [b for b in module.buffers()]
        for bucket in _by_dtype_in_buckets(tensors):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            with self._collective("broadcast", [flat]):
                dist.broadcast(flat, src=0)
            _unflatten_into(flat, bucket)

    def check_identical(self, tensors: list[torch.Tensor], where: str):
        """RunError naming `where` unless every rank holds the same `tensors` (checksums compared)."""
        if self.size == 1:
            return
        flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
        positions = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        checksum = torch.stack([flat.sum(), (flat * positions.remainder(1009)).sum()])
        sums = [torch.empty_like(checksum) for _ in range(self.size)]
        with self._collective("check", sums):
            dist.all_gather(sums, checksum)
        if any(not torch.equal(s, sums[0]) for s in sums):
            values = ", ".join(f"rank {r}: {float(s[0]):.10g}" for r, s in enumerate(sums))
            raise RunError(f"the ranks' parameters differ at {where} (checksums {values}): a step was not "
                           "identical on every rank")

    # ---- stopping every rank when one fails ----------------------------------------------------

    def start_watching(self):
        if self.size > 1 and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, args=(self.store.clone(),), daemon=True,
                                             name="rank-failure-watcher")
            self._watcher.start()

    def _watch(self, store):
        while not self._stop.wait(POLL_S):
            try:
                if not store.check([ABORT_KEY]):
                    continue
                rank, message = store.get(ABORT_KEY).decode().split("\t", 1)
            except Exception:  # noqa: BLE001 - the store is gone: the run is over
                return
            if int(rank) == self.rank or self._failed:
                return  # this rank's own failure: its main thread ends it
            self._leave(store)
            if self.is_leader:
                message = f"rank {rank}: {message}"
                for callback in self.on_failure:
                    try:
                        callback(message)
                    except Exception as error:  # noqa: BLE001 - still stop every rank
                        print(f"warning: could not record the failure: {error}", file=sys.stderr)
                print(f"error: {message}", file=sys.stderr, flush=True)
                try:
                    store.set(ACK_KEY, "1")
                    self._wait_for_others(store)
                except Exception:  # noqa: BLE001
                    pass
            os._exit(1)  # the main thread may be blocked in a collective that never completes

    def fail(self, message: str) -> tuple[str, str]:
        """Publish this rank's failure. Returns (outcome, the run's failure message); the outcome is
        "recorded" (rank 0 has it, or this is rank 0), "consequence" (another rank failed first: its
        message is the run's failure, and rank 0 records it) or "unrecorded" (rank 0 is gone)."""
        self._failed = True
        try:
            first = self.store.compare_set(ABORT_KEY, "", f"{self.rank}\t{message}").decode()
            rank, first_message = first.split("\t", 1)
            if int(rank) != self.rank:
                if self.is_leader:
                    self.store.set(ACK_KEY, "1")
                self._leave(self.store)
                return "consequence", f"rank {rank}: {first_message}"
            if not self.is_leader:
                self.store.wait([ACK_KEY], timedelta(seconds=ACK_TIMEOUT_S))
                self._leave(self.store)
            elif message != "interrupted":  # Ctrl-C and SIGTERM reach every rank: nobody to wait for
                self._wait_for_others(self.store)
            return "recorded", message
        except Exception:  # noqa: BLE001 - rank 0 or the store is gone
            return "unrecorded", message

    def _wait_for_others(self, store):
        """Rank 0 waits (up to ACK_TIMEOUT_S) until every other rank needs the store no more."""
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while store.add(LEFT_KEY, 0) < self.size - 1 and time.monotonic() < deadline:
            time.sleep(POLL_S / 2)

    def _leave(self, store):
        """Tell rank 0 that this rank needs the store no more (once)."""
        if not self.is_leader and not self._left:
            self._left = True
            try:
                store.add(LEFT_KEY, 1)
            except Exception:  # noqa: BLE001 - the store is gone already
                pass

    def close(self, leave_group: bool = True):
        """Stop the watcher and leave the process group (not after a failure: a broken group may hang
        in its teardown, and the process ends anyway)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
        if self.size > 1:
            self._leave(self.store)
            if self.is_leader and leave_group:  # the store may live in this process: let the others finish
                try:
                    self._wait_for_others(self.store)
                except Exception:  # noqa: BLE001
                    pass
        if leave_group and self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _by_dtype_in_buckets(tensors, limit: int = BUCKET_ELEMENTS):
    """The tensors in groups of one dtype and at most `limit` elements (one larger tensor alone), in order."""
    by_dtype = defaultdict(list)
    for t in tensors:
        by_dtype[t.dtype].append(t)
    for group in by_dtype.values():
        bucket, size = [], 0
        for t in group:
            if bucket and size + t.numel() > limit:
                yield bucket
                bucket, size = [], 0
            bucket.append(t)
            size += t.numel()
        if bucket:
            yield bucket


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]):
    """Copy the consecutive pieces of `flat` back into `tensors`."""
    for t, piece in zip(tensors, torch.split(flat, [t.numel() for t in tensors])):
        t.copy_(piece.view_as(t))


def launched_ranks() -> int:
    """The number of ranks the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


_shared: World | None = None  # the World of `shared_world`, which every command run within it joins


def init_world(use_cuda: bool) -> World:
    """Join the launcher's process group (NCCL on CUDA, gloo on the CPU), or a World of one process.

    Each rank takes the GPU cuda:LOCAL_RANK. Raises ValueError when a rank has no GPU.
    """
    if _shared is not None:
        return _shared
    size = launched_ranks()
    if size <= 1:
        return World(device=torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"rank {os.environ.get('RANK')} has local rank {local_rank} but this node has "
                             f"{torch.cuda.device_count()} GPU(s): start at most one process per GPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    store, rank, size = next(dist.rendezvous("env://"))
    dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=size,
                            device_id=device if use_cuda else None)
    world = World(rank, size, device, store)
    world.start_watching()
    return world


@contextmanager
def shared_world(use_cuda: bool = False):
    """One process group for several commands run in turn by every rank (tests, benchmarks)."""
    global _shared
    world = init_world(use_cuda)
    _shared = world
    try:
        yield world
    finally:
        _shared = None
        world.close()


def shard_loader(loader, world: World):
    """This rank's batches of an evaluation loader: batches i with i mod K = rank, as they were.

    A DataLoader is rebuilt over the same dataset with its batch sampler (or, for a sampler that
    yields whole batches, that sampler) thinned out, so the skipped batches are never loaded.
    """
    if world.size == 1:
        return loader
    if not isinstance(loader, DataLoader):
        return _Shard(loader, world)
    common = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=_Shard(loader.batch_sampler, world), **common)
    return DataLoader(loader.dataset, sampler=_Shard(loader.sampler, world), batch_size=None, **common)


class _Shard:
    """Every K-th item of a (batch) sampler or of any re-iterable, from item `rank`."""

    def __init__(self, sampler, world: World):
        self.sampler, self.rank, self.size = sampler, world.rank, world.size

    def __iter__(self):
        return (item for i, item in enumerate(self.sampler) if i % self.size == self.rank)

    def __len__(self):
        return len(range(self.rank, len(self.sampler), self.size))


class LeaderRunLog:
    """Rank 0's run log: the run's own, whose checkpoint and records it also hands to the other ranks."""

    def __init__(self, runlog, world: World):
        self.runlog, self.world = runlog, world

    def __getattr__(self, name):
        return getattr(self.runlog, name)

    def load_checkpoint(self, map_location):
        # Loaded on the CPU: the tensors then unpickle on every rank, whatever its device.
        return self.world.broadcast_object(self.runlog.load_checkpoint("cpu"))

    def records(self):
        return self.world.broadcast_object(self.runlog.records())


class FollowerRunLog:
    """The run log of a rank other than 0: it writes nothing; checkpoint and records come from rank 0."""

    def __init__(self, directory, world: World):
        self.dir, self.world = Path(directory), world

    def log(self, record):
        pass

    def save_weights(self, model, name):
        pass

    def save_checkpoint(self, state):
        pass

    def truncate_metrics(self, last_epoch):
        pass

    def load_checkpoint(self, map_location):
        state = self.world.broadcast_object(None)
        if state is not None:
            restore_rng(state["rng"], self.world.device)
        return state

    def records(self):
        return self.world.broadcast_object(None)


def rank_runlog(world: World, runlog=None, directory=None):
    """The run log a rank uses: `runlog` itself alone, else rank 0's or a follower's (in `directory`)."""
    if world.size == 1:
        return runlog
    return LeaderRunLog(runlog, world) if world.is_leader else FollowerRunLog(directory, world)


@contextmanager
def leader_first(world: World):
    """Rank 0 runs the block first (e.g. downloads or prepares the data), then the others."""
    if not world.is_leader:
        world.barrier()
    yield
    if world.is_leader:
        world.barrier()


def failure_message(error: BaseException) -> str:
    """The one line that tells the other ranks why this one stops."""
    if isinstance(error, SystemExit):
        text = str(error.code)
        return text[len("error: "):] if text.startswith("error: ") else text
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    lines = str(error).strip().splitlines()
    if isinstance(error, RunError):
        return lines[0] if lines else "failed"
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


@contextmanager
def stop_together(world: World):
    """Run a rank's work; if it fails, every rank stops (see the module docstring), then leave the group.

    Rank 0 prints a failure; another rank prints its own only when rank 0 could not record it
    (and shows the traceback of an unexpected error), and stays silent when it merely follows
    another rank's failure. An interrupted rank other than 0 (Ctrl-C and SIGTERM reach every
    rank) leaves the verdict to rank 0, which ends the run as interrupted.
    """
    failed = False
    try:
        yield
    except BaseException as error:
        failed = not (isinstance(error, SystemExit) and error.code in (0, None))
        interrupted_follower = isinstance(error, KeyboardInterrupt) and not world.is_leader
        if world.size > 1 and failed and not interrupted_follower:
            outcome, message = world.fail(failure_message(error))
            if outcome == "consequence":
                raise SystemExit(f"error: {message}" if world.is_leader else 1) from None
            if outcome == "recorded" and not world.is_leader and isinstance(error, (SystemExit, RunError)):
                raise SystemExit(1) from None
        raise
    finally:
        if world is not _shared:
            world.close(leave_group=not failed)
