"""Experiment tracking: one MLflow run per job, ended with the right status whatever happens.

The default store is ``sqlite:///<launch dir>/mlflow.db`` (MLflow >= 3.13 refuses a plain
``./mlruns`` file store); ``MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri`` point it at a
``mlflow server`` instead. ``tracking.backend=none`` turns tracking off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from cpo_exp.config import TrackingConfig
from cpo_exp.interrupts import Stopped

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


# Keys whose values must never reach the store: hub_token, db_password, client_secret, api_key...
_SECRET = r"token(?!i[sz]|s)|passw|secret|api_?key|credential"
_SECRET_KEY = re.compile(_SECRET, re.IGNORECASE)
# ``key=value`` inside strings: overrides, and Hydra's comma-joined ``override_dirname``.
_SECRET_ASSIGNMENT = re.compile(rf"((?:^|(?<=[,\s]))[+~]*[\w.]*(?:{_SECRET})[\w.]*=)[^,\s]*", re.IGNORECASE)
REDACTED = "***"


def is_secret(key: str) -> bool:
    """Whether a (dotted) config key names a secret; ``tokenizer``-like keys are not secrets."""
    return bool(_SECRET_KEY.search(key.rsplit(".", 1)[-1]))


def redact(tree: Any) -> Any:
    """A copy of a config tree (or list of ``key=value`` overrides) with secret values replaced."""
    if isinstance(tree, Mapping):
        return {k: (REDACTED if is_secret(str(k)) and v is not None else redact(v)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact(item) for item in tree]
    if isinstance(tree, str) and "=" in tree:
        key = tree.split("=", 1)[0].lstrip("+~")
        if re.fullmatch(r"[\w.]+", key) and is_secret(key):  # one override: its whole value
            return f"{tree.split('=', 1)[0]}={REDACTED}"
        return _SECRET_ASSIGNMENT.sub(rf"\g<1>{REDACTED}", tree)
    return tree


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

    def log_table(self, data: Mapping[str, list], artifact_file: str) -> None:
        pass


class MlflowTracker(Tracker):
    def __init__(self, run_id: str):
        import mlflow

        self._mlflow = mlflow
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # Asynchronous: a step never waits for the store; MLflow flushes when the run ends.
        self._mlflow.log_metrics(metrics, step=step, synchronous=False)

    def close(self) -> None:
        """Nothing to send: the local store never goes away; MLflow flushes async metrics at run end."""

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

    def log_table(self, data: Mapping[str, list], artifact_file: str) -> None:
        # MLflow appends to an existing table artifact of the same name.
        self._mlflow.log_table(dict(data), artifact_file)


@contextlib.contextmanager
def reopened_run(uri: str, run_id: str) -> Iterator[Tracker]:
    """Log more to an existing run (e.g. a later evaluation); it ends as FINISHED or FAILED again."""
    import mlflow

    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        yield MlflowTracker(run_id)


class ServerTracker(MlflowTracker):
    """For a tracking *server*, which can go away mid-run: training must not stop, nor lose metrics.

    Metrics are sent synchronously (one small request per logging step). When a send fails, the
    rows stay in memory and in ``spill_file`` (so a crash does not lose them either), the user is
    told once, and sending is retried every ``retry_s`` seconds; when the server is back, the
    backlog goes first. At the end, :meth:`close` waits up to ``wait_s`` for the server.
    """

    retry_s = 10.0

    def __init__(self, run_id: str, spill_file: Optional[Path], wait_s: float):
        super().__init__(run_id)
        self._client = self._mlflow.MlflowClient()
        self._pending: list[tuple[dict[str, float], int, int]] = []
        self._spill_file, self._wait_s = spill_file, wait_s
        self._down_since: Optional[float] = None
        self._next_try = 0.0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._pending.append(({k: float(v) for k, v in metrics.items()}, step, int(time.time() * 1000)))
        if self._down_since is None or time.monotonic() >= self._next_try:
            self._send()

    def _send(self) -> bool:
        from mlflow.entities import Metric

        rows = [Metric(k, v, ts, step) for metrics, step, ts in self._pending for k, v in metrics.items()]
        try:
            for start in range(0, len(rows), 1000):  # MLflow's log_batch limit
                self._client.log_batch(self.run_id, metrics=rows[start:start + 1000])
        except Exception as err:  # noqa: BLE001 - any failure to reach the server is an outage
            self._next_try = time.monotonic() + self.retry_s
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("MLflow tracking server unreachable (%s); training goes on, metrics are kept%s and "
                            "sent when it is back", type(err).__name__,
                            f" (also in {self._spill_file})" if self._spill_file else "")
            self._spill()
            return False
        if self._down_since is not None:
            log.warning("MLflow tracking server is back after %.0fs: sent %d buffered metric rows",
                        time.monotonic() - self._down_since, len(self._pending))
            self._down_since = None
        self._pending.clear()
        if self._spill_file is not None and self._spill_file.exists():
            self._spill_file.unlink()
        return True

    def _spill(self) -> None:
        if self._spill_file is not None:
            self._spill_file.write_text("".join(json.dumps({"step": s, "timestamp": ts, "metrics": m}) + "\n"
                                                for m, s, ts in self._pending))

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        self.close()  # a server that is away gets its time to return first
        super().log_artifact(path, artifact_path)

    def close(self) -> None:
        """Send what is left, waiting up to ``wait_s`` for a server that is away."""
        if not self._pending:
            return
        deadline = time.monotonic() + self._wait_s
        if self._down_since is not None:
            log.warning("waiting up to %.0fs for the MLflow tracking server to send %d buffered metric rows",
                        self._wait_s, len(self._pending))
        while not self._send():
            if time.monotonic() >= deadline:
                raise TrackingError(f"MLflow tracking server still unreachable after {self._wait_s:.0f}s; "
                                    f"the unsent metrics are in {self._spill_file}")
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


@contextlib.contextmanager
def tracked_run(
    cfg: TrackingConfig, launch_dir: str, run_name: str, tags: Optional[Mapping[str, Any]] = None,
    run_id: Optional[str] = None, spill_dir: Optional[str] = None, parent_run_id: Optional[str] = None,
) -> Iterator[Tracker]:
    """Open one run for the block: FINISHED on success, FAILED on an exception, KILLED on a signal.

    ``run_id`` reopens an existing run (a resumed training continues its metrics there). The run
    is always ended, so a crashed job never leaks into the next job of a multirun.
    ``parent_run_id`` nests a new run under a sweep's parent run (see :mod:`cpo_exp.sweep`).
    """
    if cfg.backend == "none":
        yield Tracker()
        return
    import mlflow

    uri = tracking_uri(cfg, launch_dir)
    check_reachable(uri)
    remote = urlparse(uri).scheme in ("http", "https")
    if remote:
        # MLflow's default (7 retries, exponential backoff) would stall training for minutes per
        # call while a server is away; ServerTracker retries on its own schedule instead.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.set_experiment(cfg.experiment_name)
    except Exception as err:  # noqa: BLE001 - any store failure is reported with the URI
        raise TrackingError(f"cannot open MLflow experiment {cfg.experiment_name!r} at {uri}: {err}") from err
    log.info("MLflow: %s (experiment %r)", uri, cfg.experiment_name)
    # Tag values as strings: a REST store (mlflow server) rejects anything else, e.g. an int job_num.
    str_tags = {k: str(v) for k, v in (tags or {}).items()}
    if run_id is not None:
        try:
            mlflow.get_run(run_id)
        except Exception as err:  # noqa: BLE001 - a missing run is reported with the store
            raise TrackingError(f"MLflow run {run_id} of the checkpoint is not in {uri}: {err}") from None
        started = mlflow.start_run(run_id=run_id, tags=str_tags)
    else:
        started = mlflow.start_run(run_name=run_name, experiment_id=experiment.experiment_id, tags=str_tags,
                                   parent_run_id=parent_run_id)
    with started as run:
        spill = Path(spill_dir) / "unsent_metrics.jsonl" if spill_dir else None
        tracker = ServerTracker(run.info.run_id, spill, cfg.reconnect_timeout_s) if remote else MlflowTracker(
            run.info.run_id)
        try:
            yield tracker
            tracker.close()
        except BaseException as err:
            mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:5000])
            # MLflow marks any exception FAILED; a stop asked for by a signal is KILLED.
            if isinstance(err, (Stopped, KeyboardInterrupt)):
                mlflow.end_run("KILLED")
            raise
