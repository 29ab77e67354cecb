"""Scene graphs of the shapes world: the single source of truth for images, captions and edits."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace
from typing import Any

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "crescent", "diamond", "cross", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "pink": (245, 120, 190),
}
SIZES: tuple[str, ...] = ("small", "large")
GRID = 3
ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "center", "right")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "gray": (150, 150, 150),
    "black": (20, 20, 20),
}
MAX_OBJECTS = 4
HELDOUT_FRACTION = 0.1  # share of the scene space reserved for the benchmark


def position_name(position: tuple[int, int]) -> str:
    """Human name of a grid cell: 'top left', 'center', 'bottom', ..."""
    row, col = position
    if (row, col) == (1, 1):
        return "center"
    if row == 1:
        return COL_NAMES[col]
    if col == 1:
        return ROW_NAMES[row]
    return f"{ROW_NAMES[row]} {COL_NAMES[col]}"


@dataclass(frozen=True, order=True)
class SceneObject:
    """One shape. ``position`` is a (row, col) cell of the GRID x GRID layout."""

    position: tuple[int, int]
    shape: str
    colour: str
    size: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES or self.colour not in COLOURS or self.size not in SIZES:
            raise ValueError(f"invalid object {self}")
        if not all(0 <= p < GRID for p in self.position):
            raise ValueError(f"position {self.position} outside the {GRID}x{GRID} grid")


@dataclass(frozen=True)
class Scene:
    """1..MAX_OBJECTS objects in distinct cells, sorted by position, on a background colour."""

    objects: tuple[SceneObject, ...]
    background: str = "white"

    def __post_init__(self) -> None:
        objects = tuple(sorted(self.objects))
        object.__setattr__(self, "objects", objects)
        cells = [o.position for o in objects]
        if not 1 <= len(objects) <= MAX_OBJECTS or len(set(cells)) != len(cells):
            raise ValueError(f"a scene needs 1..{MAX_OBJECTS} objects in distinct cells: {objects}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")

    def key(self) -> str:
        """Canonical string: equal scenes have equal keys (used for splits and deduplication)."""
        objs = ";".join(f"{o.position[0]}{o.position[1]}:{o.size}:{o.colour}:{o.shape}" for o in self.objects)
        return f"{self.background}|{objs}"

    def is_heldout(self) -> bool:
        """True for the ~10% of scenes reserved for the benchmark (a hash of ``key``)."""
        digest = hashlib.sha1(self.key().encode()).digest()
        return int.from_bytes(digest[:4], "big") / 2**32 < HELDOUT_FRACTION

    def free_cells(self) -> list[tuple[int, int]]:
        used = {o.position for o in self.objects}
        return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in used]

    def with_objects(self, objects: tuple[SceneObject, ...] | list[SceneObject]) -> Scene:
        return replace(self, objects=tuple(objects))

    def to_dict(self) -> dict[str, Any]:
        return {
            "background": self.background,
            "objects": [
                {"shape": o.shape, "colour": o.colour, "size": o.size, "position": list(o.position)} for o in self.objects
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        objects = tuple(
            SceneObject(position=tuple(o["position"]), shape=o["shape"], colour=o["colour"], size=o["size"])
            for o in data["objects"]
        )
        return cls(objects=objects, background=data.get("background", "white"))


def distinguishing_attributes(scene: Scene, obj: SceneObject) -> tuple[str, ...]:
    """The smallest set of attributes (in the order shape, colour, size, position) that singles out
    ``obj`` in ``scene``; the shape is always included so that phrases name a thing."""
    others = [o for o in scene.objects if o != obj]
    candidates = [("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"), ("shape", "position")]
    for attrs in candidates:
        if all(any(getattr(o, a) != getattr(obj, a) for a in attrs) for o in others):
            return attrs
    return ("size", "colour", "shape", "position")


def random_object(rng: random.Random, position: tuple[int, int]) -> SceneObject:
    return SceneObject(position=position, shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)), size=rng.choice(SIZES))


def sample_scene(
    rng: random.Random, min_objects: int = 1, max_objects: int = MAX_OBJECTS, backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
) -> Scene:
    """A uniformly random scene: object count, cells, then attributes."""
    count = rng.randint(min_objects, max_objects)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], count)
    return Scene(objects=tuple(random_object(rng, cell) for cell in cells), background=rng.choice(backgrounds))


def sample_scene_in_split(rng: random.Random, heldout: bool, **kwargs: Any) -> Scene:
    """Rejection-sample a scene from the training part (``heldout=False``) or the benchmark part."""
    while True:
        scene = sample_scene(rng, **kwargs)
        if scene.is_heldout() == heldout:
            return scene
