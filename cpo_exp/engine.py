"""The one training engine behind every loss variant.

Read top to bottom, :func:`train` is the whole run: build the loaders, optimiser and schedule,
evaluate once, then loop (forward the chosen and rejected sequences together, take the loss,
step), logging a window of metrics every ``logging_steps`` and evaluating every ``eval_steps``;
finally evaluate and save. ``accelerate`` places tensors, handles precision and gradient
accumulation, and (later) spreads the work over processes.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MethodType
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
from cpo_exp.data import LABEL_PAD, PairRows, collator_for
from cpo_exp.logprobs import DEFAULT_CHUNK_SIZE, label_logps, mean_logit, mean_logit_direction
from cpo_exp.losses import LossSpec, preference_loss, total_loss
from cpo_exp.metrics import EVAL_PREFIX, MetricWindow, pair_metrics
from cpo_exp.models import disable_dropout
from cpo_exp.packing import SEGMENT_ATTENTION, PackingCollator

log = logging.getLogger(__name__)

MetricsSink = Callable[[dict[str, float], int], None]


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient with ``train.on_nonfinite=stop``; names the step and last metrics."""


# --------------------------------------------------------------------------- the pair forward


@dataclass
class PairOutput:
    """Per-sequence log-probs of one batch of pairs, and what the metrics need besides."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    nll_loss: torch.Tensor
    chosen_logits_mean: torch.Tensor
    rejected_logits_mean: torch.Tensor
    # Mixture-of-experts models with ``output_router_logits``: the router load-balancing loss.
    aux_loss: Optional[torch.Tensor] = None


def token_logps(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label token and the mask of tokens that count.

    In a causal LM position ``t`` predicts token ``t + 1``, hence the shift by one (an
    encoder-decoder's decoder inputs are already shifted: ``shift=False``); prompt and padding
    positions carry the label -100 and are masked out. Computed in float32.
    """
    if shift:
        labels, logits = labels[:, 1:], logits[:, :-1]
    logits = logits.float()
    mask = labels != LABEL_PAD
    safe = labels.masked_fill(~mask, 0)  # any valid index; masked out below
    picked = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)) * mask, mask


def sequence_logps(per_token: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    """Sum (or mean, for the length-normalised losses) of the completion-token log-probs."""
    total = per_token.sum(-1)
    return total / mask.sum(-1) if average else total


def forward_pair(model: torch.nn.Module, batch: dict[str, torch.Tensor], average: bool) -> PairOutput:
    """One forward pass over ``[chosen; rejected]`` (``2B`` rows, chosen first).

    For an encoder-decoder the batch carries ``decoder_input_ids``: the prompt is encoded and
    the completions are decoded against it.
    """
    seq2seq = {"decoder_input_ids": batch["decoder_input_ids"]} if "decoder_input_ids" in batch else {}
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                    **seq2seq)
    logits = outputs.logits
    per_token, mask = token_logps(logits, batch["labels"], shift=not seq2seq)
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
        aux_loss=getattr(outputs, "aux_loss", None),
    )


def _body_and_head(model: torch.nn.Module):
    """The decoder stack and the output projection of a causal LM, for the hidden-state paths."""
    config = model.config
    for key in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, key, None):
            raise ValueError(f"engine.logits=chunked does not support models with {key} "
                             f"({config.model_type}); use engine.logits=full")
    return model.get_decoder(), model.get_output_embeddings()


def _head_weights(head: torch.nn.Module):
    """The head's weight and bias, read once the decoder stack has run: FSDP2 swaps its gathered
    (unsharded) parameters into the modules only then, in the pre-forward of their group."""
    return head.weight, getattr(head, "bias", None)


def load_balancing_loss(model: torch.nn.Module) -> Callable:
    """The router load-balancing loss function of ``model``'s own modeling module (Switch
    Transformer's, as each mixture-of-experts ``*ForCausalLM.forward`` of transformers calls it),
    or a ValueError naming the model when it has none with the usual signature."""
    module = sys.modules[type(model.get_decoder()).__module__]
    loss_fn = getattr(module, "load_balancing_loss_func", None)
    usual = ["gate_logits", "num_experts", "top_k", "attention_mask"]
    if (loss_fn is None or list(inspect.signature(loss_fn).parameters) != usual
            or not hasattr(model, "num_experts") or not hasattr(model, "num_experts_per_tok")):
        raise ValueError(f"engine.logits=chunked cannot reproduce the router aux loss of {type(model).__name__} "
                         f"({module.__name__} has no load_balancing_loss_func{tuple(usual)} for it); "
                         "use engine=plain, or set the model config's output_router_logits=false")
    return loss_fn


