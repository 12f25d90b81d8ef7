"""A real local Ray cluster for the tests: ``ray start --head --block`` on 127.0.0.1 in a temp dir.

``ray stop`` would stop every Ray on the machine; this head runs in a session of its own and is
stopped by signalling that process group only (the GCS, the raylet and the workers it spawns).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from clusters.slurm import free_port

# For the head and the sweep (the driver) alike. Ray swaps 127.0.0.1 for the machine's outward
# address (and binds every interface) unless told that this is a single-machine cluster. Token
# authentication switches itself on when ~/.ray/auth_token exists (a local ray.init() writes one):
# off, explicitly, so that a file in the user's home cannot decide whether the driver may connect.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


class RayHead:
    def __init__(self, proc: subprocess.Popen, address: str, root: Path) -> None:
        self.proc, self.address, self.root = proc, address, root

    def log(self) -> str:
        return (self.root / "ray_start.log").read_text(errors="replace")[-4000:]


def _ray() -> str:
    return shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


@contextmanager
def local_ray(launch_dir: Path, num_cpus: int = 2, timeout: float = 90) -> Iterator[RayHead]:
    """A head node with ``num_cpus`` CPUs and no dashboard; its address is ``127.0.0.1:<port>``.

    Started from ``launch_dir``: Ray's workers run in the directory their node was started from,
    and a job resolves Hydra's relative sweep dir there.
    """
    # Short: Ray's socket paths must stay under the 107 characters of a Unix socket name.
    root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = free_port()
    env = {**os.environ, **RAY_ENV}
    log = open(root / "ray_start.log", "w")
    proc = subprocess.Popen(
        [_ray(), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={root}"],
        cwd=launch_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(proc, f"127.0.0.1:{port}", root)
    try:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in head.log():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head did not come up (exit {proc.poll()}):\n{head.log()}")
            time.sleep(0.5)
        yield head
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:  # `ray start --block` lingers on SIGTERM; nothing of this throwaway cluster needs saving
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever of the group is left
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
