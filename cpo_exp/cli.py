"""The entry point: Hydra composes the config, this module turns it into typed objects, checks
them, and hands them to the data pipeline, the model loader and the engine.

Hydra lives only here. Order of work: validate the config, open the tracking run, load and
check the data, tokenize, then (only then) load the model and train.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import cpo_exp
from cpo_exp import checkpoint, interrupts
from cpo_exp.checkpoint import CheckpointError
from cpo_exp.config import Config, ConfigError, flatten, parse_override, unflatten, validate
from cpo_exp.data import DataError, PreparedSplit, SequenceLengths, prepare_data, summarize
from cpo_exp.sweep import SweepJob
from cpo_exp.tracking import TrackingError, redact, tracked_run, tracking_uri

log = logging.getLogger("cpo_exp")

# Errors that mean "the user asked for something impossible": shown as one clear line.
USER_ERRORS = (ConfigError, DataError, TrackingError, FileNotFoundError, CheckpointError)


def config_dir() -> str:
    """``conf/`` shipped inside the wheel, or the repository's ``conf/`` in a source checkout."""
    packaged = Path(__file__).resolve().parent / "conf"
    return str(packaged if packaged.is_dir() else packaged.parent.parent / "conf")


ConfigStore.instance().store(name="cpo_exp_schema", node=Config)
# conf/config.yaml: ``resume=<dir>`` makes <dir> the run dir (see there).
OmegaConf.register_new_resolver("cpo_exp.if_resume", lambda resume, then, other: then if resume else other,
                                replace=True)


