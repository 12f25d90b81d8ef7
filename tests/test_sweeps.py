"""Sweeps: presets that compose, real multiruns (sequential, joblib, Optuna, against a server),
a parent MLflow run per sweep, failures that do not take the sweep down, and the report."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import joblib
import pytest
import requests
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import QUICK, run_cli

from cpo_exp.cli import config_dir, with_sweep_mode
from cpo_exp.config import validate
from cpo_exp.report import REPORT_FILES
from cpo_exp.report import main as report_main
from cpo_exp.sweep import SweepJob
from cpo_exp.tracking.store import Store, SweepRecord

QUICK_SWEEP = [*QUICK, "train.save_model=false"]
CONF = Path(config_dir())


# ------------------------------------------------------------------ presets compose


def _presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("name", _presets("experiment"))
def test_every_experiment_composes_and_validates(compose, name):
    cfg = compose([f"experiment={name}"])
    validate(cfg)
    assert cfg.loss.name in ("sigmoid", "simpo", "orpo", "dpo")


def test_recipes_carry_the_published_loss_settings(compose):
    cpo, simpo, cpo_simpo = (compose([f"experiment={n}"]) for n in ("cpo_alma_r", "simpo_paper", "cpo_simpo"))
    assert (cpo.loss.name, cpo.beta, cpo.cpo_alpha) == ("sigmoid", 0.1, 1.0)
    assert (simpo.loss.name, simpo.beta, simpo.simpo_gamma, simpo.cpo_alpha) == ("simpo", 2.5, 1.4, 0.0)
    assert (cpo_simpo.loss.name, cpo_simpo.beta, cpo_simpo.simpo_gamma, cpo_simpo.cpo_alpha) == (
        "simpo", 10.0, 5.4, 0.05)
    # The schedule stays the model's: a recipe overrides only the loss.
    assert simpo.train == compose([]).train


@pytest.mark.parametrize("name", _presets("sweep"))
def test_every_sweep_preset_is_a_multirun_whose_jobs_all_compose(compose, name):
    assert with_sweep_mode([f"sweep={name}", "train.seed=1"]) == ["--multirun", f"sweep={name}", "train.seed=1"]
    cfg = compose([f"sweep={name}"], hydra=True)
    params = cfg.hydra.sweeper.params
    assert params
    import itertools

    grid = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
    for job in itertools.product(*grid):
        validate(compose([f"sweep={name}", *job]))


@pytest.mark.parametrize("name", _presets("hparams_search"))
def test_every_hparams_search_preset_composes_with_its_direction_from_the_objective(compose, name):
    assert with_sweep_mode([f"hparams_search={name}"]) == ["--multirun", f"hparams_search={name}"]
    cfg = compose([f"hparams_search={name}", "objective.direction=minimize"], hydra=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "minimize"
    assert cfg.hydra.sweeper.params
    validate(compose([f"hparams_search={name}"]))


def test_only_a_sweep_preset_adds_the_multirun_flag_and_never_beside_another_mode_flag():
    for args in (["loss=simpo"], ["sweep=null"], ["hparams_search="], ["-m", "sweep=simpo_grid"],
                 ["--cfg", "job", "sweep=simpo_grid"], ["sweep=simpo_grid", "--help"], ["--info=config", "sweep=a"]):
        assert with_sweep_mode(args) == args
    assert with_sweep_mode(["+sweep=simpo_grid"])[0] == "--multirun"


def test_an_unknown_objective_metric_is_named(compose):
    from cpo_exp.config import ConfigError

    cfg = compose(["objective.metric=eval_bleu"])
    with pytest.raises(ConfigError, match="objective.metric must be one of"):
        validate(cfg)


# ------------------------------------------------------------------ real multiruns


def _store(workdir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def _sweep_dir(workdir: Path) -> Path:
    (found,) = workdir.glob("outputs/multirun/*/*")
    return found


def _parent_and_children(client: MlflowClient, experiment: str = "cpo_exp"):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    children = [r for r in runs if r is not parent]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert all(r.data.tags["sweep_id"] == parent.info.run_id for r in children)
    return parent, children


def _assert_valid_report(sweep_dir: Path, jobs: int) -> None:
    for name in REPORT_FILES:
        assert (sweep_dir / name).is_file(), name
    for png in ("eval_curves.png", "objective.png"):
        with Image.open(sweep_dir / png) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 200
    rows = (sweep_dir / "report.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + jobs


@pytest.mark.slow
def test_grid_sweep_makes_one_parent_run_with_a_child_per_job(workdir):
    result = run_cli("-m", "train.save_model=false", "loss=sigmoid,simpo", "beta=0.1,2.0", *QUICK, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    client = _store(workdir)
    parent, children = _parent_and_children(client)
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert all(r.info.status == "FINISHED" for r in children)
    # The swept values come first in the name (MLflow's table shows ~20 characters of it).
    # Hydra's sweeper normalises values (false -> False), hence the lower().
    assert {r.info.run_name.lower() for r in children} == {
        f"loss={loss},beta={beta},train.save_model=false,{','.join(QUICK)}"
        for loss in ("sigmoid", "simpo") for beta in ("0.1", "2.0")
    }
    assert {json.loads(r.data.tags["overrides"])[0].lower() for r in children} == {"train.save_model=false"}
    assert {r.data.tags["job_num"] for r in children} == {"0", "1", "2", "3"}
    assert {r.data.tags["sweep_dir"] for r in children} == {parent.data.tags["sweep_dir"]}
    assert {r.data.tags["choice/loss"] for r in children} == {"sigmoid", "simpo"}
    # The sweep definition and its outcome are on the parent.
    assert parent.data.params["sweep.overrides"].startswith("train.save_model=false loss=sigmoid,simpo beta=0.1,2.0")
    assert parent.data.params["sweep.launcher"].endswith("BasicLauncher")
    assert parent.data.params["objective.metric"] == "eval_rewards/accuracies"
    assert parent.data.tags["jobs"] == "4" and parent.data.tags["failed_jobs"] == "0"
    best = max(children, key=lambda r: r.data.metrics["eval_rewards/accuracies"])
    assert parent.data.metrics["best/eval_rewards/accuracies"] == best.data.metrics["eval_rewards/accuracies"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.yaml", "multirun.yaml", "report"} <= artifacts
    sweep_dir = _sweep_dir(workdir)
    assert SweepRecord.read(sweep_dir).parent_run_id == parent.info.run_id
    _assert_valid_report(sweep_dir, jobs=4)


@pytest.mark.slow
def test_parallel_jobs_on_a_fresh_sqlite_store_all_complete_sharing_the_cores(workdir, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the joblib launcher sizes its workers' pools
    result = run_cli("-m", "loss=sigmoid,simpo", "beta=0.1,2.0", "hydra/launcher=joblib",
                     "hydra.launcher.n_jobs=2", *QUICK_SWEEP, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = _parent_and_children(_store(workdir))
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.launcher.n_jobs"] == "2"
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert all("eval_rewards/accuracies" in r.data.metrics for r in children)
    # Two jobs on N cores share them instead of each taking all N.
    expected = max(1, joblib.cpu_count() // 2)
    assert {r.data.params["hardware.torch_threads"] for r in children} == {str(expected)}


def _interrupt(workdir: Path, args: list[str], job: int, line: str, sig: int = signal.SIGINT,
               timeout: float = 180) -> tuple[int, str]:
    """``python -m cpo_exp ARGS``, sent ``sig`` once sweep job ``job``'s log holds ``line``: (exit status, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "cpo_exp", *args], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not any(line in log.read_text() for log in workdir.glob(f"outputs/multirun/*/*/{job}/cpo_exp.log")):
        assert proc.poll() is None and time.monotonic() < deadline, f"job {job} never logged {line!r}"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_sweep_stopped_by_a_signal_ends_its_parent_run_killed(workdir, sig):
    returncode, stderr = _interrupt(workdir, ["-m", "loss=sigmoid,simpo", "train.max_steps=5000", "train.logging_steps=2",
                                              "train.eval_steps=null", "train.save_steps=null", "data.max_eval_samples=8",
                                              "train.save_model=false"], job=0, line="step 4/5000", sig=sig)
    assert returncode == 128 + sig, stderr[-3000:]
    parent, children = _parent_and_children(_store(workdir))
    assert [r.info.status for r in children] == ["KILLED"]  # the second job never started
    assert parent.info.status == "KILLED", stderr[-3000:]


