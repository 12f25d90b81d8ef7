"""The data pipeline: every format against TRL's own preprocessing, truncation by hand, every bad
input with a real file, the tokenization cache, and the dataset summary."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cpo_exp.config import DataConfig, ModelConfig
from cpo_exp.data import (
    DataError, PairRows, PreferenceCollator, SequenceLengths, encode_pair, prepare_data, summarize, to_standard,
    tokenize_split,
)
from cpo_exp.data.checks import check_rows
from cpo_exp.data.sources import load_source
from cpo_exp.models import load_tokenizer

from conftest import write_jsonl

TINY = ModelConfig(name_or_path="pkg://cpo_exp/assets/tiny_qwen2", random_init=True)
KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """Loaded files and tokenized splits go to this test's own cache, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CONVERSATIONAL = [
    {"prompt": [msg("system", "You translate English to German."), msg("user", "the red car")],
     "chosen": [msg("assistant", "das rote Auto")], "rejected": [msg("assistant", "das Auto rote")]},
    {"prompt": [msg("user", "a small house"), msg("assistant", "ein kleines Haus"), msg("user", "the woman reads")],
     "chosen": [msg("assistant", "die Frau liest")], "rejected": [msg("assistant", "die Frau schreibt")]},
    # A prompt that ends with an assistant turn is continued, not given a generation prompt.
    {"prompt": [msg("user", "the dog sees the cat"), msg("assistant", "der Hund")],
     "chosen": [msg("assistant", " sieht die Katze")], "rejected": [msg("assistant", " sieht den Katze")]},
]
IMPLICIT_CONVERSATIONAL = [
    {"chosen": [msg("user", "the red car"), msg("assistant", "das rote Auto")],
     "rejected": [msg("user", "the red car"), msg("assistant", "das Auto rote")]},
    {"chosen": [msg("user", "a small house"), msg("assistant", "ein kleines Haus")],
     "rejected": [msg("user", "a small house"), msg("assistant", "ein Haus")]},
]
IMPLICIT_STANDARD = [
    {"chosen": "English: the red car\nGerman: das rote Auto", "rejected": "English: the red car\nGerman: das Auto rote"},
    # TRL's quirk when one is a prefix of the other: the split falls one character early.
    {"chosen": "Q: 2 + 2\nA: 4", "rejected": "Q: 2 + 2\nA: 4."},
]
# HuggingFaceH4/ultrafeedback_binarized: a string prompt next to full conversations.
H4_SHAPE = [{"prompt": r["chosen"][0]["content"], **r} for r in IMPLICIT_CONVERSATIONAL]


# --------------------------------------------------------------------------- against TRL

@pytest.fixture(scope="module")
def trl_trainer(trl, tokenizer, tmp_path_factory):
    from cpo_exp.models import load_model

    cpo = trl.experimental.cpo
    torch.manual_seed(0)
    args = cpo.CPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], use_cpu=True,
                         max_length=1024)
    rows = datasets.Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    return cpo.CPOTrainer(model=load_model(TINY, tokenizer), args=args, train_dataset=rows,
                          processing_class=tokenizer)


def trl_tokenize(trainer, tokenizer, row: dict, max_length: int) -> dict:
    """TRL's own preprocessing chain for one row: extract prompt, chat template, tokenize."""
    from trl import data_utils as trl_data  # imported by the trl fixture that made the trainer

    row = trl_data.maybe_extract_prompt(dict(row))
    row = trl_data.maybe_apply_chat_template(row, tokenizer)
    trainer.max_length = max_length
    return trainer.tokenize_row(row)


FORMATS = {"conversational": CONVERSATIONAL, "implicit-conversational": IMPLICIT_CONVERSATIONAL,
           "implicit-standard": IMPLICIT_STANDARD, "h4-shape": H4_SHAPE}


@pytest.mark.parametrize("rows", FORMATS.values(), ids=FORMATS.keys())
def test_every_format_tokenizes_exactly_as_trl(rows, tokenizer, trl_trainer):
    """The whole pipeline (checks, format normalisation, tokenization) against TRL's chain."""
    checked, dropped = check_rows(datasets.Dataset.from_list(rows), "train", "error")
    ours, _ = tokenize_split(checked, tokenizer, SequenceLengths(max_prompt_length=None), "train", "error")
    for k, row in enumerate(rows):
        theirs = trl_tokenize(trl_trainer, tokenizer, row, 1024)
        for key in KEYS:
            assert ours[k][key] == theirs[key], (k, key)
    assert not dropped


