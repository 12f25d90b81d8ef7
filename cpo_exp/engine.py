"""The one training engine behind every loss variant.

Read top to bottom, :func:`train` is the whole run: build the loaders, optimiser and schedule,
evaluate once, then loop (forward the chosen and rejected sequences together, take the loss,
step), logging a window of metrics every ``logging_steps`` and evaluating every ``eval_steps``;
finally evaluate and save. ``accelerate`` places tensors, handles precision and gradient
accumulation, and (later) spreads the work over processes.
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
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from cpo_exp.config import EngineConfig, HardwareConfig, TrainConfig
from cpo_exp.data import LABEL_PAD, PreferenceCollator
from cpo_exp.logprobs import label_logps, mean_logit, mean_logit_direction
from cpo_exp.losses import LossSpec, preference_loss, total_loss
from cpo_exp.metrics import EVAL_PREFIX, MetricWindow, pair_metrics
from cpo_exp.models import disable_dropout
from cpo_exp.packing import SEGMENT_ATTENTION, PackingCollator

log = logging.getLogger(__name__)

MetricsSink = Callable[[dict[str, float], int], None]


# --------------------------------------------------------------------------- the pair forward


@dataclass
class PairOutput:
    """Per-sequence log-probs of one batch of pairs, and what the metrics need besides."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    nll_loss: torch.Tensor
    chosen_logits_mean: torch.Tensor
    rejected_logits_mean: torch.Tensor


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label token and the mask of tokens that count.

    Position ``t`` predicts token ``t + 1``, hence the shift by one; prompt and padding
    positions carry the label -100 and are masked out. Computed in float32.
    """
    labels = labels[:, 1:]
    logits = logits[:, :-1].float()
    mask = labels != LABEL_PAD
    safe = labels.masked_fill(~mask, 0)  # any valid index; masked out below
    picked = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)) * mask, mask


def sequence_logps(per_token: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    """Sum (or mean, for the length-normalised losses) of the completion-token log-probs."""
    total = per_token.sum(-1)
    return total / mask.sum(-1) if average else total


def forward_pair(model: torch.nn.Module, batch: dict[str, torch.Tensor], average: bool) -> PairOutput:
    """One forward pass over ``[chosen; rejected]`` (``2B`` rows, chosen first)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    per_token, mask = token_logps(logits, batch["labels"])
    logps = sequence_logps(per_token, mask, average)
    half = batch["input_ids"].shape[0] // 2
    # TRL's nll_loss: cross-entropy averaged over all chosen completion tokens of the batch.
    nll = -per_token[:half].sum() / mask[:half].sum()
    # TRL's logits/* metrics: the mean over the whole padded [B, T, V] block of each half.
    detached = logits.detach()
    return PairOutput(
        chosen_logps=logps[:half],
        rejected_logps=logps[half:],
        nll_loss=nll,
        chosen_logits_mean=detached[:half].float().mean(),
        rejected_logits_mean=detached[half:].float().mean(),
    )


def _body_and_head(model: torch.nn.Module):
    """The decoder stack and the output projection of a causal LM, for the hidden-state paths."""
    if hasattr(model, "module"):
        # Calling a wrapped (DDP/FSDP) model's submodules would bypass its gradient hooks.
        raise ValueError("engine.logits=chunked runs on one process for now; use engine.logits=full "
                         f"with {type(model).__name__}")
    config = model.config
    for key in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, key, None):
            raise ValueError(f"engine.logits=chunked does not support models with {key} "
                             f"({config.model_type}); use engine.logits=full")
    head = model.get_output_embeddings()
    return model.get_decoder(), head.weight, getattr(head, "bias", None)


def _from_label_logps(per_label, seq, sequences, average, chosen_logits_mean, rejected_logits_mean):
    """Per-sequence sums (or means), and TRL's NLL over the chosen half, from flat label log-probs."""
    sums = per_label.new_zeros(sequences).index_add(0, seq, per_label)
    counts = torch.bincount(seq, minlength=sequences)
    half = sequences // 2
    logps = sums / counts if average else sums
    return PairOutput(
        chosen_logps=logps[:half],
        rejected_logps=logps[half:],
        nll_loss=-sums[:half].sum() / counts[:half].sum(),
        chosen_logits_mean=chosen_logits_mean,
        rejected_logits_mean=rejected_logits_mean,
    )


