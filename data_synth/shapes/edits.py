"""Scene-graph edits: the ground truth behind every synthetic (reference, instruction, target) triplet.

An edit is a small structured change of a :class:`~data_synth.shapes.scene.Scene`. Edits are sampled
so that each one is *valid* (it applies, it changes the scene) and *identifiable*: the structural
difference of the two scenes re-derives it (:func:`scene_difference`), so instructions, benchmarks
and tests can all be checked against the scene graph rather than against text.

Kinds and the meaning of ``objects`` / ``value``:

=============== ================================== ===========================================
kind            objects (in the scene edited)      value
=============== ================================== ===========================================
recolour        (obj,)                             new colour
resize          (obj,)                             new size
replace_shape   (obj,)                             new shape
move            (obj,)                             new (row, col) cell (free before the edit)
add             ()                                 the new SceneObject (colour+shape kind new)
remove          (obj,)                             None (obj's colour+shape kind is unique)
swap            (a, b)                             None (a and b exchange cells)
change_count    members of one colour+shape kind   the kind's members after the edit (>= 1)
=============== ================================== ===========================================

``add`` introduces a colour+shape kind absent from the scene and ``remove`` deletes the only
object of its kind; adding or removing copies of a kind that stays present is ``change_count``.
This split keeps every difference explained by exactly one kind.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any, Union

from data_synth.shapes.scene import COLOURS, MAX_OBJECTS, SHAPES, SIZES, Scene, SceneObject

ALL_KINDS: tuple[str, ...] = (
    "recolour",
    "resize",
    "move",
    "add",
    "remove",
    "replace_shape",
    "change_count",
    "swap",
)
ATTRIBUTE_KINDS = {"recolour": "colour", "resize": "size", "replace_shape": "shape"}
COMPOSITE_PROBABILITY = 0.25  # share of composite edits when ``allow_composite`` is on
_MAX_TRIES = 8

EditValue = Union[str, tuple[int, int], SceneObject, tuple[SceneObject, ...], None]


@dataclasses.dataclass(frozen=True)
class Edit:
    """One scene-graph edit; see the module docstring for ``objects`` and ``value`` per kind."""

    kind: str
    objects: tuple[SceneObject, ...] = ()
    value: EditValue = None

    def __post_init__(self) -> None:
        if self.kind not in ALL_KINDS:
            raise ValueError(f"unknown edit kind {self.kind!r}; expected one of {ALL_KINDS}")
        if self.kind in ("swap", "change_count"):  # order-free parts are stored sorted: equal edits compare equal
            object.__setattr__(self, "objects", tuple(sorted(self.objects)))
        if self.kind == "change_count":
            object.__setattr__(self, "value", tuple(sorted(self.value)))  # type: ignore[arg-type]

    @property
    def kinds(self) -> tuple[str, ...]:
        return (self.kind,)

    @property
    def target(self) -> SceneObject | None:
        """The (first) object the edit acts on, or None for ``add``."""
        return self.objects[0] if self.objects else None

    @property
    def colour_shape(self) -> tuple[str, str]:
        """For ``change_count``: the (colour, shape) kind whose count changes."""
        ref = self.objects[0]
        return ref.colour, ref.shape

    @property
    def count(self) -> int:
        """For ``change_count``: the kind's count after the edit."""
        return len(self.value)  # type: ignore[arg-type]

    def touched(self) -> frozenset[SceneObject]:
        """Objects of the edited scene that the edit changes or removes."""
        return frozenset(self.objects)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "objects": [object_to_dict(o) for o in self.objects], "value": _value_to_json(self.value)}


@dataclasses.dataclass(frozen=True)
class CompositeEdit:
    """Two edits applied in order; ``second`` refers to objects of the scene after ``first``.
    The two act on disjoint objects and the result is not reachable by any single edit."""

    first: Edit
    second: Edit

    @property
    def kinds(self) -> tuple[str, ...]:
        return (self.first.kind, self.second.kind)

    @property
    def kind(self) -> str:
        """Label used for per-type counts: ``composite:<kind1>+<kind2>``."""
        return f"composite:{self.first.kind}+{self.second.kind}"

    @property
    def parts(self) -> tuple[Edit, Edit]:
        return (self.first, self.second)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "composite", "edits": [self.first.to_dict(), self.second.to_dict()]}


