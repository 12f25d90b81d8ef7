"""The engine's numbers: log-probs by hand, every metric against TRL's CPOTrainer, determinism."""

from __future__ import annotations

import datasets
import pytest
import torch

from cpo_exp.config import HardwareConfig, ModelConfig, TrainConfig
from cpo_exp.data import PreferenceCollator, SequenceLengths, tokenize_dataset, tokenize_row
from cpo_exp.engine import pair_loss, train
from cpo_exp.logprobs import logits_label_logps, sequence_logps
from cpo_exp.losses import LossSpec
from cpo_exp.models import load_model, load_tokenizer

TINY = ModelConfig(name_or_path="pkg://cpo_exp/assets/tiny_qwen2", random_init=True)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


def fresh_model(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    return load_model(TINY, tokenizer)


def test_label_logps_and_their_per_sequence_sums_and_means_by_hand():
    logits = torch.randn(3, 5)
    labels = torch.tensor([3, 1, 4])
    per_label = logits_label_logps(logits, labels)
    logp = logits.log_softmax(-1)
    expected = [logp[0, 3].item(), logp[1, 1].item(), logp[2, 4].item()]
    assert per_label.tolist() == pytest.approx(expected, abs=1e-6)
    # labels 0 and 1 belong to sequence 0 (chosen), label 2 to sequence 1 (rejected)
    seq = torch.tensor([0, 0, 1])
    summed = sequence_logps(per_label, seq, 2, average=False)
    assert summed.chosen.tolist() == pytest.approx([expected[0] + expected[1]], abs=1e-6)
    assert summed.rejected.tolist() == pytest.approx([expected[2]], abs=1e-6)
    averaged = sequence_logps(per_label, seq, 2, average=True)
    assert averaged.chosen.tolist() == pytest.approx([(expected[0] + expected[1]) / 2], abs=1e-6)
    # TRL's nll_loss: the mean negative log-prob over the chosen labels of the batch
    assert summed.nll_loss.item() == pytest.approx(-(expected[0] + expected[1]) / 2, abs=1e-6)


# --------------------------------------------------------------------------- against TRL

SPECS = [
    LossSpec("sigmoid", beta=0.1, cpo_alpha=1.0),
    LossSpec("sigmoid", beta=0.5, cpo_alpha=1.0, label_smoothing=0.2),
    LossSpec("hinge", beta=0.3, cpo_alpha=0.5),
    LossSpec("ipo", beta=0.5, cpo_alpha=1.0),
    LossSpec("simpo", beta=2.0, cpo_alpha=0.0, simpo_gamma=0.5),
    LossSpec("simpo", beta=2.0, cpo_alpha=1.0, simpo_gamma=0.5),
    LossSpec("alphapo", beta=2.0, cpo_alpha=0.0, simpo_gamma=0.5, alpha=0.25),
]


def trl_trainer(trl, model, tokenizer, rows, spec: LossSpec, tmp_path, max_length=1024):
    cpo = trl.experimental.cpo
    args = cpo.CPOConfig(
        output_dir=str(tmp_path), loss_type=spec.name, beta=spec.beta, cpo_alpha=spec.cpo_alpha,
        simpo_gamma=spec.simpo_gamma, label_smoothing=spec.label_smoothing, alpha=spec.alpha,
        max_length=max_length, report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=len(rows),
    )
    return cpo.CPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=tokenizer)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-a{s.cpo_alpha}-ls{s.label_smoothing}")
def test_metrics_and_loss_equal_trl_cpotrainer(trl, spec, tokenizer, toy_rows, tmp_path):
    model = fresh_model(tokenizer)
    trainer = trl_trainer(trl, model, tokenizer, toy_rows, spec, tmp_path)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(toy_rows))])
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, trl_batch)

    ours = [tokenize_row(r, tokenizer, SequenceLengths()) for r in toy_rows]
    batch = PreferenceCollator(tokenizer.pad_token_id)(ours)
    loss, metrics = pair_loss(trainer.model, batch, spec)

    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    assert metrics.keys() - {"loss"} == trl_metrics.keys()  # every TRL metric, and only those
    for name, value in metrics.items():
        if name == "loss":
            continue
        if name == "nll_loss" and spec.cpo_alpha == 0:
            assert trl_metrics["nll_loss"] == 0.0 and value > 0  # TRL logs 0; we keep the diagnostic
            continue
        assert value.item() == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name


