"""The CPO loss family: pure functions of per-sequence log-probabilities.

Every loss takes the policy's log-probabilities of the chosen and rejected completions
(shape ``[B]``; summed over tokens for ``sigmoid``/``hinge``, averaged for ``ipo``/``simpo``,
see :data:`LENGTH_AVERAGED`) and returns ``(losses, chosen_rewards, rejected_rewards)``, each
of shape ``[B]``. The definitions follow TRL's ``CPOTrainer.cpo_loss`` so that our numbers
are comparable with TRL's; the total objective is ``mean(losses) + cpo_alpha * nll_loss``
(:func:`total_loss`).

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
# Losses whose log-probabilities are averaged over completion tokens (as TRL does).
LENGTH_AVERAGED = frozenset({"ipo", "simpo", "alphapo"})
# Losses that have no notion of label smoothing.
NO_LABEL_SMOOTHING = frozenset({"hinge", "ipo"})


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


def preference_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, spec: LossSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and the implicit rewards of chosen and rejected.

    Rewards are ``beta * logps`` (or ``beta * alphapo_reward(logps)`` when ``alpha != 0``,
    for every loss type, as in TRL). ``alphapo`` is SimPO on the AlphaPO reward shape.
    """
    if spec.alpha != 0.0:
        chosen_r = alphapo_reward(chosen_logps, spec.alpha)
        rejected_r = alphapo_reward(rejected_logps, spec.alpha)
    else:
        chosen_r, rejected_r = chosen_logps, rejected_logps
    logits = chosen_r - rejected_r

    if spec.name in ("simpo", "alphapo"):
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

    With ``cpo_alpha = 0`` the NLL term is dropped from the graph entirely (no gradient), but
    ``nll_loss`` itself is still reported as a diagnostic.
    """
    if cpo_alpha == 0:
        return losses.mean()
    return losses.mean() + cpo_alpha * nll_loss
