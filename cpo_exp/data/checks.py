"""Row validation before anything expensive: every row checked, problems named, a policy applied.

:func:`row_problem` is cheap (no tokenizer). Problems that only tokenization can reveal (a
prompt that leaves no room for a completion token) are found in :mod:`cpo_exp.data.tokenize`
and go through the same :func:`apply_policy`.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Optional

import datasets

from cpo_exp.data import formats
from cpo_exp.data.schema import (
    BAD_MESSAGES, COLUMNS, EMPTY, IDENTICAL, MISSING, NO_SHARED_PROMPT, ROLES, ROW_ID, WRONG_TYPE, DataError, Problem,
)

log = logging.getLogger(__name__)

SHOWN_PROBLEMS = 5
Locate = Callable[[int], str]  # row id -> "train.jsonl, line 7"


def _type_name(value: Any) -> str:
    return type(value).__name__


def _message_problem(column: str, messages: list) -> Optional[tuple[str, str]]:
    for k, message in enumerate(messages):
        where = f"'{column}' message {k}"
        if not isinstance(message, dict):
            return WRONG_TYPE, f"{where} must be a {{role, content}} dict, got {_type_name(message)}"
        role, content = message.get("role"), message.get("content")
        if role is None:
            return BAD_MESSAGES, f"{where} has no 'role'"
        if role not in ROLES:
            return BAD_MESSAGES, f"{where} has unknown role {role!r} (known: {', '.join(ROLES)})"
        if content is None:
            return BAD_MESSAGES, f"{where} has no 'content'"
        if not isinstance(content, str):
            return WRONG_TYPE, f"{where}: 'content' must be a string, got {_type_name(content)}"
    return None


def _value_problem(column: str, value: Any, allow_empty: bool = False) -> Optional[tuple[str, str]]:
    if value is None:
        return MISSING, f"'{column}' is missing"
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            return EMPTY, f"'{column}' is empty"
        return None
    if isinstance(value, list):
        if not value:
            return EMPTY, f"'{column}' is an empty list of messages"
        return _message_problem(column, value)
    return WRONG_TYPE, f"'{column}' must be a string or a list of messages, got {_type_name(value)}"


def row_problem(row: dict[str, Any], has_prompt: bool = True) -> Optional[tuple[str, str]]:
    """``(kind, message)`` of what is wrong with one row, or None. ``has_prompt``: the column exists."""
    for column in ("chosen", "rejected"):
        problem = _value_problem(column, row.get(column))
        if problem:
            return problem
    chosen, rejected = row["chosen"], row["rejected"]
    if formats.is_messages(chosen) != formats.is_messages(rejected):
        return WRONG_TYPE, (f"'chosen' is {'a list of messages' if formats.is_messages(chosen) else 'a string'} "
                            f"but 'rejected' is not")
    if chosen == rejected:
        return IDENTICAL, "'chosen' and 'rejected' are identical"
    if has_prompt and row.get("prompt") is None:
        return MISSING, "'prompt' is missing"
    if formats.prompt_is_explicit(row):
        prompt = row["prompt"]
        problem = _value_problem("prompt", prompt, allow_empty=True)
        if problem:
            return problem
        if formats.is_messages(prompt) and prompt[-1]["role"] not in ("user", "tool", "assistant"):
            return BAD_MESSAGES, f"'prompt' must end with a user, tool or assistant message, not {prompt[-1]['role']!r}"
    elif has_prompt and not isinstance(row["prompt"], str) and not formats.is_messages(row["prompt"]):
        return WRONG_TYPE, f"'prompt' must be a string or a list of messages, got {_type_name(row['prompt'])}"
    elif formats.shared_prefix(chosen, rejected) == 0:
        return NO_SHARED_PROMPT, ("no 'prompt' column and 'chosen'/'rejected' share no prompt "
                                  "(they differ from the first message or character)")
    return None


def check_columns(dataset: datasets.Dataset, split: str, source: str) -> None:
    """The columns every row needs; a missing column is an error whatever ``on_bad_rows`` says."""
    missing = [c for c in ("chosen", "rejected") if c not in dataset.column_names]
    if missing:
        shown = [c for c in dataset.column_names if c != ROW_ID]
        raise DataError(
            f"{split} data ({source}) has no column {', '.join(repr(c) for c in missing)} (columns: {shown}); "
            "map columns with data.columns='{old_name: chosen, ...}'"
        )


def check_rows(dataset: datasets.Dataset, split: str, on_bad_rows: str, locate: Optional[Locate] = None,
               source: str = "") -> tuple[datasets.Dataset, Counter]:
    """Stop on bad rows with a summary (``on_bad_rows='error'``) or drop them (``'skip'``).

    Returns the kept rows and the count of dropped rows per problem kind.
    """
    check_columns(dataset, split, source or "data")
    has_prompt = "prompt" in dataset.column_names
    columns = [c for c in (*COLUMNS, ROW_ID) if c in dataset.column_names]
    problems, position = [], 0
    # Batched column reads: far faster than row by row, and memory stays bounded.
    for batch in dataset.select_columns(columns).iter(batch_size=1000):
        for k in range(len(batch["chosen"])):
            row = {c: batch[c][k] for c in columns}
            problem = row_problem(row, has_prompt)
            if problem:
                problems.append((position, Problem(row.get(ROW_ID, position), *problem)))
            position += 1
    return apply_policy(dataset, split, problems, on_bad_rows, locate)


def apply_policy(dataset: datasets.Dataset, split: str, problems: list[tuple[int, Problem]], on_bad_rows: str,
                 locate: Optional[Locate] = None) -> tuple[datasets.Dataset, Counter]:
    """``problems``: (position in ``dataset``, problem). Error, or drop and count by kind."""
    def where(problem: Problem) -> str:
        origin = locate(problem.row) if locate else ""
        return f"{split} row {problem.row}: {problem.message}" + (f" ({origin})" if origin else "")

    if problems and on_bad_rows == "error":
        shown = "\n".join("  " + where(p) for _, p in problems[:SHOWN_PROBLEMS])
        more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise DataError(
            f"{len(problems)} bad row(s) in {split} data:\n{shown}{more}\n"
            "Fix the data or set data.on_bad_rows=skip to drop them."
        )
    dropped = Counter(p.kind for _, p in problems)
    if problems:
        reasons = ", ".join(f"{n} {kind}" for kind, n in dropped.most_common())
        log.warning("%s: dropping %d of %d row(s) (%s); first: %s", split, len(problems), len(dataset), reasons,
                    where(problems[0][1]))
        bad = {position for position, _ in problems}
        dataset = dataset.select([i for i in range(len(dataset)) if i not in bad])
    if len(dataset) == 0:
        raise DataError(f"{split} data is empty" + (" after dropping bad rows" if problems else ""))
    return dataset, dropped
