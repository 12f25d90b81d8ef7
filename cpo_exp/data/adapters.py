"""Format adapters: datasets whose rows are not preference pairs yet, turned into pairs.

``data.adapter=<name>`` with ``data.adapter_args`` picks one. Each adapter maps a dataset to
``prompt``/``chosen``/``rejected`` columns and keeps the ``__row__`` column, so that problems
still name the source row.

``alma_r``: haoranxu/ALMA-R-Preference (Xu et al. 2024, the CPO paper's data), read as the
authors' loader reads it (fe1ixxu/ALMA, ``utils/utils.py::preprocess_cpo_data``; the layout
matches the dataset card): one config per language pair (``cs-en``, ``de-en``, ``is-en``,
``ru-en``, ``zh-en``), one column ``translation`` holding a dict with ``language_pair``, the two
sentences under their language codes (the reference for the target), the systems' translations
``gpt4_<tgt>``/``alma_<tgt>``, their scores ``<system>_<tgt>_<scorer>`` with system
``ref``/``gpt4``/``alma`` and scorer ``kiwi``, ``xcomet`` or ``kiwi_xcomet`` (their mean; the
authors' ``runs/cpo_ft.sh`` trains with ``--cpo_scorer kiwi_xcomet``), ``required_directions``
and a human ``Delta``. The chosen translation is the best-scored of reference, GPT-4 and ALMA,
the rejected one the worst-scored (``Delta`` overrides, as in the authors' code).

The prompt is the authors' ``get_prompt``: "Translate this from X to Y:\\nX: <src>\\nY:", with no
space after the last colon. Their trainer tokenizes each completion on its own, so with their
(SentencePiece) tokenizer the completion starts a new word; this pipeline tokenizes
``prompt + completion`` as TRL 1.16 does, and gets the same token stream from a completion that
starts with a space, so chosen and rejected are " <translation>".
If the real columns differ, the adapter stops with an error that names the missing key.
"""

from __future__ import annotations

import inspect
from typing import Any

import datasets

from cpo_exp.data.schema import ROW_ID, DataError

LANGUAGES = {"en": "English", "de": "German", "cs": "Czech", "is": "Icelandic", "zh": "Chinese", "ru": "Russian",
             "fr": "French", "es": "Spanish", "ja": "Japanese", "uk": "Ukrainian", "ha": "Hausa"}
_SYSTEMS = ("ref", "gpt4", "alma")


def alma_prompt(source: str, target: str, text: str) -> str:
    src, tgt = LANGUAGES[source], LANGUAGES[target]
    return f"Translate this from {src} to {tgt}:\n{src}: {text}\n{tgt}:"


def _need(example: dict, key: str, where: str) -> Any:
    if key not in example or example[key] is None:
        raise DataError(f"{where}: the alma_r adapter needs translation[{key!r}] "
                        f"(present: {sorted(k for k, v in example.items() if v is not None)})")
    return example[key]


def _alma_pair(example: dict, target: str, scorer: str, where: str) -> tuple[str, str]:
    outputs = {"ref": _need(example, target, where), "gpt4": _need(example, f"gpt4_{target}", where),
               "alma": _need(example, f"alma_{target}", where)}
    delta = example.get("Delta")
    if delta:  # a human judgement of GPT-4 against ALMA beats the metric scores
        return (outputs["gpt4"], outputs["alma"]) if delta > 0 else (outputs["alma"], outputs["gpt4"])
    scores = [_need(example, f"{system}_{target}_{scorer}", where) for system in _SYSTEMS]
    # First maximum and first minimum, in the order ref, gpt4, alma (as list.index does).
    best, worst = scores.index(max(scores)), scores.index(min(scores))
    return outputs[_SYSTEMS[best]], outputs[_SYSTEMS[worst]]


def _check_keys(dataset: datasets.Dataset, name: str, wanted: list[tuple[str, str]], scorer: str) -> None:
    """Directions and a scorer that match nothing in the data fail before any row is read (the
    keys are the fields of the ``translation`` struct, known from the features)."""
    fields = dataset.features["translation"]
    if not isinstance(fields, dict):
        return  # not a struct column: the rows are checked one by one
    languages = sorted(k for k in fields if k in LANGUAGES)
    targets = sorted({target for source, target in wanted if {source, target} <= set(languages)})
    if not targets:
        raise DataError(f"data.adapter_args.directions={['-'.join(w) for w in wanted]} match no language pair of "
                        f"{name} (its languages: {', '.join(languages) or 'none'}); pick data.name to match")
    if not any(f"ref_{target}_{scorer}" in fields for target in targets):
        prefix = f"ref_{targets[0]}_"
        known = sorted(k[len(prefix):] for k in fields if k.startswith(prefix))
        raise DataError(f"data.adapter_args.scorer={scorer!r} names no score of {name} (no translation"
                        f"[{prefix + scorer!r}]); its scorers: {', '.join(known) or 'none'}")


def alma_r(dataset: datasets.Dataset, name: str, directions: list[str], scorer: str = "kiwi_xcomet") -> datasets.Dataset:
    """One pair per requested direction (e.g. ``de-en``, ``en-de``) of every row."""
    if "translation" not in dataset.column_names:
        raise DataError(f"the alma_r adapter needs a 'translation' column; {name} has {dataset.column_names}")
    wanted = []
    for direction in directions:
        source, _, target = direction.partition("-")
        if source not in LANGUAGES or target not in LANGUAGES:
            raise DataError(f"data.adapter_args.directions: unknown direction {direction!r} "
                            f"(language codes: {', '.join(LANGUAGES)})")
        wanted.append((source, target))
    _check_keys(dataset, name, wanted, scorer)

    def expand(batch: dict[str, list]) -> dict[str, list]:
        out = {"prompt": [], "chosen": [], "rejected": [], ROW_ID: []}
        for example, row_id in zip(batch["translation"], batch[ROW_ID]):
            where = f"{name}, row {row_id}"
            pair = set(_need(example, "language_pair", where).split("-"))
            required = example.get("required_directions") or ""
            for source, target in wanted:
                if {source, target} != pair or (required and required.split("-")[1] != target):
                    continue
                chosen, rejected = _alma_pair(example, target, scorer, where)
                out["prompt"].append(alma_prompt(source, target, _need(example, source, where)))
                out["chosen"].append(" " + chosen)  # see the module docstring: the word boundary
                out["rejected"].append(" " + rejected)
                out[ROW_ID].append(row_id)
        return out

    return dataset.map(expand, batched=True, remove_columns=dataset.column_names, desc="alma_r pairs")


ADAPTERS = {"alma_r": alma_r}


def apply_adapter(adapter: str, dataset: datasets.Dataset, args: dict[str, Any], name: str) -> datasets.Dataset:
    if adapter not in ADAPTERS:
        raise DataError(f"data.adapter={adapter!r} is unknown (known: {', '.join(ADAPTERS)})")
    function = ADAPTERS[adapter]
    try:
        inspect.signature(function).bind(dataset, name, **args)
    except TypeError as err:
        raise DataError(f"data.adapter_args {args} do not fit the {adapter} adapter: {err}") from None
    return function(dataset, name, **args)
