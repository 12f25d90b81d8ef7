"""The entry point: Hydra composes the config, this module turns it into typed objects, checks
them, and hands them to the data pipeline, the model loader and the engine.

Hydra lives only here. Order of work: validate the config, open the tracking run, load and
check the data, tokenize, then (only then) load the model and train.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cpo_exp.config import Config, ConfigError, validate
from cpo_exp.data import DataError, SequenceLengths, check_rows, load_splits, tokenize_dataset
from cpo_exp.tracking import TrackingError, flatten, tracked_run

log = logging.getLogger("cpo_exp")

# Errors that mean "the user asked for something impossible": shown as one clear line.
USER_ERRORS = (ConfigError, DataError, TrackingError, FileNotFoundError)


def config_dir() -> str:
    """``conf/`` shipped inside the wheel, or the repository's ``conf/`` in a source checkout."""
    packaged = Path(__file__).resolve().parent / "conf"
    return str(packaged if packaged.is_dir() else packaged.parent.parent / "conf")


ConfigStore.instance().store(name="cpo_exp_schema", node=Config)


def run_name(overrides: list[str]) -> str:
    """Name a run after what the command line changed, e.g. ``loss=simpo,cpo_alpha=0``."""
    return ",".join(overrides) if overrides else "default"


def run(dcfg: DictConfig) -> Optional[float]:
    """One job: everything after composition. Returns the final eval loss (for sweepers)."""
    started = time.perf_counter()
    hydra_cfg = HydraConfig.get()
    cfg: Config = OmegaConf.to_object(dcfg)
    cfg.output_dir = hydra_cfg.runtime.output_dir
    validate(cfg)

    import datasets
    import transformers

    from cpo_exp import engine, models

    if not engine.show_progress(cfg.train):  # bars only clutter log files and CI output
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()

    overrides = list(hydra_cfg.overrides.task)
    tags = {f"choice/{k}": v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra/")}
    tags["output_dir"] = cfg.output_dir
    if hydra_cfg.mode == RunMode.MULTIRUN:
        tags["sweep_dir"] = hydra_cfg.sweep.dir
        tags["job_num"] = hydra_cfg.job.num
    name = cfg.tracking.run_name or run_name(overrides)
    with tracked_run(cfg.tracking, hydra_cfg.runtime.cwd, name, tags) as tracker:
        resolved = OmegaConf.to_container(dcfg, resolve=True)
        resolved["output_dir"] = cfg.output_dir
        tracker.log_params(flatten(resolved))
        resolved_path = Path(cfg.output_dir) / "resolved_config.yaml"
        resolved_path.write_text(OmegaConf.to_yaml(resolved))
        tracker.log_artifact(str(resolved_path))
        hydra_dir = Path(cfg.output_dir) / hydra_cfg.output_subdir if hydra_cfg.output_subdir else None
        if hydra_dir is not None and hydra_dir.is_dir():
            tracker.log_artifacts(str(hydra_dir), "hydra")

        tokenizer = models.load_tokenizer(cfg.model)
        lengths = SequenceLengths(cfg.max_length, cfg.max_prompt_length, cfg.max_completion_length,
                                  cfg.truncation_mode)
        train_raw, eval_raw = load_splits(cfg.data, cfg.train.seed)
        splits = {"train": train_raw, "eval": eval_raw}
        tokenized = {}
        for split, raw in splits.items():
            if raw is None:
                continue
            raw = check_rows(raw, split, cfg.data.on_bad_rows)
            tokenized[split] = tokenize_dataset(raw, tokenizer, lengths, split, cfg.data.on_bad_rows,
                                                cfg.data.num_proc)
            tracker.log_params({f"data.{split}_rows": len(tokenized[split])})

        transformers.set_seed(cfg.train.seed)
        model = models.load_model(cfg.model, tokenizer)
        tracker.log_params({"model.num_parameters": sum(p.numel() for p in model.parameters())})
        result = engine.train(
            model, tokenizer, tokenized["train"], tokenized.get("eval"), cfg.loss_spec(), cfg.train,
            cfg.hardware, cfg.output_dir, tracker.log_metrics, cfg.engine,
        )
        tracker.log_metrics({"train_seconds": result.train_seconds,
                             "train_tokens_per_second": result.tokens_per_second,
                             "train_step_seconds": result.step_seconds, "eval_seconds": result.eval_seconds},
                            result.global_step)
        log.info("done in %.1fs; outputs in %s", result.train_seconds, cfg.output_dir)
        wall = time.perf_counter() - started
        other = wall - result.step_seconds - result.eval_seconds
        log.info("wall %.1fs after composition: train steps %.1fs (%.0f%%), eval %.1fs (%.0f%%), other "
                 "(tracking, data, model load, batching, logging) %.1fs (%.0f%%)", wall, result.step_seconds,
                 100 * result.step_seconds / wall, result.eval_seconds, 100 * result.eval_seconds / wall,
                 other, 100 * other / wall)
        log_file = Path(cfg.output_dir) / f"{hydra_cfg.job.name}.log"
        if log_file.is_file():
            tracker.log_artifact(str(log_file))
    return result.eval_metrics.get("eval_loss")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(dcfg: DictConfig) -> Optional[float]:
    try:
        return run(dcfg)
    except USER_ERRORS as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records the failed job and the sweep goes on
        log.error("%s", err)
        sys.exit(2)
