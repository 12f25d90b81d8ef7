"""ORPO and DPO in the loss group: hand-computed values, the stable log1mexp, the presets, and
parity with TRL 1.16's ``ORPOTrainer`` and ``DPOTrainer`` (``loss_type=sigmoid``, and with ``sft``
for RPO): on log-prob tensors, and on the tiny model with the same token ids fed to both sides
(metrics, loss, gradients, reference log-probs). The real CLI runs are in test_baselines_cli.py."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cpo_exp.cli import config_dir
from cpo_exp.config import Config, ConfigError, EngineConfig, ModelConfig, TrainConfig, validate
from cpo_exp.data import PairRows, PreferenceCollator, SequenceLengths, tokenize_dataset, tokenize_row
from cpo_exp.forward import pair_collator
from cpo_exp.engine import new_accelerator, pair_loss, pair_step
from cpo_exp.losses import (
    LOSS_TYPES,
    LossSpec,
    dpo_loss,
    log1mexp,
    orpo_log_odds,
    orpo_loss,
    preference_loss,
    total_loss,
)
from cpo_exp.metrics import pair_metrics
from cpo_exp.models import load_model, load_tokenizer
from cpo_exp.reference import with_reference

CPU = torch.device("cpu")


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def metrics_of(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, log_odds=None, loss=None):
    zero = torch.tensor(0.0)
    return pair_metrics(zero if loss is None else loss, zero, chosen_rewards, rejected_rewards,
                        chosen_logps, rejected_logps, zero, zero, log_odds=log_odds)


# --------------------------------------------------------------------------- log1mexp

def log1mexp_reference(x: float) -> float:
    """``log(1 - e^x)`` in float64 by series, not by the formula under test: near 0
    ``1 - e^x = -x (1 + x/2 + x^2/6 + x^3/24 + ...)``; far below ``log(1 - y) = -sum y^k / k``
    with ``y = e^x <= 1/2``; between, the direct form (its cancellation costs at most
    ``1e-16 / (1 - e^x)`` relative, < 1e-12 there)."""
    if x > -1e-4:
        return math.log(-x) + math.log1p(x / 2 + x * x / 6 + x ** 3 / 24)
    if x > -math.log(2):
        return math.log(1 - math.exp(x))
    return -sum(math.exp(k * x) / k for k in range(1, 80))


LOG1MEXP_POINTS = [-1e-30, -1e-20, -1e-12, -1e-8, -3e-8, -1e-6, -1e-3, -0.3, -math.log(2), -0.7, -3.0, -20.0, -80.0]


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-6), (torch.float64, 1e-12)], ids=["float32", "float64"])
def test_log1mexp_is_accurate_from_near_zero_to_far_below(dtype, rtol):
    x = torch.tensor(LOG1MEXP_POINTS, dtype=dtype)
    ours = log1mexp(x).tolist()
    for xi, got in zip(x.tolist(), ours):  # the rounded input, so that only log1mexp's error counts
        assert got == pytest.approx(log1mexp_reference(xi), rel=rtol, abs=1e-300), xi


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_log1mexp_of_exactly_zero_is_log_of_the_smallest_normal_float(dtype):
    x = torch.tensor([0.0], dtype=dtype, requires_grad=True)
    value = log1mexp(x)
    value.sum().backward()
    assert value.item() == pytest.approx(math.log(torch.finfo(dtype).tiny))  # -87.3 in float32
    assert x.grad.item() == 0.0


def test_log1mexp_has_a_finite_gradient_next_to_zero():
    """d/dx log(1 - e^x) = e^x / (e^x - 1), about 1/x near 0; no NaN from the unused branch."""
    x = torch.tensor([-1e-30, -1e-8, -2e-8, -0.5, -3.0], requires_grad=True)
    log1mexp(x).sum().backward()
    expected = [math.exp(v) / math.expm1(v) for v in x.tolist()]
    assert x.grad.tolist() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- ORPO by hand

# Length-averaged likelihoods P and their odds P / (1 - P): 0.5 vs 0.25 (odds 1 vs 1/3),
# 0.9 vs 0.1 (9 vs 1/9), 0.2 vs 0.8 (1/4 vs 4, a pair the model gets wrong).
ORPO_CHOSEN = torch.tensor([math.log(0.5), math.log(0.9), math.log(0.2)], dtype=torch.float64)
ORPO_REJECTED = torch.tensor([math.log(0.25), math.log(0.1), math.log(0.8)], dtype=torch.float64)
ORPO_LOG_ODDS = [math.log(3), math.log(81), math.log(1 / 16)]
# log sigmoid(log r) = log(r / (1 + r)): 3/4, 81/82, 1/17.
ORPO_LOGSIG = [math.log(3 / 4), math.log(81 / 82), math.log(1 / 17)]


def test_orpo_log_odds_is_the_log_ratio_of_the_odds():
    assert orpo_log_odds(ORPO_CHOSEN, ORPO_REJECTED).tolist() == pytest.approx(ORPO_LOG_ODDS, rel=1e-12)


def test_orpo_loss_is_beta_times_minus_log_sigmoid_of_the_log_odds():
    beta = 0.1
    losses, chosen_r, rejected_r = orpo_loss(ORPO_CHOSEN, ORPO_REJECTED, beta)
    assert losses.tolist() == pytest.approx([-beta * v for v in ORPO_LOGSIG], rel=1e-12)
    assert chosen_r.tolist() == pytest.approx([beta * math.log(p) for p in (0.5, 0.9, 0.2)])
    assert rejected_r.tolist() == pytest.approx([beta * math.log(p) for p in (0.25, 0.1, 0.8)])
    spec_losses, _, _ = preference_loss(ORPO_CHOSEN, ORPO_REJECTED, LossSpec("orpo", beta=beta))
    assert torch.equal(spec_losses, losses)


def test_orpo_objective_is_nll_plus_the_mean_odds_ratio_term():
    losses, _, _ = orpo_loss(ORPO_CHOSEN, ORPO_REJECTED, 0.1)
    nll = torch.tensor(2.0, dtype=torch.float64)
    assert total_loss(losses, nll, 1.0).item() == pytest.approx(2.0 - 0.1 * sum(ORPO_LOGSIG) / 3)


def test_orpo_metrics_are_trls_log_odds_ratio_and_log_odds_chosen():
    _, chosen_r, rejected_r = orpo_loss(ORPO_CHOSEN, ORPO_REJECTED, 0.1)
    metrics = metrics_of(chosen_r, rejected_r, ORPO_CHOSEN, ORPO_REJECTED,
                         log_odds=orpo_log_odds(ORPO_CHOSEN, ORPO_REJECTED))
    assert metrics["log_odds_ratio"].item() == pytest.approx(sum(ORPO_LOGSIG) / 3)  # not scaled by beta
    assert metrics["log_odds_chosen"].item() == pytest.approx(sum(ORPO_LOG_ODDS) / 3)
    assert metrics["rewards/accuracies"].item() == pytest.approx(2 / 3)


def test_metrics_without_log_odds_have_no_orpo_metrics():
    one = torch.tensor([1.0])
    assert "log_odds_ratio" not in metrics_of(one, one, one, one)


def test_orpo_stays_finite_at_an_averaged_log_prob_of_zero():
    chosen = torch.tensor([0.0, -0.5], requires_grad=True)
    rejected = torch.tensor([-0.2, 0.0], requires_grad=True)
    losses, _, _ = orpo_loss(chosen, rejected, 0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    # A rejected completion the model is certain of: log odds log(1 - P) = log(tiny), about -87.3.
    tiny = math.log(torch.finfo(torch.float32).tiny)
    assert losses[1].item() == pytest.approx(-0.1 * logsig(-0.5 - log1mexp_reference(-0.5) + tiny), rel=1e-5)


# --------------------------------------------------------------------------- DPO by hand

POLICY_CHOSEN = torch.tensor([-10.0, -20.0, -7.0], dtype=torch.float64)
POLICY_REJECTED = torch.tensor([-12.0, -15.0, -9.0], dtype=torch.float64)
REF_CHOSEN = torch.tensor([-11.0, -18.0, -7.5], dtype=torch.float64)
REF_REJECTED = torch.tensor([-11.0, -16.0, -9.5], dtype=torch.float64)
# log-ratios: chosen [1, -2, 0.5], rejected [-1, 1, 0.5]; h = chosen - rejected = [2, -3, 0].
CHOSEN_RATIOS, REJECTED_RATIOS, H = [1.0, -2.0, 0.5], [-1.0, 1.0, 0.5], [2.0, -3.0, 0.0]


def test_dpo_rewards_are_beta_times_the_log_ratio_to_the_reference():
    beta = 0.5
    losses, chosen_r, rejected_r = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta)
    assert losses.tolist() == pytest.approx([-logsig(beta * h) for h in H], rel=1e-12)
    assert chosen_r.tolist() == pytest.approx([beta * r for r in CHOSEN_RATIOS])
    assert rejected_r.tolist() == pytest.approx([beta * r for r in REJECTED_RATIOS])


def test_dpo_accuracy_is_strict_so_a_tie_is_not_a_win():
    _, chosen_r, rejected_r = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, 0.5)
    metrics = metrics_of(chosen_r, rejected_r, POLICY_CHOSEN, POLICY_REJECTED)
    assert metrics["rewards/accuracies"].item() == pytest.approx(1 / 3)  # h = 2 wins, -3 loses, 0 ties
    assert metrics["rewards/margins"].item() == pytest.approx(0.5 * sum(H) / 3)


def test_dpo_at_the_first_step_has_zero_rewards_and_loss_log_2():
    """The policy starts as the reference: rewards, margins and accuracy 0, every loss log 2."""
    logps_chosen, logps_rejected = torch.tensor([-31.5, -4.25]), torch.tensor([-12.0, -80.0])
    spec = LossSpec("dpo", beta=0.1, cpo_alpha=0.0)
    losses, chosen_r, rejected_r = preference_loss(logps_chosen, logps_rejected, spec,
                                                   ref_chosen_logps=logps_chosen.clone(),
                                                   ref_rejected_logps=logps_rejected.clone())
    loss = total_loss(losses, torch.tensor(3.0), spec.cpo_alpha)
    metrics = metrics_of(chosen_r, rejected_r, logps_chosen, logps_rejected, loss=loss)
    assert metrics["rewards/chosen"].item() == 0.0 and metrics["rewards/rejected"].item() == 0.0
    assert metrics["rewards/margins"].item() == 0.0
    assert metrics["rewards/accuracies"].item() == 0.0
    assert metrics["loss"].item() == pytest.approx(math.log(2), rel=1e-7)


def test_cdpo_is_dpo_for_labels_flipped_with_probability_eps():
    beta, eps = 0.5, 0.1
    losses, _, _ = preference_loss(POLICY_CHOSEN, POLICY_REJECTED, LossSpec("dpo", beta=beta, label_smoothing=eps),
                                   ref_chosen_logps=REF_CHOSEN, ref_rejected_logps=REF_REJECTED)
    expected = [-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h) for h in H]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_rpo_is_dpo_plus_the_chosen_nll():
    losses, _, _ = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, 0.5)
    nll = torch.tensor(1.5, dtype=torch.float64)
    assert total_loss(losses, nll, 1.0).item() == pytest.approx(sum(-logsig(0.5 * h) for h in H) / 3 + 1.5)


def test_dpo_without_reference_log_probs_is_refused():
    with pytest.raises(ValueError, match="loss=dpo is measured against a reference model"):
        preference_loss(POLICY_CHOSEN, POLICY_REJECTED, LossSpec("dpo"))
    with pytest.raises(ValueError, match="pass both ref_chosen_logps and ref_rejected_logps"):
        preference_loss(POLICY_CHOSEN, POLICY_REJECTED, LossSpec("dpo"), ref_chosen_logps=REF_CHOSEN)


@pytest.mark.parametrize("name", ["sigmoid", "simpo", "orpo"])
def test_reference_free_losses_refuse_reference_log_probs(name):
    with pytest.raises(ValueError, match=f"loss={name} has no reference model"):
        preference_loss(POLICY_CHOSEN, POLICY_REJECTED, LossSpec(name), ref_chosen_logps=REF_CHOSEN,
                        ref_rejected_logps=REF_REJECTED)


@pytest.mark.parametrize("name", ["orpo", "dpo"])
def test_alphapo_reward_shape_is_refused_for_orpo_and_dpo(name):
    refs = dict(ref_chosen_logps=REF_CHOSEN, ref_rejected_logps=REF_REJECTED) if name == "dpo" else {}
    with pytest.raises(ValueError, match=f"no meaning for loss={name}"):
        preference_loss(POLICY_CHOSEN, POLICY_REJECTED, LossSpec(name, alpha=0.25), **refs)


def test_orpo_averages_log_probs_dpo_sums_them_and_only_dpo_has_a_reference():
    assert LossSpec("orpo").average_log_prob and not LossSpec("dpo").average_log_prob
    assert {n for n in LOSS_TYPES if LossSpec(n).reference} == {"dpo"}


def test_dpo_rewards_and_orpo_rewards_carry_no_gradient():
    chosen = POLICY_CHOSEN.clone().requires_grad_()
    losses, chosen_r, _ = dpo_loss(chosen, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, 0.1)
    assert losses.requires_grad and not chosen_r.requires_grad
    losses, chosen_r, _ = orpo_loss(ORPO_CHOSEN.clone().requires_grad_(), ORPO_REJECTED, 0.1)
    assert losses.requires_grad and not chosen_r.requires_grad


# --------------------------------------------------------------------------- the presets

def compose_config(overrides: list[str]) -> Config:
    with initialize_config_dir(config_dir=config_dir()):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def test_orpo_preset_composes_with_trls_beta_and_an_nll_weight_of_one():
    cfg = compose_config(["loss=orpo"])
    validate(cfg)
    spec = cfg.loss_spec()
    assert (spec.name, spec.beta, spec.cpo_alpha, spec.average_log_prob) == ("orpo", 0.1, 1.0, True)


def test_dpo_preset_composes_without_nll_and_rpo_is_an_explicit_cpo_alpha():
    cfg = compose_config(["loss=dpo"])
    validate(cfg)
    spec = cfg.loss_spec()
    assert (spec.name, spec.beta, spec.cpo_alpha, spec.reference) == ("dpo", 0.1, 0.0, True)
    assert compose_config(["loss=dpo", "cpo_alpha=1"]).cpo_alpha == 1.0


def test_dpo_with_label_smoothing_validates_as_cdpo():
    cfg = compose_config(["loss=dpo", "label_smoothing=0.1"])
    validate(cfg)
    assert cfg.loss_spec().label_smoothing == 0.1


def test_orpo_metrics_can_be_the_sweep_objective_only_for_orpo():
    validate(compose_config(["loss=orpo", "objective.metric=eval_log_odds_ratio"]))
    with pytest.raises(ConfigError, match="objective.metric must be one of"):
        validate(compose_config(["loss=sigmoid", "objective.metric=eval_log_odds_ratio"]))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["loss=orpo", "label_smoothing=0.1"], "label_smoothing=0.1 has no meaning for loss=orpo"),
        (["loss=orpo", "alpha=0.25"], "alpha=0.25 has no meaning for loss=orpo"),
        (["loss=dpo", "alpha=0.25"], "alpha=0.25 has no meaning for loss=dpo"),
        (["loss=dpo", "label_smoothing=0.5"], "label_smoothing must be in [0, 0.5)"),
    ],
)
def test_impossible_orpo_and_dpo_combinations_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    assert message in str(err.value)


@pytest.mark.parametrize("preset,expected", [
    ("dpo_simpo_paper", ("dpo", 0.01, 0.0)),  # beta from the Zephyr DPO recipe the SimPO authors followed
    ("orpo_simpo_paper", ("orpo", 0.1, 1.0)),  # lambda of kaist-ai/mistral-orpo-beta, NLL weight 1
])
def test_simpo_paper_baseline_presets_compose_validate_and_set_only_the_loss(preset, expected):
    cfg = compose_config([f"experiment={preset}"])
    validate(cfg)
    assert (cfg.loss.name, cfg.beta, cfg.cpo_alpha) == expected
    assert cfg.label_smoothing == 0.0 and cfg.alpha == 0.0
    assert cfg.train == compose_config([]).train  # the schedule stays the model's


def test_loss_variants_sweep_lists_every_loss_and_each_job_validates():
    with initialize_config_dir(config_dir=config_dir()):
        hydra_cfg = compose("config", overrides=["sweep=loss_variants"], return_hydra_config=True)
    losses = str(hydra_cfg.hydra.sweeper.params.loss).split(",")
    assert sorted(losses) == sorted(LOSS_TYPES)
    for name in ("orpo", "dpo"):
        validate(compose_config(["sweep=loss_variants", f"loss={name}"]))


@pytest.fixture
def trl_configs():
    orpo = pytest.importorskip("trl.experimental.orpo", reason="TRL (a test dependency) is not installed")
    dpo = pytest.importorskip("trl", reason="TRL (a test dependency) is not installed")
    return orpo.ORPOConfig, dpo.DPOConfig


def trl_defaults(config_cls, *keys: str) -> dict:
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    return {key: fields[key].default if fields[key].default is not dataclasses.MISSING
            else fields[key].default_factory() for key in keys}


def test_presets_carry_trls_orpo_and_dpo_defaults(trl_configs):
    orpo_cls, dpo_cls = trl_configs
    orpo_config = trl_defaults(orpo_cls, "beta")
    dpo_config = trl_defaults(dpo_cls, "beta", "loss_type", "loss_weights")
    assert compose_config(["loss=orpo"]).beta == orpo_config["beta"]
    dpo = compose_config(["loss=dpo"])
    assert dpo.beta == dpo_config["beta"]
    assert dpo_config["loss_type"] == ["sigmoid"] and dpo_config["loss_weights"] is None  # so no NLL: cpo_alpha 0
    assert dpo.cpo_alpha == 0.0


# --------------------------------------------------------------------------- against TRL

@pytest.fixture
def trl_orpo():
    return pytest.importorskip("trl.experimental.orpo.orpo_trainer",
                               reason="TRL (a test dependency) is not installed").ORPOTrainer


@pytest.fixture
def trl_dpo():
    return pytest.importorskip("trl.trainer.dpo_trainer", reason="TRL (a test dependency) is not installed").DPOTrainer


def random_averaged_logps(seed: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Length-averaged log-probs in (-4, 0), a few of them next to 0."""
    generator = torch.Generator().manual_seed(seed)
    chosen = -torch.rand(n, generator=generator) * 4
    rejected = -torch.rand(n, generator=generator) * 4
    chosen[:3] = torch.tensor([-1e-3, -1e-5, -0.69])
    rejected[3:5] = torch.tensor([-1e-4, -0.70])
    return chosen, rejected


