"""The steps of one job, without Hydra: what ``python -m cpo_exp`` and ``python -m cpo_exp.evaluate``
both do once their config is composed.

In the order a training job runs them (:func:`train_job`): record the config in the tracking
run, import the heavy libraries while the run opens, load the tokenizer, prepare the data
(before any model exists, so bad data costs seconds), build the model, train, and say where the
wall time went (:class:`RunTimes`). The entry point (:mod:`cpo_exp.cli`) turns Hydra's config
into a :class:`~cpo_exp.config.Config` and calls these; a notebook can call them too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from cpo_exp import checkpoint, interrupts
from cpo_exp.checkpoint import CheckpointError, ResumePoint
from cpo_exp.config import Config, ConfigError, HardwareConfig, flatten
from cpo_exp.data import DataError, PreparedSplit, prepare_data, summarize
from cpo_exp.tracking import Tracker, TrackingError, redact

log = logging.getLogger("cpo_exp")

# Errors that mean "the user asked for something impossible": shown as one clear line.
USER_ERRORS = (ConfigError, DataError, TrackingError, FileNotFoundError, CheckpointError)


def record_config(tracker: Tracker, public: dict[str, Any], output_dir: str, hydra_dir: Optional[Path]) -> None:
    """The resolved config (secrets already redacted) as params and ``resolved_config.yaml``, and
    the run's ``.hydra/`` record (redacted; the local files stay as they are) as ``hydra/``."""
    tracker.log_params(flatten(public))
    resolved_path = Path(output_dir) / "resolved_config.yaml"
    resolved_path.write_text(OmegaConf.to_yaml(public))
    tracker.log_artifact(str(resolved_path))
    if hydra_dir is not None and hydra_dir.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            for file in sorted(hydra_dir.glob("*.yaml")):
                tree = redact(OmegaConf.to_container(OmegaConf.load(file), resolve=False))
                (Path(tmp) / file.name).write_text(OmegaConf.to_yaml(tree))
            tracker.log_artifacts(tmp, "hydra")


