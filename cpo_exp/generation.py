"""Evaluate what the model generates: greedy (or sampled) completions for a fixed subset of eval
prompts, scored against the ``chosen`` completion as reference by the scorers of
:mod:`cpo_exp.scorers`. Metrics are logged as ``eval_gen/<scorer>``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from cpo_exp.config import EvalConfig
from cpo_exp.data import to_standard
from cpo_exp.scorers import METRIC_PREFIX, resolve_scorer

@dataclass(frozen=True)
class SamplingSpec:
    """How to generate: greedy unless ``do_sample``."""

    max_new_tokens: int = EvalConfig.max_new_tokens
    do_sample: bool = EvalConfig.do_sample
    temperature: float = EvalConfig.temperature
    top_p: float = EvalConfig.top_p
    batch_size: int = EvalConfig.batch_size
    seed: int = EvalConfig.seed


def prompt_ids(tokenizer, prompt: str, encoder_decoder: bool = False) -> list[int]:
    """The prompt as the model saw it in training (see ``cpo_exp.data``): for a causal LM BOS
    (once) then the prompt tokens; for an encoder-decoder the tokenizer's own encoding."""
    if encoder_decoder:
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] + ids if bos is not None and (not ids or ids[0] != bos) else ids


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], spec: SamplingSpec) -> list[str]:
    """Completions for ``prompts``, batched with left padding, without touching the global RNG.

    Sampling draws from a forked RNG seeded with ``spec.seed``, so generating during training
    leaves the training run's random stream (dropout, data order) exactly as it was.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs: list[str] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(spec.seed)
        for start in range(0, len(prompts), spec.batch_size):
            encoded = [prompt_ids(tokenizer, p, model.config.is_encoder_decoder)
                       for p in prompts[start:start + spec.batch_size]]
            width = max(len(e) for e in encoded)
            input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros_like(input_ids)
            for row, ids in enumerate(encoded):
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention[row, width - len(ids):] = 1
            sampling = {"temperature": spec.temperature, "top_p": spec.top_p} if spec.do_sample else {}
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device),
                max_new_tokens=spec.max_new_tokens, do_sample=spec.do_sample,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling,
            )
            # A causal LM echoes the prompt; an encoder-decoder returns only the decoded tokens.
            new_tokens = generated if model.config.is_encoder_decoder else generated[:, width:]
            outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    model.train(was_training)
    return outputs


class GenerationEval:
    """Generates for a fixed, seeded subset of eval rows (any data format) at each evaluation
    and scores it.

    ``log_table(rows, step)`` receives the samples (step, prompt, generated, chosen, rejected).
    """

    def __init__(
        self,
        tokenizer,
        rows: Sequence[dict[str, Any]],
        num_prompts: int,
        spec: SamplingSpec,
        scorers: Sequence[str] = ("chrf", "bleu", "len_ratio"),
        log_table: Optional[Callable[[dict[str, list], int], None]] = None,
    ):
        picked = sorted(random.Random(spec.seed).sample(range(len(rows)), k=min(num_prompts, len(rows))))
        # Conversational rows become the strings the model was trained on (chat template applied).
        self.rows = [to_standard(rows[i], tokenizer) for i in picked]
        self.tokenizer = tokenizer
        self.spec = spec
        self.scorers = {name: resolve_scorer(name) for name in scorers}
        self.log_table = log_table

    def __call__(self, model, step: int) -> dict[str, float]:
        hypotheses = [h.strip() for h in generate(model, self.tokenizer, [r["prompt"] for r in self.rows], self.spec)]
        references = [r["chosen"].strip() for r in self.rows]
        metrics = {METRIC_PREFIX + name: float(fn(hypotheses, references)) for name, fn in self.scorers.items()}
        if self.log_table is not None:
            self.log_table(
                {
                    "step": [step] * len(self.rows),
                    "prompt": [r["prompt"] for r in self.rows],
                    "generated": hypotheses,
                    "chosen": [r["chosen"] for r in self.rows],
                    "rejected": [r["rejected"] for r in self.rows],
                },
                step,
            )
        return metrics
