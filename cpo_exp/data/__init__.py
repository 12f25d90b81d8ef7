"""The data pipeline: load preference pairs, check every row, normalise formats, tokenize as TRL
does, summarise, collate. Modules, in the order the pipeline runs:

- :mod:`~cpo_exp.data.sources` local files / ``datasets`` datasets, column mapping, eval carving;
- :mod:`~cpo_exp.data.adapters` datasets that need reshaping into pairs (ALMA-R);
- :mod:`~cpo_exp.data.checks` row validation and the error/skip policy;
- :mod:`~cpo_exp.data.formats` standard / conversational / implicit-prompt rows to strings;
- :mod:`~cpo_exp.data.tokenize` TRL-exact tokenization and truncation, cached;
- :mod:`~cpo_exp.data.stats` the summary logged before training;
- :mod:`~cpo_exp.data.collate` batches for the engine;
- :mod:`~cpo_exp.data.pipeline` all of the above in order (:func:`prepare_data`).
"""

from cpo_exp.data.checks import check_rows, row_problem
from cpo_exp.data.collate import PairRows, PreferenceCollator, Seq2SeqPreferenceCollator, collator_for
from cpo_exp.data.formats import to_standard
from cpo_exp.data.pipeline import PreparedSplit, prepare_data, summarize
from cpo_exp.data.schema import COLUMNS, LABEL_PAD, REFERENCE_COLUMNS, DataError, SequenceLengths
from cpo_exp.data.stats import DataSummary
from cpo_exp.data.tokenize import (encode_pair, encode_pair_seq2seq, tokenize_dataset, tokenize_row,
                                   tokenize_row_seq2seq, tokenize_split)

__all__ = [
    "COLUMNS", "LABEL_PAD", "REFERENCE_COLUMNS", "DataError", "DataSummary", "PairRows", "PreferenceCollator", "PreparedSplit",
    "Seq2SeqPreferenceCollator", "SequenceLengths", "check_rows", "collator_for", "encode_pair",
    "encode_pair_seq2seq", "prepare_data", "row_problem", "summarize", "to_standard",
    "tokenize_dataset", "tokenize_row", "tokenize_row_seq2seq", "tokenize_split",
]