def test_gradients_equal_trl(trl, tokenizer, toy_rows, tmp_path):
    spec = LossSpec("simpo", beta=2.0, cpo_alpha=1.0)
    model = fresh_model(tokenizer)
    trainer = trl_trainer(trl, model, tokenizer, toy_rows, spec, tmp_path)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(toy_rows))])
    trainer.get_batch_loss_metrics(trainer.model, trl_batch)[0].backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    batch = PreferenceCollator(tokenizer.pad_token_id)([tokenize_row(r, tokenizer, SequenceLengths())
                                                         for r in toy_rows])
    pair_loss(model, batch, spec)[0].backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("max_length", [1024, 24, 19])
def test_tokenization_equals_trl(trl, tokenizer, toy_rows, tmp_path, max_length):
    """Same ids and labels as TRL, also when completions are truncated (no prompt truncation in TRL 1.16)."""
    model = fresh_model(tokenizer)
    trainer = trl_trainer(trl, model, tokenizer, toy_rows, LossSpec(), tmp_path, max_length=max_length)
    lengths = SequenceLengths(max_length=max_length, max_prompt_length=None)
    for k, row in enumerate(toy_rows):
        theirs = trainer.train_dataset[k]
        ours = tokenize_row(row, tokenizer, lengths)
        for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            assert ours[key] == theirs[key], (k, key)


# --------------------------------------------------------------------------- the loop


def tiny_run(tokenizer, rows, tmp_path, **train_kwargs):
    data = tokenize_dataset(datasets.Dataset.from_list(rows * 4), tokenizer, SequenceLengths(), "train", "error")
    cfg = TrainConfig(learning_rate=1e-3, per_device_train_batch_size=4, max_steps=4, logging_steps=2,
                      eval_steps=2, progress_bar=False, save_model=False, **train_kwargs)
    logged = []
    result = train(fresh_model(tokenizer), tokenizer, data, data, LossSpec(), cfg, HardwareConfig(cpu=True),
                   str(tmp_path), lambda metrics, step: logged.append((step, metrics)))
    return result, logged


def test_the_same_seed_gives_the_same_metrics(tokenizer, toy_rows, tmp_path):
    first, _ = tiny_run(tokenizer, toy_rows, tmp_path)
    second, _ = tiny_run(tokenizer, toy_rows, tmp_path)
    assert {"eval_loss", "eval_rewards/accuracies"} <= first.eval_metrics.keys()  # not two empty dicts
    assert first.eval_metrics == second.eval_metrics
    assert first.train_metrics["loss"] == second.train_metrics["loss"]


def test_logs_every_trl_metric_for_train_and_eval(tokenizer, toy_rows, tmp_path):
    result, logged = tiny_run(tokenizer, toy_rows, tmp_path)
    names = {"loss", "nll_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"}
    train_keys = set().union(*(m.keys() for _, m in logged if "loss" in m))
    eval_keys = set().union(*(m.keys() for _, m in logged if "eval_loss" in m))
    assert names | {"learning_rate", "grad_norm", "epoch", "tokens_per_second"} <= train_keys
    assert {"eval_" + n for n in names} <= eval_keys
    assert [s for s, m in logged if "eval_loss" in m] == [0, 2, 4]
    assert result.global_step == 4


def test_gradient_accumulation_counts_optimizer_steps(tokenizer, toy_rows, tmp_path):
    result, logged = tiny_run(tokenizer, toy_rows, tmp_path, gradient_accumulation_steps=2)
    assert result.global_step == 4
    assert [s for s, m in logged if "loss" in m] == [2, 4]


