"""The report of a sweep, read from MLflow: ``python -m cpo_exp.report <sweep dir | parent run id>``.

Writes into the sweep dir (or ``--out``) and logs as artifacts of the parent run (``report/``):

- ``report.md`` / ``report.csv``: one row per job with its swept values, status, duration and
  final eval metrics (failed jobs with their error);
- ``eval_curves.png``: eval rewards/accuracies, rewards/margins and nll_loss against step, one
  line per job;
- ``objective.png``: the final objective metric against each swept parameter.

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

from cpo_exp.config import TrackingConfig, parse_override
from cpo_exp.tracking import TrackingError, tracking_uri
from cpo_exp.tracking.store import Store, StoredRun, SweepRecord, best_run

log = logging.getLogger(__name__)

FINAL_METRICS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_nll_loss")
CURVES = ("eval_rewards/accuracies", "eval_rewards/margins", "eval_nll_loss")
REPORT_FILES = ("report.md", "report.csv", "eval_curves.png", "objective.png")


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


def _label(row: JobRow, keys: list[str]) -> str:
    return ",".join(f"{k}={_cell(row.overrides.get(k, ''))}" for k in keys) or row.name


def plot_curves(store: Store, rows: list[JobRow], keys: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2), dpi=80)
    for ax, metric in zip(axes, CURVES):
        for row in rows:
            history = store.metric_history(row.run_id, metric)
            if history:
                style = "--" if row.status == "FAILED" else "-"
                ax.plot([step for step, _ in history], [value for _, value in history], style, marker=".",
                        label=_label(row, keys))
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.05 * math.ceil(len(labels) / 4), 1, 1))
    path = out / "eval_curves.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _number(value: str) -> Optional[float]:
    try:
        return float(value)
    except ValueError:
        return None


def plot_objective(rows: list[JobRow], keys: list[str], metric: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = keys or ["job"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), dpi=80, squeeze=False)
    scored = [r for r in rows if metric in r.metrics]
    for ax, key in zip(axes[0], panels):
        if not scored:
            ax.text(0.5, 0.5, f"no job has {metric} yet", ha="center", va="center", transform=ax.transAxes)
            continue
        values = [r.overrides.get(key, r.job_num) if key != "job" else r.job_num for r in scored]
        numbers = [_number(v) for v in values]
        if all(n is not None for n in numbers):
            xs = numbers
            if min(xs) > 0 and max(xs) / min(xs) >= 20:
                ax.set_xscale("log")
        else:  # categorical: one slot per value, in order of appearance
            slots = list(dict.fromkeys(values))
            xs = [slots.index(v) for v in values]
            ax.set_xticks(range(len(slots)), slots, rotation=20, fontsize=8)
            ax.set_xlim(-0.5, len(slots) - 0.5)
        ax.scatter(xs, [r.metrics[metric] for r in scored])
        ax.set_xlabel(key)
        ax.set_ylabel(metric if ax is axes[0][0] else "")
        ax.grid(alpha=0.3)
    fig.suptitle(f"final {metric}", fontsize=10)
    fig.tight_layout()
    path = out / "objective.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(store: Store, parent_run_id: str, out: Path, log_to_parent: bool = True) -> list[Path]:
    """Table and plots of the sweep under ``parent_run_id``, written to ``out``."""
    parent = store.get_run(parent_run_id)
    runs = store.child_runs(parent_run_id)
    rows = job_rows(runs)
    keys = swept_keys(rows)
    objective = parent.params.get("objective.metric", "eval_rewards/accuracies")
    direction = parent.params.get("objective.direction", "maximize")
    metrics = list(dict.fromkeys([*FINAL_METRICS, objective]))
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = write_table(rows, keys, metrics, out)
    best = best_run(runs, objective, direction)
    summary = (f"\n{len(rows)} jobs: " + ", ".join(f"{s.lower()} {n}" for s, n in _counts(rows)) +
               f"; sweep {parent.status.lower()}.")
    if best is not None:
        summary += f" Best by {objective} ({direction}): job {best.tags.get('job_num')} " \
                   f"`{best.name}` = {best.metrics[objective]:.4g}."
    md.write_text(md.read_text() + summary + "\n")
    paths = [md, csv_path, plot_curves(store, rows, keys, out), plot_objective(rows, keys, objective, out)]
    if log_to_parent:
        for path in paths:
            store.log_artifact(parent_run_id, str(path), "report")
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
    args = parser.parse_args(argv)
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
    paths = write_report(store, run_id, out)
    sys.stdout.write(paths[0].read_text())
    log.info("report of parent run %s (%s) written to %s and logged to the parent run", run_id, uri, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
