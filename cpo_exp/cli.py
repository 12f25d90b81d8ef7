"""The entry point: Hydra composes the config, this module turns it into a typed
:class:`~cpo_exp.config.Config`, checks it, opens the tracking run and hands over to the job's
steps (:mod:`cpo_exp.job`).

Hydra is imported here and in the multirun callback (:mod:`cpo_exp.sweep`) only. Order of work:
validate the config, open the tracking run, then the job: data, model, train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf

import cpo_exp
from cpo_exp import checkpoint, interrupts, study
from cpo_exp.checkpoint import CheckpointError
from cpo_exp.config import Config, ConfigError, flatten, parse_override, unflatten, unknown_key, validate
from cpo_exp.job import (USER_ERRORS, ProcessesFailed, RunClock, check_device, check_sources, claimed_devices,
                         launch_processes, record_config, train_job, visible_gpus, write_objective)
from cpo_exp.sweep import SweepJob
from cpo_exp.tracking import redact, tracked_run, tracking_uri

log = logging.getLogger("cpo_exp")


def config_dir() -> str:
    """``conf/`` shipped inside the wheel, or the repository's ``conf/`` in a source checkout."""
    packaged = Path(__file__).resolve().parent / "conf"
    return str(packaged if packaged.is_dir() else packaged.parent.parent / "conf")


ConfigStore.instance().store(name="cpo_exp_schema", node=Config)
# conf/config.yaml: ``resume=<dir>`` makes <dir> the run dir (see there).
OmegaConf.register_resolver("cpo_exp.if_resume", lambda resume, then, other: then if resume else other,
                                replace=True)


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [""])[0]  # SQLAlchemy appends a "Background on this error" line


@contextlib.contextmanager
def _opening_study(storage: Optional[str], study_name: str):
    """A bad URL or an unreachable database server, as one line naming ``hydra.sweeper.storage``."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - whatever SQLAlchemy or its driver raises
        raise ConfigError(f"hydra.sweeper.storage={study.shown(storage)}: the Optuna study {study_name!r} cannot "
                          f"be opened ({type(err).__name__}: {_first_line(err)}); give a reachable SQLAlchemy URL, e.g. "
                          "sqlite:///optuna.db, or null for a study in memory") from None


def trials_to_go(storage: Optional[str], study_name: str, size: int) -> int:
    """conf/hparams_search: the sweeper's ``n_trials``, what the stored study lacks of ``size``."""
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"objective.n_trials={size!r}: the size of an Optuna study must be an integer >= 1")
    with _opening_study(storage, study_name):
        return study.trials_to_go(storage, study_name, size)


def study_seed(seed: Optional[int], storage: Optional[str], study_name: str) -> Optional[int]:
    """conf/hparams_search: the sampler's seed, moved on by the trials the stored study holds."""
    with _opening_study(storage, study_name):
        return study.sampler_seed(seed, storage, study_name)


def _exit_on_config_error(resolver):
    """A resolver's error would reach the user as Hydra's traceback of the sweeper's instantiation:
    the command stops with one line instead, before the sweep has opened anything."""

    def resolve(*args):
        try:
            return resolver(*args)
        except ConfigError as err:
            print(f"cpo_exp: {err}", file=sys.stderr)
            sys.exit(2)

    return resolve


# Cached: the callback and the sweeper read each value once, and must see the same one.
OmegaConf.register_resolver("cpo_exp.trials_to_go", _exit_on_config_error(trials_to_go), replace=True, use_cache=True)
OmegaConf.register_resolver("cpo_exp.study_seed", _exit_on_config_error(study_seed), replace=True, use_cache=True)


# Where the first run of this process starts its wall clock (see cpo_exp.job.RunTimes).
_clock: Optional[float] = cpo_exp.IMPORTED_AT


def config_groups() -> tuple[str, ...]:
    """The config groups (``loss``, ``model``, ...): the folders of ``conf/``."""
    return tuple(sorted(p.name for p in Path(config_dir()).iterdir() if p.is_dir()))


def check_overrides(overrides: list[str]) -> None:
    """Refuse a command-line key that is in no config group or schema, naming the closest valid key."""
    groups = config_groups()
    for override in overrides:
        problem = unknown_key(override, groups)
        if problem:
            raise ConfigError(problem)


