"""The MLflow side of a job's tracking, in a process of its own (``python -m cpo_exp.tracking.worker``).

The training process never imports MLflow. :class:`cpo_exp.tracking.WorkerTracker` starts this
process and writes one JSON line per call to its stdin; here the run is opened (while the
trainer imports its libraries and reads its data, on another core), the calls are applied in
order, and metrics go to the store as soon as no other call is waiting: one store call for all
that came meanwhile, so a batch forms by itself when calls come faster than the store answers.
A slow store, or a tracking server that has gone away, never stalls a training step: rows wait
in memory, and in ``spill_file`` so that a crash loses none, and are sent when the store answers
again.

Replies (``ready``, ``synced``, ``ended``) and log lines go back as JSON lines on the original
stdout; anything else printed here goes to stderr. Signals are ignored: the trainer decides how
the run ends. If the trainer dies without saying (SIGKILL, the OOM killer), stdin reaches its
end and the run is ended KILLED, instead of being left RUNNING forever, and quietly: nobody is
left to read a reply.

Why a process and not MLflow's own asynchronous logging in the trainer: only a process that
outlives the trainer can end its run after a SIGKILL, and this one costs the trainer about 0.2 ms
of CPU per call, where logging in-process costs 2.8 ms of CPU per call (asynchronous or not:
MLflow's async queue runs in a thread of the trainer) and 2 s of CPU to import MLflow and open
the run.

Only the standard library, :mod:`cpo_exp.tracking` and MLflow are imported here, so the process
starts fast.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from cpo_exp.tracking import TrackingError, check_reachable, is_remote, write_spill
from cpo_exp.tracking.store import MAX_PARAM_CHARS, MAX_PARAMS_PER_CALL, Store, quiet_mlflow

MAX_METRICS_PER_CALL = 1000  # MLflow's batch limit


class Replies:
    """JSON lines to the trainer, on a private copy of the original stdout."""

    def __init__(self) -> None:
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # stray prints (MLflow's included) must not corrupt the replies

    def send(self, **message: Any) -> None:
        try:
            self._out.write(json.dumps(message) + "\n")
        except BrokenPipeError:
            pass  # the trainer is gone (killed): nobody is left to tell; the run is ended KILLED

    def log(self, level: str, message: str) -> None:
        self.send(log=level, message=message)


class Run:
    """One open MLflow run; metrics are buffered and retried while the store does not answer, and
    any other call waits for a tracking server that is away (:meth:`apply`)."""

    retry_s = 10.0

    def __init__(self, replies: Replies, uri: str, experiment_name: Optional[str], run_name: str, tags: dict,
                 run_id: Optional[str], parent_run_id: Optional[str], spill_file: Optional[str],
                 reconnect_timeout_s: float, entry_point: Optional[str]):
        check_reachable(uri)
        self._uri, self._remote = uri, is_remote(uri)
        if is_remote(uri):
            # MLflow's default (7 retries, exponential backoff) would hold every call for minutes
            # while a server is away; this class retries on its own schedule instead.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        if entry_point:
            # MLflow tags the run with its source (mlflow.source.name, the git commit) from
            # sys.argv[0]: that of the training command, not of this worker.
            sys.argv[0] = entry_point
        quiet_mlflow()
        import mlflow

        self._mlflow, self._replies = mlflow, replies
        mlflow.set_tracking_uri(uri)
        experiment_id = None
        if experiment_name is not None:  # None: reopening ``run_id`` wherever it is
            try:
                experiment_id = Store(uri).experiment_id(experiment_name)
            except Exception as err:  # noqa: BLE001 - any store failure is reported with the URI
                raise TrackingError(f"cannot open MLflow experiment {experiment_name!r} at {uri}: {err}") from None
        if run_id is not None:
            try:
                mlflow.get_run(run_id)
            except Exception as err:  # noqa: BLE001 - a missing run is reported with the store
                raise TrackingError(f"MLflow run {run_id} of the checkpoint is not in {uri}: {err}") from None
            run = mlflow.start_run(run_id=run_id, tags=tags)
        else:
            run = mlflow.start_run(run_name=run_name, experiment_id=experiment_id, tags=tags,
                                   parent_run_id=parent_run_id)
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self._client = mlflow.MlflowClient()
        self._pending: list[tuple[dict[str, float], int, int]] = []
        self._sequence = 0  # of the last metric call received
        self._spill_file = Path(spill_file) if spill_file else None
        self._wait_s = reconnect_timeout_s
        self._down_since: Optional[float] = None
        self._next_try = 0.0  # while the store is away: when to try it again
        replies.log("info", f"MLflow: {uri} (experiment {experiment_name or run.info.experiment_id!r}, "
                            f"run {self.run_id})")

    # ------------------------------------------------------------------ metrics

    def add_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int, sequence: int) -> None:
        self._pending.append((metrics, step, timestamp_ms))
        self._sequence = sequence

    def pending_rows(self) -> int:
        return sum(len(metrics) for metrics, _, _ in self._pending)

    def due_in(self) -> Optional[float]:
        """Seconds until :meth:`send_due` has something to do; None: nothing is pending."""
        return max(0.0, self._next_try - time.monotonic()) if self._pending else None

    def send_due(self) -> None:
        """Send what is pending, unless the store is away and its next try is not due yet."""
        if self._pending and time.monotonic() >= self._next_try:
            self._send()

    def _send(self) -> bool:
        from mlflow.entities import Metric

        rows = [Metric(k, float(v), ts, step) for metrics, step, ts in self._pending for k, v in metrics.items()]
        try:
            for start in range(0, len(rows), MAX_METRICS_PER_CALL):
                self._client.log_batch(self.run_id, metrics=rows[start:start + MAX_METRICS_PER_CALL])
        except Exception as err:  # noqa: BLE001 - any failure to reach the store is an outage
            self._next_try = time.monotonic() + self.retry_s
            if self._down_since is None:
                self._down_since = time.monotonic()
                kept = f" (also in {self._spill_file})" if self._spill_file else ""
                self._replies.log("warning", f"MLflow tracking server unreachable ({type(err).__name__}); "
                                             f"training goes on, metrics are kept{kept} and sent when it is back")
            self._spill()
            return False
        if self._down_since is not None:
            self._replies.log("warning", f"MLflow tracking server is back after "
                                         f"{time.monotonic() - self._down_since:.0f}s: sent {len(self._pending)} "
                                         "buffered metric rows")
            self._down_since = None
        self._pending.clear()
        self._replies.send(stored=self._sequence)  # the trainer may forget these calls
        if self._spill_file is not None and self._spill_file.exists():
            self._spill_file.unlink()
        return True

    def _spill(self) -> None:
        if self._spill_file is not None:  # all that is pending, so rewritten whole
            write_spill(self._spill_file, ({"step": s, "timestamp": ts, "metrics": m} for m, s, ts in self._pending),
                        "w")

    def flush(self, wait_s: Optional[float] = None) -> None:
        """Send what is pending, waiting up to ``wait_s`` for a store that is away."""
        if not self._pending:
            return
        wait_s = self._wait_s if wait_s is None else wait_s
        deadline = time.monotonic() + wait_s
        if self._down_since is not None and wait_s > 0:
            self._replies.log("warning", f"waiting up to {wait_s:.0f}s for the MLflow tracking server to send "
                                         f"{len(self._pending)} buffered metric rows")
        while not self._send():
            if time.monotonic() >= deadline:
                raise TrackingError(f"MLflow tracking server still unreachable after {wait_s:.0f}s; "
                                  f"the unsent metrics are in {self._spill_file}")
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    # ------------------------------------------------------------------ everything else

    def apply(self, op: str, call, **kwargs) -> None:
        """``call(**kwargs)``; while a tracking server does not answer, retried every 2 s for up to
        ``reconnect_timeout_s`` (a server's own errors, or a local store's, are raised at once)."""
        started = time.monotonic()
        deadline = started + self._wait_s
        warned = False
        while True:
            try:
                call(**kwargs)
                if warned:
                    self._replies.log("warning", f"MLflow tracking server is back after "
                                                 f"{time.monotonic() - started:.0f}s: {op} logged")
                return
            except Exception:  # noqa: BLE001 - an outage is told apart from an error below
                if not self._remote or time.monotonic() >= deadline or self._answers():
                    raise
            if not warned:
                self._replies.log("warning", f"MLflow tracking server unreachable: {op} waits for it "
                                             f"(up to {self._wait_s:.0f}s); training goes on")
                warned = True
            time.sleep(2.0)

    def _answers(self) -> bool:
        try:
            check_reachable(self._uri, timeout_s=2.0)
        except TrackingError:
            return False
        return True

    def log_params(self, params: dict[str, Any]) -> None:
        items = [(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_CALL):
            self._mlflow.log_params(dict(items[start:start + MAX_PARAMS_PER_CALL]))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)

    def log_artifact(self, path: str, artifact_path: Optional[str]) -> None:
        self.flush()  # a server that is away gets its time to return first
        if Path(path).is_dir():
            self._mlflow.log_artifacts(path, artifact_path)
        else:
            self._mlflow.log_artifact(path, artifact_path)

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        self.flush()
        # MLflow appends to an existing table artifact of the same name.
        self._mlflow.log_table(data, artifact_file)

    def end(self, status: str, error: Optional[str], wait_s: Optional[float] = None) -> None:
        try:
            self.flush(wait_s)
        finally:
            if error:
                self._mlflow.set_tag("error", error[:5000])
            self._mlflow.end_run(status)


def read_lines(inbox: queue.Queue) -> None:
    """Every line of stdin onto ``inbox``; ``None`` at its end (the trainer is gone).

    Raw ``os.read``, not ``sys.stdin``: a daemon thread blocked inside a buffered reader holds
    its lock, and the interpreter's shutdown then stalls on it for a second and aborts.
    """
    rest = b""
    while chunk := os.read(0, 1 << 16):
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            inbox.put(json.loads(line))
    inbox.put(None)


def serve(replies: Replies, inbox: queue.Queue, run: Run) -> None:
    """Apply the trainer's calls in order until it ends the run (or disappears)."""
    errors: list[str] = []
    while True:
        try:
            message = inbox.get(timeout=run.due_in())
        except queue.Empty:
            run.send_due()  # no call is waiting, or a store that was away may be back
            continue
        if message is None:
            # Without waiting: nobody is left to wait for, and a scheduler's SIGKILL may follow.
            run.end("KILLED", "the training process ended without ending this run (killed, e.g. by SIGKILL "
                              "or the out-of-memory killer)", wait_s=0)
            return
        op = message.pop("op")
        if op == "metrics":
            run.add_metrics(message["metrics"], message["step"], message["timestamp"], message["sequence"])
            if inbox.empty() or run.pending_rows() >= MAX_METRICS_PER_CALL:  # else the next calls join this one
                run.send_due()
            continue
        if op == "end":
            try:
                run.end(message["status"], message.get("error"))
            except Exception as err:  # noqa: BLE001 - reported to the trainer
                errors.append(f"{type(err).__name__}: {err}")
            replies.send(ended=True, errors=errors)
            return
        if op == "sync":
            replies.send(synced=True, errors=errors)
            continue
        try:
            run.apply(op, {"params": run.log_params, "tags": run.set_tags, "artifact": run.log_artifact,
                           "table": run.log_table}[op], **message)
        except Exception as err:  # noqa: BLE001 - training goes on; the error is reported
            errors.append(f"{op}: {type(err).__name__}: {err}")
            replies.log("error", f"MLflow could not log {op}: {type(err).__name__}: {err}")


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the trainer decides
    replies = Replies()
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(inbox,), daemon=True).start()
    opening = inbox.get()
    if opening is None:
        return 0
    opening.pop("op")
    try:
        run = Run(replies, **opening)
    except Exception as err:  # noqa: BLE001 - every failure to open is the trainer's TrackingError
        replies.send(error=str(err) if isinstance(err, TrackingError) else
                     f"cannot open an MLflow run at {opening['uri']}: {type(err).__name__}: {err}")
        return 1
    replies.send(ready=run.run_id, experiment_id=run.experiment_id)
    serve(replies, inbox, run)
    return 0


if __name__ == "__main__":
    code = main()
    # The run is ended and every reply sent: skip the interpreter's teardown of MLflow's module
    # graph and threads, which takes most of a second that the trainer would wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