@pytest.mark.slow
def test_ctrl_c_between_a_sweeps_jobs_ends_it_killed_in_one_line(workdir):
    # Once the first job has ended its run: the signal lands while Hydra sets the second one up.
    returncode, stderr = _interrupt(workdir, ["-m", "loss=sigmoid,simpo,ipo", *QUICK_SWEEP], job=0, line="to look at it")
    assert returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "cpo_exp: stopped by SIGINT" in stderr
    parent, children = _parent_and_children(_store(workdir))
    assert parent.info.status == "KILLED"
    assert [r.info.status for r in sorted(children, key=lambda r: r.data.tags["job_num"])][0] == "FINISHED"
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)


@pytest.fixture(scope="module")
def failed_sweep(tmp_path_factory):
    """A sweep with one impossible job (beta=-1), run once for the tests below."""
    workdir = tmp_path_factory.mktemp("failed_sweep")
    result = run_cli("-m", "loss=simpo", "beta=2.0,-1", *QUICK_SWEEP, cwd=workdir)
    return workdir, result


@pytest.mark.slow
def test_a_failing_job_does_not_take_the_sweep_down(failed_sweep):
    workdir, result = failed_sweep
    assert result.returncode != 0
    assert "beta must be > 0" in result.stderr
    parent, children = _parent_and_children(_store(workdir))
    by_beta = {next(o for o in json.loads(r.data.tags["overrides"]) if o.startswith("beta=")): r for r in children}
    assert by_beta["beta=2.0"].info.status == "FINISHED"
    assert by_beta["beta=-1"].info.status == "FAILED"
    assert "beta must be > 0" in by_beta["beta=-1"].data.tags["error"]
    assert parent.info.status == "FAILED" and parent.data.tags["failed_jobs"] == "1"
    report = (_sweep_dir(workdir) / "report.md").read_text()
    assert "| FAILED |" in report and "beta must be > 0" in report and "sweep failed" in report


