"""The CPO loss family: pure functions of per-sequence log-probabilities.

Every loss takes the policy's log-probabilities of the chosen and rejected completions
(shape ``[B]``; summed over tokens for ``sigmoid``/``hinge``/``dpo``, averaged for
``ipo``/``simpo``/``alphapo``/``orpo``, see :data:`LENGTH_AVERAGED`) and returns
``(losses, chosen_rewards, rejected_rewards)``, each of shape ``[B]``. ``dpo`` also takes a
frozen reference model's log-probs of the same completions (:data:`REFERENCE_LOSSES`). The
definitions follow TRL's ``CPOTrainer.cpo_loss``, ``ORPOTrainer.odds_ratio_loss`` and
``DPOTrainer`` (``loss_type="sigmoid"``) so that our numbers are comparable with TRL's; the
total objective is always ``mean(losses) + cpo_alpha * nll_loss`` (:func:`total_loss`), with
one NLL for every loss: the cross-entropy over the chosen completion tokens.

References:
    CPO     Xu et al. 2024, "Contrastive Preference Optimization", arXiv:2401.08417.
    SimPO   Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
            Reward", arXiv:2405.14734.
    IPO     Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
            Human Preferences", arXiv:2310.12036.
    SLiC    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
            arXiv:2305.10425.
    AlphaPO Gupta et al. 2025, "AlphaPO: Reward Shape Matters for LLM Alignment",
            arXiv:2501.03884.
    ORPO    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
            Model", arXiv:2403.07691.
    DPO     Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
            Secretly a Reward Model", arXiv:2305.18290.
    cDPO    Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO",
            https://ericmitchell.ai/cdpo.pdf.
    RPO     Pang et al. 2024, "Iterative Reasoning Preference Optimization", arXiv:2404.19733
            (DPO plus an NLL term on the chosen completion: ``loss=dpo cpo_alpha=1``).
    log1mexp  Mächler 2012, "Accurately Computing log(1 - exp(-|a|)) Assessed by the Rmpfr
            package", a vignette of the R package Rmpfr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo", "orpo", "dpo")
# Losses whose log-probabilities are averaged over completion tokens (as TRL does).
LENGTH_AVERAGED = frozenset({"ipo", "simpo", "alphapo", "orpo"})
# Losses that have no notion of label smoothing.
NO_LABEL_SMOOTHING = frozenset({"hinge", "ipo", "orpo"})
# Losses measured against a frozen reference model: they need its log-probs of every pair.
REFERENCE_LOSSES = frozenset({"dpo"})
# Losses with a reward of their own, to which AlphaPO's reward shape (``alpha``) does not apply.
NO_REWARD_SHAPE = frozenset({"orpo", "dpo"})
# Losses with SimPO's target reward margin (``simpo_gamma``).
MARGIN_LOSSES = frozenset({"simpo", "alphapo"})


@dataclass(frozen=True)
class LossSpec:
    """The knobs of one loss variant, with TRL's CPOConfig defaults."""

    name: str = "sigmoid"
    beta: float = 0.1
    cpo_alpha: float = 1.0
    simpo_gamma: float = 0.5
    label_smoothing: float = 0.0
    alpha: float = 0.0

    @property
    def average_log_prob(self) -> bool:
        return self.name in LENGTH_AVERAGED

    @property
    def reference(self) -> bool:
        """Whether the loss needs a reference model's log-probs (``ref_*_logps``)."""
        return self.name in REFERENCE_LOSSES


