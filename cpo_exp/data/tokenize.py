"""Tokenization and truncation as TRL's ``CPOTrainer.tokenize_row`` (decoder-only), cached.

The prompt is tokenized on its own, each completion as the tail of ``tokenize(prompt +
completion)`` (TRL's ``build_tokenized_answer``), BOS is prepended once, EOS appended once,
and prompt labels are -100, so that log-probabilities are comparable with TRL's. The
truncation rules are in docs/data.md ("Tokenization and truncation"); with ``max_prompt_length=None`` and
``max_completion_length=None`` they are TRL 1.16's exactly.

A tokenized split is written once to the ``datasets`` cache under a key made of the data's
fingerprint, the tokenizer, the length limits and this code; a second run reads it back.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections import Counter
from dataclasses import astuple
from pathlib import Path
from typing import Any, Optional

import datasets

from cpo_exp.data import formats
from cpo_exp.data.checks import Locate, apply_policy
from cpo_exp.data.schema import (
    BAD_MESSAGES, LABEL_PAD, NO_ROOM, PROMPT_MISMATCH, ROW_ID, DataError, Problem, SequenceLengths,
)

log = logging.getLogger(__name__)

# Per-row length columns kept next to the ids for the dataset summary (cpo_exp.data.stats).
STAT_COLUMNS = ("prompt_tokens", "chosen_tokens", "rejected_tokens", "truncated")
_PROBLEM_COLUMNS = ("problem", "problem_kind")


def _answer_tokens(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Split ``tokenize(prompt + answer)`` into prompt and answer ids.

    Tokenizers may merge the last prompt token with the first answer token, so the answer is
    taken as the tail of the joint encoding, and the split moves one token left when the
    prompt's own encoding is not a prefix of the joint one (TRL's ``build_tokenized_answer``).
    """
    full = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    start = len(prompt_ids)
    if start > len(full):  # TRL stops here too ("should have the same length")
        raise DataError("the prompt alone tokenizes longer than prompt + completion")
    if prompt_ids != full[:start]:
        start -= 1
    return full[:start], full[start:]


def _cut_prompt(ids: list[int], keep: int, mode: str, bos: Optional[int]) -> list[int]:
    if mode == "keep_start":
        return ids[:keep]
    # keep_end keeps the BOS in front: a sequence without it is one the model never saw.
    if bos is not None and ids and ids[0] == bos and keep > 1:
        return [bos] + ids[1:][-(keep - 1):]
    return ids[-keep:]


