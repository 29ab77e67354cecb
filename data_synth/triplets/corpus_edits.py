"""Caption-edit triplets ``(T_ref, instruction, T_tgt)`` from a real caption corpus.

Rule-based keyword edits (colour, object, count, material, size, style; add / remove a clause)
turn each caption into an edited caption and the instruction that describes the change; an
optional instruction-following LLM (any transformers text-generation model id) writes freer edits,
falling back to the rules when its output cannot be parsed. The result is a triplet dataset in the
shared shard format without images (``realise.py`` draws them); a caption no rule applies to is
dropped and counted in the manifest.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data_synth.triplets.format import RECORD, Sample, ShardResult, build_dataset, encode_record
from fusion_diff.errors import ConfigError, DataError, MissingFileError

GENERATOR = "data_synth.triplets.corpus_edits"
GENERATOR_VERSION = "1"

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "silver", "gold")
MATERIALS = ("wooden", "metal", "glass", "plastic", "leather", "stone", "marble", "paper", "wool", "denim", "silk", "ceramic")
SIZE_ANTONYMS = {
    "small": "large", "large": "small", "big": "small", "little": "big", "tiny": "huge", "huge": "tiny",
    "short": "long", "long": "short", "tall": "short",
}  # fmt: skip
STYLES = ("photo", "painting", "drawing", "sketch", "cartoon", "watercolor painting", "oil painting", "3d render")
OBJECT_GROUPS = (
    ("dog", "cat", "horse", "cow", "sheep", "bird", "elephant", "bear", "zebra", "giraffe"),
    ("car", "bus", "truck", "bicycle", "motorcycle", "train", "boat", "airplane"),
    ("chair", "table", "sofa", "bed", "bench", "desk"),
    ("pizza", "sandwich", "cake", "apple", "banana", "donut"),
    ("man", "woman", "boy", "girl", "child"),
    ("dress", "shirt", "jacket", "skirt", "hat", "coat"),
)
NUMBERS = ("one", "two", "three", "four", "five", "six")
IRREGULAR_PLURALS = {"man": "men", "woman": "women", "child": "children", "sheep": "sheep", "person": "people"}
RULE_KINDS = ("colour", "object", "count", "material", "size", "style", "add", "remove")

INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "attribute": (
        "make the {noun} {new}",
        "change the {old} {noun} to {new}",
        "the {noun} should be {new} instead of {old}",
        "show {a_new} {noun} instead",
    ),
    "object": ("replace the {old} with {a_new}", "show {a_new} instead of the {old}", "change the {old} into {a_new}"),
    "count": ("make it {new} {noun}", "show {new} {noun} instead", "change the number of {noun} to {new}"),
    "style": ("make it {a_new}", "turn it into {a_new}", "render it as {a_new}"),
    "add": ("add {a_new}", "put {a_new} in it", "include {a_new}"),
    "remove": ("remove the {old}", "take away the {old}", "get rid of the {old}"),
}


@dataclass(frozen=True)
class CorpusItem:
    """One caption of the corpus, with its image when the corpus has one."""

    id: str
    caption: str
    image: str | None = None


@dataclass(frozen=True)
class CaptionEdit:
    """An edited caption and the instruction that asks for the change."""

    kind: str
    instruction: str
    target: str
    old: str | None
    new: str | None
    method: str = "rule"


# --------------------------------------------------------------------------- reading corpora


def read_corpus(
    path: str | os.PathLike, caption_field: str = "caption", id_field: str = "id", image_field: str = "image"
) -> list[CorpusItem]:
    """Captions from a .txt (one per line), .jsonl or .csv file; ids default to the line number."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"caption corpus {path} not found; pass a .txt, .jsonl or .csv file.")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [CorpusItem(str(i), line.strip()) for i, line in enumerate(lines) if line.strip()]
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number} is not valid JSON ({err}); fix or delete the line.") from err
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise DataError(f"caption corpus {path} has an unknown extension; use .txt, .jsonl or .csv.")
    items = []
    for number, row in enumerate(rows):
        if not isinstance(row, dict) or not row.get(caption_field):
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{path}: record {number} has no {caption_field!r} (fields: {keys}); pass --caption-field.")
        image = row.get(image_field) or None
        if image is not None and not Path(image).is_absolute():
            image = str(path.parent / image)
        items.append(CorpusItem(str(row.get(id_field, number)), str(row[caption_field]).strip(), image))
    return items


