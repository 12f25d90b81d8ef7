"""The training engine: one loop for every loss variant.

:func:`train` is the page to read first. In the order it runs: set up (accelerate, the model for
the chosen pair forward, loaders, optimiser, schedule), restore a checkpoint if resuming,
evaluate the untrained model, then loop: forward and backward one batch of pairs
(:func:`pair_loss`), step the optimiser, log the window of metrics every ``logging_steps``,
evaluate every ``eval_steps``, checkpoint every ``save_steps`` (and on SIGINT/SIGTERM); finally
evaluate and save. The loop's state is one :class:`LoopState`. ``accelerate`` places tensors,
handles precision and gradient accumulation, and runs the same loop on several processes.

How a batch becomes log-probs is :mod:`cpo_exp.forward`; the losses are :mod:`cpo_exp.losses`;
the metric names :mod:`cpo_exp.metrics`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import datasets
import torch
from accelerate import Accelerator, skip_first_batches
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from cpo_exp import interrupts
from cpo_exp.checkpoint import Checkpointer, Position
from cpo_exp.config import EngineConfig, HardwareConfig, TrainConfig
from cpo_exp.data import REFERENCE_COLUMNS, PairRows
from cpo_exp.forward import PairOutput, pair_collator, pair_forward, prepare_model, router_aux_loss_coef
from cpo_exp.losses import LossSpec, orpo_log_odds, preference_loss, total_loss
from cpo_exp.metrics import EVAL_PREFIX, ROW_WEIGHTED_EVAL, MetricWindow, eval_diagnostics, pair_metrics
from cpo_exp.models import disable_dropout
from cpo_exp.reference import with_reference

log = logging.getLogger(__name__)

MetricsSink = Callable[[dict[str, float], int], None]
ExtraEval = Callable[[torch.nn.Module, int], dict[str, float]]


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient with ``train.on_nonfinite=stop``; names the step and last metrics."""


@dataclass
class TrainResult:
    global_step: int = 0
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    eval_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    train_seconds: float = 0.0
    tokens_per_second: float = 0.0
    # Wall time inside forward/backward/optimizer steps (train) and evaluations (their forwards and
    # any generation, ``extra_eval``); on a GPU these are host-side times (kernels are asynchronous),
    # exact only at the metric flushes.
    step_seconds: float = 0.0
    eval_seconds: float = 0.0


@dataclass
class LoopState:
    """Everything the loop carries from one step to the next; a checkpoint saves its position."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of ``epoch`` consumed (resume skips exactly these)
    skipped_steps: int = 0  # optimizer steps dropped for a non-finite loss or gradient
    window: MetricWindow = field(default_factory=MetricWindow)  # metrics since the last log line
    window_tokens: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    tokens: int = 0  # non-pad tokens of all logged windows
    finite: torch.Tensor = field(default_factory=lambda: torch.tensor(True))  # this accumulation so far
    grad_norm: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))
    learning_rate: float = 0.0  # the rate the last optimizer step used
    component_norms: dict[str, float] = field(default_factory=dict)  # train.component_grad_norms

    @classmethod
    def at(cls, position: Position, device) -> "LoopState":
        state = cls(position.global_step, position.epoch, position.batches_in_epoch, position.skipped_steps)
        state.window.load(position.window, device)
        return state

    def position(self, accelerator: Accelerator) -> Position:
        # One window for all ranks: each batch's values averaged over the ranks. Every rank has as
        # many batches in its window, so the logged mean of the means is unchanged after resume.
        window = self.window.state()
        if accelerator.num_processes > 1:
            window = {name: accelerator.reduce(torch.tensor(window[name], device=accelerator.device), "mean").tolist()
                      for name in sorted(window)}
        return Position(self.step, self.epoch, self.batches_in_epoch, window, self.skipped_steps)


@dataclass
class PairStep:
    """One batch through the pair forward and the loss: the objective, TRL's metrics, and the
    per-pair values the diagnostics read."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    out: PairOutput
    margins: torch.Tensor  # chosen minus rejected reward of each pair, detached
    losses: torch.Tensor  # the preference term of each pair


