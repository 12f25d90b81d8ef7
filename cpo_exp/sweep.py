"""Sweeps: one parent MLflow run per Hydra multirun, every job a child run of it.

Hydra calls :class:`SweepCallback` (registered under ``hydra.callbacks`` in ``conf/config.yaml``)
in the launching process before the first job starts and after the last one returns. It

- creates the MLflow database and experiment once, before any job exists, so that parallel
  jobs (``hydra/launcher=joblib``) never race to initialise a fresh SQLite file;
- opens the parent run, which carries the sweep definition (the command-line overrides, the
  sweeper and launcher settings, the objective) as params and a ``sweep.yaml`` artifact;
- writes ``<sweep dir>/sweep.json`` (:class:`~cpo_exp.tracking.store.SweepRecord`): how every
  job, in this process or in a joblib worker, finds its parent, and how ``python -m
  cpo_exp.report`` finds the sweep;
- ends the parent in ``on_multirun_end`` with the best job by the objective recorded on it.

Status of the parent: it says what the command said. FINISHED when Hydra completes the sweep
(exit code 0; with Optuna's ``max_failure_rate`` that may include tolerated failed trials, counted
in the ``failed_jobs`` tag); FAILED when the sweep is aborted, which is how Hydra ends a sweep
with a failed job: the other jobs of the batch finish, then Hydra raises and exits non-zero;
KILLED when Ctrl-C or SIGTERM stopped it. Hydra 1.4 calls ``on_multirun_end`` on its way out in
all three cases (from a ``finally``), so the exception on its way tells them apart; a process
that dies before that ends the parent at exit. An Optuna search stopped early marks the trials it
left running FAIL in its stored study (:func:`cpo_exp.study.fail_unfinished`).

Hydra turns any exception raised by a callback into a warning, so nothing here can stop a
sweep. A swept value that would change the launcher or the sweeper (which run once, for the
whole sweep) is refused by Hydra 1.4 itself when it composes that job.

Imports point one way: this module (Hydra's side) uses :mod:`cpo_exp.report` and
:mod:`cpo_exp.tracking.store`; neither of them imports this one, nor Hydra, nor does anything
here import MLflow (the store does).
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cpo_exp import interrupts, study
from cpo_exp.config import TrackingConfig, parse_override
from cpo_exp.report import write_report
from cpo_exp.tracking import check_reachable, redact, tracking_uri
from cpo_exp.tracking.store import Store, SweepRecord, best_run

log = logging.getLogger(__name__)


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _tracking_config(config: DictConfig) -> TrackingConfig:
    node = config.get("tracking") or {}
    return TrackingConfig(**{k: v for k, v in _container(node).items() if k in TrackingConfig.__dataclass_fields__})


class SweepCallback(Callback):
    """The parent MLflow run of a multirun; see the module docstring."""

    def __init__(self, report: bool = True) -> None:
        self.report = report
        self.record: Optional[SweepRecord] = None
        self._store: Optional[Store] = None
        self._ended = False
        self._started = datetime.datetime.now()  # Optuna's trial times are naive local times too

    # ---------------------------------------------------------------- start
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = datetime.datetime.now()
        hydra = config.hydra
        record = SweepRecord(
            sweep_dir=str(hydra.sweep.dir),
            overrides=list(hydra.overrides.task),
            launcher=_container(hydra.launcher),
            sweeper=_container(hydra.sweeper),
            objective=_container(config.get("objective") or {}),
            report=_container(config.get("report") or {}),
        )
        tracking = _tracking_config(config)
        if tracking.backend == "mlflow":
            self._open_parent(record, tracking)
        record.write()
        self.record = record

    def _open_parent(self, record: SweepRecord, tracking: TrackingConfig) -> None:
        uri = tracking_uri(tracking, os.getcwd())
        check_reachable(uri)
        store = Store(uri)
        # Created here, once: N workers opening a fresh SQLite file at once would each try to
        # create its tables and the experiment.
        experiment_id = store.experiment_id(tracking.experiment_name)
        name = "sweep: " + (" ".join(record.overrides) or "default")
        run_id = store.create_run(experiment_id, name, {"sweep_dir": record.sweep_dir, "sweep_role": "parent"})
        store.set_tags(run_id, {"sweep_id": run_id})
        params = {
            "sweep.overrides": " ".join(record.overrides),
            "sweep.launcher": record.launcher.get("_target_", ""),
            "sweep.sweeper": record.sweeper.get("_target_", ""),
            **{f"sweep.params.{k}": v for k, v in (record.sweeper.get("params") or {}).items()},
            **{f"objective.{k}": v for k, v in record.objective.items()},
            # The report reads them here when it is given the parent's id instead of the sweep dir.
            **{f"report.{k}": v for k, v in record.report.items() if v is not None},
        }
        for key in ("n_trials", "direction", "storage", "study_name"):
            if key in record.sweeper:
                params[f"sweep.{key}"] = study.shown(record.sweeper[key]) if key == "storage" else record.sweeper[key]
        if "n_jobs" in record.launcher:
            params["sweep.launcher.n_jobs"] = record.launcher["n_jobs"]
        store.log_params(run_id, params)
        store.log_text(run_id, OmegaConf.to_yaml(OmegaConf.create(
            {"overrides": record.overrides, "launcher": record.launcher, "sweeper": record.sweeper,
             "objective": record.objective, "report": record.report})), "sweep.yaml")
        record.tracking_uri, record.experiment_name, record.parent_run_id = uri, tracking.experiment_name, run_id
        self._store = store
        atexit.register(self._end_at_exit)
        log.info("MLflow parent run %s of sweep %s (%s)", run_id, record.sweep_dir, uri)

    # ---------------------------------------------------------------- end
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        stopped = sys.exc_info()[1]  # Hydra calls this from a ``finally``: the exception on its way out
        if stopped is None:
            self._end("FINISHED")
            return
        storage = (self.record.sweeper if self.record is not None else {}).get("storage")
        if storage:
            try:
                study.fail_unfinished(storage, self.record.sweeper["study_name"], self._started)
            except Exception as err:  # noqa: BLE001 - the parent run must still be ended
                log.warning("could not mark the unfinished Optuna trials FAIL: %s: %s", type(err).__name__, err)
        killed = interrupts.stopped_by() or isinstance(stopped, KeyboardInterrupt)
        self._end("KILLED" if killed else "FAILED")

    def _end_at_exit(self) -> None:
        """The sweep never reached on_multirun_end: a job failed, or a signal stopped it."""
        self._end("KILLED" if interrupts.stopped_by() else "FAILED")

    def _end(self, status: str) -> None:
        if self._ended or self.record is None or self._store is None:
            return
        self._ended = True
        store, record, run_id = self._store, self.record, self.record.parent_run_id
        try:
            summarise_parent(store, record)
        except Exception as err:  # noqa: BLE001 - the parent must be ended whatever happens
            log.warning("sweep summary failed: %s: %s", type(err).__name__, err)
        store.end_run(run_id, status)
        log.info("MLflow parent run %s ended %s", run_id, status)
        if self.report:  # after the end, so that the report states the sweep's final status
            try:
                paths = write_report(store, run_id, Path(record.sweep_dir), baseline=record.report.get("baseline"),
                                     confidence=record.report.get("confidence"))
                log.info("sweep report: %s", paths[0])
            except Exception as err:  # noqa: BLE001 - a plotting problem must not fail the sweep
                log.warning("sweep report failed: %s: %s", type(err).__name__, err)


def summarise_parent(store: Store, record: SweepRecord) -> None:
    """Job counts, the best job by the objective, and Optuna's own result, on the parent run."""
    run_id = record.parent_run_id
    runs = store.child_runs(run_id)
    statuses = [r.status for r in runs]
    store.set_tags(run_id, {"jobs": len(runs), "failed_jobs": statuses.count("FAILED"),
                            "resumed_jobs": sum("resumed_from" in r.tags for r in runs)})
    metric = record.objective.get("metric")
    best = best_run(runs, metric, record.objective.get("direction", "maximize")) if metric else None
    if best is not None:
        store.set_tags(run_id, {"best_run_id": best.run_id, "best_run_name": best.name})
        store.log_metric(run_id, "best/" + metric, best.metrics[metric])
    optuna_result = Path(record.sweep_dir) / "optimization_results.yaml"
    if optuna_result.is_file():
        result = OmegaConf.to_container(OmegaConf.load(optuna_result))
        store.log_artifact(run_id, str(optuna_result))
        if "best_value" in result:
            store.log_metric(run_id, "optuna/best_value", float(result["best_value"]))
            store.log_params(run_id, {f"optuna.best_params.{k}": v for k, v in result.get("best_params", {}).items()})
    storage = record.sweeper.get("storage")
    if storage:  # the whole study, this command's trials and those of the commands before it
        store.set_tags(run_id, {"optuna.complete_trials": study.complete_trials(storage, record.sweeper["study_name"])})
    multirun_yaml = Path(record.sweep_dir) / "multirun.yaml"
    if multirun_yaml.is_file():
        store.log_artifact(run_id, str(multirun_yaml))