AnyEdit = Union[Edit, CompositeEdit]


def edit_from_dict(data: dict[str, Any]) -> AnyEdit:
    """Inverse of ``to_dict`` (the JSON stored beside every triplet)."""
    if data["kind"] == "composite":
        first, second = (edit_from_dict(d) for d in data["edits"])
        return CompositeEdit(first, second)  # type: ignore[arg-type]
    objects = tuple(object_from_dict(o) for o in data["objects"])
    return Edit(data["kind"], objects, _value_from_json(data["kind"], data["value"]))


def object_to_dict(o: SceneObject) -> dict[str, Any]:
    return {"shape": o.shape, "colour": o.colour, "size": o.size, "position": list(o.position)}


def object_from_dict(d: dict[str, Any]) -> SceneObject:
    return SceneObject(position=tuple(d["position"]), shape=d["shape"], colour=d["colour"], size=d["size"])


def _value_to_json(value: EditValue) -> Any:
    if isinstance(value, SceneObject):
        return object_to_dict(value)
    if isinstance(value, tuple) and value and isinstance(value[0], SceneObject):
        return [object_to_dict(o) for o in value]
    if isinstance(value, tuple):
        return list(value)
    return value


def _value_from_json(kind: str, value: Any) -> EditValue:
    if kind == "add":
        return object_from_dict(value)
    if kind == "change_count":
        return tuple(object_from_dict(o) for o in value)
    if kind == "move":
        return tuple(value)
    return value


# --------------------------------------------------------------------------- applying


def apply_edit(scene: Scene, edit: AnyEdit) -> Scene:
    """The scene after ``edit``. Raises ValueError if the edit does not fit the scene."""
    if isinstance(edit, CompositeEdit):
        return apply_edit(apply_edit(scene, edit.first), edit.second)
    missing = [o for o in edit.objects if o not in scene.objects]
    if missing:
        raise ValueError(f"{edit.kind} edit refers to objects not in the scene: {missing}")
    rest = [o for o in scene.objects if o not in edit.objects]
    if edit.kind in ATTRIBUTE_KINDS:
        new = [_with(edit.objects[0], **{ATTRIBUTE_KINDS[edit.kind]: edit.value})]
    elif edit.kind == "move":
        new = [_with(edit.objects[0], position=edit.value)]
    elif edit.kind == "add":
        new = [edit.value]
    elif edit.kind == "remove":
        new = []
    elif edit.kind == "swap":
        a, b = edit.objects
        new = [_with(a, position=b.position), _with(b, position=a.position)]
    else:  # change_count
        new = list(edit.value)  # type: ignore[arg-type]
    return scene.with_objects(rest + new)


def _with(obj: SceneObject, **changes: Any) -> SceneObject:
    return dataclasses.replace(obj, **changes)  # re-validated by SceneObject.__post_init__


# --------------------------------------------------------------------------- sampling


def sample_edit(
    scene: Scene,
    rng: random.Random,
    kinds: Sequence[str] = ALL_KINDS,
    allow_composite: bool = True,
    composite_probability: float = COMPOSITE_PROBABILITY,
) -> AnyEdit | None:
    """A random valid edit of ``scene`` (one of ``kinds``; a composite of two with
    ``composite_probability`` when allowed), or None if no kind applies. Deterministic given ``rng``."""
    unknown = set(kinds) - set(ALL_KINDS)
    if unknown:
        raise ValueError(f"unknown edit kinds {sorted(unknown)}; expected a subset of {ALL_KINDS}")
    if allow_composite and rng.random() < composite_probability:
        for _ in range(_MAX_TRIES):
            composite = _sample_composite(scene, rng, kinds)
            if composite is not None:
                return composite
    return _sample_single(scene, rng, kinds)