def pair_step(model, batch, spec: LossSpec, aux_loss_coef: float = 0.0,
              engine: EngineConfig = EngineConfig()) -> PairStep:
    """The training objective of one batch and its metrics (TRL's ``get_batch_loss_metrics``).

    A mixture-of-experts model's router loss is added as ``aux_loss_coef * aux_loss`` (TRL:
    ``router_aux_loss_coef`` of a model with ``output_router_logits``).
    """
    out = pair_forward(model, batch, spec.average_log_prob, engine)
    # A reference loss (DPO) reads the reference's log-probs from the batch (see cpo_exp.reference).
    references = {name: batch[name] for name in REFERENCE_COLUMNS} if spec.reference else {}
    losses, chosen_rewards, rejected_rewards = preference_loss(out.chosen_logps, out.rejected_logps, spec,
                                                               **references)
    loss = total_loss(losses, out.nll_loss, spec.cpo_alpha)
    aux = out.aux_loss if aux_loss_coef and out.aux_loss is not None else None
    if aux is not None:
        loss = loss + aux_loss_coef * aux
    log_odds = orpo_log_odds(out.chosen_logps, out.rejected_logps).detach() if spec.name == "orpo" else None
    metrics = pair_metrics(loss, out.nll_loss, chosen_rewards, rejected_rewards, out.chosen_logps,
                           out.rejected_logps, out.chosen_logits_mean, out.rejected_logits_mean, log_odds)
    if aux is not None:
        metrics["aux_loss"] = aux.detach().float()
    return PairStep(loss, metrics, out, (chosen_rewards - rejected_rewards).detach(), losses)