def forward_pair_chunked(model, batch: dict[str, torch.Tensor], average: bool, chunk_size: int) -> PairOutput:
    """:func:`forward_pair` on the padded batch, with the head fused into a chunked log-softmax.

    Logits exist only for completion positions, ``chunk_size`` rows at a time; the
    ``logits/*`` metrics (TRL's mean over the whole padded half) come from the hidden states.
    """
    body, weight, bias = _body_and_head(model)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    mask = labels != LABEL_PAD
    per_label = label_logps(hidden[:, :-1][mask], weight, labels[mask], bias, chunk_size)
    half = hidden.shape[0] // 2
    direction = mean_logit_direction(weight, bias)
    return _from_label_logps(per_label, mask.nonzero()[:, 0], hidden.shape[0], average,
                             mean_logit(hidden[:half], direction), mean_logit(hidden[half:], direction))


def forward_pair_packed(model, batch: dict, average: bool, chunk_size: int) -> PairOutput:
    """:func:`forward_pair` on a padding-free batch from :class:`~cpo_exp.packing.PackingCollator`.

    ``logits/*`` here is the mean over the real tokens of each half (a packed batch has no
    padding positions, which TRL's figure includes; see README, Performance).
    """
    body, weight, bias = _body_and_head(model)
    hidden = body(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                  cpo_segments=batch["segments"]).last_hidden_state[0]
    per_label = label_logps(hidden[batch["pred_index"]], weight, batch["pred_labels"], bias, chunk_size)
    pairs = batch["num_pairs"]
    direction, offset = mean_logit_direction(weight, bias)
    token_means = (hidden.detach().float() @ direction)[batch["token_index"]]
    chosen = batch["token_seq"] < pairs
    return _from_label_logps(per_label, batch["pred_seq"], 2 * pairs, average,
                             token_means[chosen].mean() + offset, token_means[~chosen].mean() + offset)


def pair_forward(model, batch, average: bool, engine: EngineConfig) -> PairOutput:
    """The pair forward that ``engine`` selects; every choice gives the same numbers."""
    if engine.packing:
        return forward_pair_packed(model, batch, average, engine.logits_chunk_size)
    if engine.logits == "chunked":
        return forward_pair_chunked(model, batch, average, engine.logits_chunk_size)
    return forward_pair(model, batch, average)


def pair_collator(tokenizer, engine: EngineConfig):
    """The collator that builds the batches ``engine``'s pair forward expects."""
    if engine.packing:
        return PackingCollator(shared_prompt=engine.shared_prompt)
    return PreferenceCollator(tokenizer.pad_token_id)


def pair_loss(model, batch, spec: LossSpec,
              engine: EngineConfig = EngineConfig()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training objective of one batch and its metrics (TRL's ``get_batch_loss_metrics``)."""
    out = pair_forward(model, batch, spec.average_log_prob, engine)
    losses, chosen_rewards, rejected_rewards = preference_loss(out.chosen_logps, out.rejected_logps, spec)
    loss = total_loss(losses, out.nll_loss, spec.cpo_alpha)
    metrics = pair_metrics(
        loss, out.nll_loss, chosen_rewards, rejected_rewards, out.chosen_logps, out.rejected_logps,
        out.chosen_logits_mean, out.rejected_logits_mean,
    )
    return loss, metrics


# --------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    global_step: int
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    eval_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    train_seconds: float = 0.0
    tokens_per_second: float = 0.0
    # Wall time inside forward/backward/optimizer steps (train) and eval passes; on a GPU these
    # are host-side times (kernels are asynchronous), exact only at the metric flushes.
    step_seconds: float = 0.0
    eval_seconds: float = 0.0


def show_progress(cfg: TrainConfig) -> bool:
    """``train.progress_bar``, or, when unset, whether stderr is a terminal."""
    return cfg.progress_bar if cfg.progress_bar is not None else sys.stderr.isatty()


def _total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_train_epochs * batches_per_epoch / cfg.gradient_accumulation_steps))


