"""The engine switches (chunked logits, packing, shared prompt) give the plain path's numbers."""

from __future__ import annotations

import re

import datasets
import pytest
import torch

from cpo_exp.config import Config, ConfigError, EngineConfig, HardwareConfig, ModelConfig, TrainConfig, validate
from cpo_exp.data import LABEL_PAD, PreferenceCollator, SequenceLengths, tokenize_dataset, tokenize_row
from cpo_exp.engine import pair_loss, train
from cpo_exp.forward import pair_collator, pair_forward, prepare_model
from cpo_exp.logprobs import label_logps, mean_logit, mean_logit_direction
from cpo_exp.losses import LossSpec
from cpo_exp.models import load_model, load_tokenizer
from cpo_exp.packing import SEGMENT_ATTENTION, PackingCollator

from conftest import tiny_moe

TINY = ModelConfig(name_or_path="pkg://cpo_exp/assets/tiny_qwen2", random_init=True)
CHUNKED = EngineConfig(logits="chunked", logits_chunk_size=5)  # several chunks even on the toy rows
PACKED = EngineConfig(logits="chunked", logits_chunk_size=7, packing=True)
SHARED = EngineConfig(logits="chunked", packing=True, shared_prompt=True)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


@pytest.fixture
def encoded(tokenizer, toy_rows):
    rows = toy_rows + [{"prompt": "", "chosen": " ja", "rejected": " nein danke"}]  # no prompt at all
    return [tokenize_row(r, tokenizer, SequenceLengths()) for r in rows]


def model_for(tokenizer, engine: EngineConfig, model_cfg: ModelConfig = TINY):
    torch.manual_seed(0)
    model = load_model(model_cfg, tokenizer)
    if engine.packing:
        model.set_attn_implementation(SEGMENT_ATTENTION)
    return model


def loss_metrics_grads(tokenizer, encoded, spec, engine, model_cfg: ModelConfig = TINY, aux_loss_coef: float = 0.0):
    model = model_for(tokenizer, engine, model_cfg)
    batch = pair_collator(model.config, tokenizer, engine)(encoded)
    loss, metrics = pair_loss(model, batch, spec, aux_loss_coef, engine=engine)
    loss.backward()
    return loss, metrics, {n: p.grad for n, p in model.named_parameters()}


