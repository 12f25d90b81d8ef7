"""The report of a sweep, read from MLflow: ``python -m cpo_exp.report <sweep dir | parent run id>``.

Writes into the sweep dir (or ``--out``) and logs as artifacts of the parent run (``report/``):

- ``report.md`` / ``report.csv``: one row per job with its swept values, status, duration and
  final eval metrics (failed jobs with their error); then, in ``report.md``, the comparison;
- ``comparison.md`` / ``comparison.csv``: one row per configuration (the jobs that differ only in
  ``train.seed``): ``n`` (finished jobs with a value / all its jobs), mean, standard deviation and
  Student-t interval over its seeds of the objective and of each final eval metric, and the paired
  difference on the objective against the baseline (``report.baseline``, else the first
  configuration) with its verdict (:mod:`cpo_exp.comparison` does the statistics);
- ``eval_curves.png``: eval rewards/accuracies, rewards/margins and nll_loss against step, one
  line per configuration (the mean over its seeds) with its t interval shaded;
- ``objective.png``: the objective's mean per configuration with its t interval as error bars,
  against one swept factor and coloured by the others.

On the parent run it also records the best configuration by the objective's mean: metrics
``best/<objective>_mean``, ``_ci_low``, ``_ci_high`` and tags ``best_config``, ``best_n``.

Everything comes from the tracking store, read through :mod:`cpo_exp.tracking.store`; the sweep
dir only says where the parent run is (its ``sweep.json``, written by :mod:`cpo_exp.sweep`, whose
Hydra callback calls :func:`write_report`; this module imports neither it nor Hydra). A sweep
still running gives a partial report.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cpo_exp.comparison import CONFIDENCE, SEED_KEY, Comparison, ConfigSummary, Interval, Job, compare, t_interval
from cpo_exp.config import TrackingConfig, parse_override
from cpo_exp.tracking import TrackingError, tracking_uri
from cpo_exp.tracking.store import Store, StoredRun, SweepRecord, best_run

log = logging.getLogger(__name__)

FINAL_METRICS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_nll_loss")
CURVES = ("eval_rewards/accuracies", "eval_rewards/margins", "eval_nll_loss")
REPORT_FILES = ("report.md", "report.csv", "comparison.md", "comparison.csv", "eval_curves.png", "objective.png")
MAX_LEGEND = 12  # configurations; beyond, the plots go without a legend (an Optuna search)


@dataclass
class JobRow:
    run_id: str
    name: str
    job_num: str
    status: str
    duration_s: float
    overrides: dict[str, str]
    metrics: dict[str, float]
    error: str = ""


def _overrides(run: StoredRun) -> dict[str, str]:
    raw = run.tags.get("overrides")
    items = json.loads(raw) if raw else []
    return dict(parsed for parsed in map(parse_override, items) if parsed)


def job_rows(runs: list[StoredRun]) -> list[JobRow]:
    now_ms = time.time() * 1000
    rows = []
    for run in runs:
        end = run.end_ms or now_ms  # a running job: its duration so far
        rows.append(JobRow(
            run_id=run.run_id, name=run.name, job_num=run.tags.get("job_num", ""),
            status=run.status, duration_s=(end - run.start_ms) / 1000,
            overrides=_overrides(run), metrics=dict(run.metrics),
            error=run.tags.get("error", ""),
        ))
    return sorted(rows, key=lambda r: int(r.job_num) if r.job_num.isdigit() else math.inf)


def swept_keys(rows: list[JobRow]) -> list[str]:
    """The overrides whose value differs between jobs, in command-line order."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row.overrides if k not in keys)
    return [k for k in keys if len({row.overrides.get(k) for row in rows}) > 1]


def _fmt(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.4g}"


def write_table(rows: list[JobRow], keys: list[str], metrics: list[str], out: Path) -> tuple[Path, Path]:
    header = ["job", *keys, "status", "duration_s", *metrics, "error", "run_id"]
    table = [[r.job_num, *(r.overrides.get(k, "") for k in keys), r.status, f"{r.duration_s:.1f}",
              *(_fmt(r.metrics.get(m)) for m in metrics), r.error.splitlines()[0][:200] if r.error else "",
              r.run_id] for r in rows]
    csv_path = out / "report.csv"
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *table])
    md_path = out / "report.md"
    lines = ["| " + " | ".join(header[:-1]) + " |", "|" + "---|" * (len(header) - 1)]
    lines += ["| " + " | ".join(_cell(c) for c in row[:-1]) + " |" for row in table]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def _cell(value: str) -> str:
    """A Markdown cell: Optuna's 17-digit samples shortened, pipes escaped (the CSV keeps all)."""
    number = _number(value)
    if number is not None and len(value) > 8:
        value = f"{number:.4g}"
    return value.replace("|", "\\|")


