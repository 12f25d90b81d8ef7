"""The sweep report's comparison over seeds: Student-t intervals checked against hand-computed
values, paired differences and their verdicts, the baseline, the grouping by everything but the
seed, running and failed jobs, the files and the parent run's summary; then one real multirun."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import run_cli

from cpo_exp.comparison import Job, compare, find_baseline, paired_difference, summarize, t_interval
from cpo_exp.report import REPORT_FILES, comparison_markdown, write_report
from cpo_exp.report import main as report_main
from cpo_exp.tracking.store import Store, SweepRecord


ACC = "eval_rewards/accuracies"

# Student-t quantiles t(1 - alpha/2, dof), from a printed table (and scipy.stats.t.ppf, once by hand).
T_975_DOF_1 = 12.706205
T_975_DOF_2 = 4.302653
T_950_DOF_2 = 2.919986


# ------------------------------------------------------------------ the interval arithmetic


def test_the_95_interval_of_1_2_3_is_2_plus_or_minus_2_484():
    interval = t_interval([1.0, 2.0, 3.0])
    assert (interval.n, interval.mean, interval.std) == (3, 2.0, 1.0)
    # half width = t(0.975, 2) * sd / sqrt(n) = 4.302653 * 1 / 1.7320508 = 2.484138
    assert interval.low == pytest.approx(2 - 2.484138, abs=1e-6)
    assert interval.high == pytest.approx(2 + 2.484138, abs=1e-6)
    assert T_975_DOF_2 / math.sqrt(3) == pytest.approx(2.484138, abs=1e-6)


def test_two_seeds_give_the_wide_interval_of_one_degree_of_freedom():
    interval = t_interval([0.5, 0.7])
    # sd = 0.141421; half width = 12.706205 * 0.141421 / 1.414214 = 1.2706205
    assert interval.mean == pytest.approx(0.6) and interval.std == pytest.approx(0.141421, abs=1e-6)
    assert (interval.low, interval.high) == (pytest.approx(0.6 - 1.2706205, abs=1e-6),
                                             pytest.approx(0.6 + 1.2706205, abs=1e-6))
    assert T_975_DOF_1 * 0.1 == pytest.approx(1.2706205, abs=1e-6)


def test_a_90_interval_uses_the_95th_percentile_of_t():
    interval = t_interval([1.0, 2.0, 3.0], confidence=0.90)
    # half width = 2.919986 / 1.7320508 = 1.685854
    assert (interval.low, interval.high) == (pytest.approx(2 - 1.685854, abs=1e-6),
                                             pytest.approx(2 + 1.685854, abs=1e-6))
    assert T_950_DOF_2 / math.sqrt(3) == pytest.approx(1.685854, abs=1e-6)


def test_one_value_has_a_mean_but_no_interval_and_none_has_nothing():
    one = t_interval([0.25])
    assert (one.n, one.mean, one.std, one.low, one.high) == (1, 0.25, None, None, None)
    assert not one.covers(0.25)
    assert t_interval([]) is None


# ------------------------------------------------------------------ grouping and baseline


def _jobs(table: dict[str, list[float]], key: str = ACC, finished: bool = True) -> list[Job]:
    """``{"loss=sigmoid,beta=0.1": [seed 1, seed 2, ...]}`` -> one Job per seed."""
    jobs = []
    for config, values in table.items():
        overrides = dict(part.split("=") for part in config.split(","))
        for seed, value in enumerate(values, start=1):
            if value is not None:
                jobs.append(Job({**overrides, "train.seed": str(seed)}, {key: value}, finished))
    return jobs


def test_jobs_that_differ_only_in_the_seed_are_one_configuration():
    jobs = [Job({"loss": "simpo", "train.seed": "1", "train.learning_rate": "1e-4"}, {ACC: 0.5}),
            Job({"loss": "simpo", "train.seed": "2", "train.learning_rate": "1e-4"}, {ACC: 0.7}),
            Job({"loss": "simpo", "train.seed": "1", "train.learning_rate": "1e-3"}, {ACC: 0.9}),
            Job({"loss": "sigmoid", "train.seed": "1", "train.learning_rate": "1e-4"}, {ACC: 0.1})]
    summaries = summarize(jobs, [ACC])
    assert [s.label for s in summaries] == ["loss=simpo,train.learning_rate=1e-4",
                                            "loss=simpo,train.learning_rate=1e-3",
                                            "loss=sigmoid,train.learning_rate=1e-4"]  # in order of appearance
    assert [s.intervals[ACC].n for s in summaries] == [2, 1, 1]
    assert summaries[0].intervals[ACC].mean == pytest.approx(0.6)


def test_the_baseline_is_named_by_its_swept_values_or_is_the_first_configuration():
    summaries = summarize(_jobs({"loss=sigmoid,beta=0.1": [0.5], "loss=sigmoid,beta=2.0": [0.6],
                                 "loss=simpo,beta=0.1": [0.7], "loss=simpo,beta=2.0": [0.8]}), [ACC])
    assert find_baseline(summaries, None) is summaries[0]
    assert find_baseline(summaries, "loss=simpo,beta=0.1") is summaries[2]
    assert find_baseline(summaries, "beta=2,loss=simpo") is summaries[3]  # any order; 2 names Hydra's 2.0
    with pytest.raises(ValueError, match=r"report.baseline='loss=ipo' matches 0 configurations; one of: "
                                         r"loss=sigmoid,beta=0.1; loss=sigmoid,beta=2.0"):
        find_baseline(summaries, "loss=ipo")
    with pytest.raises(ValueError, match="matches 2 configurations"):
        find_baseline(summaries, "loss=simpo")
    with pytest.raises(ValueError, match="write its swept values as key=value pairs"):
        find_baseline(summaries, "simpo")


# ------------------------------------------------------------------ paired differences


def _difference(base: list, candidate: list, direction: str = "maximize"):
    baseline, other = summarize(_jobs({"loss=sigmoid": base, "loss=simpo": candidate}), [ACC])
    return paired_difference(other, baseline, ACC, direction)


def test_a_difference_whose_interval_excludes_zero_is_better_when_maximizing_and_worse_when_minimizing():
    # differences 0.1, 0.2, 0.2: mean 0.166667, sd 0.057735, half width 4.302653 * 0.057735 / 1.732051 = 0.143422
    better = _difference([0.5, 0.6, 0.7], [0.6, 0.8, 0.9])
    assert better.verdict == "better"
    assert (better.interval.n, better.interval.mean) == (3, pytest.approx(0.166667, abs=1e-6))
    assert better.interval.low == pytest.approx(0.166667 - 0.143422, abs=1e-6)
    assert better.interval.high == pytest.approx(0.166667 + 0.143422, abs=1e-6)
    assert _difference([0.5, 0.6, 0.7], [0.6, 0.8, 0.9], direction="minimize").verdict == "worse"
    assert _difference([0.6, 0.8, 0.9], [0.5, 0.6, 0.7]).verdict == "worse"


def test_an_interval_that_covers_zero_is_no_clear_difference():
    same = _difference([0.5, 0.6, 0.7], [0.6, 0.5, 0.7])  # differences 0.1, -0.1, 0
    assert same.verdict == "no clear difference" and same.interval.mean == pytest.approx(0.0)


def test_pairing_by_seed_removes_what_the_seed_does_to_both():
    # The seeds move both a lot (0.1 .. 0.9): the two intervals overlap, the paired one is clear.
    # differences 0.1, 0.12, 0.08: mean 0.1, sd 0.02, half width 4.302653 * 0.02 / 1.732051 = 0.049683
    base, candidate = [0.1, 0.5, 0.9], [0.2, 0.62, 0.98]
    assert t_interval(candidate).low < t_interval(base).high
    diff = _difference(base, candidate)
    assert diff.verdict == "better"
    assert (diff.interval.low, diff.interval.high) == (pytest.approx(0.1 - 0.049683, abs=1e-6),
                                                       pytest.approx(0.1 + 0.049683, abs=1e-6))


def test_only_the_seeds_both_finished_are_paired():
    diff = _difference([0.5, 0.6, 0.7], [0.6, 0.8, None])  # the candidate's seed 3 never finished
    assert diff.interval.n == 2 and diff.interval.mean == pytest.approx(0.15)
    lonely = _difference([0.5, None], [None, 0.8])
    assert lonely.interval is None and lonely.verdict == "n=0: too few shared seeds"


def test_unfinished_or_non_finite_values_do_not_count():
    jobs = [*_jobs({"loss=simpo": [0.5, 0.7]}), *_jobs({"loss=simpo": [None, None, 0.9]}, finished=False),
            Job({"loss": "simpo", "train.seed": "4"}, {ACC: math.nan})]
    (summary,) = summarize(jobs, [ACC])
    assert summary.n_jobs == 4 and summary.intervals[ACC].n == 2 and summary.intervals[ACC].mean == pytest.approx(0.6)


def test_compare_picks_the_best_mean_by_direction_and_skips_the_baseline():
    jobs = _jobs({"loss=sigmoid": [0.5, 0.6], "loss=simpo": [0.7, 0.8], "loss=ipo": [0.1, 0.2]})
    up = compare(jobs, ACC, "maximize")
    assert up.best.label == "loss=simpo" and up.baseline.label == "loss=sigmoid"
    assert set(up.differences) == {(("loss", "simpo"),), (("loss", "ipo"),)}
    assert compare(jobs, ACC, "minimize", baseline="loss=simpo").best.label == "loss=ipo"
    missing = compare(jobs, ACC, "maximize", baseline="loss=hinge")
    assert missing.baseline is None and missing.differences == {} and "matches 0 configurations" in missing.baseline_error


def test_a_sweep_without_seeds_says_so_instead_of_empty_interval_columns():
    jobs = [Job({"beta": "0.1"}, {ACC: 0.5}), Job({"beta": "2.0"}, {ACC: 0.75})]
    text = comparison_markdown(compare(jobs, ACC, "maximize"), ["beta"])
    assert "One job per configuration: no intervals and no paired differences" in text
    assert "| beta | n | value |" in text and "| 2.0 | 1/1 | 0.75 |" in text and "verdict" not in text
    assert "**beta=2.0**, 0.75, n=1/1." in text


# ------------------------------------------------------------------ the report of a stored sweep


SEEDS = {  # (loss, seed) -> final accuracy; None: a job that is still running (no final value)
    ("sigmoid", 1): 0.5, ("sigmoid", 2): 0.6, ("sigmoid", 3): 0.7,
    ("simpo", 1): 0.6, ("simpo", 2): 0.8, ("simpo", 3): None,
}


def _stored_sweep(tmp_path: Path, baseline: str | None = None) -> tuple[str, str]:
    """A parent run with 2 configurations x 3 seeds: simpo's seed 3 still RUNNING, plus one FAILED
    sigmoid job (seed 4) that logged a value before it failed."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("cpo_exp")
    parent = client.create_run(experiment, run_name="sweep", tags={"sweep_role": "parent"}).info.run_id
    client.log_param(parent, "objective.metric", ACC)
    client.log_param(parent, "report.confidence", "0.95")
    if baseline:
        client.log_param(parent, "report.baseline", baseline)
    jobs = [*SEEDS.items(), (("sigmoid", 4), 0.1)]
    for num, ((loss, seed), value) in enumerate(jobs):
        child = client.create_run(experiment, run_name=f"loss={loss},train.seed={seed}", tags={
            "mlflow.parentRunId": parent, "job_num": str(num),
            "overrides": json.dumps([f"loss={loss}", f"train.seed={seed}", "train.max_steps=2"])}).info.run_id
        for step, metric_value in ((0, 0.5), (2, value if value is not None else 0.55)):
            for metric in (ACC, "eval_rewards/margins", "eval_nll_loss", "eval_loss"):
                client.log_metric(child, metric, metric_value, step=step)
        if value is not None:
            client.set_terminated(child, "FAILED" if seed == 4 else "FINISHED")
    return uri, parent