def test_one_process_can_train_twice_with_different_precisions(tokenizer, toy_rows, tmp_path):
    """A sequential sweep over hardware.mixed_precision, or a notebook, trains in one process;
    accelerate alone would refuse the second precision."""
    data = tokenize_dataset(datasets.Dataset.from_list(toy_rows), tokenizer, SequenceLengths(), "train", "error")
    cfg = TrainConfig(learning_rate=1e-3, per_device_train_batch_size=4, max_steps=1, logging_steps=1,
                      progress_bar=False, save_model=False)
    for precision in ("no", "bf16", "no"):
        result = train(fresh_model(tokenizer), tokenizer, data, None, LossSpec("sigmoid"), cfg,
                       HardwareConfig(cpu=True, mixed_precision=precision), str(tmp_path))
        assert result.global_step == 1 and torch.isfinite(torch.tensor(result.train_metrics["loss"]))


def test_eval_loss_weights_batches_by_their_pairs_as_trl(trl, tokenizer, toy_rows, tmp_path):
    """5 eval pairs in batches of 2: transformers' evaluation loop weights each batch's loss by its
    rows (2, 2, 1); TRL's other metrics are plain means of the three batch means."""
    from torch.utils.data import DataLoader

    from cpo_exp.data import PairRows
    from cpo_exp.engine import evaluate, new_accelerator

    rows = toy_rows + [{"prompt": "Translate English to German.\nEnglish: the cat\nGerman:",
                        "chosen": " die Katze", "rejected": " der Katze"}]
    spec = LossSpec("sigmoid", beta=0.1, cpo_alpha=1.0)
    model = fresh_model(tokenizer)
    cpo = trl.experimental.cpo
    args = cpo.CPOConfig(output_dir=str(tmp_path), loss_type="sigmoid", beta=0.1, cpo_alpha=1.0, report_to=[],
                         use_cpu=True, bf16=False, per_device_eval_batch_size=2, max_length=1024)
    trainer = cpo.CPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             eval_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    theirs = trainer.evaluate()

    data = tokenize_dataset(datasets.Dataset.from_list(rows), tokenizer, SequenceLengths(max_prompt_length=None),
                            "eval", "error")
    loader = DataLoader(PairRows(data), batch_size=2, collate_fn=PreferenceCollator(tokenizer.pad_token_id))
    ours = evaluate(trainer.model, loader, spec, new_accelerator(cpu=True))
    batch_losses = [pair_loss(trainer.model, batch, spec)[1]["loss"].item() for batch in loader]
    plain_mean = sum(batch_losses) / 3
    weighted = (2 * batch_losses[0] + 2 * batch_losses[1] + batch_losses[2]) / 5
    assert abs(plain_mean - weighted) > 1e-5  # the two averages do differ here
    assert ours["eval_loss"] == pytest.approx(weighted, rel=1e-6)
    assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-5)
    for name in ("rewards/accuracies", "rewards/margins", "nll_loss", "logps/chosen"):
        assert ours["eval_" + name] == pytest.approx(theirs["eval_" + name], rel=1e-5, abs=1e-6), name


def test_learning_rate_logged_is_the_rate_the_step_used(tokenizer, toy_rows, tmp_path):
    """As TRL (transformers' Trainer reads it before the scheduler steps): linear decay from 1e-3
    over 4 steps gives 1e-3, 7.5e-4, 5e-4, 2.5e-4 (not 7.5e-4 ... 0, the rate of the next step)."""
    data = tokenize_dataset(datasets.Dataset.from_list(toy_rows * 4), tokenizer, SequenceLengths(), "train", "error")
    cfg = TrainConfig(learning_rate=1e-3, per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                      progress_bar=False, save_model=False)
    logged = []
    train(fresh_model(tokenizer), tokenizer, data, None, LossSpec(), cfg, HardwareConfig(cpu=True), str(tmp_path),
          lambda metrics, step: logged.append((step, metrics)))
    rates = [m["learning_rate"] for _, m in logged if "learning_rate" in m]
    assert rates == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
