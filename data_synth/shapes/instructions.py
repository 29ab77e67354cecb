"""Training instructions for scene-graph edits: templates, paraphrases, and their parse-back.

These are the phrasings of the *synthetic training set*. The world benchmark words its queries
differently (``benchmark_phrasings.py``), so that evaluation measures generalisation to unseen
phrasing; :func:`matches_training_phrasing` is the check that keeps the two apart.

Every template compiles to a regular expression, so an instruction can be parsed back and checked
against the scene-graph difference of its pair (:func:`instruction_matches_edit`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from data_synth.shapes.captions import SIZE_WORDS, definite_words
from data_synth.shapes.edits import AnyEdit, CompositeEdit, Edit, apply_edit
from data_synth.shapes.open_edits import AnyOpenEdit, OpenComposite, OpenEdit
from data_synth.shapes.scene import (
    COLOURS,
    GRID,
    SHAPES,
    Scene,
    SceneObject,
    distinguishing_attributes,
    position_name,
)

# Slots: {obj}/{obj2} referring expressions, {colour}, {shape}, {plural} ("crosses"), {pos} a cell name,
# {where} "at the top left" / "on the right",
# {thing} "a small red circle", {things} "red circles" (number-agreeing), {n}/{k} number words.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour": (
        "make {obj} {colour}",
        "change the colour of {obj} to {colour}",
        "turn {obj} {colour}",
        "paint {obj} {colour}",
        "colour {obj} {colour}",
        "{obj} should be {colour}",
        "give {obj} the colour {colour}",
    ),
    "resize:large": (
        "make {obj} bigger",
        "make {obj} larger",
        "enlarge {obj}",
        "scale up {obj}",
        "change the size of {obj} to large",
        "{obj} should be big",
    ),
    "resize:small": (
        "make {obj} smaller",
        "shrink {obj}",
        "scale down {obj}",
        "change the size of {obj} to small",
        "{obj} should be small",
        "make {obj} little",
    ),
    "replace_shape": (
        "replace {obj} with a {shape}",
        "turn {obj} into a {shape}",
        "change {obj} into a {shape}",
        "make {obj} a {shape} instead",
        "use a {shape} instead of {obj}",
        "{obj} should be a {shape}",
    ),
    "move": (
        "move {obj} to the {pos}",
        "put {obj} {where}",
        "shift {obj} to the {pos}",
        "place {obj} {where}",
        "{obj} should go to the {pos}",
        "relocate {obj} to the {pos}",
    ),
    "add": (
        "add {thing} {where}",
        "put {thing} {where}",
        "insert {thing} {where}",
        "place {thing} {where}",
        "there should also be {thing} {where}",
        "include {thing} {where}",
        "{where}, add {thing}",
    ),
    "remove": (
        "remove {obj}",
        "delete {obj}",
        "take away {obj}",
        "get rid of {obj}",
        "take out {obj}",
        "erase {obj}",
        "{obj} should be gone",
    ),
    "swap": (
        "swap {obj} and {obj2}",
        "switch the places of {obj} and {obj2}",
        "exchange the positions of {obj} and {obj2}",
        "let {obj} and {obj2} trade places",
        "swap the positions of {obj} and {obj2}",
    ),
    "change_count:set": (
        "there should be {n} {things}",
        "change the number of {colour} {plural} to {n}",
        "make it {n} {things}",
        "have {n} {things} instead",
    ),
    "change_count:more": (
        "add {k} more {things}",
        "put {k} more {things}",
        "increase the {colour} {plural} by {k}",
    ),
    "change_count:fewer": (
        "remove {k} of the {colour} {plural}",
        "keep only {n} {things}",
        "take away {k} of the {colour} {plural}",
        "reduce the {colour} {plural} to {n}",
    ),
}
# Removals worded as negations, used when asked (``describe_edit(..., negated_removals=True)``); {things} is the
# removed object's colour and shape, a kind the scene has one of. The parser always knows them.
NEGATED_REMOVAL_TEMPLATES: tuple[str, ...] = ("there should be no {things}", "no more {things}")
# Composite edits: (prefix, separator) around the two parts.
CONNECTIVES: tuple[tuple[str, str], ...] = (
    ("", " and "),
    ("", ", then "),
    ("first ", ", then "),
    ("", " and then "),
    ("", "; also "),
    ("", ", and also "),
    ("", ", after that "),
    ("", " plus "),
)
# Open edits (``open_edits.py``): several targets are right. Extra slots: {group} "squares" / "red squares",
# {kind} "a blue star" (no size: any size is right), {region} a phrase of ``REGION_WORDS``.
OPEN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour_any": (
        "make {obj} a different colour",
        "change the colour of {obj} to something else",
        "recolour {obj} any way you like",
    ),
    "reshape_any": (
        "make {obj} a different shape",
        "replace {obj} with some other shape",
        "change the shape of {obj} to something else",
    ),
    "resize_one_of:large": (
        "enlarge one of the {group}",
        "one of the {group} should be big",
        "scale up one of the {group}",
    ),
    "resize_one_of:small": (
        "shrink one of the {group}",
        "one of the {group} should be small",
        "scale down one of the {group}",
    ),
    "add_anywhere": (
        "put {kind} in any free cell",
        "insert {kind} anywhere",
        "there should also be {kind} somewhere",
    ),
    "move_to_region": (
        "put {obj} in some {region}",
        "move {obj} into a free {region}",
        "{obj} should go to some {region}",
    ),
}
REGION_WORDS: dict[str, str] = {
    "corner": "corner",
    "left": "cell on the left",
    "right": "cell on the right",
    "top": "cell in the top row",
    "bottom": "cell in the bottom row",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
CENTER_WORDS = ("center", "middle")
PREPOSITIONS = {"corner": ("in", "at"), "edge": ("on", "at")}  # "in the top left", "on the right"
EXTRA_ATTRIBUTE_PROBABILITY = 0.3  # referring expressions sometimes name more than they must


# --------------------------------------------------------------------------- rendering


def training_templates() -> list[str]:
    """Every training phrasing (single-edit templates, open ones, composite connectives), for disjointness checks."""
    singles = [t for templates in (*TEMPLATES.values(), *OPEN_TEMPLATES.values()) for t in templates]
    singles += NEGATED_REMOVAL_TEMPLATES
    return singles + [f"{prefix}{{a}}{sep}{{b}}" for prefix, sep in CONNECTIVES]


def describe_edit(scene: Scene, edit: AnyEdit, rng: random.Random, negated_removals: bool = False) -> str:
    """A training instruction for ``edit`` of ``scene``, its object(s) named unambiguously (a removal sometimes
    as a negation, with ``negated_removals``)."""
    if isinstance(edit, CompositeEdit):
        first = describe_edit(scene, edit.first, rng, negated_removals)
        second = describe_edit(apply_edit(scene, edit.first), edit.second, rng, negated_removals)
        prefix, sep = rng.choice(CONNECTIVES)
        return f"{prefix}{first}{sep}{second}"
    key, slots = _slots(scene, edit, rng)
    templates = TEMPLATES[key] + (NEGATED_REMOVAL_TEMPLATES if negated_removals and key == "remove" else ())
    return rng.choice(templates).format(**slots)


def describe_open_edit(scene: Scene, edit: AnyOpenEdit, rng: random.Random) -> str:
    """A training instruction for an open edit (a composite: its closed part first, then the open one)."""
    if isinstance(edit, OpenComposite):
        closed = describe_edit(scene, edit.closed, rng)
        prefix, sep = rng.choice(CONNECTIVES)
        return f"{prefix}{closed}{sep}{describe_open_edit(apply_edit(scene, edit.closed), edit.open, rng)}"
    key, slots = open_slots(scene, edit, refer, rng)
    return rng.choice(OPEN_TEMPLATES[key]).format(**slots)


def open_slots(
    scene: Scene, edit: OpenEdit, refer_to: Callable[[Scene, SceneObject, random.Random], str], rng: random.Random
) -> tuple[str, dict[str, str]]:
    """The template key and slots of an open edit (``refer_to(scene, obj, rng)`` names one object); shared by
    the training and benchmark phrasings, whose templates differ."""
    if edit.kind == "add_anywhere":
        colour, shape = edit.value
        return edit.kind, {"kind": f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"}
    if edit.kind == "resize_one_of":
        shape = edit.objects[0].shape
        whole = len(edit.objects) == sum(o.shape == shape for o in scene.objects)
        group = _plural(shape) if whole else f"{edit.objects[0].colour} {_plural(shape)}"
        return f"resize_one_of:{edit.value}", {"group": group}
    slots = {"obj": refer_to(scene, edit.objects[0], rng)}
    if edit.kind == "move_to_region":
        slots["region"] = REGION_WORDS[edit.value]
    return edit.kind, slots


def refer(scene: Scene, obj: SceneObject, rng: random.Random) -> str:
    """'the small red star at the top left': a unique description of ``obj`` in ``scene``."""
    attrs = set(distinguishing_attributes(scene, obj))
    extras = [a for a in ("colour", "size") if a not in attrs]
    if extras and rng.random() < EXTRA_ATTRIBUTE_PROBABILITY:
        attrs.add(rng.choice(extras))
    words = definite_words(obj, attrs, rng)
    if "position" in attrs:
        words.append(_where(obj.position, rng))
    return " ".join(words)


def _cell_words(cell: tuple[int, int], rng: random.Random) -> str:
    name = position_name(cell)
    return rng.choice(CENTER_WORDS) if name == "center" else name


def _where(cell: tuple[int, int], rng: random.Random) -> str:
    edge = " " not in position_name(cell) and position_name(cell) != "center"
    return f"{rng.choice(PREPOSITIONS['edge' if edge else 'corner'])} the {_cell_words(cell, rng)}"


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("ss") else "s")


def _things(colour: str, shape: str, n: int) -> str:
    return f"{colour} {shape if n == 1 else _plural(shape)}"


def _slots(scene: Scene, edit: Edit, rng: random.Random) -> tuple[str, dict[str, str]]:
    kind = edit.kind
    if kind == "add":
        new = edit.value
        thing = f"a {rng.choice(SIZE_WORDS[new.size])} {new.colour} {new.shape}"
        return kind, {"thing": thing, "where": _where(new.position, rng)}
    if kind == "change_count":
        colour, shape = edit.colour_shape
        before, after = len(edit.objects), edit.count
        key = rng.choice(["change_count:set", "change_count:more" if after > before else "change_count:fewer"])
        n = after if key != "change_count:more" else abs(after - before)
        return key, {
            "colour": colour,
            "plural": _plural(shape),
            "n": NUMBER_WORDS[after],
            "k": NUMBER_WORDS[abs(after - before)],
            "things": _things(colour, shape, n),
        }
    slots = {"obj": refer(scene, edit.objects[0], rng)}
    if kind == "swap":
        slots["obj2"] = refer(scene, edit.objects[1], rng)
    elif kind == "recolour":
        slots["colour"] = edit.value
    elif kind == "replace_shape":
        slots["shape"] = edit.value
    elif kind == "move":
        slots["pos"] = _cell_words(edit.value, rng)
        slots["where"] = _where(edit.value, rng)
    elif kind == "resize":
        kind = f"resize:{edit.value}"
    elif kind == "remove":
        slots["things"] = _things(edit.objects[0].colour, edit.objects[0].shape, 1)
    return kind, slots


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ParsedEdit:
    """One single-edit instruction read back: the template key and its raw slot strings."""

    key: str
    slots: tuple[tuple[str, str], ...]


def _alternatives(words) -> str:
    return "|".join(sorted(words, key=len, reverse=True))


_SIZES = _alternatives(w for ws in SIZE_WORDS.values() for w in ws)
_COLOURS = _alternatives(COLOURS)
_SHAPES = _alternatives(SHAPES)
_CELLS = _alternatives({position_name((r, c)) for r in range(GRID) for c in range(GRID)} | set(CENTER_WORDS))
_NUMBERS = _alternatives(NUMBER_WORDS)
_PREPOSITIONS = _alternatives({p for ps in PREPOSITIONS.values() for p in ps})
_WHERE = rf"(?:{_PREPOSITIONS}) the (?P<pos>{_CELLS})"
_REF = rf"the (?:(?:{_SIZES}) )?(?:(?:{_COLOURS}) )?(?:{_SHAPES})(?: (?:{_PREPOSITIONS}) the (?:{_CELLS}))?"
_SLOT_PATTERNS = {
    "obj": _REF,
    "obj2": _REF,
    "colour": _COLOURS,
    "shape": _SHAPES,
    "plural": _alternatives(_plural(s) for s in SHAPES),
    "pos": _CELLS,
    "where": rf"(?:{_PREPOSITIONS}) the (?:{_CELLS})",
    "thing": rf"a (?:{_SIZES}) (?:{_COLOURS}) (?:{_SHAPES})",
    "things": rf"(?:{_COLOURS}) (?:{_SHAPES})(?:e?s)?",
    "n": _NUMBERS,
    "k": _NUMBERS,
    "group": rf"(?:(?:{_COLOURS}) )?(?:{_alternatives(_plural(s) for s in SHAPES)})",
    "kind": rf"an? (?:{_COLOURS}) (?:{_SHAPES})",
    "region": _alternatives(REGION_WORDS.values()),
}
_REF_PARTS = re.compile(
    rf"the (?:(?P<size>{_SIZES}) )?(?:(?P<colour>{_COLOURS}) )?(?P<shape>{_SHAPES})"
    rf"(?: {_WHERE})?"
)


def compile_template(template: str) -> re.Pattern:
    """A template ("make {obj} {colour}") as a regular expression over the world's vocabulary."""
    pattern = re.escape(template)
    for name, slot in _SLOT_PATTERNS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{slot})")
    if "\\{" in pattern:
        raise ValueError(f"template {template!r} has a slot outside {sorted(_SLOT_PATTERNS)}")
    return re.compile(pattern)


