"""`--launcher slurm`: one SLURM job array per launch, through submitit (`pip install -e .[cluster]`).

Each array task runs one job's command (`slurm_job.RunCommand`, which also requeues a job that
is preempted or reaches its time limit, resuming the run from its checkpoint) with
--slurm_cpus_per_task threads. --slurm_nodes and --slurm_tasks_per_node give a job several
tasks, each started through srun with the torch.distributed environment exported.

The launcher then waits, showing a progress bar, until every job has left the queue
(`squeue`), unless --slurm_detach. Outcomes are read from the run folders, never from the
scheduler (without accounting, submitit sees every job as UNKNOWN); the queue is asked only
whether a job is still in it, so that a relaunch does not submit a queued run twice.
DIR/slurm/submissions.jsonl keeps one line per array: {"time", "jobs": {run id: SLURM job id}}.
"""
from __future__ import annotations

import argparse
import getpass
import json
import re
import subprocess
import sys
import time

from tqdm.auto import tqdm

from and_mask.core.errors import RunError
from and_mask.core.files import read_jsonl, writing
from and_mask.core.flags import positive_float, positive_int
from and_mask.core.runfolder import now
from and_mask.core.sweepfolder import SweepFolder, state_of
from gen_mask.sweep.slurm_job import RunCommand

SUBMISSIONS = "submissions.jsonl"
# squeue states of a job that is still in the queue (pending, running, requeued, being killed, ...).
QUEUED_STATES = "PD,R,CF,CG,S,ST,RQ,RH,RF,RS,RD,SI,SO"
SQUEUE_TRIES = 10  # failed squeue calls in a row before the wait gives up


def mem(text):
    if not re.fullmatch(r"[1-9][0-9]*[KMGT]?", text):
        raise argparse.ArgumentTypeError(f"must be SLURM's --mem form, e.g. 4000M or 8G, got {text}")
    return text


