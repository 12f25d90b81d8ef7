"""Experiment tracking: one MLflow run per job, ended with the right status whatever happens.

Only this package talks to MLflow:

- ``cpo_exp.tracking`` (this module): the run as a training job sees it (:class:`Tracker`,
  :func:`tracked_run`), the store's URI (:func:`tracking_uri`), redaction of secrets. It never
  imports MLflow.
- :mod:`cpo_exp.tracking.worker`: the MLflow process behind a job's run. The trainer writes one
  JSON line per call to its stdin, so no training step waits for the store; it rides out a
  tracking server that has gone away, and ends the run KILLED if the trainer is killed outright.
- :mod:`cpo_exp.tracking.store`: queries and writes for the processes that are not a training
  job: a sweep's parent run (:mod:`cpo_exp.sweep`), the report, ``cpo_exp.evaluate``.

The default store is ``sqlite:///<launch dir>/mlflow.db`` (MLflow >= 3.13 refuses a plain
``./mlruns`` file store), its artifacts in ``mlartifacts/`` beside it; ``MLFLOW_TRACKING_URI`` or
``tracking.tracking_uri`` point it at a ``mlflow server`` instead. ``tracking.backend=none`` turns
tracking off. MLflow's own INFO lines (creating a fresh database, its migrations) are hidden
unless ``MLFLOW_LOGGING_LEVEL=INFO`` is set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlparse

from cpo_exp.interrupts import Stopped

if TYPE_CHECKING:  # cpo_exp.config imports torch, which the MLflow process must not load
    from cpo_exp.config import TrackingConfig

__all__ = ["TrackingError", "check_reachable", "Tracker", "WorkerTracker", "tracked_run", "reopened_run",
           "tracking_uri", "redact", "how_to_view"]

log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names it."""


def tracking_uri(cfg: "TrackingConfig", launch_dir: str) -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the launch dir's SQLite file."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(launch_dir).resolve() / 'mlflow.db'}"


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before training, when a tracking server does not answer."""
    if not is_remote(uri):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as err:
        raise TrackingError(
            f"MLflow tracking server {uri} is not reachable ({type(err).__name__}). Start it, fix "
            "MLFLOW_TRACKING_URI / tracking.tracking_uri, or run with tracking=none."
        ) from None


def how_to_view(uri: str, run_id: Optional[str], experiment_id: Optional[str] = None) -> str:
    """One line saying where a run is and the command (or URL) that shows it."""
    if run_id is None:
        return f"MLflow: no run was opened in {uri}"
    if is_remote(uri):
        return f"MLflow run {run_id}: {uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"MLflow run {run_id}; to look at it: mlflow ui --backend-store-uri {uri}"


def write_spill(spill_file: Path, calls: Iterable[Mapping[str, Any]], mode: str = "a") -> None:
    """Metric calls that did not reach the store, one JSON line each (``step``, ``timestamp``,
    ``metrics``): the one format of ``unsent_metrics.jsonl``, whoever writes it."""
    with spill_file.open(mode) as spill:
        spill.writelines(json.dumps({k: call[k] for k in ("step", "timestamp", "metrics")}) + "\n"
                         for call in calls)


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

    def ready(self) -> Optional[str]:
        """Wait until the store has the run; raises :class:`TrackingError` if it cannot be used."""
        return self.run_id

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

    def how_to_view(self) -> str:
        """A line for the end of the job's log: where its run is and how to look at it."""
        return "MLflow: not tracked (tracking.backend=none)"