@pytest.mark.parametrize("room", [1, 2])
@pytest.mark.parametrize("rows", FORMATS.values(), ids=FORMATS.keys())
def test_truncated_completions_equal_trl(rows, room, tokenizer, trl_trainer):
    """max_length leaves ``room`` completion tokens after each row's prompt: both cut alike."""
    for k, row in enumerate(rows):
        standard = to_standard(row, tokenizer)
        _, full = encode_pair(standard, tokenizer, SequenceLengths())
        max_length = full["prompt_tokens"] + room
        ours, info = encode_pair(standard, tokenizer, SequenceLengths(max_length=max_length, max_prompt_length=None))
        theirs = trl_tokenize(trl_trainer, tokenizer, row, max_length)
        assert info["truncated"] and len(ours["chosen_input_ids"]) == max_length
        for key in KEYS:
            assert ours[key] == theirs[key], (k, key)


def test_chat_template_text_equals_trl(tokenizer, trl):
    trl_data = trl.data_utils
    for row in CONVERSATIONAL + IMPLICIT_CONVERSATIONAL + H4_SHAPE:
        theirs = trl_data.maybe_apply_chat_template(trl_data.maybe_extract_prompt(dict(row)), tokenizer)
        assert to_standard(row, tokenizer) == {k: theirs[k] for k in ("prompt", "chosen", "rejected")}
    first = to_standard(CONVERSATIONAL[0], tokenizer)
    assert first["prompt"].endswith("<|im_start|>assistant\n")  # the generation prompt
    assert first["chosen"] == "das rote Auto<|im_end|>\n"


# --------------------------------------------------------------------------- truncation by hand


@pytest.fixture(scope="module")
def words():
    """A word-level tokenizer: ``p1 p2`` -> [10, 11], so expected ids can be written by hand."""
    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, "<unk>": 3}
    vocab |= {f"{kind}{i}": base + i - 1 for kind, base in (("p", 10), ("c", 20), ("r", 30)) for i in range(1, 10)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


# prompt [bos,10..15] (7 tokens), chosen [20,21,22,eos] (4), rejected [30,31,eos] (3)
ROW = {"prompt": "p1 p2 p3 p4 p5 p6", "chosen": " c1 c2 c3", "rejected": " r1 r2"}
P = -100


@pytest.mark.parametrize("lengths,chosen,rejected", [
    # Fits: nothing cut; BOS in front, EOS at the end, prompt labels -100.
    (SequenceLengths(max_length=20),
     [0, 10, 11, 12, 13, 14, 15, 20, 21, 22, 1], [0, 10, 11, 12, 13, 14, 15, 30, 31, 1]),
    # 7 + 4 > 9: prompt cut to 4 keeping its end (and the BOS); completions fit the 5 left.
    (SequenceLengths(max_length=9, max_prompt_length=4, truncation_mode="keep_end"),
     [0, 13, 14, 15, 20, 21, 22, 1], [0, 13, 14, 15, 30, 31, 1]),
    (SequenceLengths(max_length=9, max_prompt_length=4, truncation_mode="keep_start"),
     [0, 10, 11, 12, 20, 21, 22, 1], [0, 10, 11, 12, 30, 31, 1]),
    # No prompt limit (TRL 1.16): the completions get the 2 tokens left.
    (SequenceLengths(max_length=9, max_prompt_length=None),
     [0, 10, 11, 12, 13, 14, 15, 20, 21], [0, 10, 11, 12, 13, 14, 15, 30, 31]),
    # A prompt already shorter than max_prompt_length is kept whole; completions cut to the room left.
    (SequenceLengths(max_length=9, max_prompt_length=8),
     [0, 10, 11, 12, 13, 14, 15, 20, 21], [0, 10, 11, 12, 13, 14, 15, 30, 31]),
    # max_completion_length cuts the completions first; then everything fits.
    (SequenceLengths(max_length=20, max_completion_length=2),
     [0, 10, 11, 12, 13, 14, 15, 20, 21], [0, 10, 11, 12, 13, 14, 15, 30, 31]),
], ids=["fits", "keep_end", "keep_start", "no-prompt-limit", "short-prompt", "max_completion_length"])
def test_truncation_rules_by_hand(words, lengths, chosen, rejected):
    ds, _ = tokenize_split(datasets.Dataset.from_list([ROW]), words, lengths, "train", "error")
    out = ds[0]
    assert out["chosen_input_ids"] == chosen and out["rejected_input_ids"] == rejected
    for side, ids in (("chosen", chosen), ("rejected", rejected)):
        prompt_len = next(i for i, t in enumerate(ids) if t >= 20)
        assert out[f"{side}_labels"] == [P] * prompt_len + ids[prompt_len:]
    assert out["truncated"] == (lengths.max_length < 11 or lengths.max_completion_length is not None)
    assert (out["prompt_tokens"], out["chosen_tokens"], out["rejected_tokens"]) == (7, 4, 3)


# --------------------------------------------------------------------------- bad input, real files


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


GOOD = {"prompt": "p", "chosen": " a", "rejected": " b"}


def bad_jsonl(tmp_path: Path, bad: dict) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, bad])