class Phrasing:
    """A family of edit phrasings (templates per key, connectives for composites) that reads text back.

    ``connectives`` are (prefix, separator) pairs: "first {a}, then {b}" is ("first ", ", then ").
    """

    def __init__(self, templates: dict[str, Sequence[str]], connectives: Sequence[tuple[str, str]]) -> None:
        self.connectives = tuple(connectives)
        self._regexes = [(key, t, compile_template(t)) for key, group in templates.items() for t in group]

    def parse_single(self, text: str) -> list[ParsedEdit]:
        """All template readings of a single-edit instruction."""
        return [
            ParsedEdit(key, tuple(sorted(m.groupdict().items())))
            for key, _, regex in self._regexes
            if (m := regex.fullmatch(text)) is not None
        ]

    def templates_of(self, text: str) -> list[tuple[str, str]]:
        """(key, template) of every template that reads ``text`` as a single edit: which wording a text uses."""
        return [(key, template) for key, template, regex in self._regexes if regex.fullmatch(text)]

    def parse(self, text: str) -> list[tuple[ParsedEdit, ...]]:
        """All readings of ``text`` as one phrasing or two joined by a connective."""
        readings = [(p,) for p in self.parse_single(text)]
        for first, second in self._splits(text):
            readings += [(a, b) for a in self.parse_single(first) for b in self.parse_single(second)]
        return readings

    def matches(self, text: str) -> bool:
        return bool(self.parse(text))

    def _splits(self, text: str) -> Iterator[tuple[str, str]]:
        for prefix, sep in self.connectives:
            if not text.startswith(prefix):
                continue
            body = text[len(prefix) :]
            for m in re.finditer(re.escape(sep), body):
                yield body[: m.start()], body[m.end() :]