@pytest.mark.parametrize("beta,seed", [(0.1, 0), (0.5, 1), (2.0, 2)])
def test_orpo_matches_trl_odds_ratio_loss(trl_orpo, beta, seed):
    chosen, rejected = random_averaged_logps(seed)
    fake_trainer = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=CPU))
    their_terms, their_chosen_r, their_rejected_r, their_ratio, their_log_odds = trl_orpo.odds_ratio_loss(
        fake_trainer, chosen, rejected)
    losses, chosen_r, rejected_r = preference_loss(chosen, rejected, LossSpec("orpo", beta=beta))
    tol = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(losses, -their_terms, **tol)  # TRL's term is minus our loss
    torch.testing.assert_close(chosen_r, their_chosen_r, **tol)
    torch.testing.assert_close(rejected_r, their_rejected_r, **tol)
    nll = torch.tensor(1.25)
    torch.testing.assert_close(total_loss(losses, nll, 1.0), nll - their_terms.mean(), **tol)  # TRL's full ORPO loss
    metrics = metrics_of(chosen_r, rejected_r, chosen, rejected, log_odds=orpo_log_odds(chosen, rejected))
    torch.testing.assert_close(metrics["log_odds_ratio"], their_ratio, **tol)
    torch.testing.assert_close(metrics["log_odds_chosen"], their_log_odds, **tol)