def _csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {row["configuration"]: row for row in csv.DictReader(f)}


def test_report_compares_configurations_over_their_finished_seeds(tmp_path):
    uri, parent = _stored_sweep(tmp_path)
    out = tmp_path / "report"
    paths = write_report(Store(uri), parent, out)
    assert [p.name for p in paths] == list(REPORT_FILES)
    rows = _csv(out / "comparison.csv")
    sigmoid, simpo = rows["loss=sigmoid"], rows["loss=simpo"]
    # sigmoid: 3 finished of 4 jobs (seed 4 failed); simpo: 2 of 3 (seed 3 running).
    assert (sigmoid["n"], simpo["n"]) == ("3/4", "2/3")
    assert float(sigmoid[f"{ACC}_mean"]) == pytest.approx(0.6)
    assert float(sigmoid[f"{ACC}_std"]) == pytest.approx(0.1)
    # 0.6 +- 4.302653 * 0.1 / sqrt(3) = 0.6 +- 0.248414
    assert float(sigmoid[f"{ACC}_ci_low"]) == pytest.approx(0.6 - 0.248414, abs=1e-6)
    assert float(sigmoid[f"{ACC}_ci_high"]) == pytest.approx(0.6 + 0.248414, abs=1e-6)
    assert float(simpo["eval_nll_loss_mean"]) == pytest.approx(0.7)  # every final metric has its columns
    # simpo - sigmoid over seeds 1 and 2: 0.1 and 0.2, mean 0.15, sd 0.070711,
    # half width 12.706205 * 0.070711 / 1.414214 = 0.635310
    assert (sigmoid["baseline"], sigmoid["verdict"]) == ("yes", "baseline")
    assert simpo["diff_n"] == "2" and float(simpo["diff_mean"]) == pytest.approx(0.15)
    assert float(simpo["diff_ci_low"]) == pytest.approx(0.15 - 0.635310, abs=1e-6)
    assert simpo["verdict"] == "no clear difference"

    report = (out / "report.md").read_text()
    jobs_table, comparison = report.split("## Comparison over seeds")
    assert "| RUNNING |" in jobs_table and "| FAILED |" in jobs_table  # the per-job table stays
    assert "95 % Student-t interval of the mean over seeds, n-1 degrees of freedom" in comparison
    assert "| sigmoid | 3/4 | 0.6 | 0.1 | [0.3516, 0.8484] |  |  | baseline |" in comparison
    assert ("| simpo | 2/3 | 0.7 | 0.1414 | [-0.5706, 1.971] | 0.15 | [-0.4853, 0.7853] | no clear difference |"
            in comparison)
    assert "Best configuration by the mean of eval_rewards/accuracies (maximize): **loss=simpo**" in comparison
    assert (out / "comparison.md").read_text() in report
    for png in ("eval_curves.png", "objective.png"):
        with Image.open(out / png) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 400