def compose_config(overrides: list[str]) -> Config:
    """The config that ``python -m cpo_exp <overrides>`` runs, composed with Hydra's compose API."""
    check_overrides(overrides)
    with initialize_config_dir(config_dir=config_dir()):
        return typed_config(compose("config", overrides=overrides))


def typed_config(dcfg: DictConfig) -> Config:
    """The composed config as a :class:`Config`; a mandatory key left unset (``???``) is named."""
    try:
        return OmegaConf.to_object(dcfg)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} must be set (it has no default): add {err.full_key}=... to the "
                          "command line, e.g. model.name_or_path=<a local folder or a hub id> for model=hf") from None


def run_name(overrides: list[str]) -> str:
    """Name a run after what the command line changed, e.g. ``loss=simpo,cpo_alpha=0``."""
    return ",".join(overrides) if overrides else "default"


def resumed_config(dcfg: DictConfig, point: checkpoint.ResumePoint, overrides: list[str]) -> DictConfig:
    """The checkpoint's config; command-line overrides may only repeat it (or change volatile keys)."""
    current = flatten(OmegaConf.to_container(dcfg, resolve=True))
    keys = [parsed[0] for parsed in map(parse_override, overrides) if parsed]
    problems = checkpoint.config_mismatches(point.config, current, [k for k in keys if k != "resume"])
    if problems:
        raise CheckpointError(f"resume={dcfg.resume}: the command line changes the checkpoint's config "
                              f"({'; '.join(problems)}); a resumed run keeps its config")
    stored = {k: v for k, v in point.config.items() if k not in checkpoint.VOLATILE_KEYS}
    volatile = {k: v for k, v in current.items() if k in checkpoint.VOLATILE_KEYS}
    merged = OmegaConf.merge(OmegaConf.structured(Config), unflatten({**stored, **volatile}))
    return merged


def check_shared_run_dir(world_size: int, hydra_overrides: list[str], resume: Optional[str]) -> None:
    """Under ``accelerate launch``/``torchrun`` all processes must write into one run dir.

    Hydra's default dir is a timestamp taken in each process, so each would get its own.
    """
    if world_size > 1 and not resume and not any(o.startswith("hydra.run.dir=") for o in hydra_overrides):
        raise ConfigError(
            f"a run of {world_size} processes needs one shared output dir, but Hydra's default dir is a "
            "per-process timestamp: add hydra.run.dir=outputs/<name> to the command line"
        )


# What accelerate launch exports for the strategies that change how the model is wrapped.
_LAUNCH_ENV = {"fsdp": "ACCELERATE_USE_FSDP", "deepspeed": "ACCELERATE_USE_DEEPSPEED"}


def check_launcher(distributed: str, env: dict) -> None:
    """FSDP and DeepSpeed come from the launcher; without it accelerate would silently run plain."""
    var = _LAUNCH_ENV.get(distributed)
    if var and env.get(var, "false").lower() != "true":
        preset = "deepspeed_zero2 (or deepspeed_zero3)" if distributed == "deepspeed" else distributed
        raise ConfigError(
            f"hardware.distributed={distributed} needs accelerate's launcher: accelerate launch --config_file "
            f"$(python -m cpo_exp.launch {preset.split()[0]}) -m cpo_exp hardware={preset.split()[0]} "
            "hydra.run.dir=outputs/<name> ..."
        )


