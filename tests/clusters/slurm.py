"""A real single-node SLURM on localhost for the tests: munged, slurmctld and slurmd in a temp dir.

Nothing is written outside that dir: the daemons get their key, config, state, spool and logs
there, and the client commands (sbatch, squeue, scontrol) find the config through ``SLURM_CONF``.
The settings are the ones that work in a container without systemd or cgroups: processes tracked
through /proc (``proctrack/linuxproc``), no task binding, no accounting (so ``sacct`` fails and
submitit, which polls it, waits for each job's result file instead). Everything runs as root.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")


def missing() -> list[str]:
    """The SLURM and munge programs that are not installed (apt-get install slurm-wlm munge)."""
    return [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SLURM_CONF = """\
ClusterName=cpoexp
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
# Both daemons bind to what localhost resolves to (127.0.0.1), not to every interface.
CommunicationParameters=NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No systemd, no cgroups in a container: /proc-based tracking, no binding, no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MinJobAge=300
SlurmdTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """A running cluster: its environment for client commands, and its logs for failure messages."""

    def __init__(self, root: Path, cpus: int) -> None:
        self.root = root
        self.cpus = cpus
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    def logs(self) -> str:
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.is_file():
                parts.append(f"--- {name} (end)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    def command(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([_program(args[0]), *args[1:]], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def _start(self, *args: str) -> None:
        # A session of its own: teardown signals this daemon's process group and nothing else.
        self.procs.append(subprocess.Popen([_program(args[0]), *args[1:]], env=self.env, start_new_session=True,
                                           stdout=subprocess.DEVNULL, stderr=open(self.root / f"{args[0]}.err", "w")))

    def up(self, timeout: float = 60) -> None:
        (self.root / "munge").mkdir(mode=0o700)
        for name in ("state", "spool"):
            (self.root / name).mkdir()
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        self.conf.write_text(SLURM_CONF.format(root=self.root, ctld_port=free_port(), slurmd_port=free_port(),
                                               cpus=self.cpus))
        munge = self.root / "munge"
        self._start("munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge}/munge.socket",
                    f"--pid-file={munge}/munged.pid", f"--log-file={self.root}/munged.log",
                    f"--seed-file={munge}/munged.seed")
        self._wait(lambda: (munge / "munge.socket").exists(), timeout, "munged never opened its socket")
        self._start("slurmctld", "-D", "-i", "-f", str(self.conf))
        self._start("slurmd", "-D", "-N", "localhost", "-f", str(self.conf))
        self._wait(self._node_idle, timeout, "the node never became idle")

    def _node_idle(self) -> bool:
        result = self.command("sinfo", "-h", "-N", "-o", "%T", timeout=10)
        return result.returncode == 0 and result.stdout.strip().rstrip("*") in ("idle", "mixed", "allocated")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"local SLURM: {what} (exited: {dead or 'none'})\n{self.logs()}")
            time.sleep(0.5)

    def down(self) -> None:
        # Jobs first, so that no job outlives the daemons that track it.
        if self.procs and all(p.poll() is None for p in self.procs):
            self.command("scancel", "--full", "--user=root", timeout=20)
        for proc in reversed(self.procs):
            _stop(proc)


def _stop(proc: subprocess.Popen, grace: float = 10) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(grace)
        except ProcessLookupError:
            pass


@contextmanager
def local_slurm(root: Path, cpus: int = 2) -> Iterator[LocalSlurm]:
    """munged + slurmctld + slurmd on 127.0.0.1, state in ``root``; stopped whatever happens."""
    # A node that claims more CPUs than the machine has is drained by slurmctld.
    cluster = LocalSlurm(root, min(cpus, os.cpu_count() or 1))
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()