def _label(values: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{k}={_cell(v)}" for k, v in values) or "default"


def _pct(confidence: float) -> str:
    return f"{confidence * 100:g} %"


# ------------------------------------------------------------------ the comparison over seeds


def comparison_jobs(rows: list[JobRow], keys: list[str]) -> list[Job]:
    """The jobs as :func:`cpo_exp.comparison.compare` sees them: their swept values, and finished
    only when FINISHED (a running job's last eval is not its final one; a failed job's is not one)."""
    return [Job({k: r.overrides[k] for k in keys if k in r.overrides}, r.metrics, r.status == "FINISHED", r.run_id)
            for r in rows]


def _n(summary: ConfigSummary, metric: str) -> str:
    interval = summary.intervals.get(metric)
    return f"{interval.n if interval else 0}/{summary.n_jobs}"


def _ci(interval: Optional[Interval]) -> str:
    return "" if interval is None or interval.low is None else f"[{interval.low:.4g}, {interval.high:.4g}]"


def _mean_sd_ci(interval: Optional[Interval], n: Optional[str] = None) -> str:
    if interval is None:
        return ""
    text = f"{interval.mean:.4g}" + ("" if interval.std is None else f" ± {interval.std:.3g} {_ci(interval)}")
    return text + (f" (n={n})" if n else "")


def comparison_markdown(comparison: Comparison, keys: list[str]) -> str:
    """The comparison section of ``report.md`` (also ``comparison.md``)."""
    c, objective, pct = comparison, comparison.objective, _pct(comparison.confidence)
    columns = keys or ["configuration"]

    def config_cells(s: ConfigSummary) -> list[str]:
        return [_cell(dict(s.config).get(k, "")) for k in keys] if keys else [s.label]

    lines = [
        "## Comparison over seeds", "",
        f"{len(c.summaries)} configurations: the jobs that differ only in `{SEED_KEY}`. `n` counts the finished "
        "jobs with a value, of all the jobs of the configuration (running and failed jobs do not count). "
        f"Intervals: {pct} Student-t interval of the mean over seeds, n-1 degrees of freedom (none for n < 2).",
        "", f"### {objective} ({c.direction})", "",
    ]
    single = all(s.n_jobs <= 1 for s in c.summaries)
    if single:  # nothing to pair, no interval to draw: the table would be empty columns
        lines += [f"One job per configuration: no intervals and no paired differences (sweep `{SEED_KEY}`, "
                  f"e.g. `{SEED_KEY}=1,2,3`, for them).", ""]
        header = [*columns, "n", "value"]
    elif c.baseline is not None:
        lines += [f"Paired differences against the baseline `{_label(c.baseline.config)}`: each seed's value minus the "
                  "baseline's with the same seed, over the seeds both finished; its mean and "
                  f"{pct} t interval. Verdict: \"better\" or \"worse\" when the interval excludes 0, "
                  "\"no clear difference\" when it covers 0 (each row on its own, no correction for "
                  "comparing several).", ""]
        header = [*columns, "n", "mean", "sd", f"{pct} CI", "diff vs baseline", f"{pct} CI of diff", "verdict"]
    else:
        lines += [f"No paired differences: {c.baseline_error}" if c.baseline_error else "No configurations yet.",
                  ""]
        header = [*columns, "n", "mean", "sd", f"{pct} CI"]
    table = []
    for s in c.summaries:
        iv = s.intervals.get(objective)
        if single:
            table.append([*config_cells(s), _n(s, objective), _fmt(iv and iv.mean)])
            continue
        row = [*config_cells(s), _n(s, objective), _fmt(iv and iv.mean), _fmt(iv and iv.std), _ci(iv)]
        if c.baseline is not None:
            if s is c.baseline:
                row += ["", "", "baseline"]
            else:
                diff = c.differences[s.config]
                d = diff.interval
                row += [_fmt(d and d.mean) + (f" (n={d.n})" if d and d.n != (iv.n if iv else 0) else ""),
                        _ci(d), diff.verdict]
        table.append(row)
    lines += _md_table(header, table)
    if c.best is not None:
        iv = c.best.intervals[objective]
        lines += ["", f"Best configuration by the mean of {objective} ({c.direction}): **{_label(c.best.config)}**, "
                      f"{iv.mean:.4g}" + (f", {pct} CI {_ci(iv)}" if iv.low is not None else "") +
                      f", n={_n(c.best, objective)}."]
    others = [m for m in c.metrics if m != objective]
    if others:
        legend = "its final value" if single else f"mean ± sd [{pct} CI] over the configuration's seeds"
        lines += ["", "### Final eval metrics", "",
                  f"Each cell: {legend}; `(n=k)` where a metric has fewer values than the objective.", ""]
        table = []
        for s in c.summaries:
            n_objective = s.intervals.get(objective).n if s.intervals.get(objective) else 0
            table.append([*config_cells(s), _n(s, objective), *(
                _mean_sd_ci(s.intervals.get(m), str(s.intervals[m].n) if s.intervals.get(m)
                            and s.intervals[m].n != n_objective else None) for m in others)])
        lines += _md_table([*columns, "n", *others], table)
    return "\n".join(lines) + "\n"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows)]