def _router_kwargs(model) -> dict:
    """``output_router_logits=True`` for the decoder stack of a model whose forward adds a router loss."""
    return {"output_router_logits": True} if getattr(model.config, "output_router_logits", False) else {}


def _router_aux_loss(model, outputs, token_weights: torch.Tensor) -> Optional[torch.Tensor]:
    """The router loss of ``outputs`` (the decoder stack's) as the model's own forward computes it.

    ``token_weights`` (one per position of ``outputs``) counts each position as often as the
    plain path sees it: the attention mask of a padded batch (padding: 0), and in a packed row
    the number of sequences holding the token (2 for a shared prompt's). The loss function sums
    masked counts and probabilities, so these weights give exactly the plain path's value.
    """
    if not _router_kwargs(model):
        return None
    return load_balancing_loss(model)(outputs.router_logits, model.num_experts, model.num_experts_per_tok,
                                      token_weights)


def _from_label_logps(per_label, seq, sequences, average, chosen_logits_mean, rejected_logits_mean,
                      aux_loss=None):
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
        aux_loss=aux_loss,
    )


def forward_pair_chunked(model, batch: dict[str, torch.Tensor], average: bool, chunk_size: int) -> PairOutput:
    """:func:`forward_pair` on the padded batch, with the head fused into a chunked log-softmax.

    Logits exist only for completion positions, ``chunk_size`` rows at a time; the
    ``logits/*`` metrics (TRL's mean over the whole padded half) come from the hidden states.
    """
    body, head = _body_and_head(model)
    outputs = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   **_router_kwargs(model))
    hidden = outputs.last_hidden_state
    weight, bias = _head_weights(head)
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    mask = labels != LABEL_PAD
    per_label = label_logps(hidden[:, :-1][mask], weight, labels[mask], bias, chunk_size)
    half = hidden.shape[0] // 2
    direction = mean_logit_direction(weight, bias)
    return _from_label_logps(per_label, mask.nonzero()[:, 0], hidden.shape[0], average,
                             mean_logit(hidden[:half], direction), mean_logit(hidden[half:], direction),
                             _router_aux_loss(model, outputs, batch["attention_mask"]))


def forward_pair_packed(model, batch: dict, average: bool, chunk_size: int) -> PairOutput:
    """:func:`forward_pair` on a padding-free batch from :class:`~cpo_exp.packing.PackingCollator`.

    ``logits/*`` here is the mean over the real tokens of each half (a packed batch has no
    padding positions, which TRL's figure includes; see README, Performance).
    """
    body, head = _body_and_head(model)
    outputs = body(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                   cpo_segments=batch["segments"], **_router_kwargs(model))
    hidden = outputs.last_hidden_state[0]
    weight, bias = _head_weights(head)
    per_label = label_logps(hidden[batch["pred_index"]], weight, batch["pred_labels"], bias, chunk_size)
    pairs = batch["num_pairs"]
    direction, offset = mean_logit_direction(weight, bias)
    token_means = (hidden.detach().float() @ direction)[batch["token_index"]]
    chosen = batch["token_seq"] < pairs
    sequences_per_token = torch.bincount(batch["token_index"], minlength=hidden.shape[0])[None]
    return _from_label_logps(per_label, batch["pred_seq"], 2 * pairs, average,
                             token_means[chosen].mean() + offset, token_means[~chosen].mean() + offset,
                             _router_aux_loss(model, outputs, sequences_per_token))


ROUTED = "cpo_routes_pairs"