def train_job(cfg: Config, tracker: Tracker, public: dict[str, Any], point: Optional[ResumePoint],
              clock: "RunClock"):
    """Everything a training job does once its tracking run is open; returns the engine's result."""
    # The heavy imports run while the tracking process opens the run.
    import torch
    import transformers

    from cpo_exp import engine, models

    quiet_progress_bars(cfg)
    tracker.ready()  # an unusable store fails here, before any compute

    tokenizer = models.load_tokenizer(cfg.model)
    prepared = prepare(cfg, tokenizer, tracker)
    transformers.set_seed(cfg.train.seed)
    model = models.load_model(cfg.model, tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    threads, why = torch_threads(cfg.hardware, parameters, torch.get_num_threads())
    torch.set_num_threads(threads)
    log.info("torch threads: %d (%s)", threads, why)
    tracker.log_params({"model.num_parameters": parameters,
                        "model.trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                        "hardware.torch_threads": threads,
                        # simpo_gamma_ratio, when set, makes the margin differ from the simpo_gamma param
                        "loss.simpo_gamma_effective": cfg.loss_spec().simpo_gamma})
    checkpointer = checkpoint.Checkpointer(cfg.output_dir, cfg.train.save_steps, cfg.train.save_total_limit,
                                           flatten(public), tracker.run_id, point)
    clock.training = time.perf_counter()
    # Log lines go above the progress bar instead of through it.
    redirect = logging_redirect_tqdm() if engine.show_progress(cfg.train) else contextlib.nullcontext()
    with interrupts.graceful_stop(), redirect:
        result = engine.train(
            model, tokenizer, prepared["train"].dataset, prepared["eval"].dataset if "eval" in prepared else None,
            cfg.loss_spec(), cfg.train, cfg.hardware, cfg.output_dir, tracker.log_metrics,
            extra_eval=generation_eval(cfg, tokenizer, prepared.get("eval"), tracker),
            checkpointer=checkpointer, engine=cfg.engine,
        )
    times = clock.times(result.step_seconds, result.eval_seconds)
    tracker.log_metrics({"train_seconds": result.train_seconds, "train_tokens_per_second": result.tokens_per_second,
                         "train_step_seconds": result.step_seconds, "eval_seconds": result.eval_seconds,
                         "startup_seconds": times.startup, "outside_compute_fraction": times.outside_fraction},
                        result.global_step)
    log.info("done in %.1fs; outputs in %s", result.train_seconds, cfg.output_dir)
    log.info("%s", times.summary())
    return result


# Below this many parameters one thread is as fast as several on an idle machine (the ops are too
# small to split) and several times faster on a busy one; see docs/performance.md, "Threads".
SMALL_MODEL_PARAMETERS = 50_000_000


def torch_threads(hardware: HardwareConfig, parameters: int, default: int) -> tuple[int, str]:
    """The intra-op thread count for training, and why: ``hardware.num_threads`` if set, else one
    thread for a small model, else torch's default (one per core; inside a joblib launcher's
    worker, its share of the cores)."""
    if hardware.num_threads is not None:
        return hardware.num_threads, "hardware.num_threads"
    if parameters < SMALL_MODEL_PARAMETERS:
        return 1, (f"auto: a model of {parameters / 1e6:.1f}M parameters runs fastest on one thread, and does "
                   "not slow down when other processes compete for the cores")
    return default, "auto: torch's default for a model of this size; set hardware.num_threads to change it"


def check_sources(cfg: Config) -> None:
    """Where the model, tokenizer and data come from, decided before a tracking run is opened: an
    unreachable hub or a missing path stops the job with one line (see :mod:`cpo_exp.hub`)."""
    from cpo_exp import hub

    hub.locate_model(cfg.model.name_or_path, "model.name_or_path", cfg.model.revision)
    if cfg.model.tokenizer:
        hub.locate_model(cfg.model.tokenizer, "model.tokenizer", cfg.model.revision)
    if cfg.data.path:
        hub.locate_dataset(cfg.data.path, "data.path")


def check_device(hardware: HardwareConfig) -> None:
    """``hardware.cpu=false`` (``hardware=gpu``, ``ddp``, ...) asks for an accelerator: refuse to
    train on the CPU without a word when there is none."""
    import torch

    if hardware.cpu or torch.cuda.is_available() or torch.backends.mps.is_available():
        return
    build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
    raise ConfigError(f"hardware.cpu=false asks for a GPU, but none is visible ({build}; CUDA_VISIBLE_DEVICES="
                      f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): run with hardware=cpu, or on a machine "
                      "with a GPU and a CUDA build of torch")


OBJECTIVE_FILE = "objective.json"


def launch_processes(cfg: Config, hardware_preset: Optional[str], overrides: list[str],
                     env: dict[str, str]) -> Optional[float]:
    """Run this job in processes of its own (``hardware.num_processes`` of them through ``accelerate
    launch``, or one) in its own run dir, and return the objective its rank 0 wrote. The job's overrides are passed on unchanged;
    ``env`` tells the processes which sweep job they are (their rank 0 opens its MLflow run)."""
    import subprocess
    import sys

    from cpo_exp.launch import PRESETS, config_file

    n = cfg.hardware.num_processes
    job = [*overrides, f"hydra.run.dir={cfg.output_dir}"]
    if n == 1:
        command = [sys.executable, "-m", "cpo_exp", *job]
    else:
        launcher = (["--config_file", str(config_file(hardware_preset))] if hardware_preset in PRESETS
                    else ["--multi_gpu"])
        command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(n),
                   "--num_machines", "1", "--main_process_port", "0", "-m", "cpo_exp", *job]
    log.info("this job runs on %d process%s: python %s", n, "es" if n > 1 else "", " ".join(command[1:]))
    objective = Path(cfg.output_dir) / OBJECTIVE_FILE
    objective.unlink(missing_ok=True)
    done = subprocess.run(command, env={**os.environ, **env})
    if done.returncode != 0:
        raise ProcessesFailed(f"the {n} processes of this job failed (exit status {done.returncode}); their log: "
                              f"{Path(cfg.output_dir) / 'cpo_exp.log'}")
    import json

    return json.loads(objective.read_text())["value"] if objective.is_file() else None