def test_trl_log1mexp_has_a_nan_gradient_next_to_zero_where_ours_is_finite(trl_orpo):
    """The quirk we do not copy: TRL's torch.where over both full branches."""
    from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp

    x = torch.tensor([-1e-8], requires_grad=True)
    trl_log1mexp(x).sum().backward()
    assert torch.isnan(x.grad).all()
    assert trl_log1mexp(torch.tensor([0.0])).item() == -math.inf
    y = torch.tensor([-1e-8], requires_grad=True)
    log1mexp(y).sum().backward()
    torch.testing.assert_close(log1mexp(y.detach()), trl_log1mexp(y.detach()))
    assert torch.isfinite(y.grad).all()


def trl_dpo_step(trainer_cls, per_token_logps, completion_mask, ref_chosen, ref_rejected, beta,
                 loss_types=("sigmoid",), loss_weights=(1.0,), label_smoothing=0.0):
    """TRL 1.16's ``DPOTrainer._compute_loss`` itself, on a stand-in trainer and model whose
    forward returns the given per-token log-probs (what its fused head returns), with the
    reference log-probs precomputed. Returns TRL's loss and its logged metrics."""
    batch, length = completion_mask.shape
    outputs = SimpleNamespace(
        log_probs=per_token_logps, entropy=torch.zeros(batch, length - 1),
        mean_logits=torch.zeros(batch, length - 1), is_top1=torch.zeros(batch, length - 1, dtype=torch.bool),
    )
    accelerator = SimpleNamespace(device=CPU, gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=list(loss_types),
        loss_weights=list(loss_weights), beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(batch, length, dtype=torch.long), "attention_mask": torch.ones(batch, length),
        "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected,
    }
    loss = trainer_cls._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def random_dpo_batch(seed: int, pairs: int = 6, length: int = 12):
    """Per-token log-probs of ``[chosen; rejected]`` with a 3-token prompt and ragged padding."""
    generator = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * pairs, length, dtype=torch.long)
    for row in range(2 * pairs):
        end = int(torch.randint(5, length + 1, (1,), generator=generator))
        completion_mask[row, 3:end] = 1
    per_token = -torch.rand(2 * pairs, length - 1, generator=generator) * 3 * completion_mask[:, 1:]
    logps = per_token.sum(1)  # what the engine's sequence_logps gives for a summed loss
    ref = logps + torch.randn(2 * pairs, generator=generator)
    return per_token, completion_mask, logps, ref


