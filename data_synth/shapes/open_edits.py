"""Open edits: instructions that leave something open, so that several targets are right.

Real modification texts are often open ("make it a different colour"): CIRCO scores them with several
ground truths per query. An :class:`OpenEdit` is such an instruction's meaning on a scene graph; its
*realisations* are the closed :class:`~data_synth.shapes.edits.Edit` s that carry it out, and
:func:`satisfies` decides from the structural difference of two scenes alone (``scene_difference``)
whether one is a right answer, independently of how the realisations were enumerated.

=================== ================================ ==================================== ======================
kind                objects                          value                                realisations
=================== ================================ ==================================== ======================
recolour_any        (obj,)                           None                                 recolour to any other colour
reshape_any         (obj,)                           None                                 replace_shape with any other shape
resize_one_of       the group ("the squares")        the new size                         resize one member not of that size
add_anywhere        ()                               (colour, shape): a kind not present  add it in any free cell, any size
move_to_region      (obj,)                           a region name (``REGIONS``)          move to any free cell of the region
=================== ================================ ==================================== ======================

An :class:`OpenComposite` is a closed edit followed by an open one (described in the scene after the closed
edit), realised as the real two-edit composites of ``make_composite``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

from data_synth.shapes.edits import (
    ALL_KINDS,
    CompositeEdit,
    Edit,
    apply_edit,
    edit_from_dict,
    make_composite,
    object_from_dict,
    object_to_dict,
    sample_edit,
    scene_difference,
)
from data_synth.shapes.scene import COLOURS, GRID, MAX_OBJECTS, SHAPES, SIZES, Scene, SceneObject

OPEN_KINDS: tuple[str, ...] = ("recolour_any", "reshape_any", "resize_one_of", "add_anywhere", "move_to_region")
REGIONS: dict[str, tuple[tuple[int, int], ...]] = {
    "corner": ((0, 0), (0, GRID - 1), (GRID - 1, 0), (GRID - 1, GRID - 1)),
    "left": tuple((r, 0) for r in range(GRID)),
    "right": tuple((r, GRID - 1) for r in range(GRID)),
    "top": tuple((0, c) for c in range(GRID)),
    "bottom": tuple((GRID - 1, c) for c in range(GRID)),
}
MIN_REALISATIONS = 2  # an instruction with one right answer is closed, not open
_MAX_TRIES = 20


@dataclasses.dataclass(frozen=True)
class OpenEdit:
    """One open edit of a scene; see the module docstring for ``objects`` and ``value`` per kind."""

    kind: str
    objects: tuple[SceneObject, ...] = ()
    value: Any = None

    def __post_init__(self) -> None:
        if self.kind not in OPEN_KINDS:
            raise ValueError(f"unknown open edit kind {self.kind!r}; expected one of {OPEN_KINDS}")
        object.__setattr__(self, "objects", tuple(sorted(self.objects)))
        if self.kind == "add_anywhere":
            object.__setattr__(self, "value", tuple(self.value))

    @property
    def kinds(self) -> tuple[str, ...]:
        return (self.kind,)

    def realisations(self, scene: Scene) -> list[Edit]:
        """Every closed edit of ``scene`` that carries this one out (empty when it does not fit the scene)."""
        if any(o not in scene.objects for o in self.objects):
            return []
        free = scene.free_cells()
        if self.kind == "recolour_any":
            (obj,) = self.objects
            return [Edit("recolour", (obj,), c) for c in COLOURS if c != obj.colour]
        if self.kind == "reshape_any":
            (obj,) = self.objects
            return [Edit("replace_shape", (obj,), s) for s in SHAPES if s != obj.shape]
        if self.kind == "resize_one_of":
            return [Edit("resize", (o,), self.value) for o in self.objects if o.size != self.value]
        if self.kind == "add_anywhere":
            colour, shape = self.value
            if len(scene.objects) >= MAX_OBJECTS or any((o.colour, o.shape) == (colour, shape) for o in scene.objects):
                return []
            return [Edit("add", (), SceneObject(cell, shape, colour, size)) for cell in free for size in SIZES]
        (obj,) = self.objects  # move_to_region
        return [Edit("move", (obj,), cell) for cell in REGIONS[self.value] if cell in free]

    def admits(self, edit: Edit) -> bool:
        """Whether the closed ``edit`` carries this one out (read from the edit's structure, not enumerated)."""
        if self.kind == "recolour_any":
            return edit.kind == "recolour" and edit.objects == self.objects
        if self.kind == "reshape_any":
            return edit.kind == "replace_shape" and edit.objects == self.objects
        if self.kind == "resize_one_of":
            return edit.kind == "resize" and edit.objects[0] in self.objects and edit.value == self.value
        if self.kind == "add_anywhere":
            return edit.kind == "add" and (edit.value.colour, edit.value.shape) == tuple(self.value)
        return edit.kind == "move" and edit.objects == self.objects and edit.value in REGIONS[self.value]

    def to_dict(self) -> dict[str, Any]:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {"kind": self.kind, "objects": [object_to_dict(o) for o in self.objects], "value": value}


@dataclasses.dataclass(frozen=True)
class OpenComposite:
    """A closed edit, then an open one of the scene after it (the two act on different objects)."""

    closed: Edit
    open: OpenEdit

    @property
    def kind(self) -> str:
        return f"composite:{self.closed.kind}+{self.open.kind}"

    @property
    def kinds(self) -> tuple[str, ...]:
        return (self.closed.kind, self.open.kind)

    def realisations(self, scene: Scene) -> list[CompositeEdit]:
        middle = apply_edit(scene, self.closed)
        found = (make_composite(scene, self.closed, edit) for edit in self.open.realisations(middle))
        return [c for c in found if c is not None]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "open_composite", "closed": self.closed.to_dict(), "open": self.open.to_dict()}


