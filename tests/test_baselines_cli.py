"""ORPO and DPO through the real CLI on the embedded default: they learn, DPO starts exactly at its
reference (loss log 2, rewards 0), reads its reference log-probs back from the cache on a second
run and on resume, and gives the same numbers with engine=lean as with engine=plain."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli

# Enough steps for the tiny model to visibly learn at its lr 1e-3 (eval accuracy at step 0:
# 0 for DPO, 0.5 for ORPO; at step 60 both above it).
LEARN = ["train.max_steps=60", "train.eval_steps=30", "train.logging_steps=10", "data.max_eval_samples=32",
         "train.save_model=false"]
EVAL_NAMES = ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies",
              "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected", "eval_nll_loss")
COMPUTED = "reference log-probs of"  # "<split>: reference log-probs of N pairs computed and cached in ..."
READ = "reference log-probs read from cache"


def cli(*args: str, workdir: Path):
    """The CLI with the datasets cache (tokenized data, reference log-probs) inside ``workdir``."""
    result = run_cli(*args, cwd=workdir, env={"HF_DATASETS_CACHE": str(workdir / "hf_cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def store(workdir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def run_named(workdir: Path, name: str):
    """The MLflow run whose output dir is ``outputs/<name>``."""
    client = store(workdir)
    runs = client.search_runs([client.get_experiment_by_name("cpo_exp").experiment_id])
    (run,) = [r for r in runs if Path(r.data.tags["output_dir"]).name == name]
    return run


def history(workdir: Path, run, name: str) -> dict[int, float]:
    """Metric value per step; a step logged twice (before and after a resume) keeps the last."""
    return {m.step: m.value for m in sorted(store(workdir).get_metric_history(run.info.run_id, name),
                                            key=lambda m: m.timestamp)}


def evals(workdir: Path, run) -> dict[str, dict[int, float]]:
    return {name: history(workdir, run, name) for name in EVAL_NAMES}


@pytest.mark.slow
def test_orpo_learns_on_the_embedded_default_and_logs_its_log_odds(workdir):
    cli("loss=orpo", *LEARN, "hydra.run.dir=outputs/orpo", workdir=workdir)
    run = run_named(workdir, "orpo")
    accuracy = history(workdir, run, "eval_rewards/accuracies")
    log_odds = history(workdir, run, "eval_log_odds_chosen")
    assert sorted(accuracy) == [0, 30, 60]
    assert accuracy[60] > accuracy[0]
    assert log_odds[60] > log_odds[0]
    assert "log_odds_ratio" in run.data.metrics and run.data.params["loss.name"] == "orpo"


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory) -> Path:
    """One launch dir, one datasets cache: ``loss=dpo`` twice with engine=plain, then engine=lean."""
    workdir = tmp_path_factory.mktemp("dpo")
    outputs = {name: cli("loss=dpo", *LEARN, *extra, f"hydra.run.dir=outputs/{name}", workdir=workdir)
               for name, extra in (("first", ()), ("second", ()), ("lean", ("engine=lean",)))}
    for name, result in outputs.items():
        (workdir / f"{name}.stderr").write_text(result.stderr)
    return workdir


@pytest.mark.slow
def test_dpo_starts_at_log_2_with_zero_rewards_and_learns(dpo_runs):
    first = evals(dpo_runs, run_named(dpo_runs, "first"))
    assert first["eval_loss"][0] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins",
                 "eval_rewards/accuracies"):
        assert first[name][0] == 0.0, name
    accuracy = first["eval_rewards/accuracies"]
    assert sorted(accuracy) == [0, 30, 60] and accuracy[60] > accuracy[0]
    assert first["eval_rewards/margins"][60] > 0 and first["eval_loss"][60] < math.log(2)
    assert "train: reference log-probs of 1500 pairs computed and cached" in (dpo_runs / "first.stderr").read_text()


@pytest.mark.slow
def test_a_second_dpo_run_reads_the_reference_log_probs_from_the_cache(dpo_runs):
    stderr = (dpo_runs / "second.stderr").read_text()
    assert f"train: {READ}" in stderr and f"eval: {READ}" in stderr
    assert COMPUTED not in stderr
    first, second = (evals(dpo_runs, run_named(dpo_runs, name)) for name in ("first", "second"))
    assert second == first  # same reference, same seed: the same run


@pytest.mark.slow
def test_dpo_with_engine_lean_equals_engine_plain_and_measures_against_its_own_forward(dpo_runs):
    stderr = (dpo_runs / "lean.stderr").read_text()
    # The plain runs' cached log-probs differ from lean's forward by float rounding, which a strict
    # ">" would count as won pairs at step 0: lean computes (and caches) its own.
    assert READ not in stderr and f"train: {COMPUTED}" in stderr
    plain, lean = (evals(dpo_runs, run_named(dpo_runs, name)) for name in ("first", "lean"))
    assert lean["eval_rewards/accuracies"][0] == 0.0 and lean["eval_rewards/margins"][0] == 0.0
    for name in EVAL_NAMES:
        assert sorted(lean[name]) == sorted(plain[name]), name
        for step, value in plain[name].items():
            assert lean[name][step] == pytest.approx(value, rel=1e-4, abs=1e-4), (name, step)


@pytest.mark.slow
def test_a_resumed_dpo_run_reads_the_cached_reference_and_ends_as_the_uninterrupted_one(workdir):
    schedule = ["loss=dpo", "train.max_steps=20", "train.save_steps=5", "train.logging_steps=5",
                "train.eval_steps=10", "data.max_eval_samples=16", "train.save_model=false",
                "hydra.run.dir=outputs/dpo"]
    cli(*schedule, workdir=workdir)
    run_dir = workdir / "outputs" / "dpo"
    uninterrupted = evals(workdir, run_named(workdir, "dpo"))
    train_loss = history(workdir, run_named(workdir, "dpo"), "loss")
    for step in (15, 20):  # as if the run had been stopped after step 10
        shutil.rmtree(run_dir / "checkpoints" / f"step-{step}")

    resumed = cli(f"resume={run_dir}", workdir=workdir)
    assert f"resumed from {run_dir}/checkpoints/step-10" in resumed.stderr
    assert f"train: {READ}" in resumed.stderr and f"eval: {READ}" in resumed.stderr
    assert COMPUTED not in resumed.stderr
    run = run_named(workdir, "dpo")
    assert run.info.status == "FINISHED"
    ended = evals(workdir, run)
    for name in EVAL_NAMES:
        assert ended[name] == pytest.approx(uninterrupted[name], rel=1e-5, abs=1e-6), name
    assert history(workdir, run, "loss") == pytest.approx(train_loss, rel=1e-5, abs=1e-6)