def run(dcfg: DictConfig) -> Optional[float]:
    """One job: everything after composition. Returns the objective's final eval value (for sweepers)."""
    global _clock
    composed = time.perf_counter()
    # A multirun's later jobs in this process imported nothing: their clock starts at composition.
    clock, _clock = RunClock(_clock if _clock is not None else composed, composed), None
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    # Set by accelerate launch and torchrun; only the first process talks to MLflow.
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if hydra_cfg.mode == RunMode.RUN:  # a multirun's job dirs are named by the one outer process
        check_shared_run_dir(world_size, list(hydra_cfg.overrides.hydra), dcfg.resume)
    if rank > 0:  # one copy of every progress line is enough; warnings and errors still show
        logging.getLogger("cpo_exp").setLevel(logging.WARNING)
    point = checkpoint.open_resume_point(dcfg.resume) if dcfg.resume else None
    if point is None and hydra_cfg.mode == RunMode.MULTIRUN and checkpoint.checkpoints(hydra_cfg.runtime.output_dir):
        # A sweep job's dir is its own (sweep dirs are timestamped to the microsecond): a checkpoint in
        # it comes from an earlier attempt of this very job that its launcher started again (a requeued
        # or preempted SLURM job, a Ray task retried after its worker died). Continue that attempt's run.
        point = checkpoint.open_resume_point(hydra_cfg.runtime.output_dir)
        log.info("job dir %s holds %s from an earlier attempt of this job: resuming it",
                 hydra_cfg.runtime.output_dir, point.path.name)
    if point is not None:
        dcfg = resumed_config(dcfg, point, overrides)
    cfg = typed_config(dcfg)
    cfg.output_dir = hydra_cfg.runtime.output_dir

    # validate before anything is opened or loaded
    job = SweepJob.current()
    tags = run_tags(hydra_cfg, cfg.output_dir, job)
    name = cfg.tracking.run_name or (job.run_name() if job is not None else run_name(redact(overrides)))
    try:
        validate(cfg)
    except ConfigError as err:
        if job is not None:  # the sweep's report must show the rejected job
            job.record_rejected(cfg.tracking, hydra_cfg.runtime.cwd, name, tags, err)
        raise
    check_device(cfg.hardware)
    check_sources(cfg)
    checkpoint.check_writable(cfg.output_dir)
    relaunched = job is not None and job.relaunched
    with job_devices(cfg, job) as devices:
        # A job on several processes, or on GPUs of its own (CUDA_VISIBLE_DEVICES counts only in a
        # process that has not initialised CUDA yet, and joblib's workers run job after job), runs in
        # processes of its own, which open its run.
        if (cfg.hardware.num_processes > 1 or devices) and world_size == 1 and not relaunched:
            env = job.environment() if job is not None else {}
            return launch_processes(cfg, hydra_cfg.runtime.choices.get("hardware"), overrides, env)
        check_launcher(cfg.hardware.distributed, dict(os.environ))
        return tracked_training(dcfg, cfg, job, name, tags, point, clock, rank)


def tracked_training(dcfg: DictConfig, cfg: Config, job: Optional[SweepJob], name: str, tags: dict,
                     point: Optional[checkpoint.ResumePoint], clock: RunClock, rank: int) -> Optional[float]:
    """Open the job's tracking run, record the config, train; the objective's final eval value."""
    hydra_cfg = HydraConfig.get()
    resolved = OmegaConf.to_container(dcfg, resolve=True)
    resolved["output_dir"] = cfg.output_dir
    public = redact(resolved)  # secrets stay out of MLflow and out of the files next to checkpoints
    tracking = cfg.tracking if rank == 0 else dataclasses.replace(cfg.tracking, backend="none")
    parent = (job.parent_run_id(tracking_uri(cfg.tracking, hydra_cfg.runtime.cwd), cfg.tracking.experiment_name)
              if job is not None and rank == 0 else None)
    with interrupts.stop_on_terminate(), tracked_run(
            tracking, hydra_cfg.runtime.cwd, name, tags, run_id=point.mlflow_run_id if point else None,
            spill_dir=cfg.output_dir, parent_run_id=parent) as tracker:
        if point is None and rank == 0:
            hydra_dir = Path(cfg.output_dir) / hydra_cfg.output_subdir if hydra_cfg.output_subdir else None
            record_config(tracker, public, cfg.output_dir, hydra_dir)
        elif point is not None:
            tracker.set_tags({"resumed_from": str(point.path)})
        result = train_job(cfg, tracker, public, point, clock)
        log_file = Path(cfg.output_dir) / f"{hydra_cfg.job.name}.log"
        if log_file.is_file():
            tracker.log_artifact(str(log_file))
    log.info("%s", tracker.how_to_view())
    objective = result.eval_metrics.get(cfg.objective.metric)
    if objective is None:
        log.warning("no eval split, so no objective %s to return to the sweeper", cfg.objective.metric)
    if job is not None and job.relaunched and rank == 0:
        write_objective(cfg.output_dir, objective)  # for the process that launched this one
    return objective