# -------------------------------------------------------------------- the job side


@dataclass
class SweepJob:
    """One job of a multirun, as seen from inside it (any launcher, any process)."""

    record: Optional[SweepRecord]
    overrides: list[str]
    num: int
    # The job runs on several processes, started by its own ``accelerate launch`` (see
    # cpo_exp.job.launch_processes): these processes are Hydra single runs that carry the job.
    relaunched: bool = False

    # The job a relaunched process belongs to: {"sweep_dir", "overrides", "num"} as JSON.
    ENV = "CPO_EXP_SWEEP_JOB"

    @classmethod
    def current(cls) -> Optional["SweepJob"]:
        """The running job, or None outside a multirun."""
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            carried = os.environ.get(cls.ENV)
            if not carried:
                return None
            job = json.loads(carried)
            return cls(SweepRecord.read(job["sweep_dir"]), job["overrides"], job["num"], relaunched=True)
        return cls(SweepRecord.read(hydra_cfg.sweep.dir), list(hydra_cfg.overrides.task), hydra_cfg.job.num)

    def environment(self) -> dict[str, str]:
        """What the processes of a relaunched job need to find their sweep (:data:`ENV`)."""
        sweep_dir = self.record.sweep_dir if self.record is not None else str(HydraConfig.get().sweep.dir)
        return {self.ENV: json.dumps({"sweep_dir": sweep_dir, "overrides": self.overrides, "num": self.num})}

    @property
    def tags(self) -> dict[str, Any]:
        tags: dict[str, Any] = {"overrides": json.dumps(self.overrides), "job_num": self.num}
        if self.record is not None:
            tags["sweep_dir"] = self.record.sweep_dir
            if self.record.parent_run_id:
                tags["sweep_id"] = self.record.parent_run_id
        return tags

    def swept_keys(self) -> list[str]:
        """The keys whose value varies between the sweep's jobs: a swept command-line override
        (``beta=0.1,1``, ``range(...)``, ``choice(...)``...) or a sweeper's ``params`` entry."""
        if self.record is None:
            return []
        parser = OverridesParser.create()
        keys = [parsed.get_key_element().lstrip("+~") for parsed in parser.parse_overrides(self.record.overrides)
                if parsed.is_sweep_override()]
        return list(dict.fromkeys([*keys, *(self.record.sweeper.get("params") or {})]))

    def run_name(self) -> str:
        """The job's overrides, its swept values first: MLflow's table cuts names at ~20 characters.

        The full overrides, in command-line order, are the ``overrides`` tag.
        """
        swept = self.swept_keys()
        overrides = redact(self.overrides)
        keys = [(parse_override(o) or (o, ""))[0] for o in overrides]
        ordered = [o for k, o in zip(keys, overrides) if k in swept] + [o for k, o in zip(keys, overrides)
                                                                           if k not in swept]
        return ",".join(ordered) or "default"

    def parent_run_id(self, uri: str, experiment_name: str) -> Optional[str]:
        """The parent, when this job logs to the parent's store and experiment."""
        r = self.record
        if r is None or not r.parent_run_id or (uri, experiment_name) != (r.tracking_uri, r.experiment_name):
            return None
        return r.parent_run_id

    def record_rejected(self, tracking: TrackingConfig, launch_dir: str, name: str, tags: dict[str, Any],
                        err: BaseException) -> None:
        """A FAILED child run for a job rejected before its run opened, so the sweep shows it."""
        if tracking.backend != "mlflow":
            return
        uri = tracking_uri(tracking, launch_dir)
        parent = self.parent_run_id(uri, tracking.experiment_name)
        if parent is None:
            return
        store = Store(uri)
        store.record_failed_run(store.get_run(parent).experiment_id, name, {**tags, "mlflow.parentRunId": parent},
                                f"{type(err).__name__}: {err}")
