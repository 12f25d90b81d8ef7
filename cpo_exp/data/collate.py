"""Batching: the tokenized pairs read straight from their Arrow columns (:class:`PairRows`),
and one right-padded batch of chosen then rejected sequences per list of pairs (decoder-only),
or of encoder prompts and decoder labels (encoder-decoder)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import datasets
import numpy as np
import pyarrow as pa
import torch

from cpo_exp.data.schema import LABEL_PAD, REFERENCE_COLUMNS, DataError

Ids = Sequence[int]  # a list of ids, or a numpy view of them (PairRows)


class PairRows(torch.utils.data.Dataset):
    """A tokenized split as a map-style dataset whose rows are numpy views of its Arrow columns.

    ``datasets.Dataset.__getitems__`` turns each row into Python lists, and padding lists costs
    as much again: 0.66 ms per batch of 8 pairs between training steps, 1.7 s of a default run.
    Here a row is a dict of integer slices of the columns' value buffers: nothing is copied,
    memory-mapped files stay memory-mapped, and the collators pad the slices with numpy.
    """

    def __init__(self, dataset: datasets.Dataset):
        # The rows in the dataset's order (a select/shuffle mapping is applied here, once).
        table = dataset.with_format("arrow")[:]
        self._len = table.num_rows
        # The token columns and the reference log-probs; anything else (a row id, say) is no
        # collator's business.
        self._columns = {field.name: _ListColumn(table.column(field.name)) for field in table.schema
                         if pa.types.is_list(field.type) or pa.types.is_large_list(field.type)}
        self._scalars = {name: table.column(name).to_numpy() for name in REFERENCE_COLUMNS
                         if name in table.column_names}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self._len):
            raise IndexError(f"row index out of range for {self._len} rows")
        views = {name: column.rows(indices) for name, column in self._columns.items()}
        views |= {name: values[indices] for name, values in self._scalars.items()}
        return [{name: views[name][k] for name in views} for k in range(len(indices))]


class _ListColumn:
    """One ``list<int>`` column: the offsets and values of each Arrow chunk, as numpy arrays."""

    def __init__(self, column: pa.ChunkedArray):
        if column.num_chunks > 1 and len(column) < 64 * column.num_chunks:
            # Tiny chunks (a shuffled dataset's rows come one per chunk): one buffer indexes faster.
            column = pa.chunked_array([column.combine_chunks()])
        chunks = [c for c in column.chunks if len(c)] or column.chunks[:1]
        # A chunk's offsets point into its whole value buffer, also when the chunk is a slice.
        self.offsets = [c.offsets.to_numpy() for c in chunks]
        self.values = [c.values.to_numpy() for c in chunks]
        self.starts = np.cumsum([0] + [len(c) for c in chunks])

    def rows(self, indices: np.ndarray) -> list[np.ndarray]:
        if len(self.values) == 1:
            offsets, values = self.offsets[0], self.values[0]
            return [values[offsets[i]:offsets[i + 1]] for i in indices.tolist()]
        chunk = np.searchsorted(self.starts, indices, side="right") - 1
        local = indices - self.starts[chunk]
        return [self.values[c][self.offsets[c][i]:self.offsets[c][i + 1]]
                for c, i in zip(chunk.tolist(), local.tolist())]


def _pad(rows: list[Ids], value: int) -> torch.Tensor:
    """Right-pad rows of ids into one ``[len(rows), longest]`` tensor."""
    width = max(len(r) for r in rows)
    # One array filled row by row: a tensor per row, or one from nested lists, costs several
    # times as much, every step.
    out = np.full((len(rows), width), value, dtype=np.int64)
    for k, row in enumerate(rows):
        out[k, :len(row)] = row
    return torch.from_numpy(out)


def _mask(rows: list[Ids]) -> torch.Tensor:
    """The attention mask of :func:`_pad`'s output: 1 on the ids, 0 on the padding."""
    lengths = np.array([len(r) for r in rows])
    return torch.from_numpy((np.arange(lengths.max()) < lengths[:, None]).astype(np.int64))


class PreferenceCollator:
    """Stack chosen then rejected into one right-padded batch of ``2B`` sequences.

    Both halves are padded to one common length, as TRL's ``concatenated_inputs`` does, so
    that one forward pass serves the pair.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Ids]]) -> dict[str, torch.Tensor]:
        sequences = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
        return {"input_ids": _pad(sequences, self.pad_token_id),
                "attention_mask": _mask(sequences),
                "labels": _pad(labels, LABEL_PAD), **reference_logps(rows)}


class Seq2SeqPreferenceCollator:
    """Encoder-decoder batch of ``2B`` rows: the prompt twice (chosen half, then rejected half)
    as encoder input, the completions as labels padded with -100, and the decoder inputs as the
    labels shifted right behind ``decoder_start_token_id`` (padding where labels are -100)."""

    def __init__(self, pad_token_id: int, decoder_start_token_id: Optional[int]):
        if decoder_start_token_id is None:
            raise DataError("the encoder-decoder's config has no decoder_start_token_id")
        self.pad_token_id = pad_token_id
        self.decoder_start_token_id = decoder_start_token_id

    def __call__(self, rows: list[dict[str, Ids]]) -> dict[str, torch.Tensor]:
        prompts = [r["prompt_input_ids"] for r in rows] * 2
        labels = _pad([r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows], LABEL_PAD)
        decoder_input_ids = torch.full_like(labels, self.pad_token_id)
        decoder_input_ids[:, 0] = self.decoder_start_token_id
        decoder_input_ids[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == LABEL_PAD, self.pad_token_id)
        return {"input_ids": _pad(prompts, self.pad_token_id),
                "attention_mask": _mask(prompts),
                "labels": labels, "decoder_input_ids": decoder_input_ids, **reference_logps(rows)}


def reference_logps(rows: list[dict]) -> dict[str, torch.Tensor]:
    """The reference log-probs of the batch's pairs (``[B]`` each), when the rows carry them."""
    if REFERENCE_COLUMNS[0] not in rows[0]:
        return {}
    return {name: torch.tensor(np.array([r[name] for r in rows]), dtype=torch.float32) for name in REFERENCE_COLUMNS}


def collator_for(model_config, pad_token_id: int):
    """The collator matching the model's layout (decoder-only or encoder-decoder)."""
    if getattr(model_config, "is_encoder_decoder", False):
        return Seq2SeqPreferenceCollator(pad_token_id, model_config.decoder_start_token_id)
    return PreferenceCollator(pad_token_id)