def _sample_single(scene: Scene, rng: random.Random, kinds: Sequence[str]) -> Edit | None:
    remaining = list(kinds)
    while remaining:
        kind = remaining.pop(rng.randrange(len(remaining)))
        edit = _SAMPLERS[kind](scene, rng)
        if edit is not None:
            return edit
    return None


def _sample_composite(scene: Scene, rng: random.Random, kinds: Sequence[str]) -> CompositeEdit | None:
    first = _sample_single(scene, rng, kinds)
    if first is None:
        return None
    second = _sample_single(apply_edit(scene, first), rng, kinds)
    return None if second is None else make_composite(scene, first, second)


def make_composite(scene: Scene, first: Edit, second: Edit) -> CompositeEdit | None:
    """``first`` then ``second`` (an edit of the scene after ``first``) as a composite, or None when it is not
    a real one: ``second`` touches what ``first`` changed or added, or the result is reachable in one edit
    (e.g. add + remove = move) or is the scene itself."""
    middle = apply_edit(scene, first)
    changed = first.touched() | (frozenset(middle.objects) - frozenset(scene.objects))
    if second.touched() & changed:
        return None
    try:
        result = apply_edit(middle, second)
    except ValueError:  # the second edit does not fit the scene after the first
        return None
    if result == scene or _explain_single(scene, result) is not None:
        return None
    return CompositeEdit(first, second)


def _kind_counts(scene: Scene) -> Counter:
    return Counter((o.colour, o.shape) for o in scene.objects)


def _sample_attribute(kind: str):
    attr = ATTRIBUTE_KINDS[kind]
    values = {"colour": tuple(COLOURS), "size": SIZES, "shape": SHAPES}[attr]

    def sample(scene: Scene, rng: random.Random) -> Edit | None:
        obj = rng.choice(scene.objects)
        value = rng.choice([v for v in values if v != getattr(obj, attr)])
        return Edit(kind, (obj,), value)

    return sample


def _sample_move(scene: Scene, rng: random.Random) -> Edit | None:
    free = scene.free_cells()
    if not free:
        return None
    return Edit("move", (rng.choice(scene.objects),), rng.choice(free))


def _sample_add(scene: Scene, rng: random.Random) -> Edit | None:
    free = scene.free_cells()
    if len(scene.objects) >= MAX_OBJECTS or not free:
        return None
    present = _kind_counts(scene)
    options = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    colour, shape = rng.choice(options)
    obj = SceneObject(position=rng.choice(free), shape=shape, colour=colour, size=rng.choice(SIZES))
    return Edit("add", (), obj)


def _sample_remove(scene: Scene, rng: random.Random) -> Edit | None:
    counts = _kind_counts(scene)
    options = [o for o in scene.objects if counts[(o.colour, o.shape)] == 1]
    if len(scene.objects) < 2 or not options:
        return None
    return Edit("remove", (rng.choice(options),))


def _sample_swap(scene: Scene, rng: random.Random) -> Edit | None:
    pairs = [
        (a, b)
        for a, b in itertools.combinations(scene.objects, 2)
        if (a.shape, a.colour, a.size) != (b.shape, b.colour, b.size)
    ]
    return Edit("swap", rng.choice(pairs)) if pairs else None


def _sample_change_count(scene: Scene, rng: random.Random) -> Edit | None:
    counts = _kind_counts(scene)
    colour, shape = rng.choice(sorted(counts))
    members = tuple(o for o in scene.objects if (o.colour, o.shape) == (colour, shape))
    room = min(MAX_OBJECTS - len(scene.objects), len(scene.free_cells()))
    options = [m for m in range(1, len(members) + room + 1) if m != len(members)]
    if not options:
        return None
    new_count = rng.choice(options)
    if new_count < len(members):
        kept = tuple(rng.sample(members, new_count))
    else:
        model = members[0]
        cells = rng.sample(scene.free_cells(), new_count - len(members))
        kept = members + tuple(_with(model, position=cell) for cell in cells)
    return Edit("change_count", members, kept)


