"""Batching: one right-padded batch of chosen then rejected sequences per list of pairs."""

from __future__ import annotations

import torch

from cpo_exp.data.schema import LABEL_PAD


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
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        label_ids = torch.full((len(sequences), width), LABEL_PAD, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        for k, (seq, lab) in enumerate(zip(sequences, labels)):
            input_ids[k, : len(seq)] = torch.tensor(seq)
            label_ids[k, : len(lab)] = torch.tensor(lab)
            attention[k, : len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": label_ids}