def route_pairs(model: torch.nn.Module) -> None:
    """Let ``model(cpo_pairs=batch, ...)`` run a hidden-state pair forward, as a call of the model.

    Under DDP, FSDP or DeepSpeed only a call of the prepared model runs the wrapper's forward
    (DDP's gradient-sync bookkeeping, FSDP's parameter gathering); calling the decoder stack
    directly bypasses it (under DDP each rank then keeps the gradient of its own share of the
    batch). So the hidden-state paths enter through the model's own call, and
    the model stays what accelerate prepares, checkpoints and saves (same state dict, same
    FSDP units). Calls without ``cpo_pairs`` (generation, a plain forward) reach the model's
    own forward unchanged.
    """
    if getattr(model, ROUTED, False):
        return
    own_forward = model.forward

    def forward(self, *args, cpo_pairs=None, average=False, packed=False, chunk_size=DEFAULT_CHUNK_SIZE,
                **kwargs):
        if cpo_pairs is None:
            return own_forward(*args, **kwargs)
        run = forward_pair_packed if packed else forward_pair_chunked
        return vars(run(self, cpo_pairs, average, chunk_size))  # a dict: the wrappers find its tensors

    model.forward = MethodType(forward, model)  # a bound method, as accelerate's mixed precision expects
    setattr(model, ROUTED, True)


def pair_forward(model, batch, average: bool, engine: EngineConfig) -> PairOutput:
    """The pair forward that ``engine`` selects; every choice gives the same numbers."""
    if "decoder_input_ids" in batch or engine.logits == "full":  # encoder-decoders: plain (see check_engine)
        return forward_pair(model, batch, average)
    # DDP and DeepSpeed hold the prepared model as ``.module``; FSDP2 shards it in place.
    if getattr(getattr(model, "module", model), ROUTED, False):
        return PairOutput(**model(cpo_pairs=batch, average=average, packed=engine.packing,
                                  chunk_size=engine.logits_chunk_size))
    # A bare model (the benchmark, tests): no wrapper to go through.
    run = forward_pair_packed if engine.packing else forward_pair_chunked
    return run(model, batch, average, engine.logits_chunk_size)


def pair_collator(model_config, tokenizer, engine: EngineConfig):
    """The collator that builds the batches ``engine``'s pair forward expects."""
    if engine.packing:
        return PackingCollator(shared_prompt=engine.shared_prompt)
    return collator_for(model_config, tokenizer.pad_token_id)


def check_engine(model: torch.nn.Module, engine: EngineConfig, zero3: bool = False) -> None:
    """The hidden-state paths run a causal LM's decoder stack and head: refuse what they cannot do."""
    if engine.logits == "full":
        return
    if model.config.is_encoder_decoder:
        raise ValueError("engine.logits=chunked and engine.packing support causal LMs only; "
                         "use engine=plain for an encoder-decoder")
    if zero3:
        # ZeRO-3 gathers a weight only inside its own module's forward; the fused head reads lm_head's outside it.
        raise ValueError("engine.logits=chunked does not run under DeepSpeed ZeRO-3 (the head weight stays "
                         "partitioned); use engine=plain, or hardware=deepspeed_zero2 or fsdp")
    _body_and_head(model)  # refuses a head that is more than a linear projection (softcapping, scaling)
    if _router_kwargs(model):
        load_balancing_loss(model)  # refuses, by name, a router loss it cannot reproduce