def add_flags(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("slurm launcher (needs submitit: pip install -e .[cluster])")
    group.add_argument("--slurm_partition", default=None, help="Partition of the jobs. Default: the cluster's default partition.")
    group.add_argument("--slurm_time", type=positive_int, default=60,
                       help="Time limit of each job, in minutes; a run that needs longer is requeued and resumed.")
    group.add_argument("--slurm_cpus_per_task", type=positive_int, default=1, help="CPUs of each task.")
    group.add_argument("--slurm_gpus_per_task", type=positive_int, default=None,
                       help="GPUs of each task. Default: none.")
    group.add_argument("--slurm_mem", type=mem, default=None,
                       help="Memory of each job in SLURM's form (4000M, 8G). Default: the partition's default.")
    group.add_argument("--slurm_array_parallelism", type=positive_int, default=256,
                       help="Jobs of the array that run at the same time, at most.")
    group.add_argument("--slurm_setup", action="append", default=None, metavar="LINE",
                       help="A shell line run before each job (e.g. 'module load cuda'); repeat for several. "
                            "Default: none.")
    group.add_argument("--slurm_nodes", type=positive_int, default=1, help="Nodes of each job.")
    group.add_argument("--slurm_tasks_per_node", type=positive_int, default=1,
                       help="Tasks (processes) per node of each job, each running the command with the "
                            "torch.distributed environment exported.")
    group.add_argument("--slurm_max_timeouts", type=positive_int, default=10,
                       help="Times a run's job may reach its time limit and be requeued.")
    group.add_argument("--slurm_signal_delay_s", type=positive_int, default=90,
                       help="Seconds before the time limit at which a job is told to stop and requeue.")
    group.add_argument("--slurm_poll_s", type=positive_float, default=10.0,
                       help="Seconds between two looks at the queue and the run folders while waiting.")
    group.add_argument("--slurm_detach", action="store_true",
                       help="Submit and return without waiting; relaunch later to wait or to continue the sweep.")


def _submitit():
    try:
        import submitit
    except ImportError:
        raise RunError("--launcher slurm needs submitit: pip install -e .[cluster]")
    return submitit


def _squeue(job_ids: set[str]) -> set[str] | None:
    """The ids among `job_ids` still in the queue; None when squeue fails."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-t", QUEUED_STATES, "-u", getpass.getuser()],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return job_ids & set(out.stdout.split())


def submitted(folder: SweepFolder) -> dict[str, str]:
    """{run id: SLURM job id} of the latest submission of each run of this sweep folder."""
    jobs = {}
    for line in read_jsonl(folder.slurm_dir / SUBMISSIONS, quiet=True):
        jobs.update(line.get("jobs", {}))
    return jobs


def queued_runs(folder: SweepFolder, run_ids) -> set[str]:
    """Those of `run_ids` whose SLURM job is still queued or running (squeue is asked only if one has a job)."""
    jobs = {run: job for run, job in submitted(folder).items() if run in run_ids}
    if not jobs:
        return set()
    in_queue = _squeue(set(jobs.values()))
    if in_queue is None:
        raise RunError(f"{folder.path} has SLURM jobs but squeue does not answer; relaunch where squeue works")
    return {run for run, job in jobs.items() if job in in_queue}


def _submit(jobs, args, folder: SweepFolder) -> dict[str, str]:
    submitit = _submitit()
    threads = args.threads_per_run or args.slurm_cpus_per_task
    try:
        executor = submitit.SlurmExecutor(folder=folder.slurm_dir, max_num_timeout=args.slurm_max_timeouts)
    except RuntimeError as error:
        raise RunError(f"--launcher slurm: {error}")
    params = dict(job_name=f"sweep-{folder.path.resolve().name}", time=args.slurm_time,
                  cpus_per_task=args.slurm_cpus_per_task, nodes=args.slurm_nodes,
                  ntasks_per_node=args.slurm_tasks_per_node, array_parallelism=args.slurm_array_parallelism,
                  signal_delay_s=args.slurm_signal_delay_s, stderr_to_stdout=True, setup=args.slurm_setup or [])
    optional = dict(partition=args.slurm_partition, gpus_per_task=args.slurm_gpus_per_task, mem=args.slurm_mem)
    executor.update_parameters(**params, **{k: v for k, v in optional.items() if v is not None})
    try:
        submitted_jobs = executor.submit_array([RunCommand(job, threads) for job in jobs])
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as error:
        lines = str(error).strip().splitlines()
        raise RunError(f"sbatch refused the job array: {lines[-1] if lines else error}")
    ids = {job.run_id: submitted_job.job_id for job, submitted_job in zip(jobs, submitted_jobs)}
    with writing(folder.slurm_dir / SUBMISSIONS), open(folder.slurm_dir / SUBMISSIONS, "a") as f:
        f.write(json.dumps({"time": now(), "jobs": ids}) + "\n")
    return ids


def _wait(ids: dict[str, str], folder: SweepFolder, args):
    left, failures = dict(ids), 0
    bar = tqdm(total=len(ids), unit="run", desc="sweep (slurm)", disable=args.quiet)
    while left:
        in_queue = _squeue(set(left.values()))
        failures = failures + 1 if in_queue is None else 0
        if failures >= SQUEUE_TRIES:
            raise RunError("squeue stopped answering; the jobs go on: relaunch to wait for them again")
        for run_id, job_id in list(left.items()):
            if in_queue is not None and job_id not in in_queue \
                    and state_of(folder.run_dir(run_id)).status != "running":
                del left[run_id]
                bar.update(1)
        if left:
            time.sleep(args.slurm_poll_s)
    bar.close()


def launch(jobs, args) -> list[int | None]:
    """Submit `jobs` as one array and wait for them; exit statuses read from the run folders."""
    folder = SweepFolder(args.out)
    ids = _submit(jobs, args, folder)
    array = next(iter(ids.values())).split("_")[0]
    print(f"submitted {len(ids)} job(s) as SLURM job {array}; logs in {folder.path / 'logs'}", file=sys.stderr)
    if args.slurm_detach:
        return [None] * len(jobs)
    try:
        _wait(ids, folder, args)
    except KeyboardInterrupt:
        raise RunError(f"stopped waiting; the jobs go on (scancel {array} stops them): relaunch to wait again")
    return [state_of(job.run_dir).exit_code for job in jobs]