BAD_ROWS = [
    ({"prompt": "p", "chosen": None, "rejected": " b"}, "'chosen' is missing"),
    ({"prompt": "p", "rejected": " b"}, "'chosen' is missing"),
    ({"chosen": " a", "rejected": " b"}, "'prompt' is missing"),
    ({"prompt": "p", "chosen": "  ", "rejected": " b"}, "'chosen' is empty"),
    ({"prompt": "p", "chosen": " a", "rejected": ""}, "'rejected' is empty"),
    ({"prompt": "p", "chosen": " same", "rejected": " same"}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "p", "chosen": 7, "rejected": " b"}, "'chosen' must be a string or a list of messages, got int"),
    ({"prompt": "p", "chosen": {"text": "a"}, "rejected": " b"},
     "'chosen' must be a string or a list of messages, got dict"),
    ({"prompt": 3.5, "chosen": " a", "rejected": " b"}, "'prompt' must be a string or a list of messages, got float"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_bad_standard_row_is_named_with_file_and_line(tmp_path, tokenizer, bad, message):
    path = bad_jsonl(tmp_path, bad)
    with pytest.raises(DataError) as err:
        prepare_data(DataConfig(train_files=[str(path)]), tokenizer, SequenceLengths(), 0)
    assert f"train row 2: {message}" in str(err.value)
    assert f"{path}, line 3" in str(err.value)
    assert "1 bad row(s)" in str(err.value) and "data.on_bad_rows=skip" in str(err.value)


CONV_GOOD = {"prompt": [msg("user", "hi")], "chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "b")]}
BAD_MESSAGES = [
    ({"prompt": [{"content": "hi"}], "chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "b")]},
     "'prompt' message 0 has no 'role'"),
    ({"prompt": [msg("user", "hi")], "chosen": [{"role": "assistant"}], "rejected": [msg("assistant", "b")]},
     "'chosen' message 0 has no 'content'"),
    ({"prompt": [msg("bot", "hi")], "chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "b")]},
     "'prompt' message 0 has unknown role 'bot'"),
    ({"prompt": [msg("user", "hi")], "chosen": [], "rejected": [msg("assistant", "b")]},
     "'chosen' is an empty list of messages"),
    ({"prompt": [msg("user", "hi")], "chosen": [msg("assistant", "a")], "rejected": "b"},
     "'chosen' is a list of messages but 'rejected' is not"),
    ({"prompt": [msg("user", "hi"), msg("system", "be brief")], "chosen": [msg("assistant", "a")],
      "rejected": [msg("assistant", "b")]}, "'prompt' must end with a user, tool or assistant message"),
    ({"chosen": [msg("user", "x"), msg("assistant", "a")], "rejected": [msg("user", "y"), msg("assistant", "b")]},
     "share no prompt"),
]


@pytest.mark.parametrize("bad,message", BAD_MESSAGES, ids=[m for _, m in BAD_MESSAGES])
def test_malformed_messages_are_named(tmp_path, tokenizer, bad, message):
    rows = [CONV_GOOD, bad] if "prompt" in bad else [{"chosen": CONV_GOOD["prompt"] + CONV_GOOD["chosen"],
                                                      "rejected": CONV_GOOD["prompt"] + CONV_GOOD["rejected"]}, bad]
    path = write_jsonl(tmp_path / "conv.jsonl", rows)
    with pytest.raises(DataError) as err:
        prepare_data(DataConfig(train_files=[str(path)]), tokenizer, SequenceLengths(), 0)
    assert message in str(err.value) and f"{path}, line 2" in str(err.value)


@pytest.mark.parametrize("name,text,message", [
    ("train.jsonl", '{"prompt": "p", "chosen": " a", "rejected": " b"}\n\n{"prompt": "p", "chosen": \n',
     "train.jsonl, line 3: not valid JSON"),
    ("train.jsonl", '["p", " a", " b"]\n', "line 1: a record must be a JSON object"),
    ("train.json", '[{"prompt": "p", "chosen": " a",\n "rejected": " b"},\n {"prompt" "p"}]', "train.json, line 3"),
    ("train.csv", 'prompt,chosen,rejected\np,a,b\np,a,b,extra\n', "train.csv"),
    ("train.txt", "prompt chosen rejected\n", "unsupported data file type '.txt'"),
])
def test_unparseable_file_is_named(tmp_path, tokenizer, name, text, message):
    path = write(tmp_path / name, text)
    with pytest.raises(DataError, match=re.escape(message)):
        prepare_data(DataConfig(train_files=[str(path)]), tokenizer, SequenceLengths(), 0)


def test_missing_file_and_missing_column_are_named(tmp_path, tokenizer):
    with pytest.raises(DataError, match="train data file not found: .*nope.jsonl"):
        prepare_data(DataConfig(train_files=[str(tmp_path / "nope.jsonl")]), tokenizer, SequenceLengths(), 0)
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "chosen": " a", "answer": " b"}])
    with pytest.raises(DataError, match=r"has no column 'rejected' \(columns: \['prompt', 'chosen', 'answer'\]\)"):
        prepare_data(DataConfig(train_files=[str(path)]), tokenizer, SequenceLengths(), 0)


def test_prompt_without_room_for_a_completion_token(tmp_path, tokenizer):
    long_prompt = {"prompt": "Translate " * 40, "chosen": " a", "rejected": " b"}
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, long_prompt])
    lengths = SequenceLengths(max_length=20, max_prompt_length=None)
    with pytest.raises(DataError, match=r"train row 1: the prompt \(\d+ tokens\) leaves no room for a 'chosen' token "
                                        r"under max_length=20 \(.*t.jsonl, line 2\)"):
        prepare_data(DataConfig(train_files=[str(path)]), tokenizer, lengths, 0)


