"""Evaluate a trained model without training: ``python -m cpo_exp.evaluate <run dir | MLflow run id>``.

The run's own composed config (``<run dir>/.hydra/overrides.yaml``) is recomposed, then any
overrides given here are applied on top (``data=files data.eval_files=[x.jsonl]``,
``eval.num_prompts=100``, ...). The saved model (``<run dir>/model``) is scored on the eval split
with the pair metrics and, by default, the generation scores. Metrics go to the same MLflow run
at its last step, or to a new run with ``--new-run``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from cpo_exp.cli import compose_config
from cpo_exp.config import ConfigError, validate
from cpo_exp.job import USER_ERRORS, generation_eval, prepare, quiet_progress_bars
from cpo_exp.tracking import Tracker, TrackingError, reopened_run, tracked_run, tracking_uri
from cpo_exp.tracking.store import Store, store_exists

log = logging.getLogger("cpo_exp.evaluate")


def find_run(target: str, uri: str, experiment: str) -> tuple[Path, Optional[str]]:
    """``(run dir, MLflow run id or None)`` for a run directory or an MLflow run id."""
    if Path(target).is_dir():
        run_dir = Path(target).resolve()
        if not store_exists(uri):
            return run_dir, None
        return run_dir, Store(uri).run_of_output_dir(experiment, run_dir)
    if not store_exists(uri):
        raise ConfigError(f"{target!r} is not a run directory, and there is no MLflow store at {uri}")
    try:
        run = Store(uri).get_run(target)
    except TrackingError:
        raise ConfigError(f"{target!r} is neither a run directory nor an MLflow run id in {uri}") from None
    return Path(run.tags["output_dir"]), target


def evaluate_run(target: str, overrides: list[str], new_run: bool) -> dict[str, float]:
    """Score the saved model of a finished run; returns the metrics it logged."""
    from torch.utils.data import DataLoader

    from cpo_exp import engine, models
    from cpo_exp.data import PairRows, collator_for
    from cpo_exp.forward import router_aux_loss_coef

    launch_dir = str(Path.cwd())
    probe = compose_config([])  # tracking defaults, to find the store before the run is known
    uri = tracking_uri(probe.tracking, launch_dir)
    run_dir, run_id = find_run(target, uri, probe.tracking.experiment_name)
    if not (run_dir / "model").is_dir():
        raise ConfigError(f"{run_dir} has no saved model (model/); was it trained with train.save_model=false?")
    original = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml") if (run_dir / ".hydra").is_dir() else []
    # Generation scores are part of an evaluation unless the user turns them off.
    cfg = compose_config([*original, "eval.generate=true", *overrides])
    # The run saved its model and the tokenizer it trained with side by side.
    cfg.model.name_or_path, cfg.model.tokenizer, cfg.model.random_init = str(run_dir / "model"), None, False
    cfg.output_dir = str(run_dir)
    validate(cfg)
    quiet_progress_bars(cfg)

    tokenizer = models.load_tokenizer(cfg.model)
    same_run = run_id is not None and not new_run
    if cfg.tracking.backend == "mlflow" and same_run:
        step, context = Store(uri).last_step(run_id), reopened_run(uri, run_id)
    else:
        step = 0
        tags = {"evaluated_run_id": run_id or "", "output_dir": str(run_dir)}
        context = tracked_run(cfg.tracking, launch_dir, f"evaluate {run_dir.name}", tags)
    with context as tracker:
        tracker.ready()
        # The original run already carries the data summary as params (which MLflow never overwrites).
        prepared = prepare(cfg, tokenizer, Tracker() if same_run else tracker)
        if "eval" not in prepared:
            raise ConfigError("no eval split: give data.eval_files, data.eval_split or data.eval_fraction")
        model = models.load_model(cfg.model, tokenizer)
        accelerator = engine.new_accelerator(mixed_precision=cfg.hardware.mixed_precision, cpu=cfg.hardware.cpu)
        loader = DataLoader(PairRows(prepared["eval"].dataset), batch_size=cfg.train.per_device_eval_batch_size,
                            collate_fn=collator_for(model.config, tokenizer.pad_token_id))
        model, loader = accelerator.prepare(model, loader)
        metrics = engine.evaluate(model, loader, cfg.loss_spec(), accelerator,
                                  aux_loss_coef=router_aux_loss_coef(model))
        scorer = generation_eval(cfg, tokenizer, prepared["eval"], tracker)
        if scorer is not None:
            metrics.update(scorer(accelerator.unwrap_model(model), step))
        tracker.log_metrics(metrics, step)
    return metrics


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpo_exp.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="a run directory (outputs/...) or an MLflow run id")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied on top of the run's own")
    parser.add_argument("--new-run", action="store_true", help="log to a new MLflow run instead of the original")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        metrics = evaluate_run(args.target, args.overrides, args.new_run)
    except USER_ERRORS as err:
        log.error("%s", err)
        return 2
    width = max(len(k) for k in metrics)
    print("\n".join(f"{k:<{width}}  {v:.6g}" for k, v in sorted(metrics.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
