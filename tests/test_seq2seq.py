"""Encoder-decoder models: the prompt is encoded, chosen/rejected decoded; same losses and metrics."""

from __future__ import annotations

import json

import pytest
import torch

from cpo_exp.config import EngineConfig, ModelConfig
from cpo_exp.data import SequenceLengths, collator_for, tokenize_row_seq2seq
from cpo_exp.engine import pair_loss
from cpo_exp.forward import pair_forward
from cpo_exp.losses import LossSpec
from cpo_exp.models import is_encoder_decoder, load_model, load_tokenizer

from conftest import QUICK, run_cli

T5 = ModelConfig(name_or_path="pkg://cpo_exp/assets/tiny_t5", tokenizer="pkg://cpo_exp/assets/tiny_qwen2",
                 random_init=True)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(T5)


@pytest.fixture
def model(tokenizer):
    torch.manual_seed(0)
    return load_model(T5, tokenizer)


def test_the_shipped_t5_config_is_an_encoder_decoder(model):
    assert is_encoder_decoder(T5) and model.config.is_encoder_decoder
    assert type(model).__name__ == "T5ForConditionalGeneration"


def test_completions_end_with_exactly_one_eos(tokenizer, toy_rows):
    encoded = tokenize_row_seq2seq(toy_rows[0], tokenizer, SequenceLengths())
    chosen = tokenizer(toy_rows[0]["chosen"], add_special_tokens=True)["input_ids"]
    assert encoded["chosen_labels"] == chosen + [tokenizer.eos_token_id]
    assert encoded["prompt_input_ids"] == tokenizer(toy_rows[0]["prompt"])["input_ids"]
    short = tokenize_row_seq2seq(toy_rows[0], tokenizer, SequenceLengths(max_completion_length=2))
    assert short["chosen_labels"] == chosen[:2]


def test_sequence_logps_match_a_hand_computation(model, tokenizer, toy_rows):
    rows = [tokenize_row_seq2seq(r, tokenizer, SequenceLengths()) for r in toy_rows[:2]]
    batch = collator_for(model.config, tokenizer.pad_token_id)(rows)
    out = pair_forward(model, batch, False, EngineConfig())
    start = model.config.decoder_start_token_id
    for half, name in ((out.chosen_logps, "chosen_labels"), (out.rejected_logps, "rejected_labels")):
        for k, row in enumerate(rows):
            labels = row[name]
            prompt = torch.tensor([row["prompt_input_ids"]])
            decoder_input = torch.tensor([[start] + labels[:-1]])  # shifted right behind the start token
            logp = model(input_ids=prompt, decoder_input_ids=decoder_input).logits[0].log_softmax(-1)
            expected = sum(logp[t, token].item() for t, token in enumerate(labels))
            assert half[k].item() == pytest.approx(expected, rel=1e-5)
    # and the loss is the CPO sigmoid of those numbers plus the NLL over chosen tokens
    spec = LossSpec("sigmoid", beta=0.1, cpo_alpha=1.0)
    loss, metrics = pair_loss(model, batch, spec)
    n_chosen = sum(len(r["chosen_labels"]) for r in rows)
    nll = -sum(out.chosen_logps.tolist()) / n_chosen
    margin = (out.chosen_logps - out.rejected_logps) * 0.1
    expected_loss = -torch.nn.functional.logsigmoid(margin).mean().item() + nll
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["nll_loss"].item() == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize("spec", [LossSpec("sigmoid", beta=0.1), LossSpec("simpo", beta=2.0)], ids=["sigmoid", "simpo"])
def test_metrics_equal_trl_on_the_same_encoder_decoder_batch(trl, model, tokenizer, toy_rows, tmp_path, spec):
    import datasets

    cpo = trl.experimental.cpo
    args = cpo.CPOConfig(output_dir=str(tmp_path), loss_type=spec.name, beta=spec.beta, cpo_alpha=spec.cpo_alpha,
                         simpo_gamma=spec.simpo_gamma, report_to=[], use_cpu=True, bf16=False,
                         gradient_checkpointing=False, max_completion_length=128)
    trainer = cpo.CPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(toy_rows),
                             processing_class=tokenizer)
    rows = [tokenize_row_seq2seq(r, tokenizer, SequenceLengths()) for r in toy_rows]
    trl_rows = [{**r, "prompt_attention_mask": [1] * len(r["prompt_input_ids"])} for r in rows]
    _, trl_metrics = trainer.get_batch_loss_metrics(model, trainer.data_collator(trl_rows))
    _, metrics = pair_loss(model, collator_for(model.config, tokenizer.pad_token_id)(rows), spec)
    assert metrics.keys() - {"loss"} == trl_metrics.keys()  # every TRL metric, and only those
    for name, value in metrics.items():
        if name != "loss":
            assert value.item() == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name


@pytest.mark.slow
def test_tiny_t5_trains_end_to_end_through_the_cli(workdir):
    result = run_cli("model=tiny_t5", *QUICK, "tracking=none", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = next(workdir.glob("outputs/*/*/model"))
    assert json.loads((saved / "config.json").read_text())["model_type"] == "t5"
    assert "eval step 6" in result.stderr