def encode_pair(row: dict[str, str], tokenizer, lengths: SequenceLengths) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Ids and labels of one standard-format pair, and its untruncated lengths (for statistics)."""
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
        answers.append(ids)
    info = {"prompt_tokens": len(prompts[0]), "chosen_tokens": len(answers[0]),
            "rejected_tokens": len(answers[1])}

    if lengths.max_completion_length is not None:
        answers = [ids[: lengths.max_completion_length] for ids in answers]
    longer = max(len(a) for a in answers)
    if lengths.max_prompt_length is not None:
        for k, ids in enumerate(prompts):
            if len(ids) + longer > lengths.max_length:
                prompts[k] = _cut_prompt(ids, lengths.max_prompt_length, lengths.truncation_mode, bos)
    for k in range(2):
        room = max(0, lengths.max_length - len(prompts[k]))
        answers[k] = answers[k][:room]
    info["truncated"] = (len(prompts[0]) < info["prompt_tokens"] or len(answers[0]) < info["chosen_tokens"]
                         or len(answers[1]) < info["rejected_tokens"])

    out: dict[str, list[int]] = {}
    for name, prompt_ids, answer_ids in zip(("chosen", "rejected"), prompts, answers):
        out[f"{name}_input_ids"] = prompt_ids + answer_ids
        out[f"{name}_labels"] = [LABEL_PAD] * len(prompt_ids) + answer_ids
    return out, info


def tokenize_row(row: dict[str, str], tokenizer, lengths: SequenceLengths) -> dict[str, list[int]]:
    """Token ids and labels of one standard-format pair, truncated as described in docs/data.md."""
    return encode_pair(row, tokenizer, lengths)[0]


# TRL's completion budget for encoder-decoders when max_completion_length is not set.
SEQ2SEQ_COMPLETION_LENGTH = 128


def encode_pair_seq2seq(row: dict[str, str], tokenizer, lengths: SequenceLengths
                        ) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Encoder-decoder layout (TRL's ``is_encoder_decoder`` branch): the prompt feeds the encoder,
    each completion is the decoder's labels.

    Each text is tokenized with the tokenizer's own special tokens; EOS is appended to a
    completion only if the tokenizer did not add it (T5-family tokenizers do), so that the model
    learns to stop. Completions are cut to ``max_completion_length`` (default 128, as TRL); the
    prompt to ``max_prompt_length`` (keeping its end or start), which TRL does not do.
    """
    eos = tokenizer.eos_token_id
    prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
    completions = {}
    for name in ("chosen", "rejected"):
        ids = tokenizer(row[name], add_special_tokens=True)["input_ids"]
        completions[name] = ids if ids and ids[-1] == eos else ids + [eos]
    info = {"prompt_tokens": len(prompt), "chosen_tokens": len(completions["chosen"]),
            "rejected_tokens": len(completions["rejected"])}
    if lengths.max_prompt_length is not None and len(prompt) > lengths.max_prompt_length:
        keep = lengths.max_prompt_length
        prompt = prompt[:keep] if lengths.truncation_mode == "keep_start" else prompt[-keep:]
    budget = lengths.max_completion_length or SEQ2SEQ_COMPLETION_LENGTH
    out = {"prompt_input_ids": prompt}
    out.update({f"{name}_labels": ids[:budget] for name, ids in completions.items()})
    info["truncated"] = (len(prompt) < info["prompt_tokens"] or len(out["chosen_labels"]) < info["chosen_tokens"]
                         or len(out["rejected_labels"]) < info["rejected_tokens"])
    return out, info


def tokenize_row_seq2seq(row: dict[str, str], tokenizer, lengths: SequenceLengths) -> dict[str, list[int]]:
    """Encoder input ids and decoder labels of one standard-format pair (see :func:`encode_pair_seq2seq`)."""
    return encode_pair_seq2seq(row, tokenizer, lengths)[0]