@pytest.mark.slow
def test_report_from_the_sweep_dir_or_the_parent_run_id(failed_sweep, tmp_path):
    workdir, _ = failed_sweep
    sweep_dir = _sweep_dir(workdir)
    for name in REPORT_FILES:
        (sweep_dir / name).unlink()
    result = run_cli(str(sweep_dir), cwd=workdir, module="cpo_exp.report")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_valid_report(sweep_dir, jobs=2)
    assert "| FAILED |" in result.stdout and "| FINISHED |" in result.stdout

    parent_id = SweepRecord.read(sweep_dir).parent_run_id
    out = tmp_path / "elsewhere"
    assert report_main([parent_id, "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--out", str(out)]) == 0
    _assert_valid_report(out, jobs=2)
    client = _store(workdir)
    logged = {a.path for a in client.list_artifacts(parent_id, "report")}
    assert {f"report/{name}" for name in REPORT_FILES} <= logged


@pytest.mark.slow
def test_optuna_search_returns_the_objective_and_records_the_best_trial(workdir):
    result = run_cli("hparams_search=optuna_simpo", "objective.n_trials=3", *QUICK_SWEEP, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = _parent_and_children(_store(workdir))
    assert parent.data.params["sweep.direction"] == "maximize"  # from objective.direction
    assert parent.info.status == "FINISHED" and len(children) == 3
    # The study is stored where optuna-dashboard can read it, next to the MLflow store.
    assert parent.data.params["sweep.storage"] == f"sqlite:///{workdir / 'optuna.db'}"
    assert parent.data.tags["optuna.complete_trials"] == "3"
    values = [r.data.metrics["eval_rewards/accuracies"] for r in children]
    assert parent.data.metrics["optuna/best_value"] == max(values)
    assert {"optuna.best_params.beta", "optuna.best_params.simpo_gamma_ratio",
            "optuna.best_params.train.learning_rate"} <= set(parent.data.params)
    # The SimPO authors' space: beta in [2, 10], gamma/beta in [0.3, 0.8]
    for child in children:
        beta, ratio = float(child.data.params["beta"]), float(child.data.params["simpo_gamma_ratio"])
        assert 2.0 <= beta <= 10.0 and 0.3 <= ratio <= 0.8
    assert {r.data.tags["choice/loss"] for r in children} == {"simpo"}
    assert (_sweep_dir(workdir) / "optimization_results.yaml").is_file()


def _trials(workdir: Path) -> list:
    import optuna

    storage = f"sqlite:///{workdir / 'optuna.db'}"
    if "optuna_simpo" not in optuna.study.get_all_study_names(storage):
        return []
    return optuna.load_study(study_name="optuna_simpo", storage=storage).trials


@pytest.mark.slow
def test_an_interrupted_optuna_search_run_again_continues_its_study_to_its_size(workdir):
    from optuna.trial import TrialState

    # Trials long enough (60 steps) to be stopped in training, as a user's Ctrl-C would be.
    command = ["hparams_search=optuna_simpo", "objective.n_trials=5", "train.max_steps=60", "train.logging_steps=3",
               "train.eval_steps=30", "data.max_eval_samples=16", "train.save_model=false"]
    # Stopped once two trials are complete and the third is training.
    returncode, stderr = _interrupt(workdir, command, job=2, line="step 3/60", timeout=300)
    assert returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert [t.state for t in _trials(workdir)] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL]
    assert "did not finish and are marked FAIL" in stderr
    assert "run the same command again to continue the Optuna study" in stderr and "resume=" not in stderr

    result = run_cli(*command, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "holds 2 of 5 complete trials: running 3 more" in result.stdout + result.stderr
    trials = _trials(workdir)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    # The resumed command draws new points (its sampler seed moved on with the study).
    points = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(points)) == len(points)
    client = _store(workdir)
    runs = client.search_runs([client.get_experiment_by_name("cpo_exp").experiment_id])
    parents = sorted((r for r in runs if r.data.tags.get("sweep_role") == "parent"), key=lambda r: r.info.start_time)
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
    second = parents[1]
    assert second.data.tags["optuna.complete_trials"] == "5" and second.data.params["sweep.n_trials"] == "3"
    complete = [t.value for t in trials if t.state == TrialState.COMPLETE]
    assert second.data.metrics["optuna/best_value"] == max(complete)  # over the whole study

    again = run_cli(*command, cwd=workdir)  # a complete study: nothing more to run
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is complete (5 trials): nothing to run" in again.stdout + again.stderr
    assert len(_trials(workdir)) == 6


