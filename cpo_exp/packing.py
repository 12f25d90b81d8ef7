"""Padding-free batches: every sequence of a batch packed into one row, attention kept per sequence.

The plain collator pads ``2B`` sequences to the longest one; here they are laid end to end in
one row of ``N`` real tokens, with position ids restarting at each sequence, and a list of
*segments* tells the attention which keys each query may see. With ``shared_prompt`` the
common prefix of a pair's chosen and rejected sequences (their prompt, at least) is laid out
once: ``[prefix | chosen rest | rejected rest]``, the rejected rest attending to the prefix
and to itself but not to the chosen rest, its position ids continuing from the prefix's end.
A causal model gives the prefix the same hidden states in both sequences, so this is exact.

Per-sequence results are read back through index tensors: ``pred_index`` holds, for every
label that counts, the packed position whose hidden state predicts it.

The attention runs as a registered ``transformers`` attention function (``cpo_segments``):
one ``scaled_dot_product_attention`` call per segment, so no ``N x N`` mask is ever built and
no compute is spent across sequences. Calls without segments run ordinary SDPA.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from cpo_exp.data import LABEL_PAD
from cpo_exp.data.collate import Ids, reference_logps

SEGMENT_ATTENTION = "cpo_segments"
TOKEN_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")

# A segment: queries ``[start, stop)`` attend causally to themselves and fully to the keys of
# ``[prefix_start, prefix_stop)`` (an empty range for a sequence of its own).
Segment = tuple[int, int, int, int]


def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      cpo_segments: Optional[list[Segment]] = None, **kwargs):
    """Attention within segments of one packed row (``query``: ``[1, heads, N, head_dim]``).

    A call without segments (generation, an ordinary padded forward) is plain SDPA, so the model
    keeps this attention implementation for good.
    """
    if cpo_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    outputs = []
    for start, stop, p_start, p_stop in cpo_segments:
        q = query[:, :, start:stop]
        if p_stop == p_start:
            k, v, mask, causal = key[:, :, start:stop], value[:, :, start:stop], None, True
        else:
            k = torch.cat((key[:, :, p_start:p_stop], key[:, :, start:stop]), dim=2)
            v = torch.cat((value[:, :, p_start:p_stop], value[:, :, start:stop]), dim=2)
            n, p = stop - start, p_stop - p_start
            own = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
            mask = torch.cat((torch.ones(n, p, dtype=torch.bool, device=query.device), own), dim=1)
            causal = False
        outputs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                      is_causal=causal, scale=scaling, enable_gqa=gqa))
    out = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    return out.transpose(1, 2).contiguous(), None


def segment_mask(**kwargs):
    """The mask for :func:`segment_attention`: none for a packed row (it carries no attention mask;
    the segments are the mask, and an ``N x N`` one is never built), SDPA's for an ordinary call."""
    return None if kwargs.get("attention_mask") is None else sdpa_mask(**kwargs)


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
AttentionMaskInterface.register(SEGMENT_ATTENTION, segment_mask)


def _as_list(ids: Ids) -> list[int]:
    return ids.tolist() if isinstance(ids, np.ndarray) else list(ids)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PackingCollator:
    """Pack ``B`` pairs into one row; chosen sequences are ``0..B-1``, rejected ``B..2B-1``."""

    def __init__(self, shared_prompt: bool = False):
        self.shared_prompt = shared_prompt

    def __call__(self, rows: list[dict[str, Ids]]) -> dict:
        references = reference_logps(rows)
        # Python lists: the loops below index them element by element.
        rows = [{name: _as_list(row[name]) for name in TOKEN_COLUMNS} for row in rows]
        pairs = len(rows)
        ids: list[int] = []
        positions: list[int] = []
        segments: list[Segment] = []
        where: list[list[int]] = [[] for _ in range(2 * pairs)]  # packed index of each token
        for k, row in enumerate(rows):
            chosen, rejected = row["chosen_input_ids"], row["rejected_input_ids"]
            start = len(ids)
            shared = _common_prefix(chosen, rejected) if self.shared_prompt else 0
            ids += chosen
            positions += range(len(chosen))
            segments.append((start, start + len(chosen), start, start))
            where[k] = list(range(start, start + len(chosen)))
            own = len(ids)
            ids += rejected[shared:]
            positions += range(shared, len(rejected))
            if len(rejected) > shared:
                segments.append((own, len(ids), start, start + shared))
            where[pairs + k] = list(range(start, start + shared)) + list(range(own, len(ids)))

        labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
        pred, target, seq, token_seq = [], [], [], []
        for s, (lab, idx) in enumerate(zip(labels, where)):
            # position t predicts token t + 1: the shift by one of the plain path
            for t in range(len(lab) - 1):
                if lab[t + 1] != LABEL_PAD:
                    pred.append(idx[t])
                    target.append(lab[t + 1])
                    seq.append(s)
            token_seq += [s] * len(idx)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "segments": segments,
            "pred_index": torch.tensor(pred, dtype=torch.long),
            "pred_labels": torch.tensor(target, dtype=torch.long),
            "pred_seq": torch.tensor(seq, dtype=torch.long),
            "token_index": torch.tensor([i for idx in where for i in idx], dtype=torch.long),
            "token_seq": torch.tensor(token_seq, dtype=torch.long),
            "num_pairs": pairs,
            "num_tokens": sum(len(idx) for idx in where),
            **references,
        }