_SAMPLERS = {
    "recolour": _sample_attribute("recolour"),
    "resize": _sample_attribute("resize"),
    "replace_shape": _sample_attribute("replace_shape"),
    "move": _sample_move,
    "add": _sample_add,
    "remove": _sample_remove,
    "swap": _sample_swap,
    "change_count": _sample_change_count,
}


# --------------------------------------------------------------------------- re-deriving


def scene_difference(a: Scene, b: Scene) -> list[AnyEdit]:
    """Every minimal explanation of ``a -> b``: the single edit if one exists (it is unique),
    otherwise all two-edit composites that produce ``b``; empty if the scenes are equal or the
    difference needs more than two edits (or changes the background)."""
    if a.background != b.background or a == b:
        return []
    single = _explain_single(a, b)
    if single is not None:
        return [single]
    removed, added = _multiset_diff(a, b)
    diff = [("r", o) for o in removed] + [("a", o) for o in added]
    found: list[AnyEdit] = []
    for mask in range(1, 2 ** len(diff) - 1):
        part = [d for i, d in enumerate(diff) if mask >> i & 1]
        rest_removed = [o for tag, o in part if tag == "r"]
        rest_added = [o for tag, o in part if tag == "a"]
        try:
            middle = a.with_objects(_subtract(a.objects, rest_removed) + rest_added)
        except ValueError:
            continue
        first, second = _explain_single(a, middle), _explain_single(middle, b)
        if first is not None and second is not None and not second.touched() & (
            first.touched() | (frozenset(middle.objects) - frozenset(a.objects))
        ):
            found.append(CompositeEdit(first, second))
    return found


def _multiset_diff(a: Scene, b: Scene) -> tuple[list[SceneObject], list[SceneObject]]:
    ca, cb = Counter(a.objects), Counter(b.objects)
    return sorted((ca - cb).elements()), sorted((cb - ca).elements())


def _subtract(objects: Sequence[SceneObject], remove: Sequence[SceneObject]) -> list[SceneObject]:
    left = Counter(objects)
    left.subtract(remove)
    return sorted(left.elements())


def _explain_single(a: Scene, b: Scene) -> Edit | None:
    """The single edit turning ``a`` into ``b``, from the structure of the difference alone."""
    if a.background != b.background:
        return None
    removed, added = _multiset_diff(a, b)
    if not removed and not added:
        return None
    kinds_touched = {(o.colour, o.shape) for o in removed + added}
    if len(kinds_touched) == 1 and len(removed) != len(added):
        colour_shape = next(iter(kinds_touched))
        before = tuple(o for o in a.objects if (o.colour, o.shape) == colour_shape)
        after = tuple(o for o in b.objects if (o.colour, o.shape) == colour_shape)
        if before and after:
            return Edit("change_count", before, after)
        if len(removed) == 1 and not added:
            return Edit("remove", (removed[0],))
        if len(added) == 1 and not removed:
            return Edit("add", (), added[0])
        return None
    if len(removed) == 1 and len(added) == 1:
        r, n = removed[0], added[0]
        if r.position == n.position:
            changed = [attr for attr in ("colour", "size", "shape") if getattr(r, attr) != getattr(n, attr)]
            if len(changed) == 1:
                kind = {v: k for k, v in ATTRIBUTE_KINDS.items()}[changed[0]]
                return Edit(kind, (r,), getattr(n, changed[0]))
            return None
        if (r.shape, r.colour, r.size) == (n.shape, n.colour, n.size):
            return Edit("move", (r,), n.position)
        return None
    if len(removed) == 2 and len(added) == 2:
        x, y = removed
        if sorted([_with(x, position=y.position), _with(y, position=x.position)]) == added:
            return Edit("swap", (x, y))
    return None
