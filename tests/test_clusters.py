"""Sweeps on real clusters: a single-node SLURM (munged, slurmctld, slurmd on 127.0.0.1) through
``hydra/launcher=slurm``, and a local Ray cluster (``ray start --head``) through
``hydra/launcher=ray_cluster`` by address. Each sweep must look in MLflow exactly as with the basic
launcher: one parent, one child per job, the report; a failing job is a FAILED child; a job
whose process dies (a SLURM requeue, a killed Ray worker) is run again and nothing hangs.

The clusters are started and stopped by the fixtures below; the SLURM tests are skipped, naming
the packages, where slurm-wlm and munge are not installed (``.ci/run`` installs them).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUICK, write_jsonl

from clusters import ray_head, slurm
from test_sweeps import _assert_valid_report, _parent_and_children, _store, _sweep_dir

QUICK_SWEEP = [*QUICK, "train.save_model=false"]
GRID = ["loss=sigmoid,simpo", "beta=0.1,2.0"]
# One CPU and no GPU per job: two jobs at a time on the test node.
SLURM_JOB = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
             "hydra.launcher.timeout_min=15", "hydra.launcher.partition=debug"]
# A job long enough to be interrupted: a checkpoint every 10 steps, ~15 s of training.
LONG_JOB = ["train.max_steps=200", "train.logging_steps=5", "train.save_steps=10", "train.eval_steps=null",
            "data.max_eval_samples=16", "train.save_model=false"]
SWEEP_TIMEOUT = 420


def cluster_test(test):
    """A sweep on a real local cluster: slow, and selectable with ``-m cluster``."""
    return pytest.mark.slow(pytest.mark.cluster(test))


def _sweep(*args: str, cwd: Path, env: dict, timeout: int = SWEEP_TIMEOUT) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(env)
    return subprocess.Popen([sys.executable, "-m", "cpo_exp", "-m", *args], cwd=cwd, env=full_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: int = SWEEP_TIMEOUT) -> tuple[int, str]:
    """The sweep's exit status and stderr; a sweep still running after ``timeout`` is a failure."""
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"the sweep hung for {timeout} s:\n{stderr[-3000:]}")
    return proc.returncode, stderr


def _run_sweep(*args: str, cwd: Path, env: dict) -> tuple[int, str]:
    return _finish(_sweep(*args, cwd=cwd, env=env))


