"""The loss family against hand-computed values and against TRL's own ``CPOTrainer.cpo_loss``."""

import math
from types import SimpleNamespace

import pytest
import torch

from cpo_exp.losses import LOSS_TYPES, LossSpec, alphapo_reward, preference_loss, total_loss

CHOSEN = torch.tensor([-2.0, -5.0, -1.0])
REJECTED = torch.tensor([-3.0, -4.0, -1.5])
DIFF = [1.0, -1.0, 0.5]  # chosen - rejected


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_sigmoid_matches_hand_computation():
    losses, chosen_r, rejected_r = preference_loss(CHOSEN, REJECTED, LossSpec("sigmoid", beta=0.5))
    assert losses.tolist() == pytest.approx([-logsig(0.5 * d) for d in DIFF])
    assert chosen_r.tolist() == pytest.approx([-1.0, -2.5, -0.5])
    assert rejected_r.tolist() == pytest.approx([-1.5, -2.0, -0.75])


def test_sigmoid_label_smoothing_mixes_both_directions():
    eps = 0.2
    losses, _, _ = preference_loss(CHOSEN, REJECTED, LossSpec("sigmoid", beta=0.5, label_smoothing=eps))
    expected = [-(1 - eps) * logsig(0.5 * d) - eps * logsig(-0.5 * d) for d in DIFF]
    assert losses.tolist() == pytest.approx(expected)


def test_hinge_is_relu_of_one_minus_beta_logits():
    losses, _, _ = preference_loss(CHOSEN, REJECTED, LossSpec("hinge", beta=2.0))
    assert losses.tolist() == pytest.approx([max(0.0, 1 - 2.0 * d) for d in DIFF])


def test_ipo_is_squared_distance_to_half_inverse_beta():
    losses, _, _ = preference_loss(CHOSEN, REJECTED, LossSpec("ipo", beta=0.25))
    assert losses.tolist() == pytest.approx([(d - 2.0) ** 2 for d in DIFF])


def test_simpo_subtracts_gamma_over_beta_margin():
    beta, gamma = 2.0, 0.5
    losses, _, _ = preference_loss(CHOSEN, REJECTED, LossSpec("simpo", beta=beta, simpo_gamma=gamma))
    assert losses.tolist() == pytest.approx([-logsig(beta * d - gamma) for d in DIFF])


def test_alphapo_reward_is_one_minus_p_to_the_minus_alpha_over_alpha():
    alpha = 0.25
    p = [math.exp(x) for x in CHOSEN.tolist()]
    expected = [(1 - pi ** (-alpha)) / alpha for pi in p]
    assert alphapo_reward(CHOSEN, alpha).tolist() == pytest.approx(expected)
    losses, chosen_r, rejected_r = preference_loss(
        CHOSEN, REJECTED, LossSpec("alphapo", beta=2.0, simpo_gamma=0.5, alpha=alpha)
    )
    assert chosen_r.tolist() == pytest.approx([2.0 * e for e in expected])
    logits = alphapo_reward(CHOSEN, alpha) - alphapo_reward(REJECTED, alpha)
    assert losses.tolist() == pytest.approx([-logsig(2.0 * x - 0.5) for x in logits.tolist()])


def test_only_length_averaged_losses_average():
    assert {n for n in LOSS_TYPES if LossSpec(n).average_log_prob} == {"ipo", "simpo", "alphapo", "orpo"}


def test_total_loss_adds_weighted_nll():
    losses, nll = torch.tensor([1.0, 3.0]), torch.tensor(4.0)
    assert total_loss(losses, nll, 0.5).item() == pytest.approx(2.0 + 2.0)


def test_simpo_with_zero_alpha_has_no_nll_term():
    nll = torch.tensor(4.0, requires_grad=True)
    loss = total_loss(torch.tensor([1.0, 3.0]), nll, 0.0)
    assert loss.item() == pytest.approx(2.0)
    assert not loss.requires_grad  # the NLL is not in the graph at all


def test_rewards_carry_no_gradient():
    chosen = CHOSEN.clone().requires_grad_()
    losses, chosen_r, _ = preference_loss(chosen, REJECTED, LossSpec("sigmoid"))
    assert losses.requires_grad and not chosen_r.requires_grad


# --------------------------------------------------------------------------- against TRL

TRL_CASES = [
    dict(name="sigmoid", beta=0.1),
    dict(name="sigmoid", beta=0.5, label_smoothing=0.3),
    dict(name="hinge", beta=0.7),
    dict(name="ipo", beta=0.5),
    dict(name="simpo", beta=2.0, simpo_gamma=0.5),
    dict(name="simpo", beta=2.0, simpo_gamma=1.0, label_smoothing=0.1),
    dict(name="sigmoid", beta=0.1, alpha=0.3),
    dict(name="alphapo", beta=2.0, simpo_gamma=0.5, alpha=0.25),
]


@pytest.mark.parametrize("case", TRL_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_losses_and_rewards_equal_trl_cpo_loss(trl, case):
    spec = LossSpec(**case)
    trl_type = "simpo" if spec.name == "alphapo" else spec.name  # TRL's alphapo is simpo + alpha
    fake_trainer = SimpleNamespace(
        alpha=spec.alpha, loss_type=trl_type, beta=spec.beta, simpo_gamma=spec.simpo_gamma,
        label_smoothing=spec.label_smoothing, accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    generator = torch.Generator().manual_seed(0)
    chosen = -torch.rand(16, generator=generator, dtype=torch.float64) * 3
    rejected = -torch.rand(16, generator=generator, dtype=torch.float64) * 3
    expected = trl.experimental.cpo.CPOTrainer.cpo_loss(fake_trainer, chosen, rejected)
    ours = preference_loss(chosen, rejected, spec)
    assert len(ours) == len(expected) == 3  # (losses, chosen_rewards, rejected_rewards)
    for mine, theirs in zip(ours, expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)
