"""Training diagnostics of this loss family: margin quantiles, length bias, likelihood displacement,
and the gradient norm of each term of the objective."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from cpo_exp.config import EngineConfig, ModelConfig
from cpo_exp.data import PreferenceCollator, SequenceLengths, encode_pair
from cpo_exp.engine import component_grad_norms
from cpo_exp.forward import pair_forward
from cpo_exp.losses import LossSpec, preference_loss
from cpo_exp.metrics import eval_diagnostics
from cpo_exp.models import load_model, load_tokenizer

from conftest import QUICK, run_cli

TINY = ModelConfig(name_or_path="pkg://cpo_exp/assets/tiny_qwen2", random_init=True)


def test_margin_quantiles_length_correlation_and_displacement_by_hand():
    margins = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    length_diff = torch.tensor([-2, -1, 0, 1, 2])  # perfectly correlated with the margin
    chosen, rejected = torch.tensor([-5.0, -4.0, -3.0, -2.0, -1.0]), torch.tensor([-6.0, -6.0, -6.0, -6.0, -6.0])
    start = torch.tensor([-4.0, -4.0, -4.0, -4.0, -4.0]), torch.tensor([-5.0, -7.0, -5.0, -7.0, -5.0])
    out = eval_diagnostics(chosen, rejected, margins, length_diff, start)
    # linear interpolation between order statistics: p10 = 0.4, p50 = 2, p90 = 3.6
    assert out["margins/p10"] == pytest.approx(0.4) and out["margins/p50"] == pytest.approx(2.0)
    assert out["margins/p90"] == pytest.approx(3.6)
    assert out["margins/length_corr"] == pytest.approx(1.0)
    # chosen changed by -1, 0, +1, +2, +3: one of five fell below its start, mean change +1
    assert out["displacement/chosen_below_start"] == pytest.approx(0.2)
    assert out["displacement/chosen_change"] == pytest.approx(1.0)
    # rejected changed by -1, +1, -1, +1, -1: three of five fell, mean change -0.2
    assert out["displacement/rejected_below_start"] == pytest.approx(0.6)
    assert out["displacement/rejected_change"] == pytest.approx(-0.2)


def test_without_a_start_there_is_no_displacement_and_a_constant_length_gives_zero_correlation():
    out = eval_diagnostics(torch.zeros(3), torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 1, 1]))
    assert out["margins/length_corr"] == 0.0
    assert not [name for name in out if name.startswith("displacement/")]


def test_component_grad_norms_are_the_norms_of_each_terms_own_gradient(toy_rows):
    tokenizer = load_tokenizer(TINY)
    torch.manual_seed(0)
    model = load_model(TINY, tokenizer)
    batch = PreferenceCollator(tokenizer.pad_token_id)([encode_pair(r, tokenizer, SequenceLengths())[0]
                                                         for r in toy_rows])
    spec = LossSpec("simpo", beta=2.0, cpo_alpha=0.5)
    got = component_grad_norms(model, batch, spec, EngineConfig())
    assert all(p.grad is None for p in model.parameters())  # the training gradients are untouched

    def norm_of(term: str) -> float:
        model.zero_grad()
        out = pair_forward(model, batch, spec.average_log_prob, EngineConfig())
        losses = preference_loss(out.chosen_logps, out.rejected_logps, spec)[0]
        (losses.mean() if term == "preference" else out.nll_loss).backward()
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                           if p.grad is not None])))

    assert got["grad_norm/preference"] == pytest.approx(norm_of("preference"), rel=1e-4)
    assert got["grad_norm/nll"] == pytest.approx(norm_of("nll"), rel=1e-4)
    assert got["grad_norm/preference"] != pytest.approx(got["grad_norm/nll"], rel=1e-3)


@pytest.mark.slow
def test_a_run_logs_the_diagnostics_and_the_data_length_bias(workdir):
    result = run_cli(*QUICK, "train.component_grad_norms=true", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "chosen longer in" in result.stderr  # the data summary's length bias, before training
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("cpo_exp").experiment_id])[0]
    for name in ("eval_margins/p10", "eval_margins/p50", "eval_margins/p90", "eval_margins/length_corr",
                 "eval_displacement/chosen_below_start", "eval_displacement/rejected_change",
                 "grad_norm/preference", "grad_norm/nll"):
        assert name in run.data.metrics, name
    displacement = client.get_metric_history(run.info.run_id, "eval_displacement/chosen_below_start")
    assert sorted(m.step for m in displacement) == [3, 6]  # measured against step 0's evaluation
    assert {m.step for m in client.get_metric_history(run.info.run_id, "grad_norm/nll")} == {3, 6}
    assert "data.train_length_diff_mean" in run.data.params and "data.train_chosen_longer" in run.data.params