def test_the_parent_run_gets_the_comparison_and_the_best_configuration(tmp_path):
    uri, parent = _stored_sweep(tmp_path)
    write_report(Store(uri), parent, tmp_path / "report")
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(parent)
    # The best mean is simpo's 0.7 over seeds 1, 2: 0.7 +- 12.706205 * 0.141421 / 1.414214 = 0.7 +- 1.270621
    assert run.data.metrics[f"best/{ACC}_mean"] == pytest.approx(0.7)
    assert run.data.metrics[f"best/{ACC}_ci_low"] == pytest.approx(0.7 - 1.270621, abs=1e-6)
    assert run.data.metrics[f"best/{ACC}_ci_high"] == pytest.approx(0.7 + 1.270621, abs=1e-6)
    assert run.data.tags["best_config"] == "loss=simpo" and run.data.tags["best_n"] == "2"
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/comparison.csv", "report/comparison.md"} <= logged


def test_the_baseline_comes_from_the_sweep_and_the_command_line_overrides_it(tmp_path):
    uri, parent = _stored_sweep(tmp_path, baseline="loss=simpo")
    out = tmp_path / "report"
    write_report(Store(uri), parent, out)
    assert _csv(out / "comparison.csv")["loss=simpo"]["verdict"] == "baseline"
    assert report_main([parent, "--tracking-uri", uri, "--out", str(out), "--baseline", "loss=sigmoid",
                        "--confidence", "0.9"]) == 0
    rows = _csv(out / "comparison.csv")
    assert rows["loss=sigmoid"]["verdict"] == "baseline"
    # 0.6 +- 2.919986 * 0.1 / sqrt(3) = 0.6 +- 0.168585
    assert float(rows["loss=sigmoid"][f"{ACC}_ci_low"]) == pytest.approx(0.6 - 0.168585, abs=1e-6)
    assert "90 % Student-t interval" in (out / "report.md").read_text()


