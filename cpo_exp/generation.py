"""Evaluate what the model generates: greedy (or sampled) completions for a fixed subset of eval
prompts, scored against the ``chosen`` completion as reference.

Scorers live in a registry: ``chrf`` and ``bleu`` (corpus level, sacreBLEU), ``len_ratio``,
``exact_match``, and any ``module:function`` named in ``eval.scorers`` whose signature is
``fn(hypotheses: list[str], references: list[str]) -> float``. Metrics are logged as
``eval_gen/<scorer>``.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

Scorer = Callable[[list[str], list[str]], float]
SCORERS: dict[str, Scorer] = {}
METRIC_PREFIX = "eval_gen/"


def scorer(name: str) -> Callable[[Scorer], Scorer]:
    """Register ``fn(hypotheses, references) -> float`` under ``name``."""

    def register(fn: Scorer) -> Scorer:
        SCORERS[name] = fn
        return fn

    return register


@scorer("chrf")
def chrf(hypotheses: list[str], references: list[str]) -> float:
    """Corpus chrF (Popović 2015) via sacreBLEU."""
    from sacrebleu.metrics import CHRF

    return CHRF().corpus_score(hypotheses, [references]).score


@scorer("bleu")
def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (Papineni et al. 2002) via sacreBLEU."""
    from sacrebleu.metrics import BLEU

    return BLEU().corpus_score(hypotheses, [references]).score


@scorer("len_ratio")
def len_ratio(hypotheses: list[str], references: list[str]) -> float:
    """Total hypothesis length over total reference length, in whitespace words."""
    reference_words = sum(len(r.split()) for r in references)
    return sum(len(h.split()) for h in hypotheses) / max(1, reference_words)


@scorer("exact_match")
def exact_match(hypotheses: list[str], references: list[str]) -> float:
    """Share of hypotheses equal to their reference (after stripping whitespace)."""
    return sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / max(1, len(references))


def resolve_scorer(name: str) -> Scorer:
    """A registered scorer, or ``package.module:function`` imported on demand."""
    if name in SCORERS:
        return SCORERS[name]
    module, sep, attribute = name.partition(":")
    if not sep:
        raise ValueError(f"unknown scorer {name!r}: registered are {sorted(SCORERS)}, or give 'module:function'")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"scorer {name!r} cannot be imported: {err}") from None


def sacrebleu_signatures() -> dict[str, str]:
    """The sacreBLEU signatures that make the chrF/BLEU numbers reproducible."""
    from sacrebleu.metrics import BLEU, CHRF

    signatures = {}
    for name, metric in (("chrf", CHRF()), ("bleu", BLEU())):
        metric.corpus_score(["x"], [["x"]])  # the signature records nrefs, known only after scoring
        signatures[name] = str(metric.get_signature())
    return signatures


@dataclass(frozen=True)
class SamplingSpec:
    """How to generate: greedy unless ``do_sample``."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0


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
        from cpo_exp.data import to_standard

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
