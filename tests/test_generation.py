"""Generation during evaluation: scorers, RNG isolation, the MLflow table, the evaluate command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cpo_exp.config import ModelConfig
from cpo_exp.generation import SamplingSpec, generate
from cpo_exp.scorers import exact_match, len_ratio, resolve_scorer, sacrebleu_signatures
from cpo_exp.models import load_model, load_tokenizer

from conftest import QUICK, run_cli

TINY = ModelConfig(name_or_path="pkg://cpo_exp/assets/tiny_qwen2", random_init=True)


def test_chrf_and_bleu_are_sacrebleu_corpus_scores():
    import sacrebleu

    hyps, refs = ["der Hund sieht die Katze", "das Auto"], ["der Hund sieht die Katze", "das rote Auto"]
    assert resolve_scorer("chrf")(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert resolve_scorer("bleu")(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert resolve_scorer("chrf")(refs, refs) == pytest.approx(100.0)
    assert "nrefs:1" in sacrebleu_signatures()["chrf"]


def test_len_ratio_and_exact_match_by_hand():
    assert len_ratio(["a b", "c"], ["a b c", "d e f"]) == pytest.approx(3 / 6)
    assert exact_match(["a b ", "c"], ["a b", "d"]) == pytest.approx(0.5)


def test_scorers_resolve_from_an_import_path_and_unknown_ones_are_named():
    assert resolve_scorer("cpo_exp.scorers:exact_match") is exact_match
    with pytest.raises(ValueError, match="unknown scorer 'meteor'"):
        resolve_scorer("meteor")
    with pytest.raises(ValueError, match="scorer 'no_such_module:fn' cannot be imported: No module named"):
        resolve_scorer("no_such_module:fn")


def test_sampling_does_not_disturb_the_training_rng():
    tokenizer = load_tokenizer(TINY)
    torch.manual_seed(0)
    model = load_model(TINY, tokenizer)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    texts = generate(model, tokenizer, ["Translate English to German.\nEnglish: the dog\nGerman:"] * 3,
                     SamplingSpec(max_new_tokens=5, do_sample=True, batch_size=2))
    assert torch.equal(torch.rand(3), expected)
    assert len(texts) == 3
    again = generate(model, tokenizer, ["Translate English to German.\nEnglish: the dog\nGerman:"] * 3,
                     SamplingSpec(max_new_tokens=5, do_sample=True, batch_size=2))
    assert again == texts  # seeded: the same samples every evaluation


def test_left_padded_batches_generate_what_single_prompts_do():
    tokenizer = load_tokenizer(TINY)
    torch.manual_seed(0)
    model = load_model(TINY, tokenizer)
    prompts = ["Translate English to German.\nEnglish: the dog\nGerman:",
               "Translate English to German.\nEnglish: the very small red car sees a house\nGerman:"]
    batched = generate(model, tokenizer, prompts, SamplingSpec(max_new_tokens=6, batch_size=2))
    single = [generate(model, tokenizer, [p], SamplingSpec(max_new_tokens=6, batch_size=1))[0] for p in prompts]
    assert batched == single


@pytest.mark.slow
def test_generation_is_logged_as_table_and_scores_then_evaluate_reuses_the_run(workdir):
    scorer_dir = workdir / "my_scorers"
    scorer_dir.mkdir()
    (scorer_dir / "word_count.py").write_text(
        "def words(hypotheses, references):\n    return float(sum(len(h.split()) for h in hypotheses))\n")
    env = {"PYTHONPATH": f"{scorer_dir}:{':'.join(sys.path)}"}  # where the user's scorer module lives
    result = run_cli(*QUICK, "eval.generate=true", "eval.num_prompts=4", "eval.max_new_tokens=8",
                     "eval.scorers=[chrf,bleu,len_ratio,word_count:words]", cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cpo_exp").experiment_id])
    for name in ("eval_gen/chrf", "eval_gen/bleu", "eval_gen/len_ratio", "eval_gen/word_count:words"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [0, 3, 6], name
    assert run.data.params["eval_gen.chrf_signature"].startswith("nrefs:1")
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval_samples.json", str(workdir))).read_text())
    assert table["columns"] == ["step", "prompt", "generated", "chosen", "rejected"]
    assert sorted({row[0] for row in table["data"]}) == [0, 3, 6] and len(table["data"]) == 12

    run_dir = run.data.tags["output_dir"]
    evaluated = run_cli(run_dir, "eval.num_prompts=4", "eval.max_new_tokens=8", "data.max_eval_samples=16",
                        cwd=workdir, env=env, module="cpo_exp.evaluate")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "eval_gen/chrf" in evaluated.stdout and "eval_rewards/accuracies" in evaluated.stdout
    history = client.get_metric_history(run.info.run_id, "eval_rewards/accuracies")
    assert [m.step for m in history] == [0, 3, 6, 6]  # the same run, at its last step
    assert history[-1].value == pytest.approx(history[-2].value)  # same model, same data, same number
    assert client.get_run(run.info.run_id).info.status == "FINISHED"

    by_id = run_cli(run.info.run_id, "--new-run", "eval.generate=false", "data.max_eval_samples=16",
                    cwd=workdir, env=env, module="cpo_exp.evaluate")
    assert by_id.returncode == 0, by_id.stderr[-3000:]
    runs = client.search_runs([run.info.experiment_id], "tags.evaluated_run_id = '%s'" % run.info.run_id)
    assert len(runs) == 1 and "eval_gen/chrf" not in runs[0].data.metrics


def test_evaluate_names_an_unknown_target(workdir):
    result = run_cli("nonexistent-run", cwd=workdir, module="cpo_exp.evaluate")
    assert result.returncode == 2
    assert "'nonexistent-run' is not a run directory" in result.stderr


def test_conversational_eval_rows_are_prompted_as_in_training():
    from cpo_exp.generation import GenerationEval

    tokenizer = load_tokenizer(TINY)
    rows = [{"prompt": [{"role": "user", "content": "the dog"}],
             "chosen": [{"role": "assistant", "content": "der Hund"}],
             "rejected": [{"role": "assistant", "content": "die Hund"}]}]
    evaluator = GenerationEval(tokenizer, rows, num_prompts=4, spec=SamplingSpec())
    assert evaluator.rows[0]["prompt"] == "<|im_start|>user\nthe dog<|im_end|>\n<|im_start|>assistant\n"
    assert evaluator.rows[0]["chosen"].startswith("der Hund")


def test_generation_works_with_the_packed_engine(toy_rows, tmp_path):
    """Packing swaps the attention for packed rows; generation must still see ordinary attention."""
    import datasets

    from cpo_exp.config import EngineConfig, HardwareConfig, TrainConfig
    from cpo_exp.data import SequenceLengths, tokenize_dataset
    from cpo_exp.engine import train
    from cpo_exp.generation import GenerationEval
    from cpo_exp.losses import LossSpec

    tokenizer = load_tokenizer(TINY)
    torch.manual_seed(0)
    model = load_model(TINY, tokenizer)
    data = tokenize_dataset(datasets.Dataset.from_list(toy_rows * 2), tokenizer, SequenceLengths(), "train", "error")
    evaluator = GenerationEval(tokenizer, toy_rows, num_prompts=2, spec=SamplingSpec(max_new_tokens=4))
    lean = EngineConfig(logits="chunked", packing=True, shared_prompt=True)
    result = train(model, tokenizer, data, data, LossSpec(),
                   TrainConfig(max_steps=2, logging_steps=1, progress_bar=False, save_model=False),
                   HardwareConfig(cpu=True), str(tmp_path), extra_eval=evaluator, engine=lean)
    assert "eval_gen/chrf" in result.eval_metrics
    # The model keeps the packed attention, whose calls without segments are ordinary SDPA:
    # it generates exactly what the same weights generate with SDPA itself.
    assert model.config._attn_implementation == "cpo_segments"
    kept = generate(model, tokenizer, [r["prompt"] for r in toy_rows], SamplingSpec(max_new_tokens=6, batch_size=4))
    model.set_attn_implementation("sdpa")
    assert generate(model, tokenizer, [r["prompt"] for r in toy_rows], SamplingSpec(max_new_tokens=6, batch_size=4)) == kept
