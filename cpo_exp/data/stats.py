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
    # Length bias (the reason for SimPO's length normalisation): chosen minus rejected completion
    # tokens, untruncated, as a mean over pairs, and the share of pairs whose chosen is longer.
    length_diff_mean: float = 0.0
    chosen_longer: float = 0.0


def split_stats(split: str, source: str, data_format: str, tokenized: datasets.Dataset, dropped: Counter) -> SplitStats:
    """Statistics of one tokenized split (with the ``*_tokens``/``truncated`` columns)."""
    tokens = {}
    for part in COLUMNS:
        counts = np.asarray(tokenized[f"{part}_tokens"])
        tokens[part] = {f"p{q}": float(np.percentile(counts, q)) for q in PERCENTILES} | {"max": float(counts.max())}
    diff = np.asarray(tokenized["chosen_tokens"]) - np.asarray(tokenized["rejected_tokens"])
    return SplitStats(split, source, data_format, len(tokenized), Counter(dropped), int(sum(tokenized["truncated"])),
                      tokens, float(diff.mean()), float((diff > 0).mean()))


def _reasons(dropped: Counter) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in dropped.most_common()) or "none"


@dataclass
class DataSummary:
    splits: list[SplitStats]
    lengths: SequenceLengths

    def params(self) -> dict[str, Any]:
        """Per split: rows, format, drops, truncation and length bias (constants of the run: params, not metrics)."""
        out: dict[str, Any] = {}
        for s in self.splits:
            out[f"data.{s.split}_rows"] = s.rows
            out[f"data.{s.split}_format"] = s.data_format
            out[f"data.{s.split}_dropped"] = sum(s.dropped.values())
            out[f"data.{s.split}_dropped_reasons"] = _reasons(s.dropped)
            out[f"data.{s.split}_truncated"] = s.truncated
            out[f"data.{s.split}_length_diff_mean"] = round(s.length_diff_mean, 4)
            out[f"data.{s.split}_chosen_longer"] = round(s.chosen_longer, 4)
        return out

    def table(self) -> dict[str, list]:
        """One row per split with every figure of the summary, token percentiles included (MLflow table)."""
        columns: dict[str, list] = {}
        for s in self.splits:
            row = {"split": s.split, "source": s.source, "format": s.data_format, "rows": s.rows,
                   "dropped": sum(s.dropped.values()), "dropped_reasons": _reasons(s.dropped), "truncated": s.truncated,
                   **{f"{part}_tokens_{name}": value for part, values in s.tokens.items() for name, value in values.items()},
                   "length_diff_mean": s.length_diff_mean, "chosen_longer": s.chosen_longer}
            for key, value in row.items():
                columns.setdefault(key, []).append(value)
        return columns

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
                         f"truncated {s.truncated} ({share:.1f}%); {tokens}; chosen - rejected "
                         f"{s.length_diff_mean:+.2f} tokens on average, chosen longer in {100 * s.chosen_longer:.0f}%")
        return "\n".join(lines)
