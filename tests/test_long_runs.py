"""Runs that survive: checkpoints, exact resume after SIGKILL, graceful stops, NaN guards, secrets.

Every test drives the real CLI in a subprocess (real signals, a real MLflow store).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli

# A short schedule whose save_steps is no multiple of logging_steps: a checkpoint then holds a
# half-filled metric window, which resume must carry over for the logged numbers to match.
SCHEDULE = ["train.max_steps=40", "train.logging_steps=4", "train.save_steps=5", "train.eval_steps=20",
            "data.max_eval_samples=16", "train.save_model=false"]


def store(workdir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def runs_by_dir(workdir: Path) -> dict[str, object]:
    client = store(workdir)
    runs = client.search_runs([client.get_experiment_by_name("cpo_exp").experiment_id])
    return {Path(r.data.tags["output_dir"]).name: r for r in runs}


def history(workdir: Path, run, name: str) -> dict[int, float]:
    """Metric value per step; a step logged twice (before a kill and after resume) keeps the last."""
    return {m.step: m.value for m in sorted(store(workdir).get_metric_history(run.info.run_id, name),
                                            key=lambda m: m.timestamp)}


def start_cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen([sys.executable, "-m", "cpo_exp", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the awaited state: "
                                 f"{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*"))


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_run_killed_with_sigkill_and_resumed_ends_exactly_as_an_uninterrupted_run(workdir):
    full = run_cli(*SCHEDULE, "hydra.run.dir=outputs/full", cwd=workdir)
    assert full.returncode == 0, full.stderr[-3000:]

    killed_dir = workdir / "outputs" / "killed"
    proc = start_cli(*SCHEDULE, "hydra.run.dir=outputs/killed", cwd=workdir)
    wait_for(lambda: checkpoint_steps(killed_dir), proc)
    proc.kill()
    _, stderr = proc.communicate()  # to its end: the tracking process, left behind, writes there too
    steps = checkpoint_steps(killed_dir)
    assert steps and steps[-1] < 40, f"the run was not interrupted (checkpoints {steps})"
    # The trainer had no chance to end its run; the tracking process, left behind, ends it KILLED.
    deadline = time.monotonic() + 60
    while (killed := runs_by_dir(workdir)["killed"]).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert killed.info.status == "KILLED" and "ended without ending this run" in killed.data.tags["error"]
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr[-3000:]

    resumed = run_cli(f"resume={killed_dir}", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed_dir}/checkpoints/step-{steps[-1]}" in resumed.stderr

    runs = runs_by_dir(workdir)
    assert sorted(runs) == ["full", "killed"]  # the resumed run continued its MLflow run, no duplicate
    assert runs["killed"].info.status == "FINISHED"
    for name in ("loss", "rewards/margins", "logps/chosen", "nll_loss", "eval_loss", "eval_rewards/margins"):
        expected, got = history(workdir, runs["full"], name), history(workdir, runs["killed"], name)
        assert sorted(got) == sorted(expected), name  # every logged step is there
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), name
    assert checkpoint_steps(killed_dir)[-1] == 40


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_ends_the_mlflow_run_killed(workdir):
    run_dir = workdir / "outputs" / "stopped"
    proc = start_cli("train.max_steps=5000", "train.logging_steps=2", "train.save_steps=null",
                     "data.max_eval_samples=16", "hydra.run.dir=outputs/stopped", cwd=workdir)
    wait_for(lambda: "step 4/5000" in (run_dir / "cpo_exp.log").read_text()
             if (run_dir / "cpo_exp.log").is_file() else False, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    steps = checkpoint_steps(run_dir)
    assert len(steps) == 1 and 4 <= steps[0] < 5000
    assert f"stopped by SIGTERM after step {steps[0]}" in stderr
    assert f"resume={run_dir}" in stderr
    run = runs_by_dir(workdir)["stopped"]
    assert run.info.status == "KILLED"
    assert "SIGTERM" in run.data.tags["error"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4, without tracking."""
    workdir = tmp_path_factory.mktemp("short")
    result = run_cli("train.max_steps=4", "train.save_steps=2", "train.logging_steps=2", "data.max_eval_samples=8",
                     "tracking=none", "train.save_model=false", "hydra.run.dir=outputs/short", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_steps(workdir / "outputs" / "short") == [2, 4]
    return workdir / "outputs" / "short"


def test_resume_with_a_changed_config_names_the_key_and_touches_nothing(short_run):
    before = digests(short_run / "checkpoints")
    result = run_cli(f"resume={short_run}", "beta=0.5", "tracking=none", cwd=short_run.parent)
    assert result.returncode == 2
    assert "beta: checkpoint 0.1, now 0.5" in result.stderr
    assert digests(short_run / "checkpoints") == before


def test_resume_from_a_corrupt_checkpoint_names_the_file_and_touches_nothing(short_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(short_run, copy)
    weights = copy / "checkpoints" / "step-4" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    before = digests(copy / "checkpoints")
    result = run_cli(f"resume={copy}", cwd=tmp_path)
    assert result.returncode == 2
    assert f"checkpoint {copy}/checkpoints/step-4 is corrupt: model.safetensors" in result.stderr
    assert digests(copy / "checkpoints") == before  # (the log file records the refused attempt)


def test_save_total_limit_keeps_the_newest(workdir):
    result = run_cli("train.max_steps=6", "train.save_steps=2", "train.save_total_limit=2", "train.logging_steps=3",
                     "data.max_eval_samples=8", "tracking=none", "train.save_model=false", "hydra.run.dir=outputs/r",
                     cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_steps(workdir / "outputs" / "r") == [4, 6]
    assert not list((workdir / "outputs" / "r" / "checkpoints").glob(".tmp-*"))


# --------------------------------------------------------------------------- guards

# An absurd learning rate: Adam moves every weight by ~1e30 at step 1; the gradient of step 2 is NaN.
DIVERGING = ["train.learning_rate=1e30", "train.warmup_ratio=0", "train.max_steps=6", "train.logging_steps=1",
             "train.save_steps=1", "data.max_eval_samples=8", "train.save_model=false", "hydra.run.dir=outputs/nan"]


def test_non_finite_loss_stops_the_run_failed_with_step_and_last_metrics(workdir):
    result = run_cli(*DIVERGING, cwd=workdir)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "non-finite loss or gradient at step 2" in result.stderr
    assert "last logged metrics: loss=7.6" in result.stderr
    assert f"last good checkpoint: {workdir}/outputs/nan/checkpoints/step-1" in result.stderr
    assert checkpoint_steps(workdir / "outputs" / "nan") == [1]  # the NaN step never reached a checkpoint
    run = runs_by_dir(workdir)["nan"]
    assert run.info.status == "FAILED"
    assert "NonFiniteError: non-finite loss or gradient at step 2" in run.data.tags["error"]


def test_non_finite_steps_are_skipped_when_asked(workdir):
    result = run_cli(*DIVERGING, "train.on_nonfinite=skip", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2: non-finite loss or gradient (grad_norm=nan); update skipped" in result.stderr
    run = runs_by_dir(workdir)["nan"]
    assert run.info.status == "FINISHED"
    # Skipping keeps step 1's (absurd but finite) weights, whose gradient is NaN every time.
    assert history(workdir, run, "nonfinite_skipped_steps") == {2: 1, 3: 2, 4: 3, 5: 4, 6: 5}


def test_skipped_steps_are_counted_on_across_a_resume(workdir):
    result = run_cli(*DIVERGING, "train.on_nonfinite=skip", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = workdir / "outputs" / "nan"
    for step in (4, 5, 6):  # as if the run had been stopped after step 3
        shutil.rmtree(run_dir / "checkpoints" / f"step-{step}")
    resumed = run_cli(f"resume={run_dir}", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step-3" in resumed.stderr
    # The steps logged again after the resume (the last values) go on counting from step 3's 2.
    assert history(workdir, runs_by_dir(workdir)["nan"], "nonfinite_skipped_steps") == {2: 1, 3: 2, 4: 3, 5: 4, 6: 5}


def test_unwritable_output_dir_is_named_before_training(tmp_path):
    from cpo_exp.checkpoint import CheckpointError, check_writable

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match=f"output dir {blocker}/run is not writable"):
        check_writable(blocker / "run")


def test_secrets_never_reach_mlflow(workdir):
    secret = "hf_SECRET_VALUE_123"
    result = run_cli("train.max_steps=1", "data.max_eval_samples=8", "train.save_model=false",
                     f"model.token={secret}", cwd=workdir)
    # The embedded model is local: the token is accepted and unused.
    assert result.returncode == 0, result.stderr[-3000:]
    client = store(workdir)
    run = client.search_runs([client.get_experiment_by_name("cpo_exp").experiment_id])[0]
    assert run.data.params["model.token"] == "***"
    assert secret not in run.info.run_name
    assert run.data.params["model.trust_remote_code"] == "False"
    local = Path(client.download_artifacts(run.info.run_id, "", str(workdir / "artifacts")))
    texts = [p.read_text() for p in local.rglob("*.yaml")]
    assert len(texts) >= 4 and not any(secret in t for t in texts)
    checkpoint_state = next(Path(run.data.tags["output_dir"]).glob("checkpoints/*/trainer_state.json"))
    assert secret not in checkpoint_state.read_text()


def test_redact_hides_secret_keys_and_overrides_but_not_tokenizer_settings():
    from cpo_exp.tracking import redact

    tree = {"model": {"token": "hf_x", "tokenizer": "t"}, "db_password": "p", "max_tokens": 3, "note": None,
            "overrides": ["model.token=hf_x", "beta=1"], "dirname": "beta=1,model.hub_token=hf_x,seed=2"}
    assert redact(tree) == {"model": {"token": "***", "tokenizer": "t"}, "db_password": "***", "max_tokens": 3,
                            "note": None, "overrides": ["model.token=***", "beta=1"],
                            "dirname": "beta=1,model.hub_token=***,seed=2"}


# --------------------------------------------------------------------------- tracking server outage


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 that a test can stop and start again (same store)."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        import requests

        deadline = time.monotonic() + 180
        while True:
            try:
                requests.get(self.uri + "/health", timeout=1).raise_for_status()
                return
            except requests.RequestException:
                assert self.proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.3)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        self.proc.wait(timeout=60)


@pytest.mark.slow
def test_tracking_server_outage_mid_run_loses_no_metrics(workdir):
    server = MlflowServer(workdir)
    server.start()
    run_dir = workdir / "outputs" / "outage"
    proc = start_cli("train.max_steps=120", "train.logging_steps=1", "train.save_steps=null", "train.eval_steps=40",
                     "data.max_eval_samples=8", "train.save_model=false", f"tracking.tracking_uri={server.uri}",
                     "hydra.run.dir=outputs/outage", cwd=workdir)
    try:
        log_file = run_dir / "cpo_exp.log"
        wait_for(lambda: log_file.is_file() and "step 3/120" in log_file.read_text(), proc)
        server.stop()
        wait_for(lambda: "tracking server unreachable" in log_file.read_text(), proc)
        server.start()
        _, stderr = proc.communicate(timeout=400)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        server.stop()
        raise
    else:
        try:
            assert proc.returncode == 0, stderr[-3000:]
            # Whichever call met the outage first (a metric batch, or the params and tables that wait
            # for the server) said so, and said when it was back.
            assert "MLflow tracking server unreachable" in stderr
            assert "MLflow tracking server is back after" in stderr
            client = MlflowClient(tracking_uri=server.uri)
            run = client.search_runs([client.get_experiment_by_name("cpo_exp").experiment_id])[0]
            assert run.info.status == "FINISHED"
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
            assert steps == list(range(1, 121))
            assert "train_seconds" in run.data.metrics
            assert not (run_dir / "unsent_metrics.jsonl").exists()
        finally:
            server.stop()


def child_pids(pid: int) -> dict[int, str]:
    """The processes whose parent is ``pid``, with their command lines (Linux /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                children[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
    return children


@pytest.mark.slow
def test_tracking_process_killed_mid_run_loses_neither_training_nor_metrics(workdir):
    """MLflow runs in a child process; if it dies, training goes on, the metrics go to a file and
    the exit status says so."""
    run_dir = workdir / "outputs" / "orphan"
    proc = start_cli("train.max_steps=30", "train.logging_steps=1", "train.save_steps=null", "train.eval_steps=null",
                     "data.max_eval_samples=8", "hydra.run.dir=outputs/orphan", cwd=workdir)
    log_file = run_dir / "cpo_exp.log"
    wait_for(lambda: log_file.is_file() and "step 3/30" in log_file.read_text(), proc)
    workers = [pid for pid, cmd in child_pids(proc.pid).items() if "cpo_exp.tracking.worker" in cmd]
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-3000:]
    assert "the MLflow worker process exited" in stderr and "training goes on" in stderr
    assert (run_dir / "model" / "model.safetensors").is_file()  # the training was not lost
    spilled = [json.loads(line) for line in (run_dir / "unsent_metrics.jsonl").read_text().splitlines()]
    assert any(row["step"] == 30 and "loss" in row["metrics"] for row in spilled)
    assert f"they are in {run_dir / 'unsent_metrics.jsonl'}" in stderr
    logged = {m.step for m in store(workdir).get_metric_history(runs_by_dir(workdir)["orphan"].info.run_id, "loss")}
    assert logged | {row["step"] for row in spilled if "loss" in row["metrics"]} == set(range(1, 31))


def test_a_store_elsewhere_keeps_its_artifacts_and_the_run_says_how_to_view_it(workdir, tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{store_dir / 'mlflow.db'}"
    result = run_cli("train.max_steps=2", "train.logging_steps=1", "data.max_eval_samples=8", "train.save_model=false",
                     f"tracking.tracking_uri={uri}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cpo_exp").experiment_id])
    # MLflow's default would be ./mlruns of the launch dir, wherever the store is.
    assert not (workdir / "mlruns").exists()
    assert (store_dir / "mlartifacts" / run.info.run_id / "artifacts" / "resolved_config.yaml").is_file()
    last = result.stderr.strip().splitlines()[-1]
    assert last.endswith(f"MLflow run {run.info.run_id}; to look at it: mlflow ui --backend-store-uri {uri}")
    # A fresh store: MLflow's own INFO lines about creating its tables stay out of the job's output.
    assert "database tables" not in result.stderr and "INFO mlflow" not in result.stderr


def test_metric_calls_reach_the_store_without_waiting_for_the_next_call_or_the_end(tmp_path):
    from cpo_exp.tracking import open_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    with open_run(uri, "prompt") as tracker:
        run_id = tracker.ready()
        for step in range(1, 6):
            tracker.log_metrics({"loss": 1.0 / step}, step)
        started = time.monotonic()
        # Nothing more comes, and the run stays open: the metrics still go out on their own.
        while len(client.get_metric_history(run_id, "loss")) < 5:
            assert time.monotonic() - started < 5, "the metrics did not reach the store"
            time.sleep(0.1)
        assert client.get_run(run_id).info.status == "RUNNING"
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert logged == {step: pytest.approx(1.0 / step) for step in range(1, 6)}
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_sigterm_before_training_ends_the_mlflow_run_killed(workdir, toy_rows):
    """A preemption while the data is still being tokenized: nothing to checkpoint, but the run
    must not be left RUNNING."""
    from conftest import write_jsonl

    rows = [{**row, "prompt": f"{row['prompt']} ({k})"} for k in range(10000) for row in toy_rows]
    train = write_jsonl(workdir / "big.jsonl", rows)  # a few seconds of tokenization
    run_dir = workdir / "outputs" / "early"
    proc = start_cli("data=files", f"data.train_files=[{train}]", "hydra.run.dir=outputs/early", cwd=workdir)
    wait_for(lambda: "train: tokenizing" in (run_dir / "cpo_exp.log").read_text()
             if (run_dir / "cpo_exp.log").is_file() else False, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM after step 0; no checkpoint" in stderr
    assert "nothing to resume" in stderr
    run = runs_by_dir(workdir)["early"]
    assert run.info.status == "KILLED"
    assert not (run_dir / "model").exists()