DPO_CASES = [
    dict(beta=0.1, cpo_alpha=0.0, seed=0),
    dict(beta=0.5, cpo_alpha=0.0, seed=1),
    dict(beta=0.1, cpo_alpha=1.0, seed=2),  # RPO: TRL's loss_type=[sigmoid, sft]
    dict(beta=0.3, cpo_alpha=0.25, seed=3),
    dict(beta=0.1, cpo_alpha=0.0, seed=4, at_reference=True),  # step 0
]


@pytest.mark.parametrize("case", DPO_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_dpo_matches_trl_dpo_trainer_sigmoid_loss(trl_dpo, case):
    per_token, completion_mask, logps, ref = random_dpo_batch(case["seed"])
    if case.get("at_reference"):
        ref = logps.clone()
    pairs = logps.shape[0] // 2
    chosen, rejected, ref_chosen, ref_rejected = logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:]
    spec = LossSpec("dpo", beta=case["beta"], cpo_alpha=case["cpo_alpha"])
    loss_types, loss_weights = (("sigmoid", "sft"), (1.0, spec.cpo_alpha)) if spec.cpo_alpha else (("sigmoid",), (1.0,))
    their_loss, theirs = trl_dpo_step(trl_dpo, per_token, completion_mask, ref_chosen, ref_rejected, spec.beta,
                                      loss_types, loss_weights)

    losses, chosen_r, rejected_r = preference_loss(chosen, rejected, spec, ref_chosen_logps=ref_chosen,
                                                   ref_rejected_logps=ref_rejected)
    chosen_mask = completion_mask[:pairs, 1:]
    nll = -per_token[:pairs].sum() / chosen_mask.sum()  # the engine's nll_loss: chosen completion tokens
    loss = total_loss(losses, nll, spec.cpo_alpha)
    ours = metrics_of(chosen_r, rejected_r, chosen, rejected, loss=loss)
    tol = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, their_loss, **tol)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):
        assert ours[name].item() == pytest.approx(theirs[name], rel=1e-6, abs=1e-6), name
    if case.get("at_reference"):
        assert theirs["rewards/accuracies"] == 0.0 and their_loss.item() == pytest.approx(math.log(2))