# --------------------------------------------------------------------------- the cache key


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the ids: the vocabulary and merges, special tokens, the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        type(tokenizer).__name__,
        backend.to_str() if backend is not None else datasets.fingerprint.Hasher.hash(tokenizer),
        str(tokenizer.chat_template),
        str((tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def cache_key(dataset: datasets.Dataset, tokenizer, lengths: SequenceLengths, encoder_decoder: bool = False) -> str:
    """Data fingerprint + tokenizer + lengths + layout + the code that turns rows into ids."""
    code = "".join(inspect.getsource(part) for part in (formats, encode_pair, encode_pair_seq2seq, _encode))
    parts = [dataset._fingerprint, tokenizer_fingerprint(tokenizer), repr(astuple(lengths)),
             f"encoder_decoder={encoder_decoder}", code]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


def cache_path(key: str) -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "cpo_exp_tokenized" / f"pairs-{key}.arrow"


def _cached(path: Path, num_proc: Optional[int]) -> bool:
    if not num_proc or num_proc <= 1:
        return path.is_file()
    return all(path.with_name(f"{path.stem}_{rank:05d}_of_{num_proc:05d}{path.suffix}").is_file()
               for rank in range(num_proc))


# --------------------------------------------------------------------------- a split


_STATS_EMPTY = {"prompt_tokens": 0, "chosen_tokens": 0, "rejected_tokens": 0, "truncated": False}
_EMPTY = {False: {"chosen_input_ids": [], "chosen_labels": [], "rejected_input_ids": [], "rejected_labels": [],
                  **_STATS_EMPTY},
          True: {"prompt_input_ids": [], "chosen_labels": [], "rejected_labels": [], **_STATS_EMPTY}}


def _encode(row: dict[str, Any], tokenizer, lengths: SequenceLengths, encoder_decoder: bool = False) -> dict[str, Any]:
    empty = _EMPTY[encoder_decoder]
    try:
        standard = formats.to_standard(row, tokenizer)
    except Exception as err:  # noqa: BLE001 - chat templates raise their own error types
        return {**empty, "problem": f"chat template failed: {err}", "problem_kind": BAD_MESSAGES}
    try:
        encoded, info = (encode_pair_seq2seq if encoder_decoder else encode_pair)(standard, tokenizer, lengths)
    except DataError as err:
        return {**empty, "problem": str(err), "problem_kind": PROMPT_MISMATCH}
    empty = [n for n in ("chosen", "rejected") if all(t == LABEL_PAD for t in encoded[f"{n}_labels"])]
    if empty:
        problem = (f"the prompt ({info['prompt_tokens']} tokens) leaves no room for a '{empty[0]}' token "
                   f"under max_length={lengths.max_length}")
        return {**encoded, **info, "problem": problem, "problem_kind": NO_ROOM}
    return {**encoded, **info, "problem": "", "problem_kind": ""}


def tokenize_split(dataset: datasets.Dataset, tokenizer, lengths: SequenceLengths, split: str, on_bad_rows: str,
                   num_proc: Optional[int] = None, locate: Optional[Locate] = None, encoder_decoder: bool = False,
                   ) -> tuple[datasets.Dataset, Counter]:
    """Checked rows -> ids, labels and :data:`STAT_COLUMNS`; rows with no completion token left
    (their length-averaged log-prob would be 0/0) are errors, or dropped with ``skip``.
    ``encoder_decoder`` selects the encoder-input / decoder-labels layout."""
    if len(dataset) and formats.is_messages(dataset[0]["chosen"]) and getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{split} data is conversational but the tokenizer has no chat template")
    key = cache_key(dataset, tokenizer, lengths, encoder_decoder)
    kwargs: dict[str, Any] = {"new_fingerprint": key}
    if dataset.cache_files:  # in-memory datasets have random fingerprints: nothing worth caching
        path = cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        kwargs.update(cache_file_name=str(path), load_from_cache_file=True)
        if _cached(path, num_proc):
            log.info("%s: tokenized data read from cache %s", split, path)
        else:
            log.info("%s: tokenizing %d rows (cached as %s)", split, len(dataset), path)
    keep = [ROW_ID] if ROW_ID in dataset.column_names else []
    encoded = dataset.map(_encode, fn_kwargs={"tokenizer": tokenizer, "lengths": lengths,
                                              "encoder_decoder": encoder_decoder},
                          remove_columns=[c for c in dataset.column_names if c not in keep], num_proc=num_proc,
                          desc=f"tokenizing {split}", **kwargs)
    problems = []
    ids = encoded[ROW_ID] if keep else range(len(encoded))
    for position, (row_id, message, kind) in enumerate(zip(ids, encoded["problem"], encoded["problem_kind"])):
        if message:
            problems.append((position, Problem(row_id, kind, message)))
    kept, dropped = apply_policy(encoded, split, problems, on_bad_rows, locate)
    return kept.remove_columns(list(_PROBLEM_COLUMNS) + keep), dropped


def tokenize_dataset(dataset: datasets.Dataset, tokenizer, lengths: SequenceLengths, split: str, on_bad_rows: str,
                     num_proc: Optional[int] = None, encoder_decoder: bool = False) -> datasets.Dataset:
    """Tokenized pairs (ids and labels only), ready for :func:`cpo_exp.data.collator_for`'s collator."""
    return tokenize_split(dataset, tokenizer, lengths, split, on_bad_rows, num_proc,
                          encoder_decoder=encoder_decoder)[0].remove_columns(
        list(STAT_COLUMNS))
