"""The pair forward: one batch of preference pairs in, per-sequence log-probs out.

:func:`pair_forward` is the only entry. It runs the policy over ``[chosen; rejected]`` (``2B``
sequences, chosen first) and returns a :class:`PairOutput`: the per-sequence log-probs, TRL's NLL
over the chosen completions, the mean logits of each half, and a mixture-of-experts router loss.
The variants give the same numbers (to float32 rounding) and differ only in cost; which one runs
is read from the batch and ``engine``:

- **plain** (``engine.logits=full``, and every encoder-decoder): the model's own forward, full
  ``[2B, T, V]`` logits, as TRL computes them;
- **chunked** (``engine.logits=chunked``): the decoder stack, then the head fused with the
  log-softmax at completion positions only (:func:`cpo_exp.logprobs.label_logps`);
- **packed** (a batch from :class:`~cpo_exp.packing.PackingCollator`, ``engine.packing``): no
  padding, attention kept within each sequence, optionally with a shared prompt.

:func:`prepare_model` readies a model for the variant once, before accelerate wraps it. The
log-prob math itself lives in :mod:`cpo_exp.logprobs`.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from types import MethodType
from typing import Callable, Optional

import torch

from cpo_exp.config import EngineConfig
from cpo_exp.data import LABEL_PAD, collator_for
from cpo_exp.logprobs import (SequenceLogps, label_logps, logits_label_logps, mean_logit, mean_logit_direction,
                              sequence_logps)
from cpo_exp.packing import SEGMENT_ATTENTION, PackingCollator


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
    # Completion tokens of each pair's chosen minus its rejected (the length-bias diagnostics).
    length_diff: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, seqs: SequenceLogps, chosen_logits_mean, rejected_logits_mean, aux_loss=None) -> "PairOutput":
        half = seqs.tokens.shape[0] // 2
        return cls(seqs.chosen, seqs.rejected, seqs.nll_loss, chosen_logits_mean, rejected_logits_mean, aux_loss,
                   seqs.tokens[:half] - seqs.tokens[half:])


def pair_forward(model, batch: dict, average: bool, engine: EngineConfig) -> PairOutput:
    """The forward of one batch of pairs, by the variant that ``engine`` and the batch select."""
    if "decoder_input_ids" in batch or engine.logits == "full":  # encoder-decoders: plain (see prepare_model)
        return _plain(model, batch, average)
    # DDP and DeepSpeed hold the prepared model as ``.module``; FSDP2 shards it in place.
    if getattr(getattr(model, "module", model), ROUTED, False):
        return PairOutput(**model(cpo_pairs=batch, average=average, chunk_size=engine.logits_chunk_size))
    return _hidden_state_forward(model, batch, average, engine.logits_chunk_size)  # a bare model (benchmark, tests)


def pair_collator(model_config, tokenizer, engine: EngineConfig):
    """The collator that builds the batches ``engine``'s pair forward expects."""
    if engine.packing:
        return PackingCollator(shared_prompt=engine.shared_prompt)
    return collator_for(model_config, tokenizer.pad_token_id)


def prepare_model(model: torch.nn.Module, engine: EngineConfig, zero3: bool = False) -> None:
    """Refuse what the selected variant cannot do, then ready the model for it (once, for good)."""
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
    if engine.packing:
        # Ordinary (unpacked) calls, such as generation, fall back to SDPA inside it.
        model.set_attn_implementation(SEGMENT_ATTENTION)
    _route_pairs(model)


def router_aux_loss_coef(model) -> float:
    """The MoE router loss weight, or 0 when the model does not return router logits."""
    config = getattr(model, "config", None)
    if not getattr(config, "output_router_logits", False):
        return 0.0
    return float(getattr(config, "router_aux_loss_coef", 0.0))


# --------------------------------------------------------------------------- the variants