def test_trl_ignores_label_smoothing_for_sigmoid_where_we_compute_cdpo(trl_dpo):
    per_token, completion_mask, logps, ref = random_dpo_batch(5)
    pairs = logps.shape[0] // 2
    refs = dict(ref_chosen_logps=ref[:pairs], ref_rejected_logps=ref[pairs:])
    their_loss, _ = trl_dpo_step(trl_dpo, per_token, completion_mask, ref[:pairs], ref[pairs:], 0.1,
                                 label_smoothing=0.3)
    plain, _, _ = preference_loss(logps[:pairs], logps[pairs:], LossSpec("dpo", beta=0.1), **refs)
    cdpo, _, _ = preference_loss(logps[:pairs], logps[pairs:], LossSpec("dpo", beta=0.1, label_smoothing=0.3), **refs)
    torch.testing.assert_close(plain.mean(), their_loss, rtol=1e-6, atol=1e-6)
    assert abs(cdpo.mean().item() - their_loss.item()) > 1e-3


# --------------------------------------------------------------------------- the whole model against TRL

# Model-level parity: the embedded tiny Qwen2, our tokenization of the same pairs fed to both
# sides (each side batches it with its own collator), TRL's own loss and metrics code.
TINY = ModelConfig(name_or_path="pkg://cpo_exp/assets/tiny_qwen2", random_init=True)
METRIC_TOL = dict(rel=1e-5, abs=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


def fresh_model(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    return load_model(TINY, tokenizer)


def our_tokens(rows: list[dict], tokenizer) -> list[dict]:
    return [tokenize_row(r, tokenizer, SequenceLengths()) for r in rows]


def full_logits(model, batch) -> torch.Tensor:
    """The ``[2B, T, V]`` logits of our padded batch (the same block TRL's forward produces)."""
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    return grads


# ORPO. TRL's ORPOTrainer tokenizes as its CPOTrainer (and we) do; its batch is still built
# from our ids (chosen_/rejected_ input_ids, attention_mask, labels, its collator's keys).
# Two definitions differ on purpose:
# - TRL's ``nll_loss`` is the cross-entropy over every non-padding token of the chosen sequence,
#   prompt included ("orpo chosen nll loss is computed over the full prompt and response");
#   ours, as for every loss here, over the chosen completion only. So the odds-ratio term
#   ``loss - nll_loss`` is compared, and TRL's total with our NLL put in place of its own.
# - TRL's ORPO ``logits/*`` average the logits without the last position ([B, T-1, V]); ours keep
#   CPO's definition, the mean over the whole padded [B, T, V] block of each half.

@pytest.fixture
def orpo_trainer(trl_orpo, tokenizer, toy_rows, tmp_path):
    from trl.experimental.orpo import ORPOConfig

    def build(model, beta: float, max_length: int = 1024):
        args = ORPOConfig(output_dir=str(tmp_path), beta=beta, max_length=max_length, report_to=[], use_cpu=True,
                          bf16=False, gradient_checkpointing=False, per_device_train_batch_size=len(toy_rows))
        return trl_orpo(model=model, args=args, train_dataset=datasets.Dataset.from_list(toy_rows),
                        processing_class=tokenizer)

    return build


def trl_orpo_batch(trainer, ours: list[dict]) -> dict:
    features = [{f"{side}_{key}": row[f"{side}_{column}"] if column else [1] * len(row[f"{side}_input_ids"])
                 for side in ("chosen", "rejected")
                 for key, column in (("input_ids", "input_ids"), ("attention_mask", None), ("labels", "labels"))}
                for row in ours]
    return trainer.data_collator(features)


@pytest.mark.parametrize("max_length", [1024, 19])
def test_trl_orpo_tokenizes_the_pairs_as_we_do(orpo_trainer, tokenizer, toy_rows, max_length):
    trainer = orpo_trainer(fresh_model(tokenizer), 0.1, max_length)
    for k, row in enumerate(toy_rows):
        ours = tokenize_row(row, tokenizer, SequenceLengths(max_length=max_length, max_prompt_length=None))
        for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            assert trainer.train_dataset[k][key] == ours[key], (k, key)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_metrics_and_odds_ratio_term_equal_trl_orpotrainer(orpo_trainer, tokenizer, toy_rows, beta):
    model = fresh_model(tokenizer)
    trainer = orpo_trainer(model, beta)
    ours_rows = our_tokens(toy_rows, tokenizer)
    their_loss, theirs = trainer.get_batch_loss_metrics(trainer.model, trl_orpo_batch(trainer, ours_rows))
    batch = PreferenceCollator(tokenizer.pad_token_id)(ours_rows)
    loss, ours = pair_loss(trainer.model, batch, LossSpec("orpo", beta=beta, cpo_alpha=1.0))

    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected", "log_odds_ratio", "log_odds_chosen"):
        assert ours[name].item() == pytest.approx(theirs[name], **METRIC_TOL), name
    # The odds-ratio term; equally, TRL's total with our NLL in place of its own is our loss.
    assert (loss - ours["nll_loss"]).item() == pytest.approx(their_loss.item() - theirs["nll_loss"], **METRIC_TOL)

    # The two NLLs and the two logits means, by hand from the same logits.
    logits, pairs = full_logits(model, batch), len(toy_rows)
    chosen_logits, labels = logits[:pairs, :-1].flatten(0, 1), batch["labels"][:pairs, 1:].flatten()
    every_token = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:pairs, 1:].flatten()
    assert theirs["nll_loss"] == pytest.approx(F.cross_entropy(chosen_logits, every_token).item(), **METRIC_TOL)
    assert ours["nll_loss"].item() == pytest.approx(F.cross_entropy(chosen_logits, labels).item(), **METRIC_TOL)
    assert abs(theirs["nll_loss"] - ours["nll_loss"].item()) > 0.1
    for name, half in (("logits/chosen", slice(None, pairs)), ("logits/rejected", slice(pairs, None))):
        assert ours[name].item() == pytest.approx(logits[half].mean().item(), **METRIC_TOL), name
        assert theirs[name] == pytest.approx(logits[half, :-1].mean().item(), **METRIC_TOL), name


def test_orpo_odds_ratio_gradients_equal_trl(orpo_trainer, tokenizer, toy_rows):
    model = fresh_model(tokenizer)
    trainer = orpo_trainer(model, 0.5)
    ours_rows = our_tokens(toy_rows, tokenizer)
    chosen, rejected = trainer.concatenated_forward(model, trl_orpo_batch(trainer, ours_rows))[:2]
    (-trainer.odds_ratio_loss(chosen, rejected)[0].mean()).backward()  # TRL's term is minus our loss
    expected = gradients(model)
    batch = PreferenceCollator(tokenizer.pad_token_id)(ours_rows)
    pair_step(model, batch, LossSpec("orpo", beta=0.5)).losses.mean().backward()
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, expected[name], **GRAD_TOL, msg=name)