def comparison_table(comparison: Comparison, keys: list[str]) -> list[list[str]]:
    """``comparison.csv``: a header and one row per configuration, numbers at full precision."""
    c, objective = comparison, comparison.objective
    header = [*keys, "configuration", "n", "jobs"]
    for m in c.metrics:
        header += [f"{m}_n", f"{m}_mean", f"{m}_std", f"{m}_ci_low", f"{m}_ci_high"]
    header += ["baseline", "diff_n", "diff_mean", "diff_ci_low", "diff_ci_high", "verdict"]

    def numbers(iv: Optional[Interval]) -> list[str]:
        return [str(iv.n if iv else 0), *("" if v is None else repr(v) for v in
                                          (iv.mean if iv else None, iv and iv.std, iv and iv.low, iv and iv.high))]

    table = [header]
    for s in c.summaries:
        row = [*(dict(s.config).get(k, "") for k in keys), s.label, _n(s, objective), str(s.n_jobs)]
        for m in c.metrics:
            row += numbers(s.intervals.get(m))
        diff = c.differences.get(s.config)
        if s is c.baseline:
            row += ["yes", "", "", "", "", "baseline"]
        elif diff is not None:
            row += ["", *numbers(diff.interval)[:2], *numbers(diff.interval)[3:], diff.verdict]
        else:
            row += ["", "", "", "", "", ""]
        table.append(row)
    return table


def write_comparison(comparison: Comparison, keys: list[str], out: Path) -> tuple[Path, Path]:
    md_path, csv_path = out / "comparison.md", out / "comparison.csv"
    md_path.write_text(comparison_markdown(comparison, keys))
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerows(comparison_table(comparison, keys))
    return md_path, csv_path


def log_best(store: Store, run_id: str, comparison: Comparison) -> None:
    """The best configuration by the objective's mean, on the parent run."""
    best = comparison.best
    if best is None:
        return
    iv, key = best.intervals[comparison.objective], f"best/{comparison.objective}"
    store.log_metric(run_id, f"{key}_mean", iv.mean)
    if iv.low is not None:
        store.log_metric(run_id, f"{key}_ci_low", iv.low)
        store.log_metric(run_id, f"{key}_ci_high", iv.high)
    store.set_tags(run_id, {"best_config": best.label, "best_n": iv.n})


# ------------------------------------------------------------------ plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    return [colormaps["viridis"](i / max(1, n - 1)) for i in range(n)]


def _curve(store: Store, summary: ConfigSummary, metric: str,
           confidence: float) -> tuple[list[int], list[Interval], bool]:
    """Steps and, at each, the interval over the seeds that logged it: the finished jobs, or where
    none has finished yet the others (then ``True``: drawn dashed)."""
    finished = [j for j in summary.jobs if j.finished and j.run_id]
    jobs = finished or [j for j in summary.jobs if j.run_id]
    by_step: dict[int, list[float]] = {}
    for job in jobs:
        for step, value in dict(store.metric_history(job.run_id, metric)).items():  # the last value of a step
            if math.isfinite(value):
                by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return steps, [t_interval(by_step[s], confidence) for s in steps], not finished


LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")


def _styles(summaries: list[ConfigSummary], keys: list[str]) -> list[dict]:
    """Colour by the factors other than the objective plot's x, line and marker by x (as far as
    four values go): a configuration looks the same in both plots. Else a colour per configuration."""
    x_key = _x_key(keys, summaries)
    group_keys = [k for k in keys if k != x_key]
    groups = list(dict.fromkeys(tuple(dict(s.config).get(k, "") for k in group_keys) for s in summaries))
    xs = list(dict.fromkeys(dict(s.config).get(x_key, "") for s in summaries)) if x_key else [""]
    if not group_keys or len(groups) > 10 or len(xs) > len(LINESTYLES):
        return [{"color": c, "linestyle": "-", "marker": "."} for c in _colors(len(summaries))]
    if all(_number(v) is not None for v in xs):
        xs.sort(key=float)
    colors = _colors(len(groups))
    return [{"color": colors[groups.index(tuple(dict(s.config).get(k, "") for k in group_keys))],
             "linestyle": LINESTYLES[xs.index(dict(s.config).get(x_key, "") if x_key else "")],
             "marker": MARKERS[xs.index(dict(s.config).get(x_key, "") if x_key else "")]} for s in summaries]


def plot_curves(store: Store, comparison: Comparison, keys: list[str], out: Path) -> Path:
    plt = _pyplot()
    summaries = comparison.summaries
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4), dpi=90)
    legend: dict[str, object] = {}
    for ax, metric in zip(axes, CURVES):
        for summary, style in zip(summaries, _styles(summaries, keys)):
            steps, intervals, unfinished = _curve(store, summary, metric, comparison.confidence)
            if not steps:
                continue
            label = _label(summary.config) + (" (none finished)" if unfinished else "")
            (line,) = ax.plot(steps, [i.mean for i in intervals], markersize=4, linewidth=1.4,
                              alpha=0.5 if unfinished else 1.0, label=label, **style)
            legend.setdefault(label, line)
            low = [math.nan if i.low is None else i.low for i in intervals]
            high = [math.nan if i.high is None else i.high for i in intervals]
            ax.fill_between(steps, low, high, color=style["color"], alpha=0.13, linewidth=0)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"eval metrics: mean over seeds, shaded {_pct(comparison.confidence)} t interval (n ≥ 2)",
                 fontsize=10)
    rows = 0
    if legend and len(legend) <= MAX_LEGEND:
        ncol = min(4, len(legend))
        rows = math.ceil(len(legend) / ncol)
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.065 * rows, 1, 1))
    path = out / "eval_curves.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _x_key(keys: list[str], summaries: list[ConfigSummary]) -> Optional[str]:
    """The factor along x: the one with the most values; among equals, a numeric one."""
    def rank(key: str) -> tuple[int, bool]:
        values = {dict(s.config).get(key, "") for s in summaries}
        return len(values), all(_number(v) is not None for v in values)

    return max(keys, key=rank) if keys else None


