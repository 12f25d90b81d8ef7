"""Every data format trains through the real CLI; the summary and drops land in MLflow; the
tokenized data is cached across runs. (Bad data stopping the run: tests/test_cli.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli, write_jsonl
from test_data import CONVERSATIONAL, H4_SHAPE, IMPLICIT_CONVERSATIONAL, alma_row, hub_folder

SHORT = ["train.max_steps=2", "train.logging_steps=1", "train.per_device_train_batch_size=2",
         "train.per_device_eval_batch_size=2", "train.save_model=false"]


def cli(workdir: Path, *args: str):
    """The CLI with its own ``datasets`` cache (loaded files and tokenized splits)."""
    return run_cli(*args, *SHORT, cwd=workdir, env={"HF_DATASETS_CACHE": str(workdir / "hf_cache")})


def the_run(workdir: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cpo_exp").experiment_id])
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_conversational_files_train_and_log_the_data_summary(workdir):
    train = write_jsonl(workdir / "train.jsonl", CONVERSATIONAL * 4)
    result = cli(workdir, "data=files", f"data.train_files=[{train}]", "data.eval_fraction=0.25")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: 9 rows (conversational)" in result.stderr and "eval: 3 rows (conversational)" in result.stderr
    run = the_run(workdir)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.train_format"] == "conversational" and run.data.params["data.train_rows"] == "9"
    assert run.data.params["data.train_dropped"] == "0" and run.data.params["data.train_dropped_reasons"] == "none"
    assert run.data.params["data.eval_rows"] == "3" and run.data.params["data.train_truncated"] == "0"
    # Constants are not time series: no data/* metric, the whole summary is one table artifact.
    assert not [name for name in run.data.metrics if name.startswith("data/")]
    table = json.loads(Path(MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").download_artifacts(
        run.info.run_id, "data/summary.json", str(workdir))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [r["split"] for r in rows] == ["train", "eval"] and [r["rows"] for r in rows] == [9, 3]
    assert rows[0]["prompt_tokens_p50"] > 10 and rows[0]["chosen_tokens_max"] > 2
    assert "eval_loss" in run.data.metrics


@pytest.mark.slow
def test_implicit_prompt_hub_preset_trains_and_second_run_reads_the_tokenized_cache(workdir):
    """``data=ultrafeedback`` (trl-lib layout: conversations only) through the hub code path."""
    folder = hub_folder(workdir / "ultrafeedback", {"train": IMPLICIT_CONVERSATIONAL * 4,
                                                    "test": IMPLICIT_CONVERSATIONAL})
    args = ("data=ultrafeedback", f"data.path={folder}", "tracking=none")
    first = cli(workdir, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "train: 8 rows (conversational, implicit prompt)" in first.stderr
    assert "train: tokenizing 8 rows" in first.stderr and "eval: tokenizing 2 rows" in first.stderr
    cached = sorted((workdir / "hf_cache" / "cpo_exp_tokenized").glob("*.arrow"))
    second = cli(workdir, *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "tokenizing" not in second.stderr.replace("tokenized data read from cache", "")
    assert "train: tokenized data read from cache" in second.stderr
    assert sorted((workdir / "hf_cache" / "cpo_exp_tokenized").glob("*.arrow")) == cached and len(cached) == 2


@pytest.mark.slow
def test_h4_preset_skips_bad_rows_and_logs_why(workdir):
    bad = {"prompt": "x", "chosen": IMPLICIT_CONVERSATIONAL[0]["chosen"],
           "rejected": IMPLICIT_CONVERSATIONAL[0]["chosen"]}
    folder = hub_folder(workdir / "h4", {"train_prefs": H4_SHAPE * 3 + [bad], "test_prefs": H4_SHAPE})
    result = cli(workdir, "data=h4_ultrafeedback", f"data.path={folder}", "data.on_bad_rows=skip")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: dropping 1 of 7 row(s) (1 identical)" in result.stderr
    run = the_run(workdir)
    assert run.data.params["data.train_dropped"] == "1"
    assert run.data.params["data.train_dropped_reasons"] == "1 identical"
    assert run.data.params["data.train_rows"] == "6"


@pytest.mark.slow
def test_alma_r_preset_trains_through_its_adapter(workdir):
    alma = [alma_row("de-en", f"das Auto {i}", f"the car {i}", f"the automobile {i}", f"car the {i}",
                     (0.9, 0.8, 0.7)) for i in range(4)]
    folder = hub_folder(workdir / "alma", {"train": alma})
    result = cli(workdir, "data=alma_r", f"data.path={folder}", "data.name=null", "data.eval_fraction=0.25",
                 "tracking=none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: 6 rows (standard)" in result.stderr and "eval: 2 rows (standard)" in result.stderr