# DPO. TRL 1.16's DPOTrainer tokenizes differently: no BOS in front of the prompt (ours adds it,
# as CPO/ORPO do), EOS appended as text before tokenizing (ours as an id; after a chat template
# we add none), the completion cut where prompt and prompt + completion diverge, and truncation
# by its collator (keep_start of prompt + completion, default max_length 1024) rather than
# prompt-first. So its rows are built from our ids: ``prompt_ids`` (our -100-labelled prefix,
# BOS included), ``chosen_ids``, ``rejected_ids``. Its reference log-probs are precomputed
# (``precompute_ref_log_probs=True``: ``_precompute_ref_logps`` adds ``ref_chosen_logps`` and
# ``ref_rejected_logps`` columns, summed over completion tokens), ours by ``with_reference``.
# TRL's ``logits/*`` are the mean logit over completion tokens; ours CPO's padded-block mean.
# TRL also logs entropy, mean_token_accuracy and num_tokens, which we do not; we log nll_loss.

def trl_dpo_rows(ours: list[dict]) -> list[dict]:
    rows = []
    for k, row in enumerate(ours):
        split = {side: row[f"{side}_labels"].count(-100) for side in ("chosen", "rejected")}
        prompt = row["chosen_input_ids"][:split["chosen"]]
        assert row["rejected_input_ids"][:split["rejected"]] == prompt, f"row {k}: TRL's rows share one prompt"
        rows.append({"prompt_ids": prompt, **{f"{side}_ids": row[f"{side}_input_ids"][split[side]:]
                                              for side in ("chosen", "rejected")}})
    return rows