def assert_same_numbers(got, expected, packed: bool):
    """Loss, metrics (but ``logits/*`` of a packed batch, see the test below) and gradients."""
    (loss, metrics, grads), (plain_loss, plain_metrics, plain_grads) = got, expected
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    for name, value in plain_metrics.items():
        if packed and name.startswith("logits/"):
            continue  # a packed batch has no padding positions
        torch.testing.assert_close(metrics[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- the fused head


def test_label_logps_and_gradients_equal_log_softmax_in_float64():
    torch.manual_seed(0)
    hidden = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (11,))
    expected = (hidden @ weight.t() + bias).log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
    got = label_logps(hidden, weight, labels, bias, chunk_size=4)  # 4 + 4 + 3 rows
    torch.testing.assert_close(got, expected)
    assert torch.autograd.gradcheck(lambda h, w, b: label_logps(h, w, labels, b, chunk_size=4),
                                    (hidden, weight, bias))


def test_mean_logit_is_the_mean_of_the_logits_without_computing_them():
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(2, 3, 8), torch.randn(50, 8), torch.randn(50)
    direction = mean_logit_direction(weight, bias)
    torch.testing.assert_close(mean_logit(hidden, direction), (hidden @ weight.t() + bias).mean())


# --------------------------------------------------------------------------- the packed layout


def test_shared_prompt_is_laid_out_once_and_rejected_continues_its_positions():
    rows = [{"chosen_input_ids": [0, 5, 6, 7, 1], "chosen_labels": [LABEL_PAD, LABEL_PAD, 6, 7, 1],
             "rejected_input_ids": [0, 5, 9, 1], "rejected_labels": [LABEL_PAD, LABEL_PAD, 9, 1]}]
    batch = PackingCollator(shared_prompt=True)(rows)
    assert batch["input_ids"].tolist() == [[0, 5, 6, 7, 1, 9, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3]]
    # chosen: causal over its own 5 tokens; rejected rest: attends to the prefix [0, 2) and itself
    assert batch["segments"] == [(0, 5, 0, 0), (5, 7, 0, 2)]
    # rejected's first label (9) is predicted by the shared prompt's last position (1)
    assert batch["pred_index"].tolist() == [1, 2, 3, 1, 5]
    assert batch["pred_labels"].tolist() == [6, 7, 1, 9, 1]
    assert batch["pred_seq"].tolist() == [0, 0, 0, 1, 1]
    assert batch["num_tokens"] == 9

    plain = PackingCollator(shared_prompt=False)(rows)
    assert plain["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert plain["segments"] == [(0, 5, 0, 0), (5, 9, 0, 0)]  # empty prefix ranges


def test_segment_attention_runs_an_unpacked_padded_call_as_sdpa(tokenizer, encoded):
    model = model_for(tokenizer, PACKED)
    batch = PreferenceCollator(tokenizer.pad_token_id)(encoded)
    assert (batch["attention_mask"] == 0).any()  # padded rows: the mask must be applied
    with torch.no_grad():
        packed_attention = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        model.set_attn_implementation("sdpa")
        sdpa = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(packed_attention[real], sdpa[real])


# --------------------------------------------------------------------------- against the plain path

SPECS = [LossSpec("sigmoid", beta=0.1, cpo_alpha=1.0), LossSpec("simpo", beta=2.0, cpo_alpha=1.0),
         LossSpec("ipo", beta=0.5, cpo_alpha=0.0)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("engine", [CHUNKED, PACKED, SHARED], ids=["chunked", "packed", "shared_prompt"])
def test_switch_gives_the_plain_loss_metrics_and_gradients(spec, engine, tokenizer, encoded):
    assert_same_numbers(loss_metrics_grads(tokenizer, encoded, spec, engine),
                        loss_metrics_grads(tokenizer, encoded, spec, EngineConfig()), engine.packing)


@pytest.fixture(scope="module")
def tiny_moe_cfg(tmp_path_factory):
    return ModelConfig(name_or_path=str(tiny_moe(tmp_path_factory.mktemp("moe"))), random_init=True)


@pytest.mark.parametrize("engine", [CHUNKED, PACKED, SHARED], ids=["chunked", "packed", "shared_prompt"])
def test_switch_adds_the_plain_router_loss_of_a_mixture_of_experts(engine, tokenizer, encoded, tiny_moe_cfg):
    """The padded batch's router loss excludes padding; the packed row weighs a shared prompt twice."""
    spec = LossSpec("sigmoid", beta=0.1, cpo_alpha=1.0)
    got = loss_metrics_grads(tokenizer, encoded, spec, engine, tiny_moe_cfg, aux_loss_coef=0.5)
    expected = loss_metrics_grads(tokenizer, encoded, spec, EngineConfig(), tiny_moe_cfg, aux_loss_coef=0.5)
    assert expected[1]["aux_loss"] > 0
    assert_same_numbers(got, expected, engine.packing)


@pytest.mark.parametrize("engine", [PACKED, SHARED], ids=["packed", "shared_prompt"])
def test_packed_logits_metric_is_the_mean_over_real_tokens(engine, tokenizer, encoded):
    _, metrics, _ = loss_metrics_grads(tokenizer, encoded, LossSpec(), engine)
    model = model_for(tokenizer, EngineConfig())
    batch = PreferenceCollator(tokenizer.pad_token_id)(encoded)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_position = logits.mean(-1)
    real = batch["attention_mask"].bool()
    half = len(encoded)
    torch.testing.assert_close(metrics["logits/chosen"], per_position[:half][real[:half]].mean())
    torch.testing.assert_close(metrics["logits/rejected"], per_position[half:][real[half:]].mean())
    # ... which is not TRL's figure over the padded block (unless nothing is padded)
    plain = pair_forward(model, batch, False, EngineConfig())
    assert abs(float(plain.chosen_logits_mean) - float(metrics["logits/chosen"])) > 1e-6


def test_training_with_every_switch_on_matches_plain_training(tokenizer, toy_rows, tmp_path):
    data = tokenize_dataset(datasets.Dataset.from_list(toy_rows * 4), tokenizer, SequenceLengths(), "train", "error")
    cfg = TrainConfig(learning_rate=1e-3, per_device_train_batch_size=4, max_steps=3, logging_steps=3,
                      progress_bar=False, save_model=False)
    results = {}
    for name, engine in (("plain", EngineConfig()), ("shared", SHARED)):
        torch.manual_seed(0)
        model = load_model(TINY, tokenizer)
        results[name] = train(model, tokenizer, data, data, LossSpec("simpo", beta=2.0), cfg,
                              HardwareConfig(cpu=True), str(tmp_path), engine=engine)
    for key, value in results["plain"].eval_metrics.items():
        if "logits/" not in key:
            assert results["shared"].eval_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert results["shared"].step_seconds > 0 and results["shared"].eval_seconds > 0


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("engine, message", [
    (EngineConfig(logits="fast"), "engine.logits must be one of full, chunked (got 'fast')"),
    (EngineConfig(packing=True), "engine.packing needs engine.logits=chunked"),
    (EngineConfig(logits="chunked", shared_prompt=True), "engine.shared_prompt needs engine.packing=true"),
    (EngineConfig(logits="chunked", logits_chunk_size=0), "engine.logits_chunk_size must be > 0 (got 0)"),
])
def test_impossible_engine_switches_are_named_with_their_rule(engine, message):
    cfg = Config(model=ModelConfig(name_or_path="x"), engine=engine)
    cfg.data.train_files = ["x.jsonl"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg)


def test_models_the_hidden_state_paths_cannot_compute_exactly_are_named_before_training(tokenizer):
    t5 = ModelConfig(name_or_path="pkg://cpo_exp/assets/tiny_t5", tokenizer=TINY.name_or_path, random_init=True)
    with pytest.raises(ValueError, match="causal LMs only; use engine=plain for an encoder-decoder"):
        prepare_model(load_model(t5, tokenizer), CHUNKED)
    model = load_model(TINY, tokenizer)
    prepare_model(model, SHARED)
    with pytest.raises(ValueError, match="engine.logits=chunked does not run under DeepSpeed ZeRO-3"):
        prepare_model(model, CHUNKED, zero3=True)
    prepare_model(model, EngineConfig(), zero3=True)  # the plain path runs anywhere
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="does not support models with final_logit_softcapping"):
        prepare_model(model, CHUNKED)
    model.config.final_logit_softcapping = None
    model.config.output_router_logits = True  # a router loss that modeling_qwen2 has no function for
    with pytest.raises(ValueError, match="router aux loss of Qwen2ForCausalLM"):
        prepare_model(model, PACKED)