@torch.no_grad()
def evaluate(model, loader, spec: LossSpec, accelerator: Accelerator, progress: bool = False,
             engine: EngineConfig = EngineConfig()) -> dict[str, float]:
    """Eval metrics over the whole loader, each the mean of its batch values (as TRL)."""
    was_training = model.training
    model.eval()
    window = MetricWindow()
    for batch in tqdm(loader, desc="eval", leave=False, disable=not progress):
        with accelerator.autocast():
            _, metrics = pair_loss(model, batch, spec, engine)
        window.add(metrics)
    model.train(was_training)
    return window.flush(prefix=EVAL_PREFIX)


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
    engine: EngineConfig = EngineConfig(),
) -> TrainResult:
    """Train ``model`` on tokenized pairs; metrics go to ``log_metrics(metrics, step)``."""
    accelerator = Accelerator(
        mixed_precision=hardware.mixed_precision,
        cpu=hardware.cpu,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(cfg.seed)
    if cfg.disable_dropout:
        disable_dropout(model)
    collate = pair_collator(tokenizer, engine)
    attn_implementation = model.config._attn_implementation
    if engine.packing:
        model.set_attn_implementation(SEGMENT_ATTENTION)
    train_loader = DataLoader(train_set, batch_size=cfg.per_device_train_batch_size, shuffle=True,
                              collate_fn=collate)
    eval_loader = (
        DataLoader(eval_set, batch_size=cfg.per_device_eval_batch_size, collate_fn=collate)
        if eval_set is not None else None
    )
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
    )
    total_steps = _total_steps(cfg, len(train_loader))
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    batches_per_step_epoch = max(1, len(train_loader) / cfg.gradient_accumulation_steps)
    show = show_progress(cfg)
    result = TrainResult(global_step=0)

    def run_eval(step: int) -> None:
        if eval_loader is None:
            return
        started = time.perf_counter()
        metrics = evaluate(model, eval_loader, spec, accelerator, show, engine)
        result.eval_seconds += time.perf_counter() - started
        result.eval_metrics = metrics
        result.eval_history.append((step, metrics))
        log_metrics(metrics, step)
        log.info("eval step %d: %s", step, _brief(metrics, EVAL_PREFIX))

    log.info("training %d steps (%d pairs, batch %d x %d accumulation)", total_steps, len(train_set),
             cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps)
    run_eval(0)
    model.train()
    window, step, epoch = MetricWindow(), 0, 0
    window_tokens, window_start, train_start, all_tokens = 0, time.perf_counter(), time.perf_counter(), 0
    grad_norm = torch.tensor(0.0)
    progress = tqdm(total=total_steps, desc="train", disable=not show)
    while step < total_steps:
        for batch in train_loader:
            started = time.perf_counter()
            with accelerator.accumulate(model):
                with accelerator.autocast():  # the hidden-state paths bypass the model's own forward
                    loss, metrics = pair_loss(model, batch, spec, engine)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(
                        model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            result.step_seconds += time.perf_counter() - started
            window.add(metrics)
            window_tokens += batch["num_tokens"] if "num_tokens" in batch else int(batch["attention_mask"].sum())
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % cfg.logging_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                logged = window.flush()
                logged.update(
                    learning_rate=scheduler.get_last_lr()[0],
                    grad_norm=float(grad_norm),
                    epoch=step / batches_per_step_epoch,
                    tokens_per_second=window_tokens / elapsed,
                )
                result.train_metrics = logged
                log_metrics(logged, step)
                log.info("step %d/%d: %s", step, total_steps, _brief(logged))
                all_tokens += window_tokens
                window_tokens, window_start = 0, time.perf_counter()
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step != total_steps:
                run_eval(step)
            if step >= total_steps:
                break
        epoch += 1
    progress.close()
    result.global_step = step
    result.train_seconds = time.perf_counter() - train_start
    result.tokens_per_second = all_tokens / result.train_seconds if result.train_seconds else 0.0
    run_eval(step)
    accelerator.unwrap_model(model).set_attn_implementation(attn_implementation)
    if cfg.save_model and accelerator.is_main_process:
        target = Path(output_dir) / "model"
        accelerator.unwrap_model(model).save_pretrained(target)
        tokenizer.save_pretrained(target)
        log.info("model saved to %s", target)
    accelerator.wait_for_everyone()
    return result


def _brief(metrics: dict[str, float], prefix: str = "") -> str:
    keys = ("loss", "rewards/accuracies", "rewards/margins", "nll_loss", "tokens_per_second")
    return " ".join(f"{k}={metrics[prefix + k]:.4g}" for k in keys if prefix + k in metrics)