# --------------------------------------------------------------------------- rule-based edits


def pluralize(noun: str) -> str:
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if re.search(r"(s|x|ch|sh)$", noun):
        return noun + "es"
    if re.search(r"[^aeiou]y$", noun):
        return noun[:-1] + "ies"
    return noun + "s"


_OBJECT_FORMS = {form: (noun, group) for group in OBJECT_GROUPS for noun in group for form in (noun, pluralize(noun))}


def _word_matches(caption: str, words: Sequence[str]) -> list[re.Match]:
    pattern = r"\b(" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + r")\b"
    return list(re.finditer(pattern, caption, flags=re.IGNORECASE))


def _next_word(caption: str, end: int) -> str | None:
    m = re.match(r"\s+([A-Za-z]+)", caption[end:])
    return m.group(1).lower() if m else None


def _replace(caption: str, m: re.Match, new: str) -> str:
    return caption[: m.start()] + new + caption[m.end() :]


def _say(kind: str, rng: random.Random, **slots: str) -> str:
    if "new" in slots:
        slots["a_new"] = f"{_article(slots['new'])} {slots['new']}"
    return rng.choice(INSTRUCTIONS[kind]).format(**slots)


def _attribute_rule(kind: str, vocabulary: Sequence[str], alternatives: Callable[[str], Sequence[str]]):
    """A rule that swaps one attribute word (a colour, a material, a size) in front of a noun."""

    def rule(caption: str, rng: random.Random) -> CaptionEdit | None:
        matches = [m for m in _word_matches(caption, vocabulary) if _next_word(caption, m.end())]
        if not matches:
            return None
        m = rng.choice(matches)
        old = m.group(1).lower()
        new = rng.choice(list(alternatives(old)))
        noun = _next_word(caption, m.end())
        return CaptionEdit(kind, _say("attribute", rng, noun=noun, old=old, new=new), _replace(caption, m, new), old, new)

    return rule


def _object_rule(caption: str, rng: random.Random) -> CaptionEdit | None:
    matches = _word_matches(caption, list(_OBJECT_FORMS))
    if not matches:
        return None
    m = rng.choice(matches)
    form = m.group(1).lower()
    noun, group = _OBJECT_FORMS[form]
    new = rng.choice([o for o in group if o != noun])
    new_form = pluralize(new) if form != noun else new
    target = caption[: m.start()] + new_form + caption[m.end() :]
    article = re.compile(r"\b(an?) $", re.IGNORECASE)
    if form == noun and article.search(target[: m.start()]):  # "a dog" -> "an elephant"
        target = article.sub(_article(new) + " ", target[: m.start()]) + target[m.start() :]
    return CaptionEdit("object", _say("object", rng, old=noun, new=new), target, noun, new)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _count_rule(caption: str, rng: random.Random) -> CaptionEdit | None:
    plural_forms = {pluralize(noun): noun for group in OBJECT_GROUPS for noun in group}
    numbered = re.compile(rf"\b({'|'.join(NUMBERS)}) ({'|'.join(map(re.escape, plural_forms))})\b", re.IGNORECASE)
    single = re.compile(rf"\b(a|an|one) ({'|'.join(o for g in OBJECT_GROUPS for o in g)})\b", re.IGNORECASE)
    found = list(numbered.finditer(caption)) or list(single.finditer(caption))
    if not found:
        return None
    m = rng.choice(found)
    old_number = m.group(1).lower()
    old_count = 1 if old_number in ("a", "an") else NUMBERS.index(old_number) + 1
    new = rng.choice([n for n in NUMBERS[1:] if n != old_number and NUMBERS.index(n) + 1 != old_count])
    noun = m.group(2).lower()
    plural = noun if noun in plural_forms else pluralize(noun)
    target = caption[: m.start()] + f"{new} {plural}" + caption[m.end() :]
    return CaptionEdit("count", _say("count", rng, noun=plural, new=new), target, old_number, new)


