"""Where preference rows come from: local JSON/JSONL/CSV/Parquet files or a ``datasets`` dataset.

Every loaded split carries a ``__row__`` column (its row's position in the source) and a
locator that turns it back into "file, line N", so that a problem found later names the
place to fix. Column mapping and format adapters are applied here; carving an eval split
and capping sample counts happen after the rows are checked (:func:`split_and_cap`).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import datasets

from cpo_exp import hub
from cpo_exp.assets import locate as locate_asset
from cpo_exp.config import DataConfig
from cpo_exp.data.adapters import apply_adapter
from cpo_exp.data.schema import ROW_ID, DataError

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Source:
    """One split as loaded: rows (with ``__row__``), a name for messages, and a row locator."""

    dataset: datasets.Dataset
    name: str
    locate: Callable[[int], str]


# --------------------------------------------------------------------------- local files


def _builder(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _BUILDERS:
        raise DataError(f"unsupported data file type {suffix!r}: {path}; use .json, .jsonl, .csv or .parquet")
    return _BUILDERS[suffix]


def _json_lines(path: str) -> list[int]:
    """Line numbers of the records of a JSONL file; the first malformed line is an error."""
    numbers = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {number}: a record must be a JSON object, got {type(record).__name__}")
            numbers.append(number)
    return numbers


def _check_json(path: str) -> None:
    with open(path, encoding="utf-8") as handle:
        try:
            json.load(handle)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None


class FileRows:
    """Row id -> "path, line N" across the concatenated files of one split."""

    def __init__(self):
        self.starts: list[int] = []
        self.files: list[tuple[str, int, Optional[list[int]], str]] = []  # path, rows, JSONL lines, builder

    def add(self, path: str, rows: int, lines: Optional[list[int]], builder: str) -> None:
        self.starts.append(self.starts[-1] + self.files[-1][1] if self.files else 0)
        self.files.append((path, rows, lines, builder))

    def __call__(self, row_id: int) -> str:
        k = bisect.bisect_right(self.starts, row_id) - 1
        path, _, lines, builder = self.files[k]
        index = row_id - self.starts[k]
        if lines is not None:
            return f"{path}, line {lines[index]}"
        if builder == "csv":
            return f"{path}, line {index + 2}"  # after the header, when no field holds a line break
        return f"{path}, record {index}"


def load_files(files: list[str], split: str) -> Source:
    """Load local files (of one or several types) into one split, each file checked first."""
    if not files:
        raise DataError(f"no {split} data files given")
    parts, rows = [], FileRows()
    for original in files:
        path = locate_asset(original) if original.startswith("pkg://") else original
        if not Path(path).is_file():
            # Relative paths are read from the launch dir (Hydra does not chdir); say which one.
            raise DataError(f"{split} data file not found: {original} (resolved to {Path(path).absolute()}, "
                            f"from the launch dir {Path.cwd()})")
        builder = _builder(path)
        lines = _json_lines(path) if path.lower().endswith(".jsonl") else None
        if path.lower().endswith(".json"):
            _check_json(path)
        try:
            part = datasets.load_dataset(builder, data_files=[path], split="train")
        except Exception as err:  # noqa: BLE001 - any parse error becomes a named DataError
            raise DataError(f"could not read {split} data file {original}: {err}") from None
        if parts and part.features != parts[0].features:
            try:  # e.g. CSV's large_string next to JSON's string
                part = part.cast(parts[0].features)
            except (ValueError, TypeError) as err:
                raise DataError(f"{split} data file {original} does not have the columns and types of {files[0]} "
                                f"({part.features} vs {parts[0].features}): {err}") from None
        rows.add(original, len(part), lines, builder)
        parts.append(part)
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return Source(dataset, ", ".join(files), rows)


# --------------------------------------------------------------------------- datasets / hub


def load_named(path: str, name: Optional[str], split: str) -> Source:
    """A ``datasets`` dataset: a hub id, a local dataset folder, or a ``save_to_disk`` folder.

    A hub id is looked up by :mod:`cpo_exp.hub` first: when the hub cannot be reached (or
    ``HF_HUB_OFFLINE`` is set) only the local cache is read, with no retries.
    """
    where = hub.locate_dataset(path, "data.path")
    local = Path(where.path)
    label = f"{path}" + (f" ({name})" if name else "") + f" split {split!r}"
    if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path} has no split {split!r} (splits: {sorted(loaded)})")
            loaded = loaded[split]
        dataset = loaded
    else:
        try:
            if where.local_files_only:
                dataset = hub.load_cached_dataset(where, "data.path", name, split)
            else:
                dataset = datasets.load_dataset(where.path, name, split=split)
        except hub.HubError:
            raise
        except Exception as err:  # noqa: BLE001 - unknown split or config, unreadable files: one named error
            raise DataError(f"could not load dataset {label}: {type(err).__name__}: {err}") from None
    return Source(dataset, label, lambda row_id: f"{label}, row {row_id}")


# --------------------------------------------------------------------------- one split, many steps


def _map_columns(source: Source, columns: dict[str, str]) -> Source:
    if not columns:
        return source
    absent = [old for old in columns if old not in source.dataset.column_names]
    if absent:
        raise DataError(f"data.columns maps {absent} but {source.name} has columns {source.dataset.column_names}")
    # A mapped-to name that already exists is replaced by the mapped column.
    clash = [new for old, new in columns.items() if new in source.dataset.column_names and new not in columns]
    dataset = source.dataset.remove_columns(clash) if clash else source.dataset
    source.dataset = dataset.rename_columns(dict(columns))
    return source


def load_source(cfg: DataConfig, split: str) -> Optional[Source]:
    """The ``split`` ('train' or 'eval') as configured, or None when no eval split is given."""
    files = list(cfg.train_files if split == "train" else cfg.eval_files)
    if files:
        source = load_files(files, split)
    elif cfg.path and (split == "train" or cfg.eval_split):
        source = load_named(cfg.path, cfg.name, cfg.train_split if split == "train" else cfg.eval_split)
    else:
        return None
    if ROW_ID in source.dataset.column_names:
        source.dataset = source.dataset.remove_columns(ROW_ID)
    source.dataset = source.dataset.add_column(ROW_ID, list(range(len(source.dataset))))
    source = _map_columns(source, dict(cfg.columns))
    if cfg.adapter:
        source.dataset = apply_adapter(cfg.adapter, source.dataset, dict(cfg.adapter_args), source.name)
    return source


def split_and_cap(train: datasets.Dataset, evaluation: Optional[datasets.Dataset], cfg: DataConfig,
                  seed: int) -> tuple[datasets.Dataset, Optional[datasets.Dataset]]:
    """Carve ``eval_fraction`` of train (seeded) when no eval split is given; cap the sample counts."""
    if evaluation is None and cfg.eval_fraction > 0:
        if len(train) < 2:
            raise DataError(f"data.eval_fraction={cfg.eval_fraction} needs at least 2 train rows, got {len(train)}")
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    if cfg.max_train_samples is not None:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if evaluation is not None and cfg.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(cfg.max_eval_samples, len(evaluation))))
    return train, evaluation