@pytest.fixture
def dpo_trainer(trl_dpo, tokenizer, toy_rows, tmp_path):
    from trl import DPOConfig

    def build(model, beta: float, cpo_alpha: float = 0.0):
        # RPO in TRL: the sigmoid loss plus its "sft" loss (the chosen completion's NLL), weighted.
        loss = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, cpo_alpha]) if cpo_alpha else {}
        args = DPOConfig(output_dir=str(tmp_path), beta=beta, precompute_ref_log_probs=True, report_to=[],
                         use_cpu=True, bf16=False, gradient_checkpointing=False,
                         per_device_train_batch_size=len(toy_rows), **loss)
        return trl_dpo(model=model, args=args, train_dataset=datasets.Dataset.from_list(toy_rows),
                       processing_class=tokenizer)

    return build


@pytest.fixture
def ours_with_reference(tokenizer, tmp_path, monkeypatch):
    """Our tokenized pairs with ``with_reference``'s columns, cached under ``tmp_path``."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))

    def build(model, rows: list[dict]) -> datasets.Dataset:
        data = tokenize_dataset(datasets.Dataset.from_list(rows), tokenizer, SequenceLengths(), "train", "error")
        collate = pair_collator(model.config, tokenizer, EngineConfig())
        accelerator = new_accelerator(cpu=True)
        cfg = TrainConfig(per_device_train_batch_size=len(rows))
        return with_reference(model, data, None, cfg, collate, EngineConfig(), accelerator)[0]

    return build


def nudge(model, seed: int = 1, scale: float = 0.02) -> None:
    """Move the policy away from the reference, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def dpo_both_sides(trainer, model, ours: datasets.Dataset, spec: LossSpec, at_reference: bool = False):
    """The reference log-probs of each side, then (after ``nudge`` unless ``at_reference``) each
    side's loss and metrics on its batch of the same ids."""
    pairs = len(ours)
    theirs_data = trainer._precompute_ref_logps(datasets.Dataset.from_list(trl_dpo_rows(list(ours))), "ours", pairs)
    if not at_reference:
        nudge(model)
    model.train()
    trl_batch = trainer.data_collator([theirs_data[k] for k in range(pairs)])
    their_loss = trainer.compute_loss(model, trl_batch)
    theirs = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    rows = PairRows(ours)
    batch = pair_collator(model.config, trainer.processing_class, EngineConfig())([rows[k] for k in range(pairs)])
    step = pair_step(model, batch, spec)
    return theirs_data, their_loss, theirs, batch, step