def test_conversational_data_needs_a_chat_template(tmp_path, words):
    path = write_jsonl(tmp_path / "t.jsonl", [CONV_GOOD])
    with pytest.raises(DataError, match="conversational but the tokenizer has no chat template"):
        prepare_data(DataConfig(train_files=[str(path)]), words, SequenceLengths(), 0)


def test_skip_drops_bad_rows_counts_them_by_reason_and_goes_on(tmp_path, tokenizer, caplog):
    rows = [GOOD] * 4 + [b for b, _ in BAD_ROWS[:6]] + [{"prompt": "x " * 300, "chosen": " a", "rejected": " b"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = DataConfig(train_files=[str(path)], on_bad_rows="skip")
    with caplog.at_level(logging.WARNING):
        prepared = prepare_data(cfg, tokenizer, SequenceLengths(max_length=64, max_prompt_length=None), 0)
    stats = prepared["train"].stats
    assert len(prepared["train"].dataset) == stats.rows == 4
    assert stats.dropped == {"missing": 3, "empty": 2, "identical": 1, "no_room": 1}
    assert "dropping 6 of 11 row(s) (3 missing, 2 empty, 1 identical)" in caplog.text
    summary = summarize(prepared, SequenceLengths())
    assert summary.params()["data.train_dropped_reasons"] == "3 missing, 2 empty, 1 identical, 1 no_room"
    assert summary.params()["data.train_dropped"] == 7 and summary.table()["dropped"] == [7]


def test_nothing_left_after_skipping_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [b for b, _ in BAD_ROWS[:3]])
    with pytest.raises(DataError, match="train data is empty after dropping bad rows"):
        prepare_data(DataConfig(train_files=[str(path)], on_bad_rows="skip"), tokenizer, SequenceLengths(), 0)


# --------------------------------------------------------------------------- sources


def test_many_files_of_mixed_types_with_column_mapping_carving_and_caps(tmp_path, tokenizer, toy_rows):
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in toy_rows]
    a = write_jsonl(tmp_path / "a.jsonl", renamed * 5)
    pd.DataFrame(renamed * 5).to_csv(tmp_path / "b.csv", index=False)
    pd.DataFrame(renamed * 5).to_parquet(tmp_path / "c.parquet")
    cfg = DataConfig(train_files=[str(a), str(tmp_path / "b.csv"), str(tmp_path / "c.parquet")],
                     columns={"question": "prompt", "good": "chosen", "bad": "rejected"}, eval_fraction=0.25)
    prepared = prepare_data(cfg, tokenizer, SequenceLengths(), seed=3)
    assert (len(prepared["train"].dataset), len(prepared["eval"].dataset)) == (45, 15)
    again = prepare_data(cfg, tokenizer, SequenceLengths(), seed=3)
    assert again["eval"].dataset["chosen_input_ids"] == prepared["eval"].dataset["chosen_input_ids"]
    other = prepare_data(cfg, tokenizer, SequenceLengths(), seed=4)
    assert other["eval"].dataset["chosen_input_ids"] != prepared["eval"].dataset["chosen_input_ids"]
    capped = prepare_data(DataConfig(**{**cfg.__dict__, "max_train_samples": 7, "max_eval_samples": 2}),
                          tokenizer, SequenceLengths(), seed=3)
    assert (len(capped["train"].dataset), len(capped["eval"].dataset)) == (7, 2)
    assert set(capped["train"].dataset.column_names) == set(KEYS)


