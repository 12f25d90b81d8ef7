"""The dataset summary shown before training: rows per split, rows dropped and why, token-length
percentiles of prompts and completions (before truncation), and how many rows were truncated.

Read the percentiles against ``max_length``/``max_prompt_length``: many truncated rows mean
the limits cut off what the model should learn from.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np

from cpo_exp.data.schema import COLUMNS, SequenceLengths

PERCENTILES = (50, 90, 99)


@dataclass
class SplitStats:
    split: str
    source: str
    data_format: str
    rows: int
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    # part -> {"p50": .., "p90": .., "p99": .., "max": ..}, untruncated token counts
    tokens: dict[str, dict[str, float]] = field(default_factory=dict)


def split_stats(split: str, source: str, data_format: str, tokenized: datasets.Dataset, dropped: Counter) -> SplitStats:
    """Statistics of one tokenized split (with the ``*_tokens``/``truncated`` columns)."""
    tokens = {}
    for part in COLUMNS:
        counts = np.asarray(tokenized[f"{part}_tokens"])
        tokens[part] = {f"p{q}": float(np.percentile(counts, q)) for q in PERCENTILES} | {"max": float(counts.max())}
    return SplitStats(split, source, data_format, len(tokenized), Counter(dropped), int(sum(tokenized["truncated"])),
                      tokens)


def _reasons(dropped: Counter) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in dropped.most_common()) or "none"


@dataclass
class DataSummary:
    splits: list[SplitStats]
    lengths: SequenceLengths

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for s in self.splits:
            out[f"data.{s.split}_rows"] = s.rows
            out[f"data.{s.split}_format"] = s.data_format
            out[f"data.{s.split}_dropped"] = sum(s.dropped.values())
            out[f"data.{s.split}_dropped_reasons"] = _reasons(s.dropped)
        return out

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.splits:
            prefix = f"data/{s.split}"
            out[f"{prefix}/rows"] = s.rows
            out[f"{prefix}/dropped"] = sum(s.dropped.values())
            for kind, n in s.dropped.items():
                out[f"{prefix}/dropped/{kind}"] = n
            out[f"{prefix}/truncated"] = s.truncated
            for part, values in s.tokens.items():
                for name, value in values.items():
                    out[f"{prefix}/{part}_tokens/{name}"] = value
        return out

    def text(self) -> str:
        lim = self.lengths
        lines = [f"data summary (max_length={lim.max_length}, max_prompt_length={lim.max_prompt_length}, "
                 f"max_completion_length={lim.max_completion_length}, truncation_mode={lim.truncation_mode}); "
                 f"token lengths before truncation as p{'/p'.join(map(str, PERCENTILES))}/max:"]
        for s in self.splits:
            share = 100 * s.truncated / s.rows if s.rows else 0.0
            tokens = "  ".join(
                f"{part} {'/'.join(str(round(v)) for v in s.tokens[part].values())}" for part in COLUMNS
            )
            lines.append(f"  {s.split}: {s.rows} rows ({s.data_format}) from {s.source}; "
                         f"dropped {sum(s.dropped.values())} ({_reasons(s.dropped)}); "
                         f"truncated {s.truncated} ({share:.1f}%); {tokens}")
        return "\n".join(lines)
