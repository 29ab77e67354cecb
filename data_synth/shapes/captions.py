"""Captions of shapes-world scenes: a canonical form, varied paraphrases, and a parser that reads them back.

Every caption is built from per-object phrases (size, colour, shape, optionally position) joined by
", " / " and " / "; ", plus an optional background clause and object count. No object phrase contains a
separator, which is what lets ``parse_caption`` read any caption of this module back into attributes.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from data_synth.shapes.scene import COLOURS, SHAPES, SIZES, Scene, SceneObject, position_name

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}


def definite_words(obj: SceneObject, attributes: set[str] | tuple[str, ...], rng: random.Random) -> list[str]:
    """``["the", size?, colour?, shape]``: the words naming ``obj`` by the ``attributes`` asked for
    (position is left to the caller, whose phrasing of places differs)."""
    words = ["the"]
    if "size" in attributes:
        words.append(rng.choice(SIZE_WORDS[obj.size]))
    if "colour" in attributes:
        words.append(obj.colour)
    words.append(obj.shape)
    return words
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {"white": ("white",), "gray": ("gray", "grey"), "black": ("black",)}
COUNT_WORDS = ("one", "two", "three", "four")
ROW_WORDS: dict[str, int] = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
COL_WORDS: dict[str, int] = {"left": 0, "right": 2}
CENTRE_WORDS = ("center", "middle", "centre")
POSITION_PREPOSITIONS = ("at the", "in the")
# Paraphrases of a cell name: (row words, column words) swapped for synonyms.
ROW_SYNONYMS = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}

# Scene-level templates; {objects} is the joined object list, {bg} a background word, {count} a count phrase.
SCENE_TEMPLATES: tuple[str, ...] = (
    "{objects} on a {bg} background",
    "{count} on {bg}: {objects}",
    "a {bg} canvas with {objects}",
    "{objects}, {bg} background",
    "{objects} against a {bg} backdrop",
    "{count}: {objects}",
    "{objects}",
)
# Object phrase templates; a position clause, when present, is part of the phrase.
OBJECT_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape}{pos}",
    "a {colour} {shape}{pos} that is {size}",
    "a {size} {shape} in {colour}{pos}",
)
# Captions that say what a scene lacks ("..., and no red circle"): the world backbone's text tower learns
# negation words from them, as a real CLIP learns "no" and "without" from alt-text. {kind} is a colour+shape
# kind absent from the scene ("red circle").
NEGATION_TEMPLATES: tuple[str, ...] = (
    "{caption}, and no {kind}",
    "{caption}, without any {kind}",
    "{caption}; there is no {kind}",
    "{caption}, with no {kind} in it",
)
POSITION_DROP_RATE = 0.15  # share of paraphrases that leave positions out (true but less specific captions)

_SEPARATOR = re.compile(r"\s*;\s*|\s*,\s*(?:and\s+)?|\s+and\s+")
_BACKGROUND_CLAUSES = (
    re.compile(r"^(?P<rest>.*) on an? (?P<bg>\w+) background$"),
    re.compile(r"^(?P<rest>.*), (?P<bg>\w+) background$"),
    re.compile(r"^(?P<rest>.*) against an? (?P<bg>\w+) backdrop$"),
    re.compile(r"^an? (?P<bg>\w+) canvas with (?P<rest>.*)$"),
)
_COUNT_PREFIX = re.compile(r"^(?P<count>\w+) shapes?(?: on (?P<bg>\w+))?: (?P<rest>.*)$")


def position_phrase(position: tuple[int, int], rng: random.Random | None = None) -> str:
    """'the top left' (canonical) or a paraphrase such as 'the upper left' / 'the middle'."""
    name = position_name(position)
    if rng is None:
        return f"the {name}"
    if name == "center":
        return "the " + rng.choice(("center", "middle"))
    words = name.split()
    if len(words) == 2:  # 'upper left' reads well, a bare 'upper' does not
        words[0] = rng.choice(ROW_SYNONYMS[words[0]])
    return "the " + " ".join(words)


def _count_phrase(n: int) -> str:
    return f"{COUNT_WORDS[n - 1]} shape" + ("s" if n > 1 else "")


def _join(phrases: list[str], rng: random.Random | None) -> str:
    if len(phrases) == 1:
        return phrases[0]
    style = 0 if rng is None else rng.randrange(3)
    if style == 2:
        return "; ".join(phrases)
    head = ", ".join(phrases[:-1])
    return f"{head}{',' if style == 1 else ''} and {phrases[-1]}"


def object_phrase(obj: SceneObject, rng: random.Random | None = None, with_position: bool = True) -> str:
    """'a large red circle at the top left' (canonical), or a random paraphrase when ``rng`` is given."""
    if rng is None:
        template, size, prep = OBJECT_TEMPLATES[0], obj.size, "at"
    else:
        template = rng.choice(OBJECT_TEMPLATES)
        size = rng.choice(SIZE_WORDS[obj.size])
        prep = rng.choice(("at", "in"))
    pos = f" {prep} {position_phrase(obj.position, rng)}" if with_position else ""
    return template.format(size=size, colour=obj.colour, shape=obj.shape, pos=pos)


def canonical_caption(scene: Scene) -> str:
    """The one fixed caption of a scene: objects in grid order, all attributes, background last."""
    objects = _join([object_phrase(o) for o in scene.objects], None)
    return f"{objects} on a {scene.background} background"


def caption_scene(scene: Scene, rng: random.Random) -> str:
    """A random paraphrase: template, synonyms, object order, joiners, and sometimes no positions."""
    with_position = rng.random() >= POSITION_DROP_RATE
    objects = list(scene.objects)
    rng.shuffle(objects)
    joined = _join([object_phrase(o, rng, with_position) for o in objects], rng)
    template = rng.choice(SCENE_TEMPLATES)
    bg = rng.choice(BACKGROUND_WORDS[scene.background])
    return template.format(objects=joined, bg=bg, count=_count_phrase(len(objects)))


def negated_caption(caption: str, kind: tuple[str, str], rng: random.Random) -> str:
    """``caption`` plus a clause saying the scene has no object of ``kind`` (colour, shape); the caller makes
    sure none is there (:func:`absent_kinds`)."""
    return rng.choice(NEGATION_TEMPLATES).format(caption=caption, kind=f"{kind[0]} {kind[1]}")


def absent_kinds(scene: Scene) -> list[tuple[str, str]]:
    """Every (colour, shape) kind no object of ``scene`` has, in a fixed order."""
    present = {(o.colour, o.shape) for o in scene.objects}
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]


def subject_attribute_split(scene: Scene) -> tuple[str, str]:
    """(subject, attributes) of a scene for FTI4CIR's tri-wise regularisation.

    The subject names the things ('a circle and a star'); the attribute phrase carries what the
    subject leaves out, object by object ('large red at the top left, small blue at the center, on a
    white background'), so that "a photo of {subject} with {attributes}" describes the scene fully.
    """
    subject = _join([f"a {o.shape}" for o in scene.objects], None)
    parts = [f"{o.size} {o.colour} at {position_phrase(o.position)}" for o in scene.objects]
    return subject, ", ".join(parts) + f", on a {scene.background} background"


@dataclass(frozen=True)
class ParsedObject:
    """Attributes read from one object phrase; None where the phrase does not say."""

    shape: str
    colour: str | None
    size: str | None
    position: tuple[int, int] | None


@dataclass(frozen=True)
class ParsedCaption:
    objects: tuple[ParsedObject, ...]
    background: str | None
    count: int | None


def _background_word(word: str) -> str:
    for name, words in BACKGROUND_WORDS.items():
        if word in words:
            return name
    raise ValueError(f"unknown background word {word!r}")


def _parse_position(words: list[str]) -> tuple[int, int] | None:
    row = next((ROW_WORDS[w] for w in words if w in ROW_WORDS), None)
    col = next((COL_WORDS[w] for w in words if w in COL_WORDS), None)
    if row is None and col is None:
        return (1, 1) if any(w in CENTRE_WORDS for w in words) else None
    return (1 if row is None else row, 1 if col is None else col)


def _parse_object(chunk: str) -> ParsedObject:
    words = re.findall(r"[a-z]+", chunk.lower())
    shapes = [w for w in words if w in SHAPES]
    if len(shapes) != 1:
        raise ValueError(f"object phrase {chunk!r} names {len(shapes)} shapes")
    colours = [w for w in words if w in COLOURS]
    sizes = [s for s in SIZES for w in words if w in SIZE_WORDS[s]]
    if len(colours) > 1 or len(sizes) > 1:
        raise ValueError(f"object phrase {chunk!r} is ambiguous")
    return ParsedObject(
        shape=shapes[0],
        colour=colours[0] if colours else None,
        size=sizes[0] if sizes else None,
        position=_parse_position(words),
    )


def parse_caption(caption: str) -> ParsedCaption:
    """Read a caption written by this module back into attributes (raises ValueError if it cannot)."""
    text = caption.strip().lower()
    background = count = None
    match = _COUNT_PREFIX.match(text)
    if match:
        count = COUNT_WORDS.index(match["count"]) + 1
        background = _background_word(match["bg"]) if match["bg"] else None
        text = match["rest"]
    for pattern in _BACKGROUND_CLAUSES:
        match = pattern.match(text)
        if match:
            background = _background_word(match["bg"])
            text = match["rest"]
            break
    chunks = [c for c in _SEPARATOR.split(text) if c]
    return ParsedCaption(objects=tuple(_parse_object(c) for c in chunks), background=background, count=count)


def caption_matches(scene: Scene, caption: str) -> bool:
    """True iff every attribute the caption states is true of ``scene`` and it names every object once."""
    parsed = parse_caption(caption)
    if parsed.background not in (None, scene.background) or parsed.count not in (None, len(scene.objects)):
        return False
    if len(parsed.objects) != len(scene.objects):
        return False
    remaining = list(scene.objects)
    for p in parsed.objects:
        match = next(
            (
                o
                for o in remaining
                if o.shape == p.shape
                and p.colour in (None, o.colour)
                and p.size in (None, o.size)
                and p.position in (None, o.position)
            ),
            None,
        )
        if match is None:
            return False
        remaining.remove(match)
    return True
