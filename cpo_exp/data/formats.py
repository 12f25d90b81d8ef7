"""The three row formats, all turned into one: ``{"prompt": str, "chosen": str, "rejected": str}``.

- standard: ``prompt``, ``chosen``, ``rejected`` strings (used as they are);
- conversational: lists of ``{"role", "content"}`` messages, rendered with the tokenizer's
  chat template (generation prompt after the prompt), as TRL's ``maybe_apply_chat_template``;
- implicit prompt: only ``chosen`` and ``rejected`` (strings or messages) that start alike; the
  shared start is the prompt, as TRL's ``maybe_extract_prompt``.

The format is read from each row, as TRL does: a value is conversational when it is a list
whose first element is a dict. A ``prompt`` of another kind than ``chosen`` (e.g. the string
prompt next to full conversations in HuggingFaceH4/ultrafeedback_binarized) is ignored and the
prompt is extracted from ``chosen``/``rejected``, again as TRL does.
"""

from __future__ import annotations

from typing import Any, Optional

from cpo_exp.data.schema import DataError

Value = Any  # a string or a list of messages


def is_messages(value: Value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def prompt_is_explicit(row: dict[str, Any]) -> bool:
    """Whether the row's own ``prompt`` is used (same kind as ``chosen``), else it is extracted."""
    prompt = row.get("prompt")
    return prompt is not None and is_messages(prompt) == is_messages(row["chosen"])


def shared_prefix(chosen: Value, rejected: Value) -> int:
    """Where the implicit prompt ends: TRL's ``extract_prompt`` rule, quirks included.

    The first position where the two differ; for strings a space just before it goes with the
    completions. When one is a prefix of the other the split falls one element before the end
    of the shorter one (TRL's loop variable after a loop without ``break``).
    """
    shorter = min(len(chosen), len(rejected))
    for index in range(shorter):
        if chosen[index] != rejected[index]:
            if index > 0 and isinstance(chosen, str) and chosen[index - 1] == " ":
                return index - 1
            return index
    return max(shorter - 1, 0)


def extract_prompt(chosen: Value, rejected: Value) -> tuple[Value, Value, Value]:
    split = shared_prefix(chosen, rejected)
    return chosen[:split], chosen[split:], rejected[split:]


def _render(tokenizer, messages: list[dict], **kwargs) -> str:
    # tokenize=False returns the text; with tokenize=True transformers 5 returns a dict.
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def render_chat(tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> tuple[str, str, str]:
    """Chat-template a conversational pair into prompt and completion strings.

    The prompt gets the generation prompt when it ends with a user/tool turn and is continued
    when it ends with an assistant turn. Completions are the rendered ``prompt + completion``
    minus the rendered prompt; the prompt is cut to the text all three renderings share, for
    templates that render the generation prompt differently from a real assistant turn.
    """
    last = prompt[-1]["role"]
    if last not in ("user", "tool", "assistant"):
        raise DataError(f"the prompt must end with a user, tool or assistant message, not {last!r}")
    text = _render(tokenizer, prompt, add_generation_prompt=last != "assistant",
                   continue_final_message=last == "assistant")
    with_chosen = _render(tokenizer, prompt + chosen)
    with_rejected = _render(tokenizer, prompt + rejected)
    common = 0
    for a, b, c in zip(text, with_chosen, with_rejected):
        if not a == b == c:
            break
        common += 1
    return text[:common], with_chosen[common:], with_rejected[common:]


def to_standard(row: dict[str, Any], tokenizer) -> dict[str, str]:
    """Any supported row (already checked by :mod:`cpo_exp.data.checks`) as prompt/chosen/rejected strings."""
    chosen, rejected = row["chosen"], row["rejected"]
    if prompt_is_explicit(row):
        prompt = row["prompt"]
    else:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    if is_messages(chosen) or is_messages(prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("conversational data needs a tokenizer with a chat template; this one has none")
        prompt, chosen, rejected = render_chat(tokenizer, prompt, chosen, rejected)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def describe(row: dict[str, Any]) -> Optional[str]:
    """'standard', 'conversational', with ', implicit prompt' when extracted; None if unknowable."""
    chosen = row.get("chosen")
    if chosen is None:
        return None
    kind = "conversational" if is_messages(chosen) else "standard"
    return kind if prompt_is_explicit(row) else kind + ", implicit prompt"