AnyOpenEdit = OpenEdit | OpenComposite


def open_edit_from_dict(data: dict[str, Any]) -> AnyOpenEdit:
    """Inverse of ``to_dict``."""
    if data["kind"] == "open_composite":
        return OpenComposite(edit_from_dict(data["closed"]), open_edit_from_dict(data["open"]))  # type: ignore[arg-type]
    objects = tuple(object_from_dict(o) for o in data["objects"])
    return OpenEdit(data["kind"], objects, data["value"])


def satisfies(reference: Scene, edit: AnyOpenEdit, candidate: Scene) -> bool:
    """Is ``candidate`` a right answer to ``edit`` of ``reference``? Decided from ``scene_difference``: some
    minimal explanation of ``reference -> candidate`` must be a realisation (a composite: the closed part as
    given and a realisation of the open part, in either order, as the two act on different objects)."""
    for explanation in scene_difference(reference, candidate):
        if isinstance(edit, OpenEdit):
            if isinstance(explanation, Edit) and edit.admits(explanation):
                return True
        elif isinstance(explanation, CompositeEdit):
            first, second = explanation.parts
            if (first == edit.closed and edit.open.admits(second)) or (
                second == edit.closed and edit.open.admits(first)
            ):
                return True
    return False


# --------------------------------------------------------------------------- sampling


def _sample_open(scene: Scene, rng: random.Random, kind: str) -> OpenEdit | None:
    """A random open edit of ``kind`` that fits ``scene`` (it may still have fewer than two realisations)."""
    if kind in ("recolour_any", "reshape_any"):
        return OpenEdit(kind, (rng.choice(scene.objects),))
    if kind == "resize_one_of":
        shapes = sorted({o.shape for o in scene.objects if sum(p.shape == o.shape for p in scene.objects) > 1})
        if not shapes:
            return None
        shape = rng.choice(shapes)
        group = [o for o in scene.objects if o.shape == shape]
        colours = {o.colour for o in group}
        if len(colours) < len(group) and rng.random() < 0.5:  # "one of the red squares": a sub-group of a colour
            colour = rng.choice(sorted(c for c in colours if sum(o.colour == c for o in group) > 1))
            group = [o for o in group if o.colour == colour]
        return OpenEdit(kind, tuple(group), rng.choice(SIZES))
    if kind == "add_anywhere":
        present = {(o.colour, o.shape) for o in scene.objects}
        options = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        return OpenEdit(kind, (), rng.choice(options))
    return OpenEdit(kind, (rng.choice(scene.objects),), rng.choice(sorted(REGIONS)))


def sample_open_edit(
    scene: Scene,
    rng: random.Random,
    kinds: Sequence[str] = OPEN_KINDS,
    composite_with: Sequence[str] | None = None,
    min_realisations: int = MIN_REALISATIONS,
) -> AnyOpenEdit | None:
    """A random open edit of ``scene`` with at least ``min_realisations`` realisations, or None.

    ``composite_with``: closed edit kinds; when given, the result is an ``OpenComposite`` whose closed part
    is one of them. Deterministic given ``rng``.
    """
    unknown = (set(kinds) - set(OPEN_KINDS)) | (set(composite_with or ()) - set(ALL_KINDS))
    if unknown:
        raise ValueError(f"unknown edit kinds {sorted(unknown)}; open kinds are {OPEN_KINDS}, closed {ALL_KINDS}")
    for _ in range(_MAX_TRIES):
        closed = None
        middle = scene
        if composite_with:
            closed = sample_edit(scene, rng, kinds=composite_with, allow_composite=False)
            if closed is None:
                continue
            middle = apply_edit(scene, closed)
        open_edit = _sample_open(middle, rng, rng.choice(list(kinds)))
        if open_edit is None:
            continue
        edit: AnyOpenEdit = open_edit if closed is None else OpenComposite(closed, open_edit)
        if len(edit.realisations(scene)) >= min_realisations:
            return edit
    return None