def job_devices(cfg: Config, job: Optional[SweepJob]):
    """``hardware.devices_per_job`` GPUs of this machine held for a sweep job (see job.claimed_devices)."""
    if cfg.hardware.devices_per_job is None or job is None or job.record is None or job.relaunched:
        return contextlib.nullcontext()  # a relaunched job's processes use what their launcher holds
    return claimed_devices(job.record.sweep_dir, cfg.hardware.devices_per_job, visible_gpus())


def run_tags(hydra_cfg, output_dir: str, job: Optional[SweepJob]) -> dict:
    """Hydra's choices (``choice/<group>``), the run dir, and a sweep job's place in its sweep."""
    tags = {f"choice/{k}": v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra/")}
    tags["output_dir"] = output_dir
    if job is not None:
        tags.update(job.tags)
    return tags


def engine_errors() -> tuple[type[Exception], ...]:
    from cpo_exp.engine import NonFiniteError  # the engine imports torch: only when needed

    return (NonFiniteError,)


# Hydra 1.4 instantiates only what trusted code names: the sweep callback of conf/config.yaml.
@hydra.main(config_path=config_dir(), config_name="config", execution_whitelist=["cpo_exp.sweep.SweepCallback"])
def main(dcfg: DictConfig) -> Optional[float]:
    try:
        return run(dcfg)
    except interrupts.Stopped as err:
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN and "optuna" in str(hydra_cfg.sweeper.get("_target_", "")):
            # The trial is failed in the study (see cpo_exp.study); resuming the job alone would tell Optuna nothing.
            log.error("%s; run the same command again to continue the Optuna study", err)
        elif err.checkpoint:
            log.error("%s; continue with: python -m cpo_exp resume=%s", err, hydra_cfg.runtime.output_dir)
        else:
            log.error("%s (stopped before training began: nothing to resume)", err)
        sys.exit(128 + err.signum)
    except engine_errors() as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # a FAILED job of the sweep, not the end of the sweep
        log.error("%s", err)
        sys.exit(3)
    except (*USER_ERRORS, ProcessesFailed) as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records the failed job and the sweep goes on
        log.error("%s", err)
        sys.exit(1 if isinstance(err, ProcessesFailed) else 2)


def entry() -> None:
    """``python -m cpo_exp`` and the ``cpo-exp`` console script: the command line's keys are checked
    before Hydra composes anything (Hydra itself would accept a typo'd ``+key=value`` and train)."""
    try:
        check_overrides([arg for arg in sys.argv[1:] if not arg.startswith("-")])
    except ConfigError as err:
        print(f"cpo_exp: {err}", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = with_sweep_mode(sys.argv[1:])
    try:
        main()
    except KeyboardInterrupt:
        # Ctrl-C outside a job's training (loading, or between a sweep's jobs): the runs and the sweep's
        # parent are already ended KILLED on the way out; the user needs one line, not a traceback.
        print("cpo_exp: stopped by SIGINT before training began (nothing to resume)", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


# Hydra's flags that choose what the command does: only one may be given.
_MODE_FLAGS = {"-m", "--multirun", "-r", "--run", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion",
               "-h", "--help", "--hydra-help", "--experimental-rerun"}
# The config groups whose presets are sweeps (conf/sweep, conf/hparams_search).
SWEEP_GROUPS = ("sweep", "hparams_search")


def with_sweep_mode(args: list[str]) -> list[str]:
    """``sweep=<preset>`` and ``hparams_search=<preset>`` run as a multirun without ``-m``.

    Hydra 1.4 reads ``hydra.mode`` from the primary config and the command line only (no longer
    from a preset), so the presets cannot say it themselves: the command line gets ``--multirun``.
    """
    if any(arg in _MODE_FLAGS or arg.split("=", 1)[0] in _MODE_FLAGS for arg in args):
        return args
    for arg in args:
        key, _, value = arg.partition("=")
        if key.lstrip("+") in SWEEP_GROUPS and value not in ("", "null"):
            return ["--multirun", *args]
    return args