def _draw_objective(ax, summaries: list[ConfigSummary], x_key: Optional[str], group_keys: list[str],
                    comparison: Comparison, legend: bool) -> None:
    metric = comparison.objective
    values = [dict(s.config).get(x_key, "") if x_key else "default" for s in summaries]
    distinct = list(dict.fromkeys(values))
    numeric = all(_number(v) is not None for v in distinct)
    categorical = len(distinct) <= 8
    if categorical:  # evenly spaced slots, numbers in their order, names in order of appearance
        slots = sorted(distinct, key=float) if numeric else distinct
        position = {v: float(slots.index(v)) for v in slots}
        ax.set_xticks(range(len(slots)), [_cell(v) for v in slots], fontsize=9)
        ax.set_xlim(-0.5, len(slots) - 0.5)
    else:
        position = {v: float(v) for v in distinct} if numeric else {v: float(i) for i, v in enumerate(distinct)}
        xs = list(position.values())
        if numeric and min(xs) > 0 and max(xs) / min(xs) >= 20:
            ax.set_xscale("log")
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(summaries):
        groups.setdefault(tuple((k, dict(s.config).get(k, "")) for k in group_keys), []).append(i)
    width = min(0.15, 0.6 / len(groups)) if categorical else 0.0  # side by side, so that bars do not overlap
    for g, ((group, members), color) in enumerate(zip(groups.items(), _colors(len(groups)))):
        offset = (g - (len(groups) - 1) / 2) * width
        members.sort(key=lambda i: position[values[i]])
        xs = [position[values[i]] + offset for i in members]
        ivs = [summaries[i].intervals[metric] for i in members]
        label = (group[0][1] if len(group) == 1 else _label(group)) if group else None
        # A line joins a group's points along a numeric grid (an interaction plot), not a random search's.
        joined = numeric and categorical and len(xs) > 1
        ax.plot(xs, [iv.mean for iv in ivs], "-" if joined else "none", marker="o", markersize=6,
                color=color, linewidth=1, alpha=0.9, label=label)
        bars = [(x, iv) for x, iv in zip(xs, ivs) if iv.low is not None]
        if bars:
            ax.errorbar([x for x, _ in bars], [iv.mean for _, iv in bars],
                        yerr=[[iv.mean - iv.low for _, iv in bars], [iv.high - iv.mean for _, iv in bars]],
                        fmt="none", ecolor=color, elinewidth=1.5, capsize=4)
        for x, i in zip(xs, members):  # the seeds themselves
            seeds = list(summaries[i].values(metric).values())
            ax.scatter([x] * len(seeds), seeds, s=14, facecolors="none", edgecolors=color, alpha=0.6, linewidths=0.8)
    if comparison.baseline is not None and comparison.baseline.intervals.get(metric) is not None:
        ax.axhline(comparison.baseline.intervals[metric].mean, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(x_key or "")
    ax.grid(alpha=0.3)
    if legend and group_keys and len(groups) > 1:
        ax.legend(title=group_keys[0] if len(group_keys) == 1 else None, fontsize=8, title_fontsize=8,
                  loc="best", framealpha=0.8)


def plot_objective(comparison: Comparison, keys: list[str], out: Path) -> Path:
    plt = _pyplot()
    metric = comparison.objective
    scored = [s for s in comparison.summaries if s.intervals.get(metric) is not None]
    x_key = _x_key(keys, scored)
    group_keys = [k for k in keys if k != x_key]
    n_groups = len({tuple(dict(s.config).get(k, "") for k in group_keys) for s in scored})
    # Coloured by the other factors while a legend can name them; else one panel per factor.
    panels = [(x_key, group_keys)] if n_groups <= MAX_LEGEND else [(k, []) for k in keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.4, 4.2 * len(panels)), 4.2), dpi=90, squeeze=False)
    for ax, (key, groups) in zip(axes[0], panels):
        if scored:
            _draw_objective(ax, scored, key, groups, comparison, legend=True)
        else:
            ax.text(0.5, 0.5, f"no finished job has {metric} yet", ha="center", va="center", transform=ax.transAxes)
    axes[0][0].set_ylabel(metric)
    baseline = "; dotted line: the baseline's mean" if comparison.baseline is not None and scored else ""
    fig.suptitle(f"final {metric} per configuration\nmean over seeds with its {_pct(comparison.confidence)} "
                 f"t interval; open circles: the seeds{baseline}", fontsize=9)
    fig.tight_layout()
    path = out / "objective.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _number(value: str) -> Optional[float]:
    try:
        return float(value)
    except ValueError:
        return None