def test_our_reference_log_probs_equal_trls_precomputed_ones(dpo_trainer, ours_with_reference, tokenizer, toy_rows):
    model = fresh_model(tokenizer)
    trainer = dpo_trainer(model, 0.1)
    ours = ours_with_reference(model, toy_rows)
    theirs = trainer._precompute_ref_logps(datasets.Dataset.from_list(trl_dpo_rows(list(ours))), "ours", 2)
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(ours[column]), torch.tensor(theirs[column]), rtol=1e-6, atol=1e-5,
                                   msg=column)
    # Summed over the completion tokens, so the log-probs of sequences of 4 to 7 tokens: tens of nats.
    assert all(-80 < value < -10 for value in ours["ref_chosen_logps"])


# DPO's rewards are beta times a difference of two sums of tens of nats: float32 keeps those to a
# few 1e-6 (their ulp is 3.8e-6), so rewards, margins and the loss are compared to 5e-6 absolute.
DPO_TOL = dict(rel=1e-5, abs=5e-6)
DPO_MODEL_CASES = [dict(beta=0.1, cpo_alpha=0.0), dict(beta=0.5, cpo_alpha=0.0),
                   dict(beta=0.1, cpo_alpha=1.0), dict(beta=0.3, cpo_alpha=0.25)]  # cpo_alpha > 0: RPO


@pytest.mark.parametrize("case", DPO_MODEL_CASES, ids=lambda c: f"beta={c['beta']},cpo_alpha={c['cpo_alpha']}")
def test_dpo_loss_metrics_and_gradients_equal_trl_dpotrainer(dpo_trainer, ours_with_reference, tokenizer,
                                                             toy_rows, case):
    model = fresh_model(tokenizer)
    trainer = dpo_trainer(model, case["beta"], case["cpo_alpha"])
    spec = LossSpec("dpo", beta=case["beta"], cpo_alpha=case["cpo_alpha"])
    _, their_loss, theirs, batch, step = dpo_both_sides(trainer, model, ours_with_reference(model, toy_rows), spec)

    assert step.loss.item() == pytest.approx(their_loss.item(), **DPO_TOL)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert step.metrics[name].item() == pytest.approx(theirs[name], **DPO_TOL), name
    assert 0 < theirs["rewards/accuracies"] < 1  # the nudged policy wins some pairs and loses others
    logits, pairs = full_logits(model, batch), len(toy_rows)
    completion = (batch["labels"][:, 1:] != -100)
    per_position = logits[:, :-1].mean(-1)
    for name, half in (("logits/chosen", slice(None, pairs)), ("logits/rejected", slice(pairs, None))):
        assert step.metrics[name].item() == pytest.approx(logits[half].mean().item(), **METRIC_TOL), name
        assert theirs[name] == pytest.approx(per_position[half][completion[half]].mean().item(), **METRIC_TOL), name

    their_loss.backward()
    expected = gradients(model)
    step.loss.backward()
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, expected[name], **GRAD_TOL, msg=name)


def test_dpo_on_the_model_at_the_reference_is_log_2_with_zero_rewards_on_both_sides(
        dpo_trainer, ours_with_reference, tokenizer, toy_rows):
    model = fresh_model(tokenizer)
    trainer = dpo_trainer(model, 0.1)
    _, their_loss, theirs, _, step = dpo_both_sides(trainer, model, ours_with_reference(model, toy_rows),
                                                    LossSpec("dpo", beta=0.1, cpo_alpha=0.0), at_reference=True)
    # Ours exactly: the reference came through the very forward the loss runs.
    assert step.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert step.metrics["rewards/margins"].item() == 0.0 and step.metrics["rewards/accuracies"].item() == 0.0
    assert their_loss.item() == pytest.approx(math.log(2), abs=1e-6) and theirs["rewards/accuracies"] == 0.0