# Where the first run of this process starts its wall clock (see RunTimes).
_clock: Optional[float] = cpo_exp.IMPORTED_AT
# Whether this process ran one job outside a multirun (see entry).
_single_run_done = False


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
    global _clock, _single_run_done
    composed = time.perf_counter()
    # A multirun's later jobs in this process imported nothing: their clock starts at composition.
    clock, _clock = _clock if _clock is not None else composed, None
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    # Set by accelerate launch and torchrun; only the first process talks to MLflow.
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if hydra_cfg.mode == RunMode.RUN:  # a multirun's job dirs are named by the one outer process
        check_shared_run_dir(world_size, list(hydra_cfg.overrides.hydra), dcfg.resume)
    if rank > 0:  # one copy of every progress line is enough; warnings and errors still show
        logging.getLogger("cpo_exp").setLevel(logging.WARNING)
    point = checkpoint.open_resume_point(dcfg.resume) if dcfg.resume else None
    if point is not None:
        dcfg = resumed_config(dcfg, point, overrides)
    cfg: Config = OmegaConf.to_object(dcfg)
    cfg.output_dir = hydra_cfg.runtime.output_dir

    tags = {f"choice/{k}": v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra/")}
    tags["output_dir"] = cfg.output_dir
    if hydra_cfg.mode == RunMode.MULTIRUN:
        tags["sweep_dir"] = hydra_cfg.sweep.dir
        tags["job_num"] = hydra_cfg.job.num
    job = SweepJob.current()
    name = cfg.tracking.run_name or (job.run_name() if job is not None else run_name(redact(overrides)))
    if job is not None:
        tags.update(job.tags)
    try:
        validate(cfg)
        if job is not None:
            job.check()
    except ConfigError as err:
        if job is not None:  # the sweep's report must show the rejected job
            job.record_rejected(cfg.tracking, hydra_cfg.runtime.cwd, name, tags, err)
        raise
    check_launcher(cfg.hardware.distributed, dict(os.environ))
    checkpoint.check_writable(cfg.output_dir)

    resolved = OmegaConf.to_container(dcfg, resolve=True)
    resolved["output_dir"] = cfg.output_dir
    # Secrets stay out of MLflow and out of the files written next to checkpoints.
    public = redact(resolved)
    tracking = cfg.tracking if rank == 0 else dataclasses.replace(cfg.tracking, backend="none")
    parent = (job.parent_run_id(tracking_uri(cfg.tracking, hydra_cfg.runtime.cwd), cfg.tracking.experiment_name)
              if job is not None and rank == 0 else None)
    with interrupts.stop_on_terminate(), tracked_run(
            tracking, hydra_cfg.runtime.cwd, name, tags, run_id=point.mlflow_run_id if point else None,
            spill_dir=cfg.output_dir, parent_run_id=parent) as tracker:
        if point is None and rank == 0:
            tracker.log_params(flatten(public))
            resolved_path = Path(cfg.output_dir) / "resolved_config.yaml"
            resolved_path.write_text(OmegaConf.to_yaml(public))
            tracker.log_artifact(str(resolved_path))
            hydra_dir = Path(cfg.output_dir) / hydra_cfg.output_subdir if hydra_cfg.output_subdir else None
            if hydra_dir is not None and hydra_dir.is_dir():
                log_hydra_record(tracker, hydra_dir)
        elif point is not None:
            tracker.set_tags({"resumed_from": str(point.path)})

        # The heavy imports run while the tracking process opens the run.
        import torch
        import transformers

        from cpo_exp import engine, models

        quiet_progress_bars(cfg)
        if cfg.hardware.num_threads is not None:
            torch.set_num_threads(cfg.hardware.num_threads)
        tracker.ready()  # an unusable store fails here, before any compute

        tokenizer = models.load_tokenizer(cfg.model)
        prepared = prepare(cfg, tokenizer, tracker)
        tokenized = {split: p.dataset for split, p in prepared.items()}

        transformers.set_seed(cfg.train.seed)
        model = models.load_model(cfg.model, tokenizer)
        tracker.log_params({"model.num_parameters": sum(p.numel() for p in model.parameters()),
                            "model.trainable_parameters": sum(p.numel() for p in model.parameters()
                                                              if p.requires_grad),
                            "hardware.torch_threads": torch.get_num_threads()})
        checkpointer = checkpoint.Checkpointer(cfg.output_dir, cfg.train.save_steps, cfg.train.save_total_limit,
                                               flatten(public), tracker.run_id, point)
        training = time.perf_counter()
        with interrupts.graceful_stop():
            result = engine.train(
                model, tokenizer, tokenized["train"], tokenized.get("eval"), cfg.loss_spec(), cfg.train,
                cfg.hardware, cfg.output_dir, tracker.log_metrics,
                extra_eval=generation_eval(cfg, tokenizer, prepared.get("eval"), tracker),
                checkpointer=checkpointer, engine=cfg.engine,
            )
        times = RunTimes(composed - clock, training - composed,
                         time.perf_counter() - training, result.step_seconds, result.eval_seconds)
        tracker.log_metrics({"train_seconds": result.train_seconds,
                             "train_tokens_per_second": result.tokens_per_second,
                             "train_step_seconds": result.step_seconds, "eval_seconds": result.eval_seconds,
                             "startup_seconds": times.startup, "outside_compute_fraction": times.outside_fraction},
                            result.global_step)
        log.info("done in %.1fs; outputs in %s", result.train_seconds, cfg.output_dir)
        log.info("%s", times.summary())
        log_file = Path(cfg.output_dir) / f"{hydra_cfg.job.name}.log"
        if log_file.is_file():
            tracker.log_artifact(str(log_file))
    log.info("%s", tracker.how_to_view())
    _single_run_done = hydra_cfg.mode == RunMode.RUN
    objective = result.eval_metrics.get(cfg.objective.metric)
    if objective is None:
        log.warning("no eval split, so no objective %s to return to the sweeper", cfg.objective.metric)
    return objective


@dataclasses.dataclass
class RunTimes:
    """Where a run's wall time went, from the import of cpo_exp to the end of training."""

    imports: float  # Python, torch, Hydra, and composing the config
    setup: float  # the rest of the start: tracking, the heavy imports, data, model
    train: float  # engine.train: the loop, its evaluations, checkpoints, saving the model
    steps: float  # forward, backward and optimizer steps
    evals: float  # evaluations: their forwards, and generation when eval.generate is on

    @property
    def startup(self) -> float:
        return self.imports + self.setup

    @property
    def wall(self) -> float:
        return self.startup + self.train

    @property
    def outside_fraction(self) -> float:
        return 1 - (self.steps + self.evals) / self.wall

    def summary(self) -> str:
        loop = self.train - self.steps - self.evals
        return (f"wall {self.wall:.1f}s: forward/backward/optimizer steps {self.steps:.1f}s, evaluations "
                f"{self.evals:.1f}s; outside them {self.wall - self.steps - self.evals:.1f}s "
                f"({100 * self.outside_fraction:.0f}%): start-up {self.startup:.1f}s (imports and config "
                f"{self.imports:.1f}s; tracking, data, model {self.setup:.1f}s), in the loop {loop:.1f}s "
                "(batching, logging, checkpoints, saving)")


def quiet_progress_bars(cfg: Config) -> None:
    """Library progress bars only clutter log files and CI output."""
    from cpo_exp.engine import show_progress

    if not show_progress(cfg.train):
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def prepare(cfg: Config, tokenizer, tracker) -> dict[str, PreparedSplit]:
    """Load, check and tokenize the data (before any model is loaded); log its summary."""
    from cpo_exp.models import is_encoder_decoder

    lengths = SequenceLengths(cfg.max_length, cfg.max_prompt_length, cfg.max_completion_length,
                              cfg.truncation_mode)
    prepared = prepare_data(cfg.data, tokenizer, lengths, cfg.train.seed, is_encoder_decoder(cfg.model))
    summary = summarize(prepared, lengths)
    log.info("%s", summary.text())
    tracker.log_params(summary.params())
    tracker.log_metrics(summary.metrics(), 0)
    return prepared


def generation_eval(cfg: Config, tokenizer, eval_split: Optional[PreparedSplit], tracker):
    """The ``eval.generate`` evaluator, logging its samples as the ``eval_samples.json`` table."""
    if not cfg.eval.generate or eval_split is None:
        return None
    from cpo_exp.generation import GenerationEval, SamplingSpec, sacrebleu_signatures

    e = cfg.eval
    tracker.log_params({f"eval_gen.{k}_signature": v for k, v in sacrebleu_signatures().items()})
    spec = SamplingSpec(e.max_new_tokens, e.do_sample, e.temperature, e.top_p, e.batch_size, e.seed)
    return GenerationEval(tokenizer, eval_split.rows, e.num_prompts, spec, e.scorers,
                          log_table=lambda data, step: tracker.log_table(data, "eval_samples.json"))
def engine_errors() -> tuple[type[Exception], ...]:
    from cpo_exp.engine import NonFiniteError  # the engine imports torch: only when needed

    return (NonFiniteError,)


def log_hydra_record(tracker, hydra_dir: Path) -> None:
    """Hydra's ``.hydra/`` files as artifacts, with secrets redacted (the local files stay as they are)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for file in sorted(hydra_dir.glob("*.yaml")):
            tree = redact(OmegaConf.to_container(OmegaConf.load(file), resolve=False))
            (Path(tmp) / file.name).write_text(OmegaConf.to_yaml(tree))
        tracker.log_artifacts(tmp, "hydra")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(dcfg: DictConfig) -> Optional[float]:
    try:
        return run(dcfg)
    except interrupts.Stopped as err:
        if err.checkpoint:
            log.error("%s; continue with: python -m cpo_exp resume=%s", err, HydraConfig.get().runtime.output_dir)
        else:
            log.error("%s (stopped before training began: nothing to resume)", err)
        sys.exit(128 + err.signum)
    except engine_errors() as err:
        log.error("%s", err)
        sys.exit(3)
    except USER_ERRORS as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records the failed job and the sweep goes on
        log.error("%s", err)
        sys.exit(2)


def entry() -> None:
    """``python -m cpo_exp`` and ``cpo-exp``: :func:`main`, then exit without the interpreter's teardown.

    By then every file is written and closed and the MLflow run is ended; dismantling the
    module graph of torch and transformers would only add a second to every run. Only after a
    single run in one process: a multirun's launcher (joblib's worker processes) and
    torch.distributed must be shut down the ordinary way.
    """
    try:
        main()
        code = 0
    except SystemExit as err:
        code = err.code
    if not _single_run_done or int(os.environ.get("WORLD_SIZE", 1)) > 1:
        sys.exit(code)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # logging's shutdown is one of them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
