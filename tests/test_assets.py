"""The embedded default: its tokenizer survives the loading path users take, its data is sound."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoTokenizer

from cpo_exp.assets import locate
from cpo_exp.config import ModelConfig
from cpo_exp.models import load_tokenizer

TINY = "pkg://cpo_exp/assets/tiny_qwen2"


def dataset_rows(split: str) -> list[dict]:
    path = locate(f"pkg://cpo_exp/assets/toy_translation/{split}.jsonl")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rows = dataset_rows("train")[:300] + dataset_rows("eval")[:100]
    return [r[k] for r in rows for k in ("prompt", "chosen", "rejected")] + [
        "Translate 42 words.\r\nGerman: ÄÖÜ ß", "<|im_start|>user\nhi<|im_end|>\n",
    ]


def test_autotokenizer_encodes_exactly_as_the_shipped_tokenizer_json(texts):
    """transformers 5 maps model_type qwen2 to Qwen2Tokenizer, which rebuilds its own pre-tokenizer;
    the shipped tokenizer must still encode exactly as its tokenizer.json says."""
    raw = Tokenizer.from_file(locate(TINY) + "/tokenizer.json")
    for loaded in (AutoTokenizer.from_pretrained(locate(TINY)), load_tokenizer(ModelConfig(name_or_path=TINY))):
        for text in texts:
            assert loaded(text, add_special_tokens=False)["input_ids"] == raw.encode(text).ids, text
            assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_and_model_config_agree():
    tokenizer = load_tokenizer(ModelConfig(name_or_path=TINY))
    config = AutoConfig.from_pretrained(locate(TINY))
    assert len(tokenizer) == config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        config.bos_token_id, config.eos_token_id, config.pad_token_id)
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3


def test_chat_template_adds_the_generation_prompt():
    tokenizer = load_tokenizer(ModelConfig(name_or_path=TINY))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hallo"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhallo<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("split,expected", [("train", 1500), ("eval", 200)])
def test_toy_translation_rows_are_sound(split, expected):
    rows = dataset_rows(split)
    assert len(rows) == expected
    for row in rows:
        assert row["prompt"].startswith("Translate English to German.") and row["prompt"].endswith("German:")
        assert row["chosen"] != row["rejected"] and row["chosen"].startswith(" ")


def test_train_and_eval_share_no_source_sentence():
    source = {s: {r["prompt"] for r in dataset_rows(s)} for s in ("train", "eval")}
    assert not source["train"] & source["eval"]


def test_pkg_uri_names_the_missing_file():
    with pytest.raises(FileNotFoundError, match="pkg://cpo_exp/assets/nope"):
        locate("pkg://cpo_exp/assets/nope")