def _plain(model, batch: dict, average: bool) -> PairOutput:
    """The model's own forward and full logits. An encoder-decoder's batch carries
    ``decoder_input_ids``: the prompt is encoded and the completions decoded against it."""
    seq2seq = {"decoder_input_ids": batch["decoder_input_ids"]} if "decoder_input_ids" in batch else {}
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                    **seq2seq)
    logits, labels = outputs.logits, batch["labels"]
    if not seq2seq:  # in a causal LM position t predicts token t + 1; decoder inputs are already shifted
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != LABEL_PAD
    per_token = logits_label_logps(logits, labels.masked_fill(~mask, 0))  # any valid index where masked
    seqs = sequence_logps(per_token[mask], mask.nonzero()[:, 0], logits.shape[0], average)
    # TRL's logits/* metrics: the mean over the whole padded [B, T, V] block of each half.
    detached, half = outputs.logits.detach(), logits.shape[0] // 2
    return PairOutput.of(seqs, detached[:half].float().mean(), detached[half:].float().mean(),
                         getattr(outputs, "aux_loss", None))


def _hidden_state_forward(model, batch: dict, average: bool, chunk_size: int) -> PairOutput:
    """The decoder stack, then the fused head at the positions whose next token counts."""
    body, head = _body_and_head(model)
    packed = "segments" in batch
    if packed:
        outputs = body(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       cpo_segments=batch["segments"], **_router_kwargs(model))
        hidden = outputs.last_hidden_state[0]
        predicting, targets, seq = hidden[batch["pred_index"]], batch["pred_labels"], batch["pred_seq"]
        sequences = 2 * batch["num_pairs"]
    else:
        outputs = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                       **_router_kwargs(model))
        hidden = outputs.last_hidden_state
        labels = batch["labels"][:, 1:]  # position t predicts token t + 1
        mask = labels != LABEL_PAD
        predicting, targets, seq = hidden[:, :-1][mask], labels[mask], mask.nonzero()[:, 0]
        sequences = hidden.shape[0]
    # Read once the decoder stack has run: FSDP2 swaps the gathered (unsharded) parameters into the
    # modules only then, in the pre-forward of their group.
    weight, bias = head.weight, getattr(head, "bias", None)
    seqs = sequence_logps(label_logps(predicting, weight, targets, bias, chunk_size), seq, sequences, average)
    direction = mean_logit_direction(weight, bias)
    if packed:
        # The mean over the real tokens of each half: a packed batch has no padding positions,
        # which TRL's figure includes (see docs/performance.md).
        token_means = (hidden.detach().float() @ direction[0])[batch["token_index"]]
        chosen = batch["token_seq"] < batch["num_pairs"]
        logit_means = token_means[chosen].mean() + direction[1], token_means[~chosen].mean() + direction[1]
        token_weights = torch.bincount(batch["token_index"], minlength=hidden.shape[0])[None]
    else:
        half = sequences // 2
        logit_means = mean_logit(hidden[:half], direction), mean_logit(hidden[half:], direction)
        token_weights = batch["attention_mask"]
    return PairOutput.of(seqs, *logit_means, _router_aux_loss(model, outputs, token_weights))


# --------------------------------------------------------------------------- entering through the model's call

ROUTED = "cpo_routes_pairs"


def _route_pairs(model: torch.nn.Module) -> None:
    """Let ``model(cpo_pairs=batch, ...)`` run the hidden-state pair forward, as a call of the model.

    Under DDP, FSDP or DeepSpeed only a call of the prepared model runs the wrapper's forward
    (DDP's gradient-sync bookkeeping, FSDP's parameter gathering); calling the decoder stack
    directly bypasses it (under DDP each rank then keeps the gradient of its own share of the
    batch). So the hidden-state paths enter through the model's own call, and the model stays
    what accelerate prepares, checkpoints and saves (same state dict, same FSDP units). Calls
    without ``cpo_pairs`` (generation, a plain forward) reach the model's own forward unchanged.
    """
    if getattr(model, ROUTED, False):
        return
    own_forward = model.forward

    def forward(self, *args, cpo_pairs=None, average=False, chunk_size=None, **kwargs):
        if cpo_pairs is None:
            return own_forward(*args, **kwargs)
        return vars(_hidden_state_forward(self, cpo_pairs, average, chunk_size))  # a dict: wrappers find its tensors

    model.forward = MethodType(forward, model)  # a bound method, as accelerate's mixed precision expects
    setattr(model, ROUTED, True)


# --------------------------------------------------------------------------- what the hidden-state paths need


def _body_and_head(model: torch.nn.Module):
    """The decoder stack and the output projection of a causal LM."""
    config = model.config
    for key in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, key, None):
            raise ValueError(f"engine.logits=chunked does not support models with {key} "
                             f"({config.model_type}); use engine.logits=full")
    return model.get_decoder(), model.get_output_embeddings()


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
