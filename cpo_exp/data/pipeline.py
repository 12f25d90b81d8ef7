"""The whole data pipeline in the order it runs: load -> check -> carve/cap -> tokenize -> summarise.

Everything here happens before a model is loaded, so bad data costs seconds, not a GPU job.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
import datasets

from cpo_exp.config import DataConfig
from cpo_exp.data import formats
from cpo_exp.data.checks import check_rows
from cpo_exp.data.schema import SequenceLengths
from cpo_exp.data.sources import load_source, split_and_cap
from cpo_exp.data.stats import DataSummary, SplitStats, split_stats
from cpo_exp.data.tokenize import STAT_COLUMNS, tokenize_split

log = logging.getLogger(__name__)


@dataclass
class PreparedSplit:
    """A tokenized split (ids and labels only), its statistics, and the checked rows it was
    made from (in their original format; generation during evaluation reads their text)."""

    dataset: datasets.Dataset
    stats: SplitStats
    rows: datasets.Dataset


def prepare_data(cfg: DataConfig, tokenizer, lengths: SequenceLengths, seed: int,
                 encoder_decoder: bool = False) -> dict[str, PreparedSplit]:
    """Train (and eval, when there is one) split, checked and tokenized per ``cfg``, in the
    encoder-decoder layout when ``encoder_decoder``."""
    sources = {split: load_source(cfg, split) for split in ("train", "eval")}
    sources = {split: source for split, source in sources.items() if source is not None}
    checked, dropped = {}, {}
    for split, source in sources.items():
        checked[split], dropped[split] = check_rows(source.dataset, split, cfg.on_bad_rows, source.locate,
                                                    source.name)
    train, evaluation = split_and_cap(checked["train"], checked.get("eval"), cfg, seed)
    eval_source = sources.get("eval", sources["train"])  # a carved eval split points into train's files
    prepared = {}
    for split, rows, source in (("train", train, sources["train"]), ("eval", evaluation, eval_source)):
        if rows is None:
            continue
        data_format = formats.describe(rows[0])
        tokenized, more = tokenize_split(rows, tokenizer, lengths, split, cfg.on_bad_rows, cfg.num_proc,
                                         source.locate, encoder_decoder)
        name = source.name if split in sources else f"{eval_source.name} (eval_fraction={cfg.eval_fraction})"
        stats = split_stats(split, name, data_format, tokenized, dropped.get(split, Counter()) + more)
        if stats.truncated:
            log.warning("%s: %d of %d rows truncated (max_length=%d); see the token-length percentiles below",
                        split, stats.truncated, stats.rows, lengths.max_length)
        prepared[split] = PreparedSplit(tokenized.remove_columns(list(STAT_COLUMNS)), stats, rows)
    return prepared


def summarize(prepared: dict[str, PreparedSplit], lengths: SequenceLengths) -> DataSummary:
    return DataSummary([p.stats for p in prepared.values()], lengths)
