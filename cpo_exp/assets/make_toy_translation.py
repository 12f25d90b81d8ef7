"""Regenerate the embedded default assets: a toy English→German preference set and a tiny Qwen2.

The data follows the setting of CPO (Xu et al. 2024, "Contrastive Preference Optimization"):
``chosen`` is the correct translation and ``rejected`` an adequate-but-imperfect one, made by
applying exactly one corruption (recorded in ``corruption``) to the correct translation.

Run ``python -m cpo_exp.assets.make_toy_translation``; the output is byte-identical on every run.
Needs only the standard library and ``tokenizers``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

ASSETS_DIR = Path(__file__).resolve().parent
DATA_DIR = ASSETS_DIR / "toy_translation"
MODEL_DIR = ASSETS_DIR / "tiny_qwen2"

SEED = 20240116
N_TRAIN = 1500
N_EVAL = 200
PROMPT_TEMPLATE = "Translate English to German.\nEnglish: {}\nGerman:"

# Share of each corruption among the rejected translations.
CORRUPTION_WEIGHTS = {
    "wrong_word": 0.3,
    "wrong_agreement": 0.3,
    "word_order": 0.2,
    "dropped_word": 0.2,
}

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split. transformers 5.x loads any tokenizer folder whose config.json says
# model_type "qwen2" as Qwen2Tokenizer, whatever tokenizer_config.json names, and that class
# rebuilds its normalizer and pre-tokenizer from this regex. Training with the same pipeline keeps
# tokenizer.json and the loaded tokenizer in agreement.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
BPE_VOCAB_SIZE = 1024
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --- Lexicon -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Noun:
    en: str
    en_pl: str
    de: str
    de_pl: str
    gender: str  # "m", "f" or "n"
    category: str  # "person", "animal", "food", "thing" or "readable"
    de_acc: str | None = None  # weak masculines: "der Junge" but "den Jungen"
    openable: bool = False


@dataclass(frozen=True)
class Adjective:
    en: str
    de: str  # stem; the ending is added by agreement
    categories: frozenset[str]
    group: str


@dataclass(frozen=True)
class Verb:
    en: str
    en_pl: str
    de: str
    de_pl: str
    subjects: frozenset[str]
    objects: frozenset[str]  # categories, or "openable"
    group: str
    # German "fressen" replaces "essen" when an animal eats.
    de_animal: str | None = None
    de_animal_pl: str | None = None


@dataclass(frozen=True)
class Adverb:
    en: str
    de: str
    before_verb_en: bool  # English puts frequency adverbs before the verb, time adverbs last
    group: str


ANIMATE = frozenset({"person", "animal"})
ANY = frozenset({"person", "animal", "food", "thing", "readable"})


def _cats(*names: str) -> frozenset[str]:
    return frozenset(names)


NOUNS = [
    Noun("man", "men", "Mann", "Männer", "m", "person"),
    Noun("woman", "women", "Frau", "Frauen", "f", "person"),
    Noun("child", "children", "Kind", "Kinder", "n", "person"),
    Noun("boy", "boys", "Junge", "Jungen", "m", "person", de_acc="Jungen"),
    Noun("girl", "girls", "Mädchen", "Mädchen", "n", "person"),
    Noun("teacher", "teachers", "Lehrer", "Lehrer", "m", "person"),
    Noun("doctor", "doctors", "Ärztin", "Ärztinnen", "f", "person"),
    Noun("cook", "cooks", "Koch", "Köche", "m", "person"),
    Noun("dog", "dogs", "Hund", "Hunde", "m", "animal"),
    Noun("cat", "cats", "Katze", "Katzen", "f", "animal"),
    Noun("horse", "horses", "Pferd", "Pferde", "n", "animal"),
    Noun("bird", "birds", "Vogel", "Vögel", "m", "animal"),
    Noun("mouse", "mice", "Maus", "Mäuse", "f", "animal"),
    Noun("apple", "apples", "Apfel", "Äpfel", "m", "food"),
    Noun("cake", "cakes", "Kuchen", "Kuchen", "m", "food"),
    Noun("banana", "bananas", "Banane", "Bananen", "f", "food"),
    Noun("egg", "eggs", "Ei", "Eier", "n", "food"),
    Noun("sausage", "sausages", "Wurst", "Würste", "f", "food"),
    Noun("car", "cars", "Auto", "Autos", "n", "thing"),
    Noun("bicycle", "bicycles", "Fahrrad", "Fahrräder", "n", "thing"),
    Noun("ball", "balls", "Ball", "Bälle", "m", "thing"),
    Noun("table", "tables", "Tisch", "Tische", "m", "thing"),
    Noun("chair", "chairs", "Stuhl", "Stühle", "m", "thing"),
    Noun("lamp", "lamps", "Lampe", "Lampen", "f", "thing"),
    Noun("house", "houses", "Haus", "Häuser", "n", "thing"),
    Noun("key", "keys", "Schlüssel", "Schlüssel", "m", "thing"),
    Noun("cup", "cups", "Tasse", "Tassen", "f", "thing"),
    Noun("bag", "bags", "Tasche", "Taschen", "f", "thing", openable=True),
    Noun("door", "doors", "Tür", "Türen", "f", "thing", openable=True),
    Noun("window", "windows", "Fenster", "Fenster", "n", "thing", openable=True),
    Noun("bottle", "bottles", "Flasche", "Flaschen", "f", "thing", openable=True),
    Noun("book", "books", "Buch", "Bücher", "n", "readable", openable=True),
    Noun("letter", "letters", "Brief", "Briefe", "m", "readable", openable=True),
    Noun("newspaper", "newspapers", "Zeitung", "Zeitungen", "f", "readable"),
]

ADJECTIVES = [
    Adjective("small", "klein", ANY, "size"),
    Adjective("big", "groß", ANY, "size"),
    Adjective("heavy", "schwer", _cats("thing", "readable"), "size"),
    Adjective("old", "alt", ANY, "age"),
    Adjective("young", "jung", ANIMATE, "age"),
    Adjective("new", "neu", _cats("thing", "readable"), "age"),
    Adjective("red", "rot", _cats("thing", "food"), "colour"),
    Adjective("blue", "blau", _cats("thing"), "colour"),
    Adjective("green", "grün", _cats("thing", "food"), "colour"),
    Adjective("black", "schwarz", _cats("thing", "animal"), "colour"),
    Adjective("white", "weiß", _cats("thing", "animal"), "colour"),
    Adjective("beautiful", "schön", ANY, "opinion"),
    Adjective("friendly", "freundlich", ANIMATE, "opinion"),
    Adjective("hungry", "hungrig", ANIMATE, "opinion"),
    Adjective("fresh", "frisch", _cats("food"), "food"),
    Adjective("warm", "warm", _cats("food"), "food"),
]

PERSON = _cats("person")
NON_PERSON = _cats("animal", "food", "thing", "readable")
VERBS = [
    Verb("sees", "see", "sieht", "sehen", ANIMATE, ANY, "perceive"),
    Verb("finds", "find", "findet", "finden", ANIMATE, ANY, "perceive"),
    Verb("looks for", "look for", "sucht", "suchen", ANIMATE, ANY, "perceive"),
    Verb("knows", "know", "kennt", "kennen", ANIMATE, ANIMATE | {"readable"}, "perceive"),
    Verb("has", "have", "hat", "haben", ANIMATE, NON_PERSON, "own"),
    Verb("needs", "need", "braucht", "brauchen", PERSON, NON_PERSON - {"animal"}, "own"),
    Verb("buys", "buy", "kauft", "kaufen", PERSON, NON_PERSON, "own"),
    Verb("likes", "like", "mag", "mögen", ANIMATE, ANY, "own"),
    Verb("carries", "carry", "trägt", "tragen", ANIMATE, NON_PERSON, "handle"),
    Verb("holds", "hold", "hält", "halten", PERSON, NON_PERSON, "handle"),
    Verb("washes", "wash", "wäscht", "waschen", PERSON, NON_PERSON - {"readable"}, "handle"),
    Verb("opens", "open", "öffnet", "öffnen", PERSON, _cats("openable"), "handle"),
    Verb("reads", "read", "liest", "lesen", PERSON, _cats("readable"), "act"),
    Verb("paints", "paint", "malt", "malen", PERSON, ANY, "act"),
    Verb("eats", "eat", "isst", "essen", ANIMATE, _cats("food"), "act", "frisst", "fressen"),
]

ADVERBS = [
    Adverb("often", "oft", True, "frequency"),
    Adverb("always", "immer", True, "frequency"),
    Adverb("sometimes", "manchmal", True, "frequency"),
    Adverb("today", "heute", False, "time"),
    Adverb("now", "jetzt", False, "time"),
    Adverb("again", "wieder", False, "time"),
]

# Fixed phrases: German dative and contractions ("in dem" -> "im") are not part of the grammar.
PLACES = [
    ("in the garden", "im Garten"),
    ("in the kitchen", "in der Küche"),
    ("in the park", "im Park"),
    ("in the city", "in der Stadt"),
    ("at school", "in der Schule"),
    ("at home", "zu Hause"),
]


# --- Grammar -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NounPhrase:
    noun: Noun
    adjective: Adjective | None
    definite: bool
    plural: bool


@dataclass(frozen=True)
class Sentence:
    subject: NounPhrase
    verb: Verb
    object: NounPhrase
    adverb: Adverb | None
    place: tuple[str, str] | None


@dataclass(frozen=True)
class Word:
    text: str
    role: str  # "det", "adj", "noun", "verb", "adv" or "place"
    slot: str  # "subject", "object" or "clause"


@dataclass(frozen=True)
class Agreement:
    """Inflection features of one noun phrase; overridden to make agreement errors."""

    case: str  # "nom" or "acc"
    gender: str
    plural: bool
    ending: str | None = None  # forced adjective ending


DEFINITE = {
    ("nom", "m"): "der", ("nom", "f"): "die", ("nom", "n"): "das",
    ("acc", "m"): "den", ("acc", "f"): "die", ("acc", "n"): "das",
}
INDEFINITE = {
    ("nom", "m"): "ein", ("nom", "f"): "eine", ("nom", "n"): "ein",
    ("acc", "m"): "einen", ("acc", "f"): "eine", ("acc", "n"): "ein",
}
# Weak declension after "der/die/das", mixed after "ein"; plurals here are always definite.
WEAK_ENDINGS = {("nom", "m"): "e", ("nom", "f"): "e", ("nom", "n"): "e",
                ("acc", "m"): "en", ("acc", "f"): "e", ("acc", "n"): "e"}
MIXED_ENDINGS = {("nom", "m"): "er", ("nom", "f"): "e", ("nom", "n"): "es",
                 ("acc", "m"): "en", ("acc", "f"): "e", ("acc", "n"): "es"}
ADJECTIVE_ENDINGS = ("e", "en", "er", "es")


def english_noun_phrase(np: NounPhrase) -> str:
    """'the small dog', 'an old man', 'the red cars'."""
    words = [np.adjective.en] if np.adjective else []
    words.append(np.noun.en_pl if np.plural else np.noun.en)
    if np.definite:
        article = "the"
    else:
        article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def english(sentence: Sentence) -> str:
    """The source sentence: frequency adverbs before the verb, time adverbs and places last."""
    verb = sentence.verb.en_pl if sentence.subject.plural else sentence.verb.en
    words = [english_noun_phrase(sentence.subject)]
    adverb = sentence.adverb
    if adverb and adverb.before_verb_en:
        words.append(adverb.en)
    words += [verb, english_noun_phrase(sentence.object)]
    if adverb and not adverb.before_verb_en:
        words.append(adverb.en)
    if sentence.place:
        words.append(sentence.place[0])
    return " ".join(words)


def german_noun_phrase(np: NounPhrase, agreement: Agreement, slot: str) -> list[Word]:
    key = (agreement.case, agreement.gender)
    if agreement.plural:
        article, ending = "die", "en"
    elif np.definite:
        article, ending = DEFINITE[key], WEAK_ENDINGS[key]
    else:
        article, ending = INDEFINITE[key], MIXED_ENDINGS[key]
    words = [Word(article, "det", slot)]
    if np.adjective:
        words.append(Word(np.adjective.de + (agreement.ending or ending), "adj", slot))
    # Gender and number errors stay in article and ending; a case error also reaches weak nouns.
    if np.plural:
        noun = np.noun.de_pl
    elif agreement.case == "acc" and np.noun.de_acc:
        noun = np.noun.de_acc
    else:
        noun = np.noun.de
    words.append(Word(noun, "noun", slot))
    return words


def german_verb(verb: Verb, subject: NounPhrase, plural: bool | None = None) -> str:
    plural = subject.plural if plural is None else plural
    if verb.de_animal and subject.noun.category == "animal":
        return verb.de_animal_pl if plural else verb.de_animal
    return verb.de_pl if plural else verb.de


def true_agreement(np: NounPhrase, case: str) -> Agreement:
    return Agreement(case, np.noun.gender, np.plural)


def german(
    sentence: Sentence,
    subject: Agreement | None = None,
    object: Agreement | None = None,
    verb: str | None = None,
) -> list[Word]:
    """The translation, verb second: subject, verb, adverb, object, place.

    The keyword arguments replace the correct inflection to build agreement errors.
    """
    subject = subject or true_agreement(sentence.subject, "nom")
    object = object or true_agreement(sentence.object, "acc")
    words = german_noun_phrase(sentence.subject, subject, "subject")
    words.append(Word(verb or german_verb(sentence.verb, sentence.subject), "verb", "clause"))
    if sentence.adverb:
        words.append(Word(sentence.adverb.de, "adv", "clause"))
    words += german_noun_phrase(sentence.object, object, "object")
    if sentence.place:
        words.append(Word(sentence.place[1], "place", "clause"))
    return words


def text(words: list[Word]) -> str:
    return " ".join(w.text for w in words)


# --- Sampling ------------------------------------------------------------------------------


def sample_noun_phrase(rng: random.Random, noun: Noun) -> NounPhrase:
    plural = rng.random() < 0.25
    definite = plural or rng.random() < 0.7
    fitting = [a for a in ADJECTIVES if noun.category in a.categories]
    adjective = rng.choice(fitting) if rng.random() < 0.5 else None
    return NounPhrase(noun, adjective, definite, plural)


def fits(noun: Noun, categories: frozenset[str]) -> bool:
    return noun.category in categories or ("openable" in categories and noun.openable)


def sample_sentence(rng: random.Random) -> Sentence:
    verb = rng.choice(VERBS)
    subject_noun = rng.choice([n for n in NOUNS if fits(n, verb.subjects)])
    object_noun = rng.choice([n for n in NOUNS if fits(n, verb.objects) and n != subject_noun])
    roll = rng.random()
    adverb = rng.choice(ADVERBS) if roll < 0.25 else None
    place = rng.choice(PLACES) if 0.25 <= roll < 0.45 else None
    return Sentence(
        sample_noun_phrase(rng, subject_noun),
        verb,
        sample_noun_phrase(rng, object_noun),
        adverb,
        place,
    )


# --- Corruptions ---------------------------------------------------------------------------
# Each function returns {variant: [candidate translations]}; a variant is picked uniformly,
# then a candidate. Candidates equal to the correct translation are filtered out later.


def wrong_word(s: Sentence) -> dict[str, list[str]]:
    """A related but wrong lexicon entry, correctly inflected."""
    out: dict[str, list[str]] = {}
    for slot in ("subject", "object"):
        np = getattr(s, slot)
        other = s.object.noun if slot == "subject" else s.subject.noun
        nouns = [n for n in NOUNS if n.category == np.noun.category and n not in (np.noun, other)]
        out[f"{slot}_noun"] = [
            text(german(replace(s, **{slot: replace(np, noun=n)}))) for n in nouns
        ]
        if np.adjective:
            group = np.adjective.group
            adjectives = [a for a in ADJECTIVES if a.group == group and a != np.adjective]
            out[f"{slot}_adjective"] = [
                text(german(replace(s, **{slot: replace(np, adjective=a)}))) for a in adjectives
            ]
    verbs = [v for v in VERBS if v.group == s.verb.group and v != s.verb]
    out["verb"] = [text(german(replace(s, verb=v))) for v in verbs]
    if s.verb.de_animal:
        # "essen" for an animal or "fressen" for a person: the classic register slip.
        people = s.subject.noun.category == "person"
        wrong = s.verb.de_animal if people else s.verb.de
        wrong_pl = s.verb.de_animal_pl if people else s.verb.de_pl
        out["verb"].append(text(german(s, verb=wrong_pl if s.subject.plural else wrong)))
    if s.adverb:
        adverbs = [a for a in ADVERBS if a.group == s.adverb.group and a != s.adverb]
        out["adverb"] = [text(german(replace(s, adverb=a))) for a in adverbs]
    return out


def wrong_agreement(s: Sentence) -> dict[str, list[str]]:
    """One inflection error: case, gender, adjective ending, or verb number."""
    out: dict[str, list[str]] = {}
    for slot, case, flipped in (("subject", "nom", "acc"), ("object", "acc", "nom")):
        np = getattr(s, slot)
        right = true_agreement(np, case)
        out[f"{slot}_case"] = [text(german(s, **{slot: replace(right, case=flipped)}))]
        out[f"{slot}_gender"] = [
            text(german(s, **{slot: replace(right, gender=g)})) for g in "mfn" if g != right.gender
        ]
        if np.adjective:
            out[f"{slot}_ending"] = [
                text(german(s, **{slot: replace(right, ending=e)})) for e in ADJECTIVE_ENDINGS
            ]
    out["verb_number"] = [
        text(german(s, verb=german_verb(s.verb, s.subject, plural=not s.subject.plural)))
    ]
    return out


def word_order(s: Sentence) -> dict[str, list[str]]:
    """English or subordinate-clause order leaking into the main clause."""
    words = german(s)
    verb = next(i for i, w in enumerate(words) if w.role == "verb")
    out = {"verb_final": [text(words[:verb] + words[verb + 1 :] + [words[verb]])]}
    if s.adverb:
        # "der Hund oft sieht ...": English adverb position, breaks verb-second.
        swapped = words[:verb] + [words[verb + 1], words[verb]] + words[verb + 2 :]
        out["adverb_before_verb"] = [text(swapped)]
    for i in range(len(words) - 1):
        if words[i].role == "adj":
            swapped = words[:i] + [words[i + 1], words[i]] + words[i + 2 :]
            out[f"{words[i].slot}_adjective_after_noun"] = [text(swapped)]
    return out


def dropped_word(s: Sentence) -> dict[str, list[str]]:
    """An omission: one article, adjective or adverb is missing."""
    words = german(s)
    return {
        f"{w.slot}_{w.role}": [text(words[:i] + words[i + 1 :])]
        for i, w in enumerate(words)
        if w.role in ("det", "adj", "adv")
    }


CORRUPTIONS = {
    "wrong_word": wrong_word,
    "wrong_agreement": wrong_agreement,
    "word_order": word_order,
    "dropped_word": dropped_word,
}


def corrupt(rng: random.Random, s: Sentence) -> tuple[str, str]:
    """Pick a corruption type by CORRUPTION_WEIGHTS, then a variant and a candidate of it."""
    correct = text(german(s))
    kinds = list(CORRUPTION_WEIGHTS)
    kind = rng.choices(kinds, weights=[CORRUPTION_WEIGHTS[k] for k in kinds])[0]
    variants = {
        name: candidates
        for name, raw in CORRUPTIONS[kind](s).items()
        # dict.fromkeys: dedupe but keep order, so the draw stays reproducible.
        if (candidates := [c for c in dict.fromkeys(raw) if c != correct])
    }
    # Every sentence has a verb and articles, so each kind has at least one variant.
    name = rng.choice(sorted(variants))
    return kind, rng.choice(variants[name])


# --- Outputs -------------------------------------------------------------------------------


def make_rows(rng: random.Random, n: int) -> list[dict[str, str]]:
    """n preference rows with distinct English sources."""
    rows, seen = [], set()
    while len(rows) < n:
        s = sample_sentence(rng)
        source = english(s)
        if source in seen:
            continue
        seen.add(source)
        kind, rejected = corrupt(rng, s)
        rows.append({
            "prompt": PROMPT_TEMPLATE.format(source),
            # Completions start with a space: the prompt ends at "German:".
            "chosen": " " + text(german(s)),
            "rejected": " " + rejected,
            "corruption": kind,
        })
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """Byte-level BPE with Qwen2's normalizer and pre-tokenizer; special tokens at ids 0-4."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # All 256 bytes, so any text (chat markup, unseen words) stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_model_folder(tokenizer: Tokenizer) -> None:
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(MODEL_DIR / "tokenizer.json"))
    bos, eos, pad = (tokenizer.token_to_id(t) for t in SPECIAL_TOKENS[:3])
    write_json(MODEL_DIR / "tokenizer_config.json", {
        # What AutoTokenizer loads anyway (see QWEN2_SPLIT_REGEX); naming another class is ignored.
        "tokenizer_class": "Qwen2Tokenizer",
        # Qwen2Tokenizer otherwise appends "<|endoftext|>" as unk, growing the vocab by one.
        "unk_token": None,
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[2],
        # The 4.x name: 5.x reads it as extra_special_tokens, but 4.x wants a dict under that one.
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        # The training code adds BOS/EOS itself, as TRL does.
        "add_bos_token": False,
        "add_eos_token": False,
        # Keeps decode(encode(s)) == s: no removal of spaces before punctuation.
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
        "chat_template": CHAT_TEMPLATE,
    })
    # No weights are shipped: the model is built with AutoModelForCausalLM.from_config.
    write_json(MODEL_DIR / "config.json", {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": tokenizer.get_vocab_size(),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "dtype": "float32",
    })
    write_json(MODEL_DIR / "generation_config.json", {
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "do_sample": False,
        "max_new_tokens": 32,
    })


def main() -> None:
    rng = random.Random(SEED)
    rows = make_rows(rng, N_TRAIN + N_EVAL)
    # Sources are distinct, so slicing is a split by source sentence.
    train, eval_ = rows[:N_TRAIN], rows[N_TRAIN:]
    write_jsonl(DATA_DIR / "train.jsonl", train)
    write_jsonl(DATA_DIR / "eval.jsonl", eval_)
    texts = [row[key] for row in rows for key in ("prompt", "chosen", "rejected")]
    write_model_folder(train_tokenizer(texts))
    for path in sorted([*DATA_DIR.iterdir(), *MODEL_DIR.iterdir()]):
        print(f"{path.relative_to(ASSETS_DIR)}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