TRAINING_PHRASING = Phrasing(
    {**TEMPLATES, "remove": TEMPLATES["remove"] + NEGATED_REMOVAL_TEMPLATES, **OPEN_TEMPLATES}, CONNECTIVES
)


def parse_instruction(text: str) -> list[tuple[ParsedEdit, ...]]:
    """All readings of a training instruction (empty if ``text`` is not in the training phrasing)."""
    return TRAINING_PHRASING.parse(text)


def matches_training_phrasing(text: str) -> bool:
    """True if ``text`` is worded in the training generator's phrasing (the benchmark's must not be)."""
    return TRAINING_PHRASING.matches(text)


def resolve(scene: Scene, phrase: str) -> SceneObject | None:
    """The single object of ``scene`` that a referring expression picks out, else None."""
    m = _REF_PARTS.fullmatch(phrase)
    if m is None:
        return None
    size, colour, shape, pos = m.group("size", "colour", "shape", "pos")
    size = next((s for s, words in SIZE_WORDS.items() if size in words), None) if size else None
    matches = [
        o
        for o in scene.objects
        if o.shape == shape
        and (colour is None or o.colour == colour)
        and (size is None or o.size == size)
        and (pos is None or _cell_matches(o.position, pos))
    ]
    return matches[0] if len(matches) == 1 else None


