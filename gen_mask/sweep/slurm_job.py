"""What runs on the cluster for one job of `--launcher slurm` (imports nothing heavy: no torch).

`RunCommand` runs a job's command as a child process with `threads` threads. SLURM sends SIGUSR2
a while before a job's time limit (and on preemption); submitit then calls
`RunCommand.checkpoint`, which stops the run with SIGINT (the run keeps its last end-of-epoch
checkpoint and writes status.json "interrupted") and hands submitit the same command with
--resume to requeue; the run's --resume drops any metrics past that checkpoint, so no epoch is
logged twice. The child ignores SIGUSR2 itself (SLURM signals every process of the job), so
that only this clean stop happens. A job that SLURM itself starts again (after a node failure, or
a preemption in REQUEUE mode) runs its first command: it adds --resume when the run's folder
shows that the run has started.

With several tasks per job, every task runs the command with the torch.distributed variables
(MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) exported, for
modules that initialise torch.distributed from the environment; task 0 alone writes the run's
status and requeues.
"""
from __future__ import annotations

import signal

from and_mask.core.runfolder import holds_files
from gen_mask.sweep import execute


class RunCommand:
    """One run as a checkpointable submitit job: the command, stopped and resubmitted with --resume."""

    def __init__(self, job, threads: int):
        self.job, self.threads = job, threads
        self._child, self._stopped = None, False

    def __call__(self) -> int:
        import submitit

        environment = submitit.JobEnvironment()
        if environment.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        # SLURM itself may start a job again (node failure, preemption in REQUEUE mode): a run that
        # has started in its folder is then continued, whatever the command first submitted.
        if not self.job.resume and holds_files(self.job.run_dir):
            self.job = self.job.resumed()
        self._child = execute.start(self.job, self.threads, ignore_signals=(signal.SIGUSR2,))
        try:
            returncode = self._child.wait()
        finally:  # also when submitit exits after a requeue
            if environment.global_rank == 0:
                self._child.finish(stopped=self._stopped)
        return returncode

    def checkpoint(self):
        """Called by submitit on SIGUSR2: stop the run cleanly, resubmit it with --resume."""
        from submitit.helpers import DelayedSubmission

        self._stopped = True
        if self._child is not None:
            self._child.stop()
        return DelayedSubmission(RunCommand(self.job.resumed(), self.threads))

    def __getstate__(self):  # the pickle sent to the cluster holds the job, never a live process
        return {"job": self.job, "threads": self.threads}

    def __setstate__(self, state):
        self.__init__(state["job"], state["threads"])
