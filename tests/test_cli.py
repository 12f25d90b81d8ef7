"""The real CLI in a subprocess, read back from the real MLflow store it wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import QUICK, run_cli, write_jsonl

HEADLINE = ("rewards/accuracies", "rewards/margins", "logps/chosen", "nll_loss", "loss")


def store(workdir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def only_run(workdir: Path):
    client = store(workdir)
    experiment = client.get_experiment_by_name("cpo_exp")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


@pytest.mark.slow
def test_default_run_learns_and_logs_to_mlflow(workdir):
    """The embedded default, unchanged: the model visibly learns and everything lands in MLflow."""
    result = run_cli(cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = only_run(workdir)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "default"
    for name in HEADLINE:
        assert name in run.data.metrics and "eval_" + name in run.data.metrics
    evals = client.get_metric_history(run.info.run_id, "eval_rewards/accuracies")
    margins = client.get_metric_history(run.info.run_id, "eval_rewards/margins")
    first, last = min(evals, key=lambda m: m.step), max(evals, key=lambda m: m.step)
    assert first.step == 0 and last.value > first.value + 0.2
    assert max(margins, key=lambda m: m.step).value > min(margins, key=lambda m: m.step).value
    assert run.data.params["loss.name"] == "sigmoid"
    # Where the wall time went (the run's last log line says the same).
    assert 0 < run.data.metrics["startup_seconds"] and 0 < run.data.metrics["outside_compute_fraction"] < 1
    assert "outside them" in result.stderr
    assert run.data.params["train.learning_rate"] == "0.001"
    assert run.data.tags["choice/model"] == "tiny"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"resolved_config.yaml", "hydra", "cpo_exp.log"} <= artifacts
    output_dir = Path(run.data.tags["output_dir"])
    assert (output_dir / "model" / "config.json").is_file()
    assert (output_dir / "model" / "tokenizer.json").is_file()
    assert output_dir.parent.parent == workdir / "outputs"


@pytest.mark.slow
def test_simpo_without_nll_is_named_after_its_overrides(workdir):
    result = run_cli("loss=simpo", "cpo_alpha=0", *QUICK, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    _, run = only_run(workdir)
    assert run.info.run_name.startswith("loss=simpo,cpo_alpha=0")
    assert run.data.params["loss.name"] == "simpo" and run.data.params["cpo_alpha"] == "0.0"
    assert run.data.metrics["nll_loss"] > 0  # still reported as a diagnostic (TRL logs 0)
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize(
    "override,message",
    [("beta=-1", "beta must be > 0"), ("loss=kto", "Could not find 'loss/kto'"),
     ("train.learning_rate=fast", "could not be converted to Float\n    full_key: train.learning_rate"),
     ("+los=simpo", "unknown config key 'los' in '+los=simpo': did you mean 'loss'?"),
     ("train.lr=1e-3", "unknown config key 'train.lr' in 'train.lr=1e-3': did you mean 'train.learning_rate'?"),
     ("model=hf", "model.name_or_path must be set (it has no default)"),
     pytest.param("hardware=gpu", "hardware.cpu=false asks for a GPU, but none is visible (torch ",
                  marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: hardware=gpu trains"))],
)
def test_bad_override_fails_fast_and_trains_nothing(workdir, override, message):
    result = run_cli(override, cwd=workdir)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert not (workdir / "mlflow.db").exists()
    assert not list(workdir.glob("outputs/**/model"))


def test_bad_data_row_is_named_and_the_run_is_failed_in_mlflow(workdir, toy_rows):
    rows = toy_rows + [{"prompt": "p", "chosen": "", "rejected": "x"}]
    train = write_jsonl(workdir / "train.jsonl", rows)
    result = run_cli("data=files", f"data.train_files=[{train}]", cwd=workdir)
    assert result.returncode == 2
    assert f"train row 4: 'chosen' is empty ({train}, line 5)" in result.stderr
    _, run = only_run(workdir)
    assert run.info.status == "FAILED" and "chosen' is empty" in run.data.tags["error"]
    assert "model.num_parameters" not in run.data.params  # stopped before the model was loaded


@pytest.mark.slow
def test_hf_model_folder_and_local_files_use_the_same_path(workdir, toy_rows):
    """``model=hf`` on a saved folder and ``data=files`` with JSONL train and Parquet eval."""
    first = run_cli(*QUICK, "tracking=none", cwd=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = next(workdir.glob("outputs/*/*/model"))
    train = write_jsonl(workdir / "train.jsonl", toy_rows * 3)
    import pandas as pd

    pd.DataFrame(toy_rows).to_parquet(workdir / "eval.parquet")
    result = run_cli("model=hf", f"model.name_or_path={saved}", "data=files", f"data.train_files=[{train}]",
                     f"data.eval_files=[{workdir / 'eval.parquet'}]", "train.max_steps=2", "train.logging_steps=1",
                     cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    _, run = only_run(workdir)
    assert run.data.params["data.train_rows"] == "12" and run.data.params["data.eval_rows"] == "4"
    assert run.data.params["train.learning_rate"] == "1e-06"


def test_tracking_none_writes_no_store(workdir):
    result = run_cli(*QUICK, "tracking=none", "train.save_model=false", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (workdir / "mlflow.db").exists()


def test_mlflow_tracking_uri_from_the_environment_wins(workdir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("store") / "other.db"
    result = run_cli(*QUICK, "train.save_model=false", cwd=workdir,
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{elsewhere}"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert elsewhere.exists() and not (workdir / "mlflow.db").exists()


def test_unreachable_tracking_server_is_named_before_training(workdir):
    result = run_cli(*QUICK, "tracking.tracking_uri=http://127.0.0.1:9", cwd=workdir)
    assert result.returncode == 2
    assert "http://127.0.0.1:9 is not reachable" in result.stderr
    assert not list(workdir.glob("outputs/**/model"))


def test_console_script_equals_python_m(workdir):
    import shutil
    import subprocess
    import sys

    script = shutil.which("cpo-exp") or str(Path(sys.executable).parent / "cpo-exp")
    via_script = subprocess.run([script, "--cfg", "job"], cwd=workdir, capture_output=True, text=True)
    via_module = run_cli("--cfg", "job", cwd=workdir)
    assert via_script.returncode == 0, via_script.stderr
    assert via_script.stdout == via_module.stdout