def _cell_matches(cell: tuple[int, int], words: str) -> bool:
    name = position_name(cell)
    return words == name or (name == "center" and words in CENTER_WORDS)


def parsed_matches(scene: Scene, parsed: ParsedEdit, edit: Edit) -> bool:
    """Whether one parsed single-edit reading describes exactly the closed ``edit`` of ``scene``."""
    kind, _, variant = parsed.key.partition(":")
    if kind != edit.kind:
        return False
    slots = dict(parsed.slots)
    if "where" in slots:
        slots["pos"] = slots["where"].split(" the ", 1)[1]
    if kind == "add":
        new = edit.value
        return _cell_matches(new.position, slots["pos"]) and slots["thing"].split()[1:] in (
            [w, new.colour, new.shape] for w in SIZE_WORDS[new.size]
        )
    if kind == "change_count":
        colour, shape = edit.colour_shape
        words = slots["things"].split() if "things" in slots else [slots["colour"], slots["plural"]]
        if words[0] != colour or words[1] not in (shape, _plural(shape)):
            return False
        before, after = len(edit.objects), edit.count
        if "k" in slots:
            return slots["k"] == NUMBER_WORDS[abs(after - before)] and (variant == "more") == (after > before)
        return slots["n"] == NUMBER_WORDS[after] and (variant != "more")
    if kind == "swap":
        return {resolve(scene, slots["obj"]), resolve(scene, slots["obj2"])} == set(edit.objects)
    if kind == "remove" and "things" in slots:  # "no more red stars": every object of that kind goes
        colour, shape = slots["things"].split()
        kind_objects = [o for o in scene.objects if o.colour == colour and shape in (o.shape, _plural(o.shape))]
        return kind_objects == [edit.objects[0]]
    if resolve(scene, slots["obj"]) != edit.objects[0]:
        return False
    if kind == "resize":
        return variant == edit.value
    if kind == "move":
        return _cell_matches(edit.value, slots["pos"])
    value_slot = {"recolour": "colour", "replace_shape": "shape"}.get(kind)
    return value_slot is None or slots[value_slot] == edit.value