def test_a_baseline_that_matches_nothing_is_one_line_and_the_report_is_still_written(tmp_path):
    uri, parent = _stored_sweep(tmp_path, baseline="loss=ipo")
    out = tmp_path / "report"
    write_report(Store(uri), parent, out)
    report = (out / "report.md").read_text()
    assert ("No paired differences: report.baseline='loss=ipo' matches 0 configurations; "
            "one of: loss=sigmoid; loss=simpo") in report
    assert "verdict" not in report and "| sigmoid | 3/4 | 0.6 |" in report
    assert {row["verdict"] for row in _csv(out / "comparison.csv").values()} == {""}
    assert (out / "objective.png").is_file() and (out / "eval_curves.png").is_file()


# ------------------------------------------------------------------ a real seed sweep


@pytest.mark.slow
def test_a_seed_sweep_reports_each_configuration_over_its_seeds(workdir):
    result = run_cli("-m", "loss=sigmoid,simpo", "train.seed=1,2", "train.max_steps=2", "train.eval_steps=2",
                     "data.max_eval_samples=8", "train.save_model=false", "report.baseline='loss=simpo'",
                     cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = workdir.glob("outputs/multirun/*/*")
    record = SweepRecord.read(sweep_dir)
    assert record.report == {"baseline": "loss=simpo", "confidence": 0.95}
    rows = _csv(sweep_dir / "comparison.csv")
    assert list(rows) == ["loss=sigmoid", "loss=simpo"]  # the seed is not a column of the configuration
    assert {row["n"] for row in rows.values()} == {"2/2"}
    assert rows["loss=simpo"]["verdict"] == "baseline"
    assert rows["loss=sigmoid"]["diff_n"] == "2" and rows["loss=sigmoid"]["verdict"] in {
        "better", "worse", "no clear difference"}
    report = (sweep_dir / "report.md").read_text()
    assert "## Comparison over seeds" in report and "| sigmoid | 2/2 |" in report
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    parent = client.get_run(record.parent_run_id)
    assert parent.data.params["report.baseline"] == "loss=simpo"
    assert parent.data.tags["best_config"] in rows and parent.data.tags["best_n"] == "2"
    best = rows[parent.data.tags["best_config"]]
    assert parent.data.metrics[f"best/{ACC}_mean"] == pytest.approx(float(best[f"{ACC}_mean"]))
    assert parent.data.metrics[f"best/{ACC}_ci_low"] == pytest.approx(float(best[f"{ACC}_ci_low"]))
    assert {f"report/{name}" for name in REPORT_FILES} <= {a.path for a in client.list_artifacts(
        record.parent_run_id, "report")}