def alphapo_reward(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO reward shape ``r = (1 - p^(-alpha)) / alpha`` with ``p = exp(logps)``.

    Written as ``-expm1(-alpha * logps) / alpha`` (the same value, since
    ``p^(-alpha) = exp(-alpha * logps)``) so that it stays accurate for small ``alpha``.
    """
    return -torch.expm1(-alpha * logps) / alpha


def sigmoid_loss(logits: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """CPO's preference term (Xu et al. 2024, eq. 3), optionally label-smoothed.

    ``-(1 - eps) * log sigmoid(beta * logits) - eps * log sigmoid(-beta * logits)``,
    where ``logits = r_chosen - r_rejected``.
    """
    return (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing)
        - F.logsigmoid(-beta * logits) * label_smoothing
    )


def hinge_loss(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC hinge (Zhao et al. 2023): ``relu(1 - beta * logits)``."""
    return torch.relu(1 - beta * logits)


def ipo_loss(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17) with ``beta`` as tau: ``(logits - 1 / (2 * beta))^2``."""
    return (logits - 1 / (2 * beta)) ** 2


def simpo_loss(
    logits: torch.Tensor, beta: float, gamma: float, label_smoothing: float = 0.0
) -> torch.Tensor:
    """SimPO (Meng et al. 2024): the sigmoid loss on ``logits - gamma / beta``.

    ``beta * (logits - gamma / beta) = beta * logits - gamma``, i.e. a target reward margin
    ``gamma`` between length-averaged log-probabilities scaled by ``beta``.
    """
    return sigmoid_loss(logits - gamma / beta, beta, label_smoothing)


_LN2 = math.log(2)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for log-probabilities ``x <= 0``, accurate over the whole range.

    The standard two-branch form (Mächler 2012): near 0 (``x > -ln 2``) ``1 - exp(x)`` cancels,
    so it is ``log(-expm1(x))``; below, ``exp(x) < 1/2`` and ``log1p(-exp(x))`` is the accurate one.
    Each branch sees only its own inputs (the other gets ``-ln 2``, where both are exact): a
    ``torch.where`` over two full branches has a NaN gradient wherever the unused branch is
    infinite, which TRL's ``log1mexp`` hits for every ``x >= -2**-25`` (-3e-8) in float32, where
    ``exp(x)`` rounds to 1.

    ``x`` is first clamped to ``<= -tiny`` (``torch.finfo(x.dtype).tiny``, the smallest normal
    float: 1.2e-38 in float32). An average log-prob of exactly 0 (every token predicted with
    probability 1 in float) would give ``log(0) = -inf`` and an infinite ORPO loss; clamped, it
    gives ``log(tiny)`` (-87.3 in float32) and a zero gradient. Every normal ``x < 0`` is
    left as it is, so the value is TRL's wherever TRL's is finite.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = x > -_LN2
    near = torch.log(-torch.expm1(torch.where(near_zero, x, -_LN2)))
    far = torch.log1p(-torch.exp(torch.where(near_zero, -_LN2, x)))
    return torch.where(near_zero, near, far)


def orpo_log_odds(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    """ORPO's log odds ratio (Hong et al. 2024, eq. 4 and 7), one per pair.

    ``log(odds(y_w) / odds(y_l))`` with ``odds(y) = P(y) / (1 - P(y))`` and ``P(y) = exp(logps)``
    the length-averaged likelihood, i.e.
    ``(logps_w - logps_l) - (log1mexp(logps_w) - log1mexp(logps_l))``. Computed in float32 at
    least (as TRL): ``expm1`` near 0 in bfloat16 keeps 3 significant digits.
    """
    dtype = torch.promote_types(chosen_logps.dtype, torch.float32)
    chosen, rejected = chosen_logps.to(dtype), rejected_logps.to(dtype)
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


def orpo_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, eq. 6-7) with ``beta`` as the paper's lambda.

    ``losses = -beta * log sigmoid(log_odds)`` (:func:`orpo_log_odds`, length-averaged
    log-probs); rewards ``beta * logps``. ORPO's objective is ``nll + mean(losses)``
    (:func:`total_loss` with ``cpo_alpha = 1``). TRL's ``odds_ratio_loss`` returns the opposite
    sign (``beta * log sigmoid(log_odds)``) and subtracts its mean from the NLL: the same total.
    """
    losses = -beta * F.logsigmoid(orpo_log_odds(chosen_logps, rejected_logps))
    chosen = chosen_logps.to(losses.dtype)
    rejected = rejected_logps.to(losses.dtype)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7) on summed log-probs, conservative with ``label_smoothing``.

    The implicit rewards are ``r = beta * (logps - ref_logps)`` and
    ``losses = -log sigmoid(r_chosen - r_rejected)``, TRL's ``DPOTrainer`` with
    ``loss_type="sigmoid"``. With ``label_smoothing = eps > 0`` it is cDPO (Mitchell 2023,
    eq. 3), DPO for labels flipped with probability ``eps``:
    ``-(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)``, ``h = r_chosen - r_rejected``.
    (TRL 1.16 ignores ``label_smoothing`` for ``sigmoid``; earlier TRL versions computed cDPO.)
    At the first step the policy is the reference: rewards 0, every loss ``log 2``.
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    losses = sigmoid_loss(chosen_logratios - rejected_logratios, beta, label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    spec: LossSpec,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and the implicit rewards of chosen and rejected.

    Rewards are ``beta * logps`` (or ``beta * alphapo_reward(logps)`` when ``alpha != 0``,
    for the CPO-family loss types, as in TRL). ``alphapo`` is SimPO on the AlphaPO reward
    shape. A loss in :data:`REFERENCE_LOSSES` (``dpo``) needs the reference model's log-probs
    of the same completions, summed the same way; the others refuse them.
    """
    given = ref_chosen_logps is not None, ref_rejected_logps is not None
    if spec.reference and not all(given):
        raise ValueError(f"loss={spec.name} is measured against a reference model: pass both "
                         "ref_chosen_logps and ref_rejected_logps (the reference model's log-probs of the pairs)")
    if not spec.reference and any(given):
        raise ValueError(f"loss={spec.name} has no reference model, but reference log-probs were passed; "
                         f"the losses with a reference are: {', '.join(sorted(REFERENCE_LOSSES))}")
    if spec.alpha != 0.0 and spec.name in NO_REWARD_SHAPE:
        raise ValueError(f"alpha={spec.alpha} (AlphaPO's reward shape) has no meaning for loss={spec.name}")
    if spec.name == "orpo":
        return orpo_loss(chosen_logps, rejected_logps, spec.beta)
    if spec.name == "dpo":
        return dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, spec.beta,
                        spec.label_smoothing)

    if spec.alpha != 0.0:
        chosen_r = alphapo_reward(chosen_logps, spec.alpha)
        rejected_r = alphapo_reward(rejected_logps, spec.alpha)
    else:
        chosen_r, rejected_r = chosen_logps, rejected_logps
    logits = chosen_r - rejected_r

    if spec.name in MARGIN_LOSSES:
        losses = simpo_loss(logits, spec.beta, spec.simpo_gamma, spec.label_smoothing)
    elif spec.name == "sigmoid":
        losses = sigmoid_loss(logits, spec.beta, spec.label_smoothing)
    elif spec.name == "hinge":
        losses = hinge_loss(logits, spec.beta)
    elif spec.name == "ipo":
        losses = ipo_loss(logits, spec.beta)
    else:
        raise ValueError(f"unknown loss {spec.name!r}; valid: {', '.join(LOSS_TYPES)}")
    return losses, spec.beta * chosen_r.detach(), spec.beta * rejected_r.detach()


def total_loss(losses: torch.Tensor, nll_loss: torch.Tensor, cpo_alpha: float) -> torch.Tensor:
    """The training objective: ``mean(losses) + cpo_alpha * nll_loss``.

    ``cpo_alpha`` is the NLL weight of every loss: CPO's (1 in TRL), ORPO's (1: the paper's
    ``L_SFT + lambda * L_OR``, lambda being ``beta``), RPO's when added to DPO (TRL's ``sft``
    loss weight; plain DPO has none: 0). With ``cpo_alpha = 0`` the NLL term is dropped from
    the graph entirely (no gradient), but ``nll_loss`` itself is still reported as a diagnostic.
    """
    if cpo_alpha == 0:
        return losses.mean()
    return losses.mean() + cpo_alpha * nll_loss