def write_report(store: Store, parent_run_id: str, out: Path, log_to_parent: bool = True,
                 baseline: Optional[str] = None, confidence: Optional[float] = None) -> list[Path]:
    """Tables and plots of the sweep under ``parent_run_id``, written to ``out``; ``report.md`` first.

    ``baseline`` / ``confidence``: as ``report.baseline`` / ``report.confidence``; None: the sweep's
    (the parent run's ``report.*`` params).
    """
    parent = store.get_run(parent_run_id)
    runs = store.child_runs(parent_run_id)
    rows = job_rows(runs)
    keys = swept_keys(rows)
    objective = parent.params.get("objective.metric", "eval_rewards/accuracies")
    direction = parent.params.get("objective.direction", "maximize")
    if baseline is None:
        baseline = parent.params.get("report.baseline") or None
    if confidence is None:
        confidence = float(parent.params.get("report.confidence", CONFIDENCE))
    metrics = list(dict.fromkeys([*FINAL_METRICS, objective]))
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = write_table(rows, keys, metrics, out)
    best = best_run(runs, objective, direction)
    summary = (f"\n{len(rows)} jobs: " + ", ".join(f"{s.lower()} {n}" for s, n in _counts(rows)) +
               f"; sweep {parent.status.lower()}.")
    if best is not None:
        summary += f" Best job by {objective} ({direction}): job {best.tags.get('job_num')} " \
                   f"`{best.name}` = {best.metrics[objective]:.4g}."
    config_keys = [k for k in keys if k != SEED_KEY]
    comparison = compare(comparison_jobs(rows, keys), objective, direction, FINAL_METRICS, baseline, confidence)
    comparison_md, comparison_csv = write_comparison(comparison, config_keys, out)
    md.write_text(md.read_text() + summary + "\n\n" + comparison_md.read_text())
    paths = [md, csv_path, comparison_md, comparison_csv, plot_curves(store, comparison, config_keys, out),
             plot_objective(comparison, config_keys, out)]
    if log_to_parent:
        for path in paths:
            store.log_artifact(parent_run_id, str(path), "report")
        log_best(store, parent_run_id, comparison)
    return paths


def _counts(rows: list[JobRow]) -> list[tuple[str, int]]:
    statuses = [r.status for r in rows]
    return [(s, statuses.count(s)) for s in dict.fromkeys(statuses)]


def locate(target: str, uri: Optional[str]) -> tuple[str, str, Optional[Path]]:
    """``(tracking uri, parent run id, sweep dir)`` of a sweep dir or a parent run id."""
    path = Path(target)
    if path.is_dir():
        record = SweepRecord.read(path)
        if record is None or not record.parent_run_id:
            raise SystemExit(f"{path} has no {'sweep.json' if record is None else 'MLflow parent run'}: "
                             "not a sweep dir of cpo_exp, or the sweep ran with tracking=none")
        return uri or record.tracking_uri, record.parent_run_id, path
    return tracking_uri(TrackingConfig(tracking_uri=uri), str(Path.cwd())), target, None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpo_exp.report", description=__doc__.splitlines()[0])
    parser.add_argument("target", help="a sweep dir (outputs/multirun/...) or the MLflow id of a sweep's parent run")
    parser.add_argument("--tracking-uri", help="the MLflow store (default: the sweep's, $MLFLOW_TRACKING_URI, "
                                               "or ./mlflow.db)")
    parser.add_argument("--out", type=Path, help="where to write the files (default: the sweep dir)")
    parser.add_argument("--baseline", help="the configuration the others are compared with, as its swept values "
                                           "(loss=sigmoid,beta=0.1; default: the sweep's report.baseline, else "
                                           "the first configuration)")
    parser.add_argument("--confidence", type=float, help="of the intervals, in (0, 1) (default: the sweep's "
                                                         f"report.confidence, else {CONFIDENCE})")
    args = parser.parse_args(argv)
    if args.confidence is not None and not 0 < args.confidence < 1:
        parser.error(f"--confidence must be in (0, 1), not {args.confidence}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    uri, run_id, sweep_dir = locate(args.target, args.tracking_uri)
    store = Store(uri)
    try:
        parent = store.get_run(run_id)
    except TrackingError as err:
        raise SystemExit(str(err)) from None
    if sweep_dir is None:
        recorded = Path(parent.tags.get("sweep_dir", ""))
        sweep_dir = recorded if recorded.parts and recorded.is_dir() else None
    out = args.out or sweep_dir or Path(f"sweep_report_{run_id[:8]}")
    recorded = (SweepRecord.read(sweep_dir) if sweep_dir else None) or SweepRecord("", [], {}, {})
    baseline = args.baseline if args.baseline is not None else recorded.report.get("baseline")
    confidence = args.confidence if args.confidence is not None else recorded.report.get("confidence")
    paths = write_report(store, run_id, out, baseline=baseline, confidence=confidence)
    sys.stdout.write(paths[0].read_text())
    log.info("report of parent run %s (%s) written to %s and logged to the parent run", run_id, uri, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
