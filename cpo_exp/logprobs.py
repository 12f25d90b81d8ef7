"""The log-prob math, in one place: label log-probs (from logits, or straight from hidden states
without the full logits) and their per-sequence sums or means.

Every pair forward (:mod:`cpo_exp.forward`) reduces to the same two steps: the log-probability of
each label that counts (:func:`logits_label_logps` or the fused :func:`label_logps`), then
:func:`sequence_logps` over the flat labels and the index of the sequence each belongs to.

A causal LM's head turns hidden states ``h`` (``[N, H]``) into logits ``h W^T (+ b)``
(``[N, V]``); the losses need only ``log softmax(logits)[label]`` at completion positions.
:func:`label_logps` computes that chunk by chunk over positions and, in the backward pass,
recomputes each chunk's logits instead of keeping them, so at most ``chunk_size x V`` floats
exist at a time (in the spirit of Liger-Kernel's fused linear cross-entropy, in plain
PyTorch so that it runs on CPU and GPU alike). The gradient is the exact one,
``d logp_y / d logits = onehot(y) - softmax(logits)``, so results equal the plain path's to
floating-point rounding.

:func:`mean_logit` gives TRL's ``logits/*`` metric without logits at all: the mean over the
vocabulary of ``h . W_v + b_v`` is ``h . mean_v(W_v) + mean(b)``.
"""

from __future__ import annotations

from typing import Optional

from dataclasses import dataclass

import torch


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs (a half-precision model still gets a float32 softmax)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    # The projection runs in the model's dtype (as the model's own lm_head would), the
    # softmax in float32 (as the plain path's ``logits.float()``).
    logits = h @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits.to(_accumulator(logits.dtype))


class _LabelLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, labels, chunk_size):
        out = torch.empty(h.shape[0], dtype=_accumulator(h.dtype), device=h.device)
        lse = torch.empty_like(out)
        for start in range(0, h.shape[0], chunk_size):
            stop = start + chunk_size
            logits = _chunk_logits(h[start:stop], weight, bias)
            lse[start:stop] = torch.logsumexp(logits, dim=-1)
            out[start:stop] = logits.gather(-1, labels[start:stop, None]).squeeze(-1) - lse[start:stop]
        ctx.save_for_backward(h, weight, bias, labels, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        acc = _accumulator(h.dtype)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for start in range(0, h.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            hc, go = h[start:stop], grad_out[start:stop]
            # d out_i / d logits_i = onehot(y_i) - softmax(logits_i)
            grad_logits = torch.exp(_chunk_logits(hc, weight, bias) - lse[start:stop, None]).mul_(-go[:, None])
            grad_logits.scatter_add_(-1, labels[start:stop, None], go[:, None])
            grad_logits = grad_logits.to(h.dtype)
            if need_h:
                grad_h[start:stop] = grad_logits @ weight
            if need_w:
                grad_w += (grad_logits.t() @ hc).to(acc)
            if need_b:
                grad_b += grad_logits.to(acc).sum(0)
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
        )


def logits_label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[labels]`` per row of ``logits`` (``[N, V]``), in float32 (as TRL)."""
    logits = logits.float()
    return torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def label_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor],
    chunk_size: int,
) -> torch.Tensor:
    """``log softmax(hidden @ weight.T + bias)[labels]`` per row, in (at least) float32, chunk by chunk.

    ``hidden`` is ``[N, H]`` (only the positions whose next token counts), ``labels`` ``[N]``.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=_accumulator(hidden.dtype)) + 0 * weight.sum()
    return _LabelLogps.apply(hidden, weight, bias, labels, chunk_size)


@torch.no_grad()
def mean_logit_direction(weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, float]:
    """``(mean_v W_v, mean_v b_v)``: the mean logit over the vocabulary is ``h . w + b``."""
    w = weight.float().mean(0)
    return w, (float(bias.float().mean()) if bias is not None else 0.0)


@torch.no_grad()
def mean_logit(hidden: torch.Tensor, direction: tuple[torch.Tensor, float]) -> torch.Tensor:
    """Mean over every position of ``hidden`` (any shape ``[..., H]``) and the vocabulary of the logits."""
    w, b = direction
    return (hidden.detach().float() @ w).mean() + b


@dataclass
class SequenceLogps:
    """Per-sequence log-probs of ``2B`` sequences (chosen ``0..B-1``, rejected ``B..2B-1``)."""

    logps: torch.Tensor  # sums, or means over the sequence's labels when length-averaged
    nll_loss: torch.Tensor  # TRL's: cross-entropy averaged over all chosen labels of the batch
    tokens: torch.Tensor  # the labels that count in each sequence (its completion's length)

    @property
    def chosen(self) -> torch.Tensor:
        return self.logps[: self.logps.shape[0] // 2]

    @property
    def rejected(self) -> torch.Tensor:
        return self.logps[self.logps.shape[0] // 2:]


def sequence_logps(per_label: torch.Tensor, seq: torch.Tensor, sequences: int, average: bool) -> SequenceLogps:
    """Sum (or, for the length-normalised losses, mean) of the label log-probs of each sequence.

    ``per_label`` (``[N]``) holds the log-prob of every label that counts, ``seq`` (``[N]``) the
    index of the sequence it belongs to.
    """
    sums = per_label.new_zeros(sequences).index_add(0, seq, per_label)
    counts = torch.bincount(seq, minlength=sequences)
    half = sequences // 2
    return SequenceLogps(logps=sums / counts if average else sums,
                         nll_loss=-sums[:half].sum() / counts[:half].sum(), tokens=counts)