class WorkerTracker(Tracker):
    """Tracking through :mod:`cpo_exp.tracking.worker`: each call is one JSON line to its stdin.

    A writer thread does the writing, so no call waits, not even for a full pipe. Files handed to
    ``log_artifact(s)`` are copied first (a snapshot at call time: the caller may delete or
    rewrite them). :meth:`ready` waits until the run is open and every call so far is applied.
    If the worker dies, metrics from then on go to ``spill_file`` and :meth:`end` says so.
    """

    def __init__(self, opening: Mapping[str, Any], wait_s: float):
        self._uri = opening["uri"]
        self._spill_file = Path(opening["spill_file"]) if opening.get("spill_file") else None
        self._wait_s = wait_s
        self._proc = subprocess.Popen([sys.executable, "-m", "cpo_exp.tracking.worker"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._outbox: queue.Queue = queue.Queue()
        self._replies: queue.Queue = queue.Queue()
        self._staging = Path(tempfile.mkdtemp(prefix="cpo_exp-artifacts-"))
        self._staged = 0
        self._run_id: Optional[str] = None
        self._experiment_id: Optional[str] = None
        self._ended = False
        # Metric calls not yet confirmed stored, by sequence number: if the worker dies, they
        # (and every later one) go to the spill file instead of being lost with it.
        self._unconfirmed: dict[int, dict] = {}
        self._sequence = 0
        self._gone = False
        self._lock = threading.Lock()
        self._lost = 0
        threading.Thread(target=self._write, name="cpo_exp-tracking-writer", daemon=True).start()
        threading.Thread(target=self._read, name="cpo_exp-tracking-reader", daemon=True).start()
        self._send({"op": "open", **opening})

    # ------------------------------------------------------------------ the pipes

    def _send(self, message: dict) -> None:
        self._outbox.put(message)

    def _write(self) -> None:
        stdin = self._proc.stdin
        while (message := self._outbox.get()) is not None:
            try:
                stdin.write(json.dumps(message).encode() + b"\n")
                stdin.flush()
            except (BrokenPipeError, OSError):
                pass  # the worker is gone; the reader keeps the unconfirmed metrics
        try:
            stdin.close()
        except (BrokenPipeError, OSError):
            pass

    def _spill(self, messages: list[dict], mode: str) -> None:
        """Metric calls the worker will never store (``mode`` "w" or "a")."""
        self._lost += sum(len(m["metrics"]) for m in messages)
        if self._spill_file is not None:
            write_spill(self._spill_file, messages, mode)

    def _read(self) -> None:
        for line in self._proc.stdout:
            message = json.loads(line)
            if "stored" in message:
                with self._lock:
                    for sequence in [n for n in self._unconfirmed if n <= message["stored"]]:
                        del self._unconfirmed[sequence]
            elif "log" in message:
                log.log(logging.getLevelName(message["log"].upper()), "%s", message["message"])
            else:
                self._replies.put(message)
        code = self._proc.wait()
        with self._lock:
            self._gone = True
            if self._unconfirmed:  # a superset of what the worker itself had spilled: rewrite
                self._spill(list(self._unconfirmed.values()), "w")
                self._unconfirmed.clear()
        if not self._ended:
            log.error("the MLflow worker process exited (status %s) while the run was open; training goes on%s",
                      code, f", metrics are kept in {self._spill_file}" if self._spill_file else "")
        self._replies.put({"gone": code})

    def _reply(self, timeout_s: float, waiting_for: str) -> dict:
        try:
            reply = self._replies.get(timeout=timeout_s)
        except queue.Empty:
            raise TrackingError(f"MLflow did not answer within {timeout_s:.0f}s ({waiting_for})") from None
        if "gone" in reply:
            self._replies.put(reply)  # every later wait sees it too
            raise TrackingError(f"the MLflow worker process exited (status {reply['gone']}) before {waiting_for}")
        return reply

    # ------------------------------------------------------------------ the run

    @property
    def run_id(self) -> str:
        """The run's id; waits for the run to be open."""
        if self._run_id is None:
            reply = self._reply(self._wait_s + 60, "the run was open")
            if "error" in reply:
                raise TrackingError(reply["error"])
            self._opened(reply)
        return self._run_id

    def _opened(self, reply: dict) -> None:
        self._run_id, self._experiment_id = reply["ready"], reply["experiment_id"]

    def how_to_view(self) -> str:
        return how_to_view(self._uri, self._run_id, self._experiment_id)

    def ready(self) -> str:
        """Wait until the run is open and every call so far is applied; raise if any failed."""
        run_id = self.run_id
        self._send({"op": "sync"})
        errors = self._reply(self._wait_s + 60, "the first calls were logged")["errors"]
        if errors:
            raise TrackingError("MLflow: " + "; ".join(errors))
        return run_id

    def end(self, status: str, error: Optional[str] = None) -> None:
        """End the run with ``status``; raise if anything could not be logged (after the run ended)."""
        self._ended = True
        self._send({"op": "end", "status": status, "error": error})
        self._send(None)
        errors: list[str] = []
        try:
            while True:  # replies to calls nobody waited for come first
                reply = self._reply(self._wait_s + 60, "the run was ended")
                if "ready" in reply:
                    self._opened(reply)
                elif "error" in reply:  # the run never opened; the worker has stopped
                    errors.append(reply["error"])
                    break
                elif "ended" in reply:
                    errors += reply["errors"]
                    break
        except TrackingError as err:
            errors.append(str(err))
        finally:
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            shutil.rmtree(self._staging, ignore_errors=True)
        if self._lost:
            errors.append(f"{self._lost} metric values could not be sent; they are in {self._spill_file}")
        if errors:
            raise TrackingError("MLflow: " + "; ".join(errors))

    # ------------------------------------------------------------------ the calls

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        message = {"op": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "step": step,
                   "timestamp": int(time.time() * 1000)}
        with self._lock:
            if self._gone:
                self._spill([message], "a")
                return
            self._sequence += 1
            message["sequence"] = self._sequence
            self._unconfirmed[self._sequence] = message
        self._send(message)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._send({"op": "params", "params": {k: str(v) for k, v in params.items()}})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._send({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifacts(self, path: str, artifact_path: Optional[str] = None) -> None:
        staged = self._stage()
        shutil.copytree(path, staged, dirs_exist_ok=True)
        self._send({"op": "artifact", "path": str(staged), "artifact_path": artifact_path})

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        staged = self._stage() / Path(path).name
        shutil.copy2(path, staged)
        self._send({"op": "artifact", "path": str(staged), "artifact_path": artifact_path})

    def _stage(self) -> Path:
        self._staged += 1
        folder = self._staging / str(self._staged)
        folder.mkdir()
        return folder

    def log_table(self, data: Mapping[str, list], artifact_file: str) -> None:
        self._send({"op": "table", "data": dict(data), "artifact_file": artifact_file})


@contextlib.contextmanager
def open_run(uri: str, experiment_name: Optional[str], run_name: Optional[str] = None,
             tags: Optional[Mapping[str, Any]] = None, run_id: Optional[str] = None,
             spill_dir: Optional[str] = None, parent_run_id: Optional[str] = None,
             reconnect_timeout_s: float = 60.0) -> Iterator[WorkerTracker]:
    """One run for the block: FINISHED on success, FAILED on an exception, KILLED on a signal."""
    tracker = WorkerTracker(dict(
        uri=uri, experiment_name=experiment_name, run_name=run_name,
        # Tag values as strings: a REST store (mlflow server) rejects anything else, e.g. an int job_num.
        tags={k: str(v) for k, v in (tags or {}).items()}, run_id=run_id, parent_run_id=parent_run_id,
        spill_file=str(Path(spill_dir) / "unsent_metrics.jsonl") if spill_dir else None,
        reconnect_timeout_s=reconnect_timeout_s, entry_point=sys.argv[0],
    ), reconnect_timeout_s)
    try:
        yield tracker
    except BaseException as err:
        # MLflow marks any exception FAILED; a stop asked for by a signal is KILLED.
        status = "KILLED" if isinstance(err, (Stopped, KeyboardInterrupt)) else "FAILED"
        try:
            tracker.end(status, f"{type(err).__name__}: {err}")
        except TrackingError as tracking_err:
            log.error("%s", tracking_err)  # the original exception is the one to report
        raise
    tracker.end("FINISHED")


def tracked_run(
    cfg: TrackingConfig, launch_dir: str, run_name: str, tags: Optional[Mapping[str, Any]] = None,
    run_id: Optional[str] = None, spill_dir: Optional[str] = None, parent_run_id: Optional[str] = None,
) -> contextlib.AbstractContextManager[Tracker]:
    """The job's run in the configured store (:func:`open_run`), or a :class:`Tracker` that logs nothing.

    ``run_id`` reopens an existing run (a resumed training continues its metrics there);
    ``parent_run_id`` nests a new run under a sweep's parent run (see :mod:`cpo_exp.sweep`).
    Call ``ready()`` before spending compute: it raises if the store cannot be used.
    """
    if cfg.backend == "none":
        return contextlib.nullcontext(Tracker())
    return open_run(tracking_uri(cfg, launch_dir), cfg.experiment_name, run_name, tags, run_id, spill_dir,
                    parent_run_id, cfg.reconnect_timeout_s)


def reopened_run(uri: str, run_id: str) -> contextlib.AbstractContextManager[Tracker]:
    """Log more to an existing run (e.g. a later evaluation); it ends as FINISHED or FAILED again."""
    return open_run(uri, None, run_id=run_id)