def test_an_optuna_study_that_cannot_be_opened_stops_the_search_before_any_job(workdir):
    started = time.monotonic()
    result = run_cli("hparams_search=optuna_simpo", "hydra.sweeper.storage=sqlite:////no/such/dir/optuna.db",
                     *QUICK_SWEEP, cwd=workdir, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "hydra.sweeper.storage=sqlite:////no/such/dir/optuna.db: the Optuna study 'optuna_simpo' cannot be " \
           "opened" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not list(workdir.glob("outputs/multirun/*/*/0")), "a job ran"
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_a_launcher_chosen_inside_a_swept_experiment_is_rejected(workdir):
    extra = workdir / "extra_conf" / "experiment"
    extra.mkdir(parents=True)
    (extra / "parallel.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /hydra/launcher: joblib\n")
    result = run_cli("-m", "experiment=parallel,cpo_alma_r", f"hydra.searchpath=[file://{extra.parent}]",
                     *QUICK_SWEEP, cwd=workdir)
    # Hydra 1.4 refuses it itself, in one line, when it composes the jobs: before any of them runs.
    assert result.returncode != 0
    assert "'hydra/launcher' must be selected before the sweep starts" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    parent, children = _parent_and_children(_store(workdir))
    assert parent.info.status == "FAILED" and children == []


@pytest.mark.slow
def test_a_launcher_setting_inside_a_swept_experiment_is_refused(workdir):
    extra = workdir / "extra_conf" / "experiment"
    extra.mkdir(parents=True)
    (extra / "wide.yaml").write_text("# @package _global_\nhydra:\n  launcher:\n    n_jobs: 4\n")
    result = run_cli("-m", "experiment=wide,cpo_alma_r", "hydra/launcher=joblib",
                     f"hydra.searchpath=[file://{extra.parent}]", *QUICK_SWEEP, cwd=workdir)
    assert result.returncode != 0
    assert "'hydra.launcher' must be configured before the sweep starts" in result.stderr, result.stderr[-3000:]
    parent, children = _parent_and_children(_store(workdir))
    assert parent.info.status == "FAILED" and children == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1, stopped after the test."""
    port = _free_port()
    root = tmp_path / "server"
    root.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: the server and the workers it spawns
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            try:
                if requests.get(uri + "/health", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_parallel_sweep_against_a_tracking_server(workdir, mlflow_server):
    result = run_cli("-m", "loss=simpo", "beta=0.1,2.0", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                     *QUICK_SWEEP, cwd=workdir, env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (workdir / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=mlflow_server)
    parent, children = _parent_and_children(client)
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(r.info.status == "FINISHED" and "eval_loss" in r.data.metrics for r in children)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {"report/report.md"}
    assert SweepRecord.read(_sweep_dir(workdir)).tracking_uri == mlflow_server


def test_report_of_a_sweep_still_running_shows_what_exists(tmp_path):
    """A parent still RUNNING with one finished job and one that has not evaluated yet."""
    from cpo_exp.report import write_report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("cpo_exp")
    parent = client.create_run(experiment, run_name="sweep: beta=1,2", tags={"sweep_role": "parent"}).info.run_id
    client.log_param(parent, "objective.metric", "eval_rewards/accuracies")
    for num, beta in enumerate(("1", "2")):
        child = client.create_run(experiment, run_name=f"beta={beta}", tags={
            "mlflow.parentRunId": parent, "job_num": str(num), "overrides": json.dumps([f"beta={beta}", "x=1"])})
        if num == 0:
            for step, value in ((0, 0.5), (10, 0.75)):
                client.log_metric(child.info.run_id, "eval_rewards/accuracies", value, step=step)
            client.set_terminated(child.info.run_id, "FINISHED")
    paths = write_report(Store(uri), parent, tmp_path / "report")
    _assert_valid_report(tmp_path / "report", jobs=2)
    table = paths[0].read_text()
    assert "| 0 | 1 | FINISHED |" in table and "| 1 | 2 | RUNNING |" in table and "sweep running" in table
    assert "| x |" not in table.splitlines()[0]  # only swept values get a column


def test_a_jobs_run_name_puts_the_swept_values_first():
    record = SweepRecord("unused", ["train.max_steps=6", "loss=sigmoid,simpo", "data.train_files=[a.jsonl,b.jsonl]",
                                    "+beta=range(1,3)"], launcher={}, sweeper={"params": {"simpo_gamma": "0.5,1"}})
    job = SweepJob(record, ["train.max_steps=6", "loss=simpo", "data.train_files=[a.jsonl,b.jsonl]", "+beta=2",
                            "model.token=hf_x", "simpo_gamma=1"], num=3)
    # A list value has commas but is one value; the sweeper's params are swept too; secrets stay out.
    assert job.swept_keys() == ["loss", "beta", "simpo_gamma"]
    assert job.run_name() == ("loss=simpo,+beta=2,simpo_gamma=1,train.max_steps=6,data.train_files=[a.jsonl,b.jsonl],"
                              "model.token=***")
