"""What a preference row is, the length limits, and how a bad row is reported.

Shared by every stage of the pipeline (sources -> checks -> formats -> tokenize -> stats).
"""

from __future__ import annotations

from dataclasses import dataclass

from cpo_exp.config import SequenceLengths  # noqa: F401 - the limits every stage applies

COLUMNS = ("prompt", "chosen", "rejected")
LABEL_PAD = -100
# The reference model's summed log-probs of each pair, added for the losses that need them (DPO).
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# Roles a chat template is expected to know; anything else is a typo worth stopping for.
ROLES = ("system", "user", "assistant", "tool")
# The column that carries each row's position in its source through splits and selects, so
# that a problem found after carving an eval split still names the original file line.
ROW_ID = "__row__"


class DataError(ValueError):
    """Data that cannot be trained on; the message names the file, row and column."""


@dataclass(frozen=True)
class Problem:
    """One bad row: where it is, which column, a short ``kind`` for counting, and the message."""

    row: int
    kind: str
    message: str


# Problem kinds, counted in the dataset summary when rows are dropped.
MISSING = "missing"
EMPTY = "empty"
WRONG_TYPE = "wrong_type"
IDENTICAL = "identical"
BAD_MESSAGES = "bad_messages"
NO_SHARED_PROMPT = "no_shared_prompt"
NO_ROOM = "no_room"
PROMPT_MISMATCH = "prompt_mismatch"