def _wait_for_log(workdir: Path, job: int, text: str, proc: subprocess.Popen, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while True:
        for log in workdir.glob(f"outputs/multirun/*/*/{job}/cpo_exp.log"):
            if text in log.read_text(errors="replace"):
                return log
        if proc.poll() is not None or time.monotonic() > deadline:
            rc, stderr = _finish(proc, timeout=10)
            pytest.fail(f"job {job} never logged {text!r} (sweep exit {rc}):\n{stderr[-3000:]}")
        time.sleep(0.3)


def _assert_grid(workdir: Path, launcher: str) -> None:
    parent, children = _parent_and_children(_store(workdir))
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.launcher"].endswith(launcher)
    assert parent.data.tags["jobs"] == "4" and parent.data.tags["failed_jobs"] == "0"
    assert sorted(r.info.status for r in children) == ["FINISHED"] * 4
    assert {r.data.tags["job_num"] for r in children} == {"0", "1", "2", "3"}
    assert {(r.data.tags["choice/loss"], r.data.params["beta"]) for r in children} == {
        (loss, beta) for loss in ("sigmoid", "simpo") for beta in ("0.1", "2.0")}
    assert all("eval_rewards/accuracies" in r.data.metrics for r in children)
    sweep_dir = _sweep_dir(workdir)
    # Every job ran in its own dir under the launch dir and logged to the launch dir's store.
    assert {r.data.tags["output_dir"] for r in children} == {str(sweep_dir / str(n)) for n in range(4)}
    _assert_valid_report(sweep_dir, jobs=4)
    assert "| FINISHED |" in (sweep_dir / "report.md").read_text()


@pytest.fixture
def bad_row_data(tmp_path, toy_rows) -> Path:
    """The toy pairs and one with an empty ``chosen``: data.on_bad_rows=error fails at data loading,
    after the job's run is open; ``skip`` trains on the rest."""
    return write_jsonl(tmp_path / "train_with_a_bad_row.jsonl",
                       [*toy_rows, {"prompt": "Translate.\nEnglish: yes\nGerman:", "chosen": "", "rejected": " nein"}])


def _assert_one_failed_job(workdir: Path, rc: int, stderr: str) -> None:
    assert rc != 0, stderr[-3000:]
    parent, children = _parent_and_children(_store(workdir))
    by_mode = {r.data.params["data.on_bad_rows"]: r for r in children}
    assert by_mode["skip"].info.status == "FINISHED"
    assert by_mode["error"].info.status == "FAILED"
    assert "'chosen' is empty" in by_mode["error"].data.tags["error"]
    assert parent.info.status == "FAILED" and parent.data.tags["failed_jobs"] == "1"
    report = (_sweep_dir(workdir) / "report.md").read_text()
    assert "| FAILED |" in report and "sweep failed" in report


def _assert_resumed_child(workdir: Path, job: int, missing_hook: str, exact: bool) -> None:
    """The interrupted job's second attempt continued its first one's MLflow run from its checkpoint.

    ``exact``: the first attempt saved a checkpoint at the step it stopped (SIGTERM), so every step
    is logged once; a worker killed outright may log again the steps after its last checkpoint.
    """
    client = _store(workdir)
    parent, children = _parent_and_children(client)
    runs = [r for r in children if r.data.tags["job_num"] == str(job)]
    assert len(runs) == 1, f"{len(runs)} runs for job {job}: {missing_hook}"
    (run,) = runs
    assert run.info.status == "FINISHED", run.data.tags.get("error")
    assert Path(run.data.tags["resumed_from"]).parent == Path(run.data.tags["output_dir"]) / "checkpoints"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert set(steps) == set(range(5, 201, 5))  # both halves in the one run
    if exact:
        assert len(steps) == len(set(steps))
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["failed_jobs"] == "0" and parent.data.tags["resumed_jobs"] == "1"


MISSING_HOOK = ("the job's second attempt did not continue the first attempt's run from the checkpoint in its "
                "job dir (cpo_exp/cli.py run: a multirun job whose dir holds a checkpoint resumes it)")


# ------------------------------------------------------------------ SLURM


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    missing = slurm.missing()
    if missing:
        pytest.skip(f"no local SLURM: {', '.join(missing)} not installed (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM runs its daemons as root (SlurmUser=root); run the tests as root")
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        pytest.skip("hydra-submitit-launcher is not installed (pip install 'cpo_exp[slurm]')")
    with slurm.local_slurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@cluster_test
def test_slurm_sweep_is_one_job_per_sweep_job_with_a_parent_run_and_a_report(slurm_cluster, workdir):
    rc, stderr = _run_sweep(*GRID, *SLURM_JOB, *QUICK_SWEEP, cwd=workdir, env=slurm_cluster.env)
    assert rc == 0, stderr[-3000:] + slurm_cluster.logs()
    _assert_grid(workdir, "SlurmLauncher")
    # Each job really was a SLURM job (an array task): submitit names its logs <job id>_<task>.
    logs = sorted(p.name for p in (_sweep_dir(workdir) / ".submitit").glob("*/*_log.out"))
    assert [name.split("_")[1] for name in logs] == ["0", "1", "2", "3"], logs


@cluster_test
def test_slurm_sweep_with_a_failing_job_has_a_failed_child(slurm_cluster, workdir, bad_row_data):
    rc, stderr = _run_sweep("data.on_bad_rows=error,skip", f"data.train_files=[{bad_row_data}]", *SLURM_JOB,
                            *QUICK_SWEEP, cwd=workdir, env=slurm_cluster.env)
    _assert_one_failed_job(workdir, rc, stderr)


def _running_slurm_job(cluster) -> str:
    listed = cluster.command("squeue", "-h", "-t", "RUNNING", "-o", "%A")
    (job_id,) = listed.stdout.split()
    return job_id


@cluster_test
def test_a_requeued_slurm_job_resumes_from_its_checkpoint_into_the_same_child_run(slurm_cluster, workdir):
    proc = _sweep("loss=simpo", *SLURM_JOB, *LONG_JOB, cwd=workdir, env=slurm_cluster.env)
    _wait_for_log(workdir, 0, "checkpoint saved", proc)
    # What a preemption with PreemptMode=REQUEUE does: SIGTERM to the job, then it runs again.
    requeue = slurm_cluster.command("scontrol", "requeue", _running_slurm_job(slurm_cluster))
    assert requeue.returncode == 0, requeue.stderr
    rc, stderr = _finish(proc)
    assert rc == 0, stderr[-3000:] + slurm_cluster.logs()
    log = (_sweep_dir(workdir) / "0" / "cpo_exp.log").read_text()
    assert "stopped by SIGTERM" in log  # the first attempt saved a checkpoint and ended its run
    # Without the hook the requeued job starts over in a second child run.
    _assert_resumed_child(workdir, 0, MISSING_HOOK, exact=True)


# ------------------------------------------------------------------ Ray


@pytest.fixture
def ray_cluster(workdir):
    """A head node started from the test's launch dir (see tests/clusters/ray_head.py)."""
    if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
        pytest.skip("hydra-ray-launcher is not installed (pip install 'cpo_exp[ray]')")
    with ray_head.local_ray(workdir, num_cpus=2) as head:
        yield head


def _ray_args(cluster) -> list[str]:
    return ["hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address={cluster.address}"]


@cluster_test
def test_ray_sweep_on_a_cluster_by_address_has_a_parent_run_and_a_report(ray_cluster, workdir):
    rc, stderr = _run_sweep(*GRID, *_ray_args(ray_cluster), *QUICK_SWEEP, cwd=workdir, env=ray_head.RAY_ENV)
    assert rc == 0, stderr[-3000:]
    assert f"Connecting to existing Ray cluster at address: {ray_cluster.address}" in stderr
    _assert_grid(workdir, "RayLauncher")


@cluster_test
def test_ray_sweep_with_a_failing_job_has_a_failed_child(ray_cluster, workdir, bad_row_data):
    rc, stderr = _run_sweep("data.on_bad_rows=error,skip", f"data.train_files=[{bad_row_data}]",
                            *_ray_args(ray_cluster), *QUICK_SWEEP, cwd=workdir, env=ray_head.RAY_ENV)
    _assert_one_failed_job(workdir, rc, stderr)


def _processes_writing(path: Path) -> list[int]:
    """The processes that hold ``path`` open (a job's log: its Ray worker)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == str(path) for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


@cluster_test
def test_a_killed_ray_worker_is_retried_and_its_job_resumes_into_the_same_child_run(ray_cluster, workdir):
    proc = _sweep("loss=simpo", *_ray_args(ray_cluster), *LONG_JOB, cwd=workdir, env=ray_head.RAY_ENV)
    log = _wait_for_log(workdir, 0, "checkpoint saved", proc)
    (worker,) = _processes_writing(log)
    os.kill(worker, signal.SIGKILL)  # no handler runs: the run is left RUNNING, as after an OOM kill
    rc, stderr = _finish(proc)
    # Ray ran the job again (hydra.launcher.ray.remote.max_retries=1) and the sweep completed.
    assert rc == 0, stderr[-3000:]
    assert "done in" in log.read_text()
    # Without the hook the retried task starts over in a second child run; the killed one stays RUNNING.
    _assert_resumed_child(workdir, 0, MISSING_HOOK, exact=False)


# ------------------------------------------------------------------ presets


def test_the_cluster_presets_compose_with_their_documented_keys(compose):
    slurm_launcher = compose(["hydra/launcher=slurm"], hydra=True).hydra.launcher
    assert slurm_launcher._target_.endswith("SlurmLauncher")
    assert (slurm_launcher.partition, slurm_launcher.timeout_min, slurm_launcher.gpus_per_node,
            slurm_launcher.cpus_per_task, slurm_launcher.mem_gb, slurm_launcher.array_parallelism) == (
        None, 1440, 1, 8, None, 256)
    ray_launcher = compose(["hydra/launcher=ray_cluster"], hydra=True).hydra.launcher
    assert ray_launcher._target_.endswith("RayLauncher")
    assert ray_launcher.ray.init.address is None and ray_launcher.ray.init.object_store_memory is None
    assert dict(ray_launcher.ray.remote) == {"num_cpus": 1, "num_gpus": 0, "max_retries": 1}