def _style_rule(caption: str, rng: random.Random) -> CaptionEdit | None:
    styled = re.match(rf"^(an?|the) ({'|'.join(sorted(STYLES, key=len, reverse=True))}) of ", caption, flags=re.IGNORECASE)
    old = styled.group(2).lower() if styled else None
    new = rng.choice([s for s in STYLES if s != old])
    body = caption[styled.end() :] if styled else caption[:1].lower() + caption[1:]
    return CaptionEdit("style", _say("style", rng, new=new), f"{_article(new)} {new} of {body}", old, new)


def _add_rule(caption: str, rng: random.Random) -> CaptionEdit | None:
    present = {noun for form, (noun, _) in _OBJECT_FORMS.items() if re.search(rf"\b{form}\b", caption, re.IGNORECASE)}
    new = rng.choice([o for g in OBJECT_GROUPS for o in g if o not in present])
    joiner = rng.choice(("with", "next to", "and"))
    target = f"{caption.rstrip(' .')} {joiner} {_article(new)} {new}"
    return CaptionEdit("add", _say("add", rng, new=new), target, None, new)


_CLAUSE = re.compile(
    r"\s+(?:with|and|next to|beside|holding|near)\s+(?:a|an|the|some|two|three|four)\s+((?:[a-z]+\s+){0,2}?([a-z]+))(?=[\s.,;]*$|,)",
    re.IGNORECASE,
)


def _remove_rule(caption: str, rng: random.Random) -> CaptionEdit | None:
    clauses = [m for m in _CLAUSE.finditer(caption) if m.start() > 0]
    if not clauses:
        return None
    m = rng.choice(clauses)
    target = (caption[: m.start()] + caption[m.end() :]).strip()
    return CaptionEdit("remove", _say("remove", rng, old=m.group(1).lower()), target, m.group(1).lower(), None)


RULES: dict[str, Callable[[str, random.Random], CaptionEdit | None]] = {
    "colour": _attribute_rule("colour", COLOURS, lambda old: [c for c in COLOURS if c != old]),
    "object": _object_rule,
    "count": _count_rule,
    "material": _attribute_rule("material", MATERIALS, lambda old: [c for c in MATERIALS if c != old]),
    "size": _attribute_rule("size", tuple(SIZE_ANTONYMS), lambda old: [SIZE_ANTONYMS[old]]),
    "style": _style_rule,
    "add": _add_rule,
    "remove": _remove_rule,
}


def rule_edit(caption: str, rng: random.Random, kinds: Sequence[str] = RULE_KINDS) -> CaptionEdit | None:
    """A random applicable keyword edit of ``caption`` (rules tried in random order), or None."""
    order = list(kinds)
    rng.shuffle(order)
    for kind in order:
        edit = RULES[kind](caption, rng)
        if edit is not None and edit.target != caption:
            return edit
    return None


# --------------------------------------------------------------------------- LLM edits

LLM_PROMPT = (
    "Write one edit instruction for the image described by the caption, then the caption of the edited image.\n"
    "Caption: a brown dog running on the beach\nInstruction: make the dog a black cat\n"
    "Edited caption: a black cat running on the beach\n\n"
    "Caption: {caption}\nInstruction:"
)


class LLMCaptionEditor:
    """Edits written by an instruction-following LLM through a transformers text-generation pipeline."""

    def __init__(self, model_id: str, max_new_tokens: int = 48, device: str | int | None = None) -> None:
        from transformers import pipeline

        self.model_id = model_id
        self.max_new_tokens = max_new_tokens
        self.generator = pipeline("text-generation", model=model_id, device=device)

    def edit(self, caption: str) -> CaptionEdit | None:
        """The LLM's edit, or None when its output is not ``instruction`` + ``Edited caption: ...``."""
        out = self.generator(
            LLM_PROMPT.format(caption=caption), max_new_tokens=self.max_new_tokens, do_sample=False, return_full_text=False
        )[0]["generated_text"]
        m = re.match(r"\s*(?P<instruction>[^\n]+)\n\s*Edited caption:\s*(?P<target>[^\n]+)", out)
        if m is None:
            return None
        instruction, target = m.group("instruction").strip(), m.group("target").strip()
        if not instruction or not target or target == caption:
            return None
        return CaptionEdit("llm", instruction, target, None, None, method="llm")