def pair_loss(model, batch, spec: LossSpec, aux_loss_coef: float = 0.0,
              engine: EngineConfig = EngineConfig()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(objective, metrics)`` of one batch: :func:`pair_step` without the per-pair values."""
    step = pair_step(model, batch, spec, aux_loss_coef, engine)
    return step.loss, step.metrics


def component_grad_norms(model, batch, spec: LossSpec, engine: EngineConfig) -> dict[str, float]:
    """The gradient norm of each term of the objective on one batch: ``grad_norm/preference`` (of
    ``mean(losses)``) and ``grad_norm/nll`` (of ``nll_loss``, before its weight ``cpo_alpha``), the
    balance ``cpo_alpha`` is meant to set. Costs an extra forward and two backward passes."""
    params = [p for p in model.parameters() if p.requires_grad]
    step = pair_step(model, batch, spec, engine=engine)

    def norm(term: torch.Tensor, retain: bool) -> float:
        grads = torch.autograd.grad(term, params, retain_graph=retain, allow_unused=True)
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                           for g in grads if g is not None])))

    return {"grad_norm/preference": norm(step.losses.mean(), True), "grad_norm/nll": norm(step.out.nll_loss, False)}


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_set: datasets.Dataset,
    eval_set: Optional[datasets.Dataset],
    spec: LossSpec,
    cfg: TrainConfig,
    hardware: HardwareConfig,
    output_dir: str,
    log_metrics: MetricsSink = lambda metrics, step: None,
    extra_eval: Optional[ExtraEval] = None,
    checkpointer: Optional[Checkpointer] = None,
    engine: EngineConfig = EngineConfig(),
) -> TrainResult:
    """Train ``model`` on tokenized pairs; metrics go to ``log_metrics(metrics, step)``.

    ``extra_eval(model, step)`` adds metrics to every evaluation (e.g. generation scores).
    With a ``checkpointer``, state is saved every ``train.save_steps``, at the end, and when a
    SIGINT/SIGTERM arrives (then :class:`cpo_exp.interrupts.Stopped` is raised); if it holds a
    resume point, training continues from there exactly as if never interrupted.
    """
    # set up
    accelerator = new_accelerator(mixed_precision=hardware.mixed_precision, cpu=hardware.cpu,
                                  gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                  dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(cfg.seed)
    if cfg.disable_dropout:
        disable_dropout(model)
    prepare_model(model, engine, zero3=getattr(accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3)
    collate = pair_collator(model.config, tokenizer, engine)
    if spec.reference:  # the initial policy's log-probs of every pair, before any step changes it
        splits = with_reference(model.to(accelerator.device), {"train": train_set, "eval": eval_set},
                                {"train": cfg.per_device_train_batch_size, "eval": cfg.per_device_eval_batch_size},
                                collate, engine, accelerator.device, accelerator.autocast,
                                accelerator.mixed_precision)
        train_set, eval_set = splits["train"], splits["eval"]
    train_loader = DataLoader(PairRows(train_set), batch_size=cfg.per_device_train_batch_size, shuffle=True,
                              collate_fn=collate)
    eval_loader = (DataLoader(PairRows(eval_set), batch_size=cfg.per_device_eval_batch_size, collate_fn=collate)
                   if eval_set is not None else None)
    optimizer = new_optimizer(model, cfg)
    total_steps = _total_steps(cfg, len(train_loader))
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loader = accelerator.prepare(eval_loader) if eval_loader is not None else None
    steps_per_epoch = max(1, len(train_loader) / cfg.gradient_accumulation_steps)
    aux_coef, show = router_aux_loss_coef(model), show_progress(cfg)
    result = TrainResult()
    run_eval = _Evaluation(model, eval_loader, spec, accelerator, show, aux_coef, engine, extra_eval, log_metrics,
                           result, Path(output_dir) / "eval_start_logps.pt")
    if cfg.component_grad_norms and accelerator.num_processes > 1:
        raise ValueError("train.component_grad_norms=true runs on one process only (its extra backward passes "
                         "would bypass the gradient synchronisation)")

    # resume, or evaluate the untrained model
    log.info("training %d steps (%d pairs, batch %d x %d accumulation)", total_steps, len(train_set),
             cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps)
    resumed = checkpointer.restore(accelerator) if checkpointer and checkpointer.resume else Position()
    state = LoopState.at(resumed, accelerator.device)
    if state.step == 0:
        run_eval(0)
    model.train()
    progress = tqdm(total=total_steps, initial=state.step, desc="train", disable=not show)
    train_start = time.perf_counter()
    while state.step < total_steps:
        for batch in _epoch(train_loader, state):
            # forward, backward, update
            started = time.perf_counter()
            _micro_step(model, batch, spec, aux_coef, engine, optimizer, scheduler, accelerator, cfg, state,
                        result, checkpointer)
            result.step_seconds += time.perf_counter() - started
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            progress.update(1)
            # log, evaluate, checkpoint, stop when asked to
            if state.step % cfg.logging_steps == 0 or state.step == total_steps:
                result.train_metrics = _log_window(state, accelerator, steps_per_epoch, log_metrics)
                log.info("step %d/%d: %s", state.step, total_steps, _brief(result.train_metrics))
            if cfg.eval_steps and state.step % cfg.eval_steps == 0 and state.step != total_steps:
                run_eval(state.step)
            stop = _stop_requested(accelerator)
            if checkpointer and (checkpointer.due(state.step) or stop or state.step == total_steps):
                checkpointer.save(accelerator, state.position(accelerator))
            if stop:
                progress.close()
                raise interrupts.Stopped(stop, state.step, str(checkpointer.last_saved) if checkpointer else None)
            if state.step >= total_steps:
                break
        else:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    progress.close()
    result.global_step = state.step
    result.train_seconds = time.perf_counter() - train_start
    result.tokens_per_second = state.tokens / result.train_seconds if result.train_seconds else 0.0

    # evaluate and save
    run_eval(state.step)
    if cfg.save_model:
        save_model(accelerator, model, tokenizer, Path(output_dir) / "model")
    accelerator.wait_for_everyone()
    return result


@dataclass
class _Evaluation:
    """``run_eval(step)``: the eval metrics (and ``extra_eval``'s) at ``step``, logged and kept in ``result``."""

    model: torch.nn.Module
    loader: Optional[DataLoader]
    spec: LossSpec
    accelerator: Accelerator
    progress: bool
    aux_coef: float
    engine: EngineConfig
    extra_eval: Optional[ExtraEval]
    log_metrics: MetricsSink
    result: TrainResult
    # The eval pairs' log-probs at step 0, which likelihood displacement is measured against; kept
    # in the run dir, so that a resumed run measures against the same start.
    start_file: Optional[Path] = None
    start: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def __call__(self, step: int) -> None:
        if self.loader is None:
            return
        started = time.perf_counter()
        if self.start is None and step > 0 and self.start_file is not None and self.start_file.is_file():
            self.start = tuple(torch.load(self.start_file))
        metrics, logps = evaluate_pairs(self.model, self.loader, self.spec, self.accelerator, self.progress,
                                        self.aux_coef, self.engine, self.start)
        if step == 0:
            self.start = logps
            if self.start_file is not None and self.accelerator.is_main_process:
                torch.save(list(logps), self.start_file)
        if self.extra_eval is not None:
            metrics.update(self.extra_eval(self.accelerator.unwrap_model(self.model), step))
        self.result.eval_seconds += time.perf_counter() - started
        self.result.eval_metrics = metrics
        self.result.eval_history.append((step, metrics))
        self.log_metrics(metrics, step)
        log.info("eval step %d: %s", step, _brief(metrics, EVAL_PREFIX))


def _epoch(train_loader, state: LoopState):
    """The batches of ``state.epoch`` not yet consumed, counting them into ``state``.

    The epoch fixes the shuffle (seedable sampler); on resume the consumed batches are skipped.
    """
    train_loader.set_epoch(state.epoch)
    skip = state.batches_in_epoch
    for batch in skip_first_batches(train_loader, skip) if skip else train_loader:
        state.batches_in_epoch += 1
        yield batch


def _micro_step(model, batch, spec, aux_coef, engine, optimizer, scheduler, accelerator, cfg: TrainConfig,
                state: LoopState, result: TrainResult, checkpointer) -> None:
    """Forward and backward one batch; at the end of an accumulation, clip and step (unless non-finite)."""
    update = True
    if cfg.component_grad_norms and (state.step + 1) % cfg.logging_steps == 0:
        with accelerator.autocast():
            state.component_norms = component_grad_norms(model, batch, spec, engine)
    with accelerator.accumulate(model):
        with accelerator.autocast():  # the whole step, not only the model call
            loss, metrics = pair_loss(model, batch, spec, aux_coef, engine)
        accelerator.backward(loss)
        state.finite = state.finite & torch.isfinite(loss.detach())
        if accelerator.sync_gradients:
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
            state.grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            # One host sync per optimizer step: a NaN must not reach the weights.
            update = bool(state.finite & torch.isfinite(state.grad_norm))
            state.finite = torch.tensor(True)
            if not update:
                _on_nonfinite(cfg, state.step + 1, float(state.grad_norm), result, checkpointer)
                state.skipped_steps += 1
            state.learning_rate = scheduler.get_last_lr()[0]  # TRL logs the rate this step used
        if update:
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad()
    if update:
        state.window.add(metrics)
    state.window_tokens += batch["num_tokens"] if "num_tokens" in batch else int(batch["attention_mask"].sum())


def _log_window(state: LoopState, accelerator: Accelerator, steps_per_epoch: float,
                log_metrics: MetricsSink) -> dict[str, float]:
    """The window's means and the step's figures, logged at ``state.step``; then a fresh window."""
    elapsed = time.perf_counter() - state.window_start
    logged = reduce_across_processes(state.window.flush(), accelerator)
    logged.update(learning_rate=state.learning_rate, grad_norm=float(state.grad_norm),
                  epoch=state.step / steps_per_epoch, tokens_per_second=state.window_tokens / elapsed)
    if state.skipped_steps:
        logged["nonfinite_skipped_steps"] = state.skipped_steps
    logged.update(state.component_norms)
    state.component_norms = {}
    log_metrics(logged, state.step)
    state.tokens += state.window_tokens
    state.window_tokens, state.window_start = 0, time.perf_counter()
    return logged


@torch.no_grad()
def evaluate(model, loader, spec: LossSpec, accelerator: Accelerator, progress: bool = False,
             aux_loss_coef: float = 0.0, engine: EngineConfig = EngineConfig(),
             start: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> dict[str, float]:
    """Eval metrics over the whole loader, averaged over its batches as TRL averages them, and the
    per-pair diagnostics (:func:`cpo_exp.metrics.eval_diagnostics`, against ``start`` if given)."""
    return evaluate_pairs(model, loader, spec, accelerator, progress, aux_loss_coef, engine, start)[0]


@torch.no_grad()
def evaluate_pairs(model, loader, spec: LossSpec, accelerator: Accelerator, progress: bool = False,
                   aux_loss_coef: float = 0.0, engine: EngineConfig = EngineConfig(),
                   start: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                   ) -> tuple[dict[str, float], tuple[torch.Tensor, torch.Tensor]]:
    """:func:`evaluate`, and the chosen and rejected log-probs of every eval pair (for ``start``)."""
    was_training = model.training
    model.eval()
    window, pairs = MetricWindow(), []
    for batch in tqdm(loader, desc="eval", leave=False, disable=not progress):
        with accelerator.autocast():
            step = pair_step(model, batch, spec, aux_loss_coef, engine)
        window.add(step.metrics, rows=step.margins.shape[0])
        # Every process's pairs, without the ones accelerate repeats to even out the last batch.
        pairs.append(accelerator.gather_for_metrics((step.out.chosen_logps.float(), step.out.rejected_logps.float(),
                                                     step.margins.float(), step.out.length_diff)))
    model.train(was_training)
    metrics = reduce_across_processes(window.flush(EVAL_PREFIX, row_weighted=ROW_WEIGHTED_EVAL), accelerator)
    chosen, rejected, margins, length_diff = (torch.cat(parts) for parts in zip(*pairs))
    diagnostics = eval_diagnostics(chosen, rejected, margins, length_diff, start)
    metrics.update({EVAL_PREFIX + name: value for name, value in diagnostics.items()})
    return metrics, (chosen.cpu(), rejected.cpu())


def reduce_across_processes(metrics: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """Mean of each metric over the processes (each saw equally many batches of equal size)."""
    if accelerator.num_processes == 1 or not metrics:
        return metrics
    names = sorted(metrics)  # the same order on every process
    values = accelerator.reduce(torch.tensor([metrics[n] for n in names], device=accelerator.device), "mean")
    return dict(zip(names, values.tolist()))


def new_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with TRL's grouping: no weight decay on biases and norm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
    )


def new_accelerator(**kwargs) -> Accelerator:
    """An ``Accelerator`` with these settings, even if this process made one with others before.

    accelerate keeps one process-wide state and refuses a second precision, so the second job of
    a sequential sweep over ``hardware.mixed_precision`` (or a notebook's second run) would fail.
    The process-level state (devices, process group) is kept.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(**kwargs)


def save_model(accelerator: Accelerator, model, tokenizer, target: Path) -> None:
    """``save_pretrained`` of the model and its tokenizer (the shards gathered under FSDP / ZeRO-3)."""
    state = accelerator.get_state_dict(model)  # every process takes part in the gathering
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(target, state_dict=state)
        tokenizer.save_pretrained(target)
        log.info("model saved to %s", target)


def show_progress(cfg: TrainConfig) -> bool:
    """``train.progress_bar``, or, when unset, whether stderr is a terminal."""
    return cfg.progress_bar if cfg.progress_bar is not None else sys.stderr.isatty()


def _total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_train_epochs * batches_per_epoch / cfg.gradient_accumulation_steps))


def _on_nonfinite(cfg: TrainConfig, step: int, grad_norm: float, result: TrainResult,
                  checkpointer: Optional[Checkpointer]) -> None:
    last = ", ".join(f"{k}={v:.4g}" for k, v in result.train_metrics.items()) or "none logged yet"
    kept = f"; last good checkpoint: {checkpointer.last_saved}" if checkpointer and checkpointer.last_saved else ""
    if cfg.on_nonfinite == "stop":
        raise NonFiniteError(f"non-finite loss or gradient at step {step} (grad_norm={grad_norm}); "
                             f"last logged metrics: {last}{kept}. Lower train.learning_rate, or set "
                             "train.on_nonfinite=skip to drop such steps")
    log.warning("step %d: non-finite loss or gradient (grad_norm=%s); update skipped", step, grad_norm)


def _stop_requested(accelerator: Accelerator) -> int:
    """The stop signal, agreed by all processes (one may see it a step before another)."""
    signum = interrupts.requested() or 0
    if accelerator.num_processes > 1:
        signum = int(accelerator.reduce(torch.tensor(signum, device=accelerator.device), "max"))
    return signum


def _brief(metrics: dict[str, float], prefix: str = "") -> str:
    keys = ("loss", "rewards/accuracies", "rewards/margins", "nll_loss", "tokens_per_second", "gen/chrf")
    return " ".join(f"{k}={metrics[prefix + k]:.4g}" for k in keys if prefix + k in metrics)
