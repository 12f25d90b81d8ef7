"""The MLflow store as the processes that are not a training job use it: a sweep's Hydra callback
(its parent run, see :mod:`cpo_exp.sweep`), the sweep report (:mod:`cpo_exp.report`) and
``cpo_exp.evaluate``; the MLflow process of :mod:`cpo_exp.tracking.worker` creates experiments here.

Runs come back as :class:`StoredRun`, plain data, so the modules above never touch an MLflow
object. MLflow is imported when a :class:`Store` is first opened, not with this module: a training
job imports it (through :class:`cpo_exp.sweep.SweepJob`) without ever loading MLflow.

Also here: :class:`SweepRecord`, the ``sweep.json`` with which the launching process tells the
jobs and the report where a sweep's parent run is.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from cpo_exp.tracking import TrackingError

SWEEP_FILE = "sweep.json"
MAX_PARAMS_PER_CALL = 100  # MLflow's batch limit
MAX_PARAM_CHARS = 6000


def quiet_mlflow() -> None:
    """MLflow's INFO lines (a fresh database's tables, its migrations) only with MLFLOW_LOGGING_LEVEL=INFO.

    MLflow reads the variable when it is first imported: call this before.
    """
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def store_exists(uri: str) -> bool:
    """False for a SQLite store whose file was never written (opening it would create it)."""
    path = sqlite_path(uri)
    return path is None or path.exists()


def artifact_location(uri: str) -> Optional[str]:
    """``mlartifacts/`` beside a SQLite store's file, as ``mlflow server`` keeps them.

    MLflow's own default for a SQLite store is ``./mlruns`` of whichever directory the first
    command ran in, so a store's artifacts would end up wherever its first run was started.
    """
    path = sqlite_path(uri)
    return str(path.resolve().parent / "mlartifacts") if path is not None else None


@dataclass
class StoredRun:
    """One run as read from the store."""

    run_id: str
    name: str
    experiment_id: str
    status: str
    start_ms: int
    end_ms: Optional[int]
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]


def _stored(run: Any) -> StoredRun:
    info, data = run.info, run.data
    return StoredRun(info.run_id, info.run_name, info.experiment_id, info.status, info.start_time,
                     info.end_time, dict(data.tags), dict(data.params), dict(data.metrics))


def _param_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)[:MAX_PARAM_CHARS]


class Store:
    """One MLflow tracking store (a ``sqlite:///`` file or a server), by URI."""

    def __init__(self, uri: str):
        quiet_mlflow()
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self._client = MlflowClient(tracking_uri=uri)

    # ---------------------------------------------------------------- reading

    def get_run(self, run_id: str) -> StoredRun:
        try:
            return _stored(self._client.get_run(run_id))
        except Exception as err:  # noqa: BLE001 - MLflow raises several types for an unknown id
            raise TrackingError(f"no MLflow run {run_id!r} at {self.uri}: {getattr(err, 'message', err)}") from None

    def child_runs(self, parent_run_id: str) -> list[StoredRun]:
        """The job runs of a sweep, oldest first (all of them, however many pages)."""
        parent = self.get_run(parent_run_id)
        runs, token = [], None
        while True:
            page = self._client.search_runs([parent.experiment_id],
                                            filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                            order_by=["attributes.start_time ASC"], max_results=1000,
                                            page_token=token)
            runs.extend(_stored(r) for r in page)
            token = page.token
            if not token:
                return runs

    def run_of_output_dir(self, experiment_name: str, output_dir: Path) -> Optional[str]:
        """The id of the run that trained into ``output_dir`` (its ``output_dir`` tag), or None."""
        found = self._client.get_experiment_by_name(experiment_name)
        if found is None:
            return None
        runs = self._client.search_runs([found.experiment_id], f"tags.output_dir = '{output_dir}'")
        return runs[0].info.run_id if runs else None

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every logged value of ``key``, by step."""
        return sorted((m.step, m.value) for m in self._client.get_metric_history(run_id, key))

    def last_step(self, run_id: str, key: str = "eval_loss") -> int:
        return max((step for step, _ in self.metric_history(run_id, key)), default=0)

    # ---------------------------------------------------------------- writing

    def experiment_id(self, name: str) -> str:
        """The experiment's id; a new one keeps its artifacts beside a SQLite store (:func:`artifact_location`)."""
        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self._client.create_experiment(name, artifact_location=artifact_location(self.uri))
        except Exception:  # noqa: BLE001 - another process created it meanwhile
            experiment = self._client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def create_run(self, experiment_id: str, name: str, tags: dict[str, Any]) -> str:
        # Tag values as strings: a REST store (mlflow server) rejects anything else.
        run = self._client.create_run(experiment_id, run_name=name[:250], tags={k: str(v) for k, v in tags.items()})
        return run.info.run_id

    def record_failed_run(self, experiment_id: str, name: str, tags: dict[str, Any], error: str) -> str:
        """A run that is FAILED from the start: a job rejected before its own run opened."""
        run_id = self.create_run(experiment_id, name, {**tags, "error": error[:5000]})
        self._client.set_terminated(run_id, status="FAILED", end_time=int(time.time() * 1000))
        return run_id

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self._client.set_tag(run_id, key, str(value))

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_CALL):
            self._client.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_CALL])

    def log_metric(self, run_id: str, key: str, value: float) -> None:
        self._client.log_metric(run_id, key, value)

    def log_artifact(self, run_id: str, path: str, artifact_path: Optional[str] = None) -> None:
        self._client.log_artifact(run_id, path, artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._client.log_text(run_id, text, artifact_file)

    def end_run(self, run_id: str, status: str) -> None:
        self._client.set_terminated(run_id, status=status)


def best_run(runs: list[StoredRun], metric: str, direction: str) -> Optional[StoredRun]:
    """The finished run with the best final ``metric``, or None."""
    scored = [r for r in runs if r.status == "FINISHED" and metric in r.metrics]
    if not scored:
        return None
    pick = max if direction == "maximize" else min
    return pick(scored, key=lambda r: r.metrics[metric])


@dataclass
class SweepRecord:
    """What the launching process tells the jobs and the report about the sweep (``sweep.json``)."""

    sweep_dir: str
    overrides: list[str]
    launcher: dict[str, Any]
    sweeper: dict[str, Any]
    objective: dict[str, Any] = field(default_factory=dict)
    # ``report.baseline`` and ``report.confidence`` of the composed config: how the report compares.
    report: dict[str, Any] = field(default_factory=dict)
    tracking_uri: Optional[str] = None
    experiment_name: Optional[str] = None
    parent_run_id: Optional[str] = None

    def write(self) -> None:
        path = Path(self.sweep_dir) / SWEEP_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, default=str))
        tmp.replace(path)  # a job never reads a half-written file

    @classmethod
    def read(cls, sweep_dir: str | Path) -> Optional["SweepRecord"]:
        path = Path(sweep_dir) / SWEEP_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))
