"""The scorer registry of generation during evaluation: ``chrf`` and ``bleu`` (corpus level,
sacreBLEU), ``len_ratio``, ``exact_match``, and any ``module:function`` named in ``eval.scorers``
whose signature is ``fn(hypotheses: list[str], references: list[str]) -> float``.

Kept apart from :mod:`cpo_exp.generation` (which needs torch and the data pipeline) so that the
config's validation can check scorer names cheaply.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

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