def pair_loss(model, batch, spec: LossSpec, aux_loss_coef: float = 0.0,
              engine: EngineConfig = EngineConfig()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training objective of one batch and its metrics (TRL's ``get_batch_loss_metrics``).

    A mixture-of-experts model's router loss is added as ``aux_loss_coef * aux_loss`` (TRL:
    ``router_aux_loss_coef`` of a model with ``output_router_logits``).
    """
    out = pair_forward(model, batch, spec.average_log_prob, engine)
    losses, chosen_rewards, rejected_rewards = preference_loss(out.chosen_logps, out.rejected_logps, spec)
    loss = total_loss(losses, out.nll_loss, spec.cpo_alpha)
    if aux_loss_coef and out.aux_loss is not None:
        loss = loss + aux_loss_coef * out.aux_loss
    metrics = pair_metrics(
        loss, out.nll_loss, chosen_rewards, rejected_rewards, out.chosen_logps, out.rejected_logps,
        out.chosen_logits_mean, out.rejected_logits_mean,
    )
    if aux_loss_coef and out.aux_loss is not None:
        metrics["aux_loss"] = out.aux_loss.detach().float()
    return loss, metrics


def router_aux_loss_coef(model: PreTrainedModel) -> float:
    """The MoE router loss weight, or 0 when the model does not return router logits."""
    config = getattr(model, "config", None)
    if not getattr(config, "output_router_logits", False):
        return 0.0
    return float(getattr(config, "router_aux_loss_coef", 0.0))


# --------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    global_step: int
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    eval_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    train_seconds: float = 0.0
    tokens_per_second: float = 0.0
    # Wall time inside forward/backward/optimizer steps (train) and evaluations (their forwards and
    # any generation, ``extra_eval``); on a GPU these
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
             aux_loss_coef: float = 0.0, engine: EngineConfig = EngineConfig()) -> dict[str, float]:
    """Eval metrics over the whole loader, each the mean of its batch values (as TRL)."""
    was_training = model.training
    model.eval()
    window = MetricWindow()
    for batch in tqdm(loader, desc="eval", leave=False, disable=not progress):
        with accelerator.autocast():
            _, metrics = pair_loss(model, batch, spec, aux_loss_coef, engine)
        window.add(metrics)
    model.train(was_training)
    return reduce_across_processes(window.flush(prefix=EVAL_PREFIX), accelerator)


def reduce_across_processes(metrics: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """Mean of each metric over the processes (each saw equally many batches of equal size)."""
    if accelerator.num_processes == 1 or not metrics:
        return metrics
    names = sorted(metrics)  # the same order on every process
    values = accelerator.reduce(torch.tensor([metrics[n] for n in names], device=accelerator.device), "mean")
    return dict(zip(names, values.tolist()))


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
    extra_eval: Optional[Callable[[torch.nn.Module, int], dict[str, float]]] = None,
    checkpointer: Optional[Checkpointer] = None,
    engine: EngineConfig = EngineConfig(),
) -> TrainResult:
    """Train ``model`` on tokenized pairs; metrics go to ``log_metrics(metrics, step)``.

    ``extra_eval(model, step)`` adds metrics to every evaluation (e.g. generation scores).
    With a ``checkpointer``, state is saved every ``train.save_steps``, at the end, and when a
    SIGINT/SIGTERM arrives (then :class:`cpo_exp.interrupts.Stopped` is raised); if it holds a
    resume point, training continues from there exactly as if never interrupted.
    """
    accelerator = new_accelerator(
        mixed_precision=hardware.mixed_precision,
        cpu=hardware.cpu,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(cfg.seed)
    aux_coef = router_aux_loss_coef(model)
    if cfg.disable_dropout:
        disable_dropout(model)
    check_engine(model, engine, zero3=getattr(accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3)
    if engine.logits == "chunked":
        route_pairs(model)
    collate = pair_collator(model.config, tokenizer, engine)
    attn_implementation = model.config._attn_implementation
    if engine.packing:
        model.set_attn_implementation(SEGMENT_ATTENTION)
    train_loader = DataLoader(PairRows(train_set), batch_size=cfg.per_device_train_batch_size, shuffle=True,
                              collate_fn=collate)
    eval_loader = (
        DataLoader(PairRows(eval_set), batch_size=cfg.per_device_eval_batch_size, collate_fn=collate)
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
        metrics = evaluate(model, eval_loader, spec, accelerator, show, aux_coef, engine)
        if extra_eval is not None:
            plain = accelerator.unwrap_model(model)
            if engine.packing:  # generation runs ordinary forwards, not packed rows
                plain.set_attn_implementation(attn_implementation)
            metrics.update(extra_eval(plain, step))
            if engine.packing:
                plain.set_attn_implementation(SEGMENT_ATTENTION)
        result.eval_seconds += time.perf_counter() - started
        result.eval_metrics = metrics
        result.eval_history.append((step, metrics))
        log_metrics(metrics, step)
        log.info("eval step %d: %s", step, _brief(metrics, EVAL_PREFIX))

    log.info("training %d steps (%d pairs, batch %d x %d accumulation)", total_steps, len(train_set),
             cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps)
    start = checkpointer.restore(accelerator) if checkpointer and checkpointer.resume else Position()
    window, step, epoch = MetricWindow(), start.global_step, start.epoch
    window.load(start.window, accelerator.device)
    if step == 0:
        run_eval(0)
    model.train()
    skip, in_epoch = start.batches_in_epoch, 0
    window_tokens, window_start, train_start, all_tokens = 0, time.perf_counter(), time.perf_counter(), 0
    grad_norm, finite, skipped = torch.tensor(0.0), torch.tensor(True), start.skipped_steps

    def position() -> Position:
        # One window for all ranks: each batch's values averaged over the ranks. Every rank has as
        # many batches in its window, so the logged mean of the means is unchanged after resume.
        state = window.state()
        if accelerator.num_processes > 1:
            state = {name: accelerator.reduce(torch.tensor(state[name], device=accelerator.device), "mean").tolist()
                     for name in sorted(state)}
        return Position(step, epoch, in_epoch, state, skipped)

    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not show)
    while step < total_steps:
        # The epoch fixes the shuffle (seedable sampler); on resume the consumed batches are skipped.
        train_loader.set_epoch(epoch)
        loader, in_epoch, skip = (skip_first_batches(train_loader, skip) if skip else train_loader), skip, 0
        for batch in loader:
            in_epoch += 1
            update = True
            started = time.perf_counter()
            with accelerator.accumulate(model):
                with accelerator.autocast():  # the whole step, not only the model call
                    loss, metrics = pair_loss(model, batch, spec, aux_coef, engine)
                accelerator.backward(loss)
                finite = finite & torch.isfinite(loss.detach())
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(
                        model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
                    )
                    # One host sync per optimizer step: a NaN must not reach the weights.
                    update = bool(finite & torch.isfinite(grad_norm))
                    finite = torch.tensor(True)
                    if not update:
                        _on_nonfinite(cfg, step + 1, float(grad_norm), result, checkpointer)
                        skipped += 1
                if update:
                    optimizer.step()
                    scheduler.step()
                optimizer.zero_grad()
            result.step_seconds += time.perf_counter() - started
            if update:
                window.add(metrics)
            window_tokens += batch["num_tokens"] if "num_tokens" in batch else int(batch["attention_mask"].sum())
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % cfg.logging_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                logged = reduce_across_processes(window.flush(), accelerator)
                logged.update(
                    learning_rate=scheduler.get_last_lr()[0],
                    grad_norm=float(grad_norm),
                    epoch=step / batches_per_step_epoch,
                    tokens_per_second=window_tokens / elapsed,
                )
                if skipped:
                    logged["nonfinite_skipped_steps"] = skipped
                result.train_metrics = logged
                log_metrics(logged, step)
                log.info("step %d/%d: %s", step, total_steps, _brief(logged))
                all_tokens += window_tokens
                window_tokens, window_start = 0, time.perf_counter()
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step != total_steps:
                run_eval(step)
            stop = _stop_requested(accelerator)
            if checkpointer and (checkpointer.due(step) or stop or step == total_steps):
                checkpointer.save(accelerator, position())
            if stop:
                progress.close()
                raise interrupts.Stopped(stop, step, str(checkpointer.last_saved) if checkpointer else None)
            if step >= total_steps:
                break
        else:
            epoch += 1
    progress.close()
    result.global_step = step
    result.train_seconds = time.perf_counter() - train_start
    result.tokens_per_second = all_tokens / result.train_seconds if result.train_seconds else 0.0
    run_eval(step)
    if engine.packing:
        accelerator.unwrap_model(model).set_attn_implementation(attn_implementation)
    if cfg.save_model:
        state = accelerator.get_state_dict(model)  # gathers shards under FSDP / ZeRO-3: every process
        if accelerator.is_main_process:
            target = Path(output_dir) / "model"
            accelerator.unwrap_model(model).save_pretrained(target, state_dict=state)
            tokenizer.save_pretrained(target)
            log.info("model saved to %s", target)
    accelerator.wait_for_everyone()
    return result


def new_accelerator(**kwargs) -> Accelerator:
    """An ``Accelerator`` with these settings, even if this process made one with others before.

    accelerate keeps one process-wide state and refuses a second precision, so the second job of
    a sequential sweep over ``hardware.mixed_precision`` (or a notebook's second run) would fail.
    The process-level state (devices, process group) is kept.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(**kwargs)


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
