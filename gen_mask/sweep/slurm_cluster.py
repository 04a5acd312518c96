"""A one-node SLURM cluster on this machine, for trying `--launcher slurm` of gen_mask.sweep.

    python -m gen_mask.sweep.slurm_cluster start|stop DIR

On a laptop or in CI (Debian/Ubuntu: `apt-get install slurm-wlm munge`; run as root). `start` writes everything into DIR (a munge key and socket, slurm.conf,
state and spool folders, logs), starts munged, slurmctld and slurmd on free localhost ports,
waits until the node is idle and prints the line that points SLURM's commands at it:

    export SLURM_CONF=DIR/slurm.conf

The node offers this machine's cores and memory in one partition, `debug`; processes are
tracked by parent id (proctrack/linuxproc) with no cgroups (task/none) and no accounting.
`stop DIR` stops the three daemons by their pid files. Nothing outside DIR is touched.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from and_mask.core.errors import RunError
from and_mask.core.files import make_folder, writing
from and_mask.core.flags import entry_parser

DAEMONS = ("slurmd", "slurmctld", "munged")
NODE = "localhost"
START_TIMEOUT_S = 60


def available() -> str | None:
    """None when the cluster can start here, else why not (for messages and test skips)."""
    missing = [tool for tool in ("slurmctld", "slurmd", "munged", "sbatch", "squeue") if shutil.which(tool) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the one-node SLURM cluster must be started as root"
    return None


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2 ** 20


def slurm_conf(folder: Path, ctld_port: int, slurmd_port: int) -> str:
    user = "root"
    return f"""\
ClusterName=sweeptest
SlurmctldHost={NODE}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={folder / 'munge.socket'}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation={folder / 'state'}
SlurmdSpoolDir={folder / 'spool'}
SlurmctldPidFile={folder / 'slurmctld.pid'}
SlurmdPidFile={folder / 'slurmd.pid'}
SlurmctldLogFile={folder / 'slurmctld.log'}
SlurmdLogFile={folder / 'slurmd.log'}
ReturnToService=2
KillWait=5
InactiveLimit=0
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _run(command: list[str], env=None):
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        raise RunError(f"{' '.join(command[:1])} failed: {lines[-1] if lines else f'exit {out.returncode}'}")
    return out.stdout


def start(folder) -> dict:
    """Start the cluster in `folder`; returns the environment variables that point SLURM at it."""
    reason = available()
    if reason:
        raise RunError(reason)
    folder = Path(folder).resolve()
    for sub in ("state", "spool"):
        make_folder(folder / sub, "DIR")
    key = folder / "munge.key"
    if not key.exists():
        with writing(key):
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
    # --force: munged refuses a socket folder that others cannot enter (a temporary folder is 0700).
    _run(["munged", "--force", f"--socket={folder / 'munge.socket'}", f"--key-file={key}",
          f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'munged.log'}",
          f"--seed-file={folder / 'munged.seed'}"])
    conf = folder / "slurm.conf"
    with writing(conf):
        conf.write_text(slurm_conf(folder, *_free_ports(2)))
    env = {"SLURM_CONF": str(conf)}
    full = dict(os.environ, **env)
    _run(["slurmctld", "-f", str(conf)], full)
    _run(["slurmd", "-f", str(conf), "-N", NODE], full)
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=full, timeout=60)
        if out.returncode == 0 and out.stdout.strip() == "idle":
            return env
        time.sleep(0.2)
    stop(folder)
    raise RunError(f"the SLURM node did not become idle within {START_TIMEOUT_S} s; see {folder}/slurmctld.log")


def stop(folder):
    """Stop the daemons started in `folder` (by their pid files) and wait until they have exited."""
    folder = Path(folder)
    stopping = []
    for daemon in DAEMONS:
        pid_file = folder / f"{daemon}.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            continue
        stopping.append((pid, pid_file))
    deadline = time.time() + 30
    for pid, pid_file in stopping:
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        pid_file.unlink(missing_ok=True)


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser("gen_mask.sweep.slurm_cluster", __doc__)
    parser.add_argument("action", choices=["start", "stop"], help="Start a cluster, or stop the one started in the folder.")
    parser.add_argument("folder", type=Path, help="The cluster's folder (configuration, state, logs).")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.action == "start":
            env = start(args.folder)
            print(f"export SLURM_CONF={env['SLURM_CONF']}")
        else:
            stop(args.folder)
    except RunError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
