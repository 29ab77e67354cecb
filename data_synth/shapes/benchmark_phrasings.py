"""The world benchmark's own wording of edits, disjoint from the training generator's.

Zero-shot CIR is scored on phrasings the synthetic training set never used, so a method is measured on
understanding edits, not on matching templates. None of these templates is (or parses as) one of
``data_synth.shapes.instructions``' training templates; the tests check every generated query with
``instructions.matches_training_phrasing``. The vocabulary (colour, shape, size and position words) is
the world's, so the gap measured is one of phrasing, not of unknown words.
"""

from __future__ import annotations

import random

from data_synth.shapes.captions import SIZE_WORDS, definite_words
from data_synth.shapes.edits import AnyEdit, CompositeEdit, Edit, apply_edit
from data_synth.shapes.instructions import Phrasing, open_slots
from data_synth.shapes.open_edits import AnyOpenEdit, OpenComposite
from data_synth.shapes.scene import Scene, SceneObject, distinguishing_attributes, position_name

# Slots: {obj} a referring expression ("the red star"), {colour},
# {shape}, {pos} a cell name, {thing} an indefinite object phrase ("a big red circle").
# New sentence structures, mostly over words the training instructions and captions also use.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour": (
        "turn the colour of {obj} into {colour}",
        "{obj} is {colour} now",
        "change {obj} so it is {colour}",
        "paint {obj} in {colour} instead",
        "{colour} for {obj}",
    ),
    "resize:large": (
        "{obj} is bigger now",
        "increase the size of {obj}",
        "give {obj} a larger size",
        "scale {obj} up",
        "have {obj} large instead",
    ),
    "resize:small": (
        "{obj} is smaller now",
        "reduce the size of {obj}",
        "give {obj} a smaller size",
        "scale {obj} down",
        "have {obj} small instead",
    ),
    "replace_shape": (
        "{obj} is a {shape} now",
        "put a {shape} in place of {obj}",
        "swap {obj} for a {shape}",
        "have a {shape} instead of {obj}",
        "turn the shape of {obj} into a {shape}",
    ),
    "move": (
        "{obj} is at the {pos} now",
        "take {obj} to the {pos}",
        "change the position of {obj} to the {pos}",
        "let {obj} go to the {pos}",
        "{obj} should be moved to the {pos}",
    ),
    "add": (
        "there is also {thing} at the {pos} now",
        "include one more shape: {thing} at the {pos}",
        "put in {thing} at the {pos}",
        "have {thing} at the {pos} too",
        "{thing} at the {pos} is added",
    ),
    "remove": (
        "{obj} is gone now",
        "take {obj} out",
        "without {obj}",
        "keep everything except {obj}",
        "get {obj} out of the picture",
    ),
}
# Open edits (``open_edits.py``), slots as in ``instructions.OPEN_TEMPLATES``; the issue's own examples are here.
OPEN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour_any": ("give {obj} another colour", "{obj} is some other colour now", "any colour but its own for {obj}"),
    "reshape_any": ("give {obj} another shape", "{obj} is some other shape now", "turn {obj} into any other shape"),
    "resize_one_of:large": ("make one of the {group} bigger", "any one of the {group} is bigger now"),
    "resize_one_of:small": ("make one of the {group} smaller", "any one of the {group} is smaller now"),
    "add_anywhere": ("add {kind} somewhere", "{kind} goes in any free cell", "there is {kind} somewhere now"),
    "move_to_region": ("move {obj} to any {region}", "{obj} ends up in any {region}", "let {obj} go to some free {region}"),
}
# Composite edits: "{a}<joiner>{b}".
JOINERS: tuple[str, ...] = ("; ", ", as well as ", ", besides ", " - ")
BENCHMARK_KINDS: tuple[str, ...] = ("recolour", "resize", "move", "add", "remove", "replace_shape")


def benchmark_templates() -> list[str]:
    """Every benchmark phrasing, for disjointness checks against the training templates."""
    singles = [t for templates in (*TEMPLATES.values(), *OPEN_TEMPLATES.values()) for t in templates]
    return singles + [f"{{a}}{joiner}{{b}}" for joiner in JOINERS]


def refer(scene: Scene, obj: SceneObject, rng: random.Random) -> str:
    """'the small red star' / 'the star at the top left': names ``obj`` unambiguously in ``scene``."""
    attrs = distinguishing_attributes(scene, obj)
    phrase = " ".join(definite_words(obj, attrs, rng))
    if "position" in attrs:
        phrase += f" at the {position_name(obj.position)}"
    return phrase


def _describe_single(scene: Scene, edit: Edit, rng: random.Random) -> str:
    key = edit.kind
    slots: dict[str, str] = {}
    if edit.kind == "add":
        new = edit.value
        slots = {"thing": f"a {rng.choice(SIZE_WORDS[new.size])} {new.colour} {new.shape}", "pos": position_name(new.position)}
    elif edit.kind in ("recolour", "resize", "replace_shape", "move", "remove"):
        slots = {"obj": refer(scene, edit.objects[0], rng)}
        if edit.kind == "recolour":
            slots["colour"] = edit.value
        elif edit.kind == "replace_shape":
            slots["shape"] = edit.value
        elif edit.kind == "move":
            slots["pos"] = position_name(edit.value)
        elif edit.kind == "resize":
            key = f"resize:{edit.value}"
    else:
        raise ValueError(f"the benchmark does not phrase {edit.kind!r} edits; kinds: {BENCHMARK_KINDS}")
    return rng.choice(TEMPLATES[key]).format(**slots)


def describe_edit_benchmark(scene: Scene, edit: AnyEdit, rng: random.Random) -> str:
    """The benchmark's wording of ``edit`` of ``scene`` (a composite's second part refers to the scene
    after its first)."""
    if isinstance(edit, CompositeEdit):
        first = _describe_single(scene, edit.first, rng)
        second = _describe_single(apply_edit(scene, edit.first), edit.second, rng)
        return f"{first}{rng.choice(JOINERS)}{second}"
    return _describe_single(scene, edit, rng)


def describe_open_edit_benchmark(scene: Scene, edit: AnyOpenEdit, rng: random.Random) -> str:
    """The benchmark's wording of an open edit (a composite: the closed part, a joiner, the open part worded
    in the scene after the closed one)."""
    if isinstance(edit, OpenComposite):
        closed = _describe_single(scene, edit.closed, rng)
        return f"{closed}{rng.choice(JOINERS)}{describe_open_edit_benchmark(apply_edit(scene, edit.closed), edit.open, rng)}"
    key, slots = open_slots(scene, edit, refer, rng)
    return rng.choice(OPEN_TEMPLATES[key]).format(**slots)


BENCHMARK_PHRASING = Phrasing({**TEMPLATES, **OPEN_TEMPLATES}, [("", joiner) for joiner in JOINERS])
"""The benchmark's phrasing as a grammar: reads its instructions back (``instructions.open_instruction_matches``)."""


def phrasing_of(instruction: str, kind: str) -> str | None:
    """The benchmark template that worded a single edit of ``kind`` ("remove", "resize", ...), for analyses by
    phrasing; None for a composite or another kind's wording."""
    readings = BENCHMARK_PHRASING.templates_of(instruction)
    return next((template for key, template in readings if key.split(":")[0] == kind), None)