@functools.lru_cache(maxsize=2)
def _llm(model_id: str, max_new_tokens: int) -> LLMCaptionEditor:
    return LLMCaptionEditor(model_id, max_new_tokens)


@functools.lru_cache(maxsize=2)
def _corpus(path: str, caption_field: str, id_field: str, image_field: str) -> list[CorpusItem]:
    return read_corpus(path, caption_field, id_field, image_field)


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class CorpusEditConfig:
    """How captions become triplets; stored in the manifest."""

    corpus: str
    caption_field: str = "caption"
    id_field: str = "id"
    image_field: str = "image"
    kinds: tuple[str, ...] = RULE_KINDS
    llm_model: str | None = None
    llm_probability: float = 1.0  # share of captions sent to the LLM when one is set
    llm_max_new_tokens: int = 48

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(RULE_KINDS)
        if unknown or not self.kinds:
            raise ConfigError(f"edit kinds {sorted(unknown) or '[]'} are not valid; choose from {', '.join(RULE_KINDS)}.")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kinds": list(self.kinds)}


def make_corpus_shard(items: range, seed: int, config: CorpusEditConfig) -> ShardResult:
    corpus = _corpus(config.corpus, config.caption_field, config.id_field, config.image_field)
    samples, dropped = [], {"no_applicable_rule": 0, "llm_fallback_to_rule": 0}
    for index in items:
        item = corpus[index]
        rng = random.Random(f"corpus-edit/{seed}/{index}")
        edit = None
        if config.llm_model and rng.random() < config.llm_probability:
            edit = _llm(config.llm_model, config.llm_max_new_tokens).edit(item.caption)
            dropped["llm_fallback_to_rule"] += edit is None
        edit = edit or rule_edit(item.caption, rng, config.kinds)
        if edit is None:
            dropped["no_applicable_rule"] += 1
            continue
        record = {
            "id": f"{index:09d}",
            "corpus_id": item.id,
            "source": f"corpus:{Path(config.corpus).name}",
            "reference_caption": item.caption,
            "instruction": edit.instruction,
            "target_caption": edit.target,
            "edit": {"kind": edit.kind, "old": edit.old, "new": edit.new, "method": edit.method},
            "edit_label": edit.kind,
            "reference_image_path": item.image,
        }
        samples.append(Sample(record["id"], {RECORD: encode_record(record)}, edit.kind))
    return ShardResult(samples, dropped)


def build_corpus_triplets(
    out_dir: str | os.PathLike,
    config: CorpusEditConfig,
    seed: int = 0,
    max_samples: int | None = None,
    shard_size: int = 1000,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Caption-edit triplets (no images) for the first ``max_samples`` captions of the corpus."""
    corpus = read_corpus(config.corpus, config.caption_field, config.id_field, config.image_field)
    if not corpus:
        raise DataError(f"caption corpus {config.corpus} holds no captions.")
    config = CorpusEditConfig(**{**asdict(config), "corpus": str(Path(config.corpus).resolve())})
    n = len(corpus) if max_samples is None else min(max_samples, len(corpus))
    corpus_sha256 = hashlib.sha256(Path(config.corpus).read_bytes()).hexdigest()  # a changed corpus is a new build
    return build_dataset(
        out_dir,
        functools.partial(make_corpus_shard, seed=seed, config=config),
        num_samples=n,
        shard_size=shard_size,
        generator=GENERATOR,
        generator_version=GENERATOR_VERSION,
        seed=seed,
        config={**config.to_dict(), "corpus_sha256": corpus_sha256},
        source=config.corpus,
        workers=1 if config.llm_model else workers,  # one LLM copy, not one per worker
        overwrite=overwrite,
        progress=progress,
    )