def test_a_bad_row_in_the_second_file_names_that_file_and_line(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD] * 3)
    b = write(tmp_path / "b.jsonl", json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "chosen": ""}) + "\n")
    with pytest.raises(DataError, match=r"train row 4: 'chosen' is empty \(.*b.jsonl, line 3\)"):
        prepare_data(DataConfig(train_files=[str(a), str(b)]), tokenizer, SequenceLengths(), 0)


def test_column_mapping_of_an_absent_column_is_named(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD])
    with pytest.raises(DataError, match=r"data.columns maps \['good'\]"):
        load_source(DataConfig(train_files=[str(path)], columns={"good": "chosen"}), "train")


def hub_folder(root: Path, splits: dict[str, list[dict]]) -> Path:
    """A dataset folder laid out as on the hub: data/<split>-00000-of-00001.parquet."""
    (root / "data").mkdir(parents=True)
    for split, rows in splits.items():
        pd.DataFrame(rows).to_parquet(root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def test_hub_layout_with_named_splits_loads_through_the_hub_code_path(tmp_path, tokenizer):
    folder = hub_folder(tmp_path / "h4", {"train_prefs": H4_SHAPE * 3, "test_prefs": H4_SHAPE})
    cfg = DataConfig(path=str(folder), train_split="train_prefs", eval_split="test_prefs")
    prepared = prepare_data(cfg, tokenizer, SequenceLengths(), 0)
    assert (len(prepared["train"].dataset), len(prepared["eval"].dataset)) == (6, 2)
    assert prepared["train"].stats.data_format == "conversational, implicit prompt"
    with pytest.raises(DataError, match="could not load dataset .*split 'nope'.*Unknown split"):
        prepare_data(DataConfig(path=str(folder), train_split="nope"), tokenizer, SequenceLengths(), 0)


def test_save_to_disk_folder_loads_too(tmp_path, tokenizer):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(IMPLICIT_STANDARD * 2)}).save_to_disk(tmp_path / "saved")
    prepared = prepare_data(DataConfig(path=str(tmp_path / "saved")), tokenizer, SequenceLengths(), 0)
    assert len(prepared["train"].dataset) == 4
    assert prepared["train"].stats.data_format == "standard, implicit prompt"