def instruction_matches_edit(text: str, scene: Scene, edit: AnyEdit) -> bool:
    """True if some reading of ``text`` describes exactly ``edit`` of ``scene`` (objects resolved
    uniquely; a composite's second part in the scene after its first)."""
    parts = edit.parts if isinstance(edit, CompositeEdit) else (edit,)
    scenes = [scene] if len(parts) == 1 else [scene, apply_edit(scene, parts[0])]
    return any(
        len(reading) == len(parts) and all(parsed_matches(s, p, e) for s, p, e in zip(scenes, reading, parts))
        for reading in parse_instruction(text)
    )


def open_from_reading(scene: Scene, parsed: ParsedEdit) -> OpenEdit | None:
    """The open edit of ``scene`` that a parsed reading states (objects resolved uniquely), else None."""
    kind, _, variant = parsed.key.partition(":")
    slots = dict(parsed.slots)
    if kind == "add_anywhere":
        _, colour, shape = slots["kind"].split()
        return OpenEdit(kind, (), (colour, shape))
    if kind == "resize_one_of":
        *colour, plural = slots["group"].split()
        shape = next(s for s in SHAPES if _plural(s) == plural)
        group = tuple(o for o in scene.objects if o.shape == shape and (not colour or o.colour == colour[0]))
        return OpenEdit(kind, group, variant) if len(group) > 1 else None
    if kind not in ("recolour_any", "reshape_any", "move_to_region"):
        return None
    obj = resolve(scene, slots["obj"])
    if obj is None:
        return None
    region = next((r for r, words in REGION_WORDS.items() if words == slots.get("region")), None)
    return OpenEdit(kind, (obj,), region)


def open_instruction_matches(text: str, scene: Scene, edit: AnyOpenEdit, phrasing: Phrasing = TRAINING_PHRASING) -> bool:
    """True if some reading of ``text`` in ``phrasing`` states exactly the open ``edit`` of ``scene``."""
    for reading in phrasing.parse(text):
        if isinstance(edit, OpenEdit) and len(reading) == 1 and open_from_reading(scene, reading[0]) == edit:
            return True
        if (
            isinstance(edit, OpenComposite)
            and len(reading) == 2
            and parsed_matches(scene, reading[0], edit.closed)
            and open_from_reading(apply_edit(scene, edit.closed), reading[1]) == edit.open
        ):
            return True
    return False