class ProcessesFailed(RuntimeError):
    """The ``accelerate launch`` of a multi-process job exited with an error (the processes said why)."""


def write_objective(output_dir: str, value: Optional[float]) -> None:
    import json

    (Path(output_dir) / OBJECTIVE_FILE).write_text(json.dumps({"value": value}))


def quiet_progress_bars(cfg: Config) -> None:
    """Library progress bars only clutter log files and CI output."""
    from cpo_exp.engine import show_progress

    if not show_progress(cfg.train):
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def prepare(cfg: Config, tokenizer, tracker: Tracker) -> dict[str, PreparedSplit]:
    """Load, check and tokenize the data (before any model is loaded); log its summary."""
    from cpo_exp.models import is_encoder_decoder

    lengths = cfg.lengths()
    prepared = prepare_data(cfg.data, tokenizer, lengths, cfg.train.seed, is_encoder_decoder(cfg.model))
    summary = summarize(prepared, lengths)
    log.info("%s", summary.text())
    tracker.log_params(summary.params())
    tracker.log_table(summary.table(), "data/summary.json")
    return prepared


def generation_eval(cfg: Config, tokenizer, eval_split: Optional[PreparedSplit], tracker: Tracker):
    """The ``eval.generate`` evaluator, logging its samples as the ``eval_samples.json`` table."""
    if not cfg.eval.generate or eval_split is None:
        return None
    from cpo_exp.generation import GenerationEval, SamplingSpec
    from cpo_exp.scorers import sacrebleu_signatures

    e = cfg.eval
    tracker.log_params({f"eval_gen.{k}_signature": v for k, v in sacrebleu_signatures().items()})
    spec = SamplingSpec(e.max_new_tokens, e.do_sample, e.temperature, e.top_p, e.batch_size, e.seed)
    return GenerationEval(tokenizer, eval_split.rows, e.num_prompts, spec, e.scorers,
                          log_table=lambda data, step: tracker.log_table(data, "eval_samples.json"))


@dataclasses.dataclass
class RunClock:
    """When a job began (the import of cpo_exp, or composition for a multirun's later jobs),
    when its config was composed, and when training began."""

    start: float
    composed: float
    training: float = 0.0

    def times(self, steps: float, evals: float) -> "RunTimes":
        return RunTimes(self.composed - self.start, self.training - self.composed,
                        time.perf_counter() - self.training, steps, evals)


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


@contextlib.contextmanager
def claimed_devices(sweep_dir: str, count: int, visible: list[str], poll_s: float = 1.0):
    """Hold ``count`` of the ``visible`` GPUs for one job of a parallel sweep, and yield their ids.

    The joblib launcher runs several jobs at once on one machine; each job takes the first
    ``count`` GPUs no other job holds (a lock file per GPU under ``<sweep dir>/.devices/``, held
    with ``flock`` for the job's lifetime, so a job that dies frees its GPUs) and sees only them
    through ``CUDA_VISIBLE_DEVICES``. A job waits while every GPU is taken.
    """
    import fcntl

    if count > len(visible):
        raise ConfigError(f"hardware.devices_per_job={count}, but only {len(visible)} GPU(s) are visible "
                          f"({','.join(visible) or 'none'})")
    folder = Path(sweep_dir) / ".devices"
    folder.mkdir(parents=True, exist_ok=True)
    held: list[tuple[str, Any]] = []
    try:
        while len(held) < count:
            for device in visible:
                if len(held) == count:
                    break
                if any(device == d for d, _ in held):
                    continue
                handle = open(folder / f"{device}.lock", "w")
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    continue
                held.append((device, handle))
            if len(held) < count:
                time.sleep(poll_s)
        devices = [d for d, _ in held]
        log.info("this job runs on GPU(s) %s of %s", ",".join(devices), ",".join(visible))
        before = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)  # before anything initialises CUDA
        try:
            yield devices
        finally:  # a joblib worker runs later jobs too
            if before is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = before
    finally:
        for _, handle in held:
            handle.close()  # closing the file releases its lock


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES``, else every one torch counts."""
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]