def alma_row(pair: str, src: str, ref: str, gpt4: str, alma: str, scores: tuple, **extra) -> dict:
    """One row shaped as haoranxu/ALMA-R-Preference: a 'translation' dict (see cpo_exp/data/adapters.py)."""
    first, _ = pair.split("-")
    translation = {"language_pair": pair, first: src, "en": ref, "gpt4_en": gpt4, "alma_en": alma,
                   "ref_en_kiwi_xcomet": scores[0], "gpt4_en_kiwi_xcomet": scores[1],
                   "alma_en_kiwi_xcomet": scores[2], "required_directions": "", "Delta": 0.0}
    translation |= {f"gpt4_{first}": src + "!", f"alma_{first}": src + "?", f"ref_{first}_kiwi_xcomet": 0.9,
                    f"gpt4_{first}_kiwi_xcomet": 0.8, f"alma_{first}_kiwi_xcomet": 0.7}
    translation |= extra
    return {"translation": translation}


def test_alma_r_adapter_picks_best_and_worst_scored_translation(tmp_path, tokenizer):
    rows = [alma_row("de-en", "das rote Auto", "the red car", "the red automobile", "the car red", (0.9, 0.8, 0.7)),
            alma_row("de-en", "ein Haus", "a house", "one house", "a home", (0.5, 0.9, 0.6)),
            alma_row("de-en", "die Frau", "the woman", "the wife", "the lady", (0.5, 0.9, 0.6),
                     required_directions="en-de")]
    folder = hub_folder(tmp_path / "alma", {"train": rows})
    cfg = DataConfig(path=str(folder), adapter="alma_r", adapter_args={"directions": ["de-en", "en-de"]})
    source = load_source(cfg, "train")
    pairs = source.dataset.to_list()
    assert [p["__row__"] for p in pairs] == [0, 0, 1, 1, 2]  # the en-de-only row yields one pair
    assert pairs[0] == {"prompt": "Translate this from German to English:\nGerman: das rote Auto\nEnglish:",
                        "chosen": " the red car", "rejected": " the car red", "__row__": 0}
    assert (pairs[2]["chosen"], pairs[2]["rejected"]) == (" one house", " a house")
    assert pairs[1]["prompt"].startswith("Translate this from English to German:\nEnglish: the red car")
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == (" das rote Auto", " das rote Auto?")
    assert len(prepare_data(cfg, tokenizer, SequenceLengths(), 0)["train"].dataset) == 5
    with pytest.raises(DataError, match="alma_r adapter needs translation\\['gpt4_en'\\]"):
        broken = [{"translation": {k: v for k, v in rows[0]["translation"].items() if k != "gpt4_en"}}]
        load_source(DataConfig(path=str(hub_folder(tmp_path / "broken", {"train": broken})), adapter="alma_r",
                               adapter_args={"directions": ["de-en"]}), "train")


# --------------------------------------------------------------------------- cache and summary


def test_second_tokenization_of_the_same_data_reads_the_cache(tmp_path, tokenizer, toy_rows, caplog):
    path = write_jsonl(tmp_path / "t.jsonl", toy_rows * 3)
    cfg = DataConfig(train_files=[str(path)])
    with caplog.at_level(logging.INFO, logger="cpo_exp.data.tokenize"):
        first = prepare_data(cfg, tokenizer, SequenceLengths(), 0)
        cached = sorted((tmp_path / "hf_cache" / "cpo_exp_tokenized").glob("*.arrow"))
        second = prepare_data(cfg, tokenizer, SequenceLengths(), 0)
        third = prepare_data(cfg, tokenizer, SequenceLengths(max_length=20, max_prompt_length=12), 0)  # other lengths, other key
    assert "train: tokenizing 12 rows" in caplog.text
    assert caplog.text.count("train: tokenized data read from cache") == 1
    assert len(cached) == 1 and second["train"].dataset.cache_files[0]["filename"] == str(cached[0])
    assert second["train"].dataset.to_list() == first["train"].dataset.to_list()
    assert len(list(cached[0].parent.glob("*.arrow"))) == 2 and third["train"].stats.truncated > 0
    caplog.clear()
    write_jsonl(path, toy_rows * 2)  # edited data: tokenized afresh, never a stale cache
    with caplog.at_level(logging.INFO, logger="cpo_exp.data.tokenize"):
        edited = prepare_data(cfg, tokenizer, SequenceLengths(), 0)
    assert "train: tokenizing 8 rows" in caplog.text and len(edited["train"].dataset) == 8


def test_parallel_tokenization_gives_the_same_ids(tmp_path, tokenizer, toy_rows):
    path = write_jsonl(tmp_path / "t.jsonl", toy_rows * 3)
    serial = prepare_data(DataConfig(train_files=[str(path)]), tokenizer, SequenceLengths(), 0)
    parallel = prepare_data(DataConfig(train_files=[str(path)], num_proc=2), tokenizer, SequenceLengths(), 0)
    assert parallel["train"].dataset.to_list() == serial["train"].dataset.to_list()


