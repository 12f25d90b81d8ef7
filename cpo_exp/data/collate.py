"""Batching: one right-padded batch of chosen then rejected sequences per list of pairs
(decoder-only), or of encoder prompts and decoder labels (encoder-decoder)."""

from __future__ import annotations

from typing import Optional

import torch

from cpo_exp.data.schema import LABEL_PAD, DataError


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad lists of ids into one ``[len(rows), longest]`` tensor."""
    width = max(len(r) for r in rows)
    # One tensor from padded lists: a tensor per row costs ten times as much, every step.
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _mask(rows: list[list[int]]) -> torch.Tensor:
    """The attention mask of :func:`_pad`'s output: 1 on the ids, 0 on the padding."""
    lengths = torch.tensor([len(r) for r in rows])
    return (torch.arange(int(lengths.max())) < lengths[:, None]).long()


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
                "attention_mask": _mask(sequences),
                "labels": _pad(labels, LABEL_PAD)}


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
        labels = _pad([r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows], LABEL_PAD)
        decoder_input_ids = torch.full_like(labels, self.pad_token_id)
        decoder_input_ids[:, 0] = self.decoder_start_token_id
        decoder_input_ids[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == LABEL_PAD, self.pad_token_id)
        return {"input_ids": _pad(prompts, self.pad_token_id),
                "attention_mask": _mask(prompts),
                "labels": labels, "decoder_input_ids": decoder_input_ids}


def collator_for(model_config, pad_token_id: int):
    """The collator matching the model's layout (decoder-only or encoder-decoder)."""
    if getattr(model_config, "is_encoder_decoder", False):
        return Seq2SeqPreferenceCollator(pad_token_id, model_config.decoder_start_token_id)
    return PreferenceCollator(pad_token_id)
