"""Experiment tracking: one MLflow run per job, ended with the right status whatever happens.

The default store is ``sqlite:///<launch dir>/mlflow.db`` (MLflow >= 3.13 refuses a plain
``./mlruns`` file store); ``MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri`` point it at a
``mlflow server`` instead. ``tracking.backend=none`` turns tracking off.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from cpo_exp.config import TrackingConfig

log = logging.getLogger(__name__)

_MAX_PARAMS_PER_CALL = 100  # MLflow's batch limit
_MAX_PARAM_CHARS = 6000


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names it."""


def tracking_uri(cfg: TrackingConfig, launch_dir: str) -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the launch dir's SQLite file."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(launch_dir).resolve() / 'mlflow.db'}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before training, when a tracking server does not answer."""
    scheme = urlparse(uri).scheme
    if scheme not in ("http", "https"):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as err:
        raise TrackingError(
            f"MLflow tracking server {uri} is not reachable ({type(err).__name__}). Start it, fix "
            "MLFLOW_TRACKING_URI / tracking.tracking_uri, or run with tracking=none."
        ) from None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; lists stay whole."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class Tracker:
    """What the engine and the CLI log through; this base logs nothing (``tracking=none``)."""

    run_id: Optional[str] = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifacts(self, path: str, artifact_path: Optional[str] = None) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        pass


class MlflowTracker(Tracker):
    def __init__(self, run_id: str):
        import mlflow

        self._mlflow = mlflow
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # Asynchronous: a step never waits for the store; MLflow flushes when the run ends.
        self._mlflow.log_metrics(metrics, step=step, synchronous=False)

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()]
        for start in range(0, len(items), _MAX_PARAMS_PER_CALL):
            self._mlflow.log_params(dict(items[start:start + _MAX_PARAMS_PER_CALL]))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifacts(self, path: str, artifact_path: Optional[str] = None) -> None:
        self._mlflow.log_artifacts(path, artifact_path)

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        self._mlflow.log_artifact(path, artifact_path)


@contextlib.contextmanager
def tracked_run(
    cfg: TrackingConfig, launch_dir: str, run_name: str, tags: Optional[Mapping[str, Any]] = None,
    parent_run_id: Optional[str] = None,
) -> Iterator[Tracker]:
    """Open one run for the block: FINISHED on success, FAILED on an exception, KILLED on Ctrl-C.

    The run is always ended, so a crashed job never leaks into the next job of a multirun.
    ``parent_run_id`` nests it under a sweep's parent run (see :mod:`cpo_exp.sweep`).
    """
    if cfg.backend == "none":
        yield Tracker()
        return
    import mlflow

    uri = tracking_uri(cfg, launch_dir)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.set_experiment(cfg.experiment_name)
    except Exception as err:  # noqa: BLE001 - any store failure is reported with the URI
        raise TrackingError(f"cannot open MLflow experiment {cfg.experiment_name!r} at {uri}: {err}") from err
    log.info("MLflow: %s (experiment %r)", uri, cfg.experiment_name)
    # Tag values as strings: a REST store (mlflow server) rejects anything else, e.g. an int job_num.
    str_tags = {k: str(v) for k, v in (tags or {}).items()}
    with mlflow.start_run(run_name=run_name, experiment_id=experiment.experiment_id, tags=str_tags,
                          parent_run_id=parent_run_id) as run:
        try:
            yield MlflowTracker(run.info.run_id)
        except BaseException as err:
            mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:5000])
            raise