def test_summary_reports_rows_lengths_and_truncation(tmp_path, words):
    path = write_jsonl(tmp_path / "t.jsonl", [ROW] * 3 + [{**ROW, "chosen": " c1"}])
    lengths = SequenceLengths(max_length=9, max_prompt_length=None)
    prepared = prepare_data(DataConfig(train_files=[str(path)]), words, lengths, 0)
    summary = summarize(prepared, lengths)
    table = summary.table()
    assert table["rows"] == [4] and table["truncated"] == [4] and summary.params()["data.train_truncated"] == 4
    assert table["prompt_tokens_p50"] == [7] and table["chosen_tokens_max"] == [4]
    assert table["chosen_tokens_p50"] == [4] and table["rejected_tokens_p99"] == [3]
    # three pairs with chosen one token longer than rejected (4 vs 3), one with chosen " c1" (2 vs 3)
    assert table["length_diff_mean"] == [pytest.approx((3 * 1 - 1) / 4)] and table["chosen_longer"] == [0.75]
    assert summary.params()["data.train_format"] == "standard"
    assert "train: 4 rows (standard)" in summary.text() and "truncated 4 (100.0%)" in summary.text()


def test_eval_fraction_next_to_an_eval_split_is_a_config_error():
    from cpo_exp.config import Config, ConfigError, validate

    cfg = Config(model=TINY, data=DataConfig(path="trl-lib/ultrafeedback_binarized", eval_split="test",
                                             eval_fraction=0.1))
    with pytest.raises(ConfigError, match="data.eval_fraction must be 0 when an eval split is given"):
        validate(cfg)
    validate(Config(model=TINY, data=DataConfig(path="x", eval_fraction=0.1)))


# --------------------------------------------------------------------------- batching


def test_pair_rows_read_each_row_in_the_datasets_order_without_copying(tmp_path, tokenizer, toy_rows):
    path = write_jsonl(tmp_path / "t.jsonl", toy_rows * 25)
    tokenized = prepare_data(DataConfig(train_files=[str(path)]), tokenizer, SequenceLengths(), 0)["train"].dataset
    # Views of the Arrow buffers: a memory-mapped split stays on disk.
    assert all(not ids.flags.owndata for ids in PairRows(tokenized)[0].values())
    # Several Arrow chunks; then a shuffled index mapping on top, and a column that is not tokens.
    chunked = datasets.concatenate_datasets([tokenized] * 3)
    shuffled = chunked.add_column("__row__", list(range(len(chunked)))).shuffle(seed=3)
    for dataset in (chunked, shuffled):
        rows = PairRows(dataset)
        assert len(rows) == len(dataset) == 300
        for k in (0, 7, 150, 299):
            expected = {name: ids for name, ids in dataset[k].items() if name != "__row__"}
            assert {name: ids.tolist() for name, ids in rows[k].items()} == expected
        batch = rows.__getitems__([3, 0, 3, 250])
        assert [r["rejected_labels"].tolist() for r in batch] == [dataset[i]["rejected_labels"] for i in (3, 0, 3, 250)]
        with pytest.raises(IndexError, match="out of range for 300 rows"):
            rows.__getitems__([300])


def test_collators_give_the_same_batch_from_pair_rows_and_from_lists(tmp_path, tokenizer, toy_rows):
    from cpo_exp.packing import PackingCollator

    path = write_jsonl(tmp_path / "t.jsonl", toy_rows)
    tokenized = prepare_data(DataConfig(train_files=[str(path)]), tokenizer, SequenceLengths(), 0)["train"].dataset
    as_lists = [tokenized[i] for i in range(len(tokenized))]
    as_views = PairRows(tokenized).__getitems__(range(len(tokenized)))
    for collate in (PreferenceCollator(tokenizer.pad_token_id), PackingCollator(shared_prompt=True)):
        from_lists, from_views = collate(as_lists), collate(as_views)
        assert from_lists.keys() == from_views.keys()
        for name, value in from_lists.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == from_views[name].dtype and torch.equal(value, from_views[name]), name
            else:
                assert value == from_views[name], name
