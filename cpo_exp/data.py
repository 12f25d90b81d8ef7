"""The data pipeline: load preference pairs, check every row, tokenize as TRL does, collate.

A row is ``{"prompt": str, "chosen": str, "rejected": str}``. Tokenization reproduces TRL's
``CPOTrainer.tokenize_row`` for decoder-only models (prompt tokenized on its own, completions
as the tail of ``tokenize(prompt + completion)``, BOS prepended once, EOS appended once,
prompt labels set to -100) so that log-probabilities are comparable with TRL's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import datasets
import torch

from cpo_exp.assets import locate
from cpo_exp.config import DataConfig

log = logging.getLogger(__name__)

COLUMNS = ("prompt", "chosen", "rejected")
LABEL_PAD = -100
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """Data that cannot be trained on; the message names the file, row and column."""


@dataclass(frozen=True)
class SequenceLengths:
    """Length limits, as in TRL's CPOConfig (see README, "Sequence lengths")."""

    max_length: int = 1024
    max_prompt_length: Optional[int] = 512
    max_completion_length: Optional[int] = None
    truncation_mode: str = "keep_end"


# --------------------------------------------------------------------------- loading


def _builder_for(files: list[str]) -> str:
    suffixes = {Path(f).suffix.lower() for f in files}
    unknown = suffixes - set(_BUILDERS)
    if unknown:
        raise DataError(f"unsupported data file type {sorted(unknown)} in {files}; use .json/.jsonl/.csv/.parquet")
    builders = {_BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise DataError(f"data files mix formats {sorted(builders)}: {files}")
    return builders.pop()


def _check_json_lines(path: str) -> None:
    """Name the first malformed line of a JSONL file (``datasets`` only says that one failed)."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {number}: not valid JSON ({err.msg})") from None


def _load_files(files: list[str]) -> datasets.Dataset:
    paths = [locate(f) for f in files]
    for original, path in zip(files, paths):
        if not Path(path).is_file():
            raise DataError(f"data file not found: {original}")
        if path.endswith(".jsonl"):
            _check_json_lines(path)
    builder = _builder_for(paths)
    try:
        return datasets.load_dataset(builder, data_files=paths, split="train")
    except Exception as err:  # noqa: BLE001 - any parse error becomes a named DataError
        raise DataError(f"could not read {files}: {err}") from err


def load_splits(cfg: DataConfig, seed: int) -> tuple[datasets.Dataset, Optional[datasets.Dataset]]:
    """Load the train split and the eval split (or carve one from train with ``eval_fraction``)."""
    if cfg.train_files:
        train = _load_files(list(cfg.train_files))
        evaluation = _load_files(list(cfg.eval_files)) if cfg.eval_files else None
    else:
        train = datasets.load_dataset(cfg.path, cfg.name, split=cfg.train_split)
        evaluation = (
            datasets.load_dataset(cfg.path, cfg.name, split=cfg.eval_split) if cfg.eval_split else None
        )
    if cfg.columns:
        train = train.rename_columns(dict(cfg.columns))
        evaluation = evaluation.rename_columns(dict(cfg.columns)) if evaluation is not None else None
    if evaluation is None and cfg.eval_fraction > 0:
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    if cfg.max_train_samples is not None:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if evaluation is not None and cfg.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(cfg.max_eval_samples, len(evaluation))))
    return train, evaluation


# --------------------------------------------------------------------------- checking


def row_problem(row: dict[str, Any]) -> Optional[str]:
    """What is wrong with one row, or None. Cheap: no tokenizer involved."""
    for column in COLUMNS:
        value = row.get(column)
        if value is None:
            return f"'{column}' is missing"
        if not isinstance(value, str):
            return f"'{column}' must be a string, got {type(value).__name__}"
        if column != "prompt" and not value.strip():
            return f"'{column}' is empty"
    if row["chosen"] == row["rejected"]:
        return "'chosen' and 'rejected' are identical"
    return None


def check_rows(dataset: datasets.Dataset, split: str, on_bad_rows: str) -> datasets.Dataset:
    """Stop on bad rows with a summary (``on_bad_rows='error'``) or drop them (``'skip'``)."""
    missing = [c for c in COLUMNS if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"{split} data has no column {missing} (columns: {dataset.column_names}); "
            "rename columns with data.columns={{old: new}}"
        )
    problems = [(i, p) for i, row in enumerate(dataset) if (p := row_problem(row)) is not None]
    return _apply_policy(dataset, split, problems, on_bad_rows)


def _apply_policy(dataset, split, problems, on_bad_rows):
    if problems and on_bad_rows == "error":
        shown = "\n".join(f"  {split} row {i}: {p}" for i, p in problems[:5])
        raise DataError(
            f"{len(problems)} bad row(s) in {split} data:\n{shown}\n"
            "Fix the data or set data.on_bad_rows=skip to drop them."
        )
    if problems:
        log.warning("%s: dropping %d bad row(s), first: row %d: %s", split, len(problems), *problems[0])
        bad = {i for i, _ in problems}
        dataset = dataset.select(i for i in range(len(dataset)) if i not in bad)
    if len(dataset) == 0:
        raise DataError(f"{split} data is empty" + (" after dropping bad rows" if problems else ""))
    return dataset


# --------------------------------------------------------------------------- tokenizing


def _answer_tokens(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Split ``tokenize(prompt + answer)`` into prompt and answer ids.

    Tokenizers may merge the last prompt token with the first answer token, so the answer is
    taken as the tail of the joint encoding, and the split moves one token left when the
    prompt's own encoding is not a prefix of the joint one (TRL's ``build_tokenized_answer``).
    """
    full = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    start = len(prompt_ids)
    if prompt_ids != full[:start]:
        start -= 1
    return full[:start], full[start:]


def tokenize_row(row: dict[str, str], tokenizer, lengths: SequenceLengths) -> dict[str, list[int]]:
    """Token ids and labels of one pair, truncated as described in the README.

    Truncation: completions are first cut to ``max_completion_length``; if prompt plus the
    longer completion exceeds ``max_length``, the prompt is cut to ``max_prompt_length``
    (keeping its end or start); each completion is then cut to the room left. A completion
    can end up empty; :func:`tokenize_dataset` rejects those rows.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt = row["prompt"]
    chosen_prompt, chosen = _answer_tokens(tokenizer, prompt, row["chosen"])
    rejected_prompt, rejected = _answer_tokens(tokenizer, prompt, row["rejected"])
    differing = sum(a != b for a, b in zip(chosen_prompt, rejected_prompt))
    if differing > 1 or abs(len(chosen_prompt) - len(rejected_prompt)) > 1:
        raise DataError("chosen and rejected tokenize the prompt differently by more than one token")

    # Prepend BOS unless the prompt already starts with it (no double BOS).
    prompts = []
    for ids in (chosen_prompt, rejected_prompt):
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        prompts.append(ids)
    answers = []
    for ids in (chosen, rejected):
        if not ids or ids[-1] != eos:
            ids = ids + [eos]
        if lengths.max_completion_length is not None:
            ids = ids[: lengths.max_completion_length]
        answers.append(ids)

    longer = max(len(a) for a in answers)
    if lengths.max_prompt_length is not None:
        for k, ids in enumerate(prompts):
            if len(ids) + longer > lengths.max_length:
                keep = lengths.max_prompt_length
                prompts[k] = ids[:keep] if lengths.truncation_mode == "keep_start" else ids[-keep:]
    for k in range(2):
        room = max(0, lengths.max_length - len(prompts[k]))
        answers[k] = answers[k][:room]

    out: dict[str, list[int]] = {}
    for name, prompt_ids, answer_ids in zip(("chosen", "rejected"), prompts, answers):
        out[f"{name}_input_ids"] = prompt_ids + answer_ids
        out[f"{name}_labels"] = [LABEL_PAD] * len(prompt_ids) + answer_ids
    return out


# TRL's completion budget for encoder-decoders when max_completion_length is not set.
SEQ2SEQ_COMPLETION_LENGTH = 128


def tokenize_row_seq2seq(row: dict[str, str], tokenizer, lengths: SequenceLengths) -> dict[str, list[int]]:
    """Encoder-decoder layout (TRL's ``is_encoder_decoder`` branch): the prompt feeds the encoder,
    each completion is the decoder's labels.

    Each text is tokenized with the tokenizer's own special tokens; EOS is appended to a
    completion only if the tokenizer did not add it (T5-family tokenizers do), so that the model
    learns to stop. Completions are cut to ``max_completion_length`` (default 128, as TRL); the
    prompt to ``max_prompt_length`` (keeping its end or start), which TRL does not do.
    """
    eos = tokenizer.eos_token_id
    prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
    if lengths.max_prompt_length is not None and len(prompt) > lengths.max_prompt_length:
        keep = lengths.max_prompt_length
        prompt = prompt[:keep] if lengths.truncation_mode == "keep_start" else prompt[-keep:]
    budget = lengths.max_completion_length or SEQ2SEQ_COMPLETION_LENGTH
    out = {"prompt_input_ids": prompt}
    for name in ("chosen", "rejected"):
        ids = tokenizer(row[name], add_special_tokens=True)["input_ids"]
        if not ids or ids[-1] != eos:
            ids = ids + [eos]
        out[f"{name}_labels"] = ids[:budget]
    return out


def tokenize_dataset(
    dataset: datasets.Dataset, tokenizer, lengths: SequenceLengths, split: str, on_bad_rows: str, num_proc=None,
    encoder_decoder: bool = False,
) -> datasets.Dataset:
    """Tokenize every row and catch the rows that leave no completion token to train on.

    A prompt that fills ``max_length`` leaves an empty completion, whose length-averaged
    log-probability would be 0/0 = NaN; such rows are errors here (or dropped with ``skip``).
    """
    tokenize = tokenize_row_seq2seq if encoder_decoder else tokenize_row
    keys = (("prompt_input_ids", "chosen_labels", "rejected_labels") if encoder_decoder else
            ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"))

    def encode(row):
        try:
            encoded = tokenize(row, tokenizer, lengths)
        except DataError as err:
            return {**{k: [] for k in keys}, "problem": str(err)}
        empty = [n for n in ("chosen", "rejected") if all(t == LABEL_PAD for t in encoded[f"{n}_labels"])]
        problem = (
            f"the prompt leaves no room for a '{empty[0]}' token under max_length={lengths.max_length}"
            if empty else ""
        )
        return {**encoded, "problem": problem}

    encoded = dataset.map(encode, remove_columns=dataset.column_names, num_proc=num_proc,
                          desc=f"tokenizing {split}")
    problems = [(i, p) for i, p in enumerate(encoded["problem"]) if p]
    return _apply_policy(encoded, split, problems, on_bad_rows).remove_columns("problem")


# --------------------------------------------------------------------------- batching


def collator_for(model_config, pad_token_id: int):
    """The collator matching the model's layout (decoder-only or encoder-decoder)."""
    if getattr(model_config, "is_encoder_decoder", False):
        return Seq2SeqPreferenceCollator(pad_token_id, model_config.decoder_start_token_id)
    return PreferenceCollator(pad_token_id)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for k, row in enumerate(rows):
        out[k, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class Seq2SeqPreferenceCollator:
    """Encoder-decoder batch of ``2B`` rows: the prompt twice (chosen half, then rejected half)
    as encoder input, the completions as labels padded with -100, and the decoder inputs as the
    labels shifted right behind ``decoder_start_token_id`` (padding where labels are -100)."""

    def __init__(self, pad_token_id: int, decoder_start_token_id: Optional[int]):
        if decoder_start_token_id is None:
            raise DataError("the encoder-decoder's config has no decoder_start_token_id")
        self.pad_token_id = pad_token_id
        self.decoder_start_token_id = decoder_start_token_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        prompts = [r["prompt_input_ids"] for r in rows] * 2
        input_ids = _pad(prompts, self.pad_token_id)
        labels = _pad([r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows], LABEL_PAD)
        decoder_input_ids = torch.full_like(labels, self.pad_token_id)
        decoder_input_ids[:, 0] = self.decoder_start_token_id
        decoder_input_ids[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == LABEL_PAD, self.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": _pad([[1] * len(p) for p in prompts], 0),
                "labels": labels, "decoder_input_ids": decoder_input_ids}


class PreferenceCollator:
    """Stack chosen then rejected into one right-padded batch of ``2B`` sequences.

    Both halves are padded to one common length, as TRL's ``concatenated_inputs`` does, so
    that one forward pass serves the pair.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        sequences = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
        return {"input_ids": _pad(sequences, self.pad_token_id),
                "attention_mask": _pad([[1] * len(s) for s in sequences], 0),
                "labels": _pad(labels, LABEL_PAD)}
