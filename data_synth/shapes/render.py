"""Pillow renderer of shapes-world scenes: anti-aliased by supersampling, with small random jitter.

The jitter (position, size, rotation, hue/brightness, background tint) makes two renders of one scene
differ in pixels while keeping every attribute readable; the same seed always gives the same image.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
import multiprocessing as mp
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from data_synth.shapes.scene import BACKGROUNDS, COLOURS, GRID, SHAPES, SIZES, Scene, SceneObject

T = TypeVar("T")

SUPERSAMPLE = 4  # draw at 4x and box-filter down: cheap, good anti-aliasing
RADIUS = {"small": 0.26, "large": 0.44}  # half-extent of a shape as a fraction of a grid cell
POSITION_JITTER = 0.07  # fraction of a cell
SIZE_JITTER = 0.08  # relative
ROTATION_JITTER = 12.0  # degrees
HUE_JITTER = 0.012  # fraction of the hue circle: small enough to keep neighbouring colours apart
VALUE_JITTER = 0.06
BACKGROUND_JITTER = 8  # per channel, 0..255


def _regular_polygon(sides: int, phase: float) -> list[tuple[float, float]]:
    return [(math.cos(phase + 2 * math.pi * k / sides), math.sin(phase + 2 * math.pi * k / sides)) for k in range(sides)]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * k / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _cross(arm: float = 0.34) -> list[tuple[float, float]]:
    a = arm
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


def _crescent(offset: float = 0.5, inner: float = 0.75, n: int = 24) -> list[tuple[float, float]]:
    """The unit disc minus a disc of radius ``inner`` shifted right by ``offset``: a moon opening right."""
    x = (1.0 + offset**2 - inner**2) / (2.0 * offset)  # the two circles cross at (x, +-y)
    y = math.sqrt(1.0 - x * x)
    outer_start = math.atan2(y, x)  # the outer arc runs from (x, y) the long way round to (x, -y)
    outer = [outer_start + (2 * math.pi - 2 * outer_start) * k / n for k in range(n + 1)]
    inner_start = math.atan2(-y, x - offset) % (2 * math.pi)  # the inner arc runs back from (x, -y) to (x, y)
    inner_arc = [inner_start + (2 * math.pi - 2 * inner_start) * k / n for k in range(1, n)]
    return [(math.cos(a), math.sin(a)) for a in outer] + [(offset + inner * math.cos(a), inner * math.sin(a)) for a in inner_arc]


def _heart(n: int = 40) -> list[tuple[float, float]]:
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17.0, -(y + 2.5) / 15.5))
    return pts


# Unit outlines in [-1, 1]^2 (y down). The circle is drawn as an ellipse instead.
OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": _regular_polygon(3, -math.pi / 2),
    "star": _star(),
    "crescent": _crescent(),
    "diamond": [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)],
    "cross": _cross(),
    "heart": _heart(),
}


def world_fingerprint() -> str:
    """A short digest of what the world looks like: its vocabulary, the shapes' outlines and the jitter.

    Artifacts rendered from the world (the backbone cache, pair sets, benchmarks) store it in their
    config, so that a change to the world makes them stale instead of silently reused."""
    spec = {
        "shapes": SHAPES, "colours": COLOURS, "sizes": SIZES, "grid": GRID, "backgrounds": BACKGROUNDS,
        "radius": RADIUS, "outlines": {name: [[round(x, 4), round(y, 4)] for x, y in pts] for name, pts in OUTLINES.items()},
        "jitter": [POSITION_JITTER, SIZE_JITTER, ROTATION_JITTER, HUE_JITTER, VALUE_JITTER, BACKGROUND_JITTER],
        "supersample": SUPERSAMPLE,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _jitter_colour(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    h = (h + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    v = min(1.0, max(0.0, v * (1.0 + rng.uniform(-VALUE_JITTER, VALUE_JITTER))))
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, canvas: int, rng: random.Random) -> None:
    cell = canvas / GRID
    row, col = obj.position
    cx = (col + 0.5 + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * cell
    cy = (row + 0.5 + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * cell
    radius = RADIUS[obj.size] * cell * (1.0 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    fill = _jitter_colour(COLOURS[obj.colour], rng)
    angle = math.radians(rng.uniform(-ROTATION_JITTER, ROTATION_JITTER))
    if obj.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        return
    cos, sin = math.cos(angle), math.sin(angle)
    points = [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in OUTLINES[obj.shape]]
    draw.polygon(points, fill=fill)


def _as_rng(rng: random.Random | int | None, scene: Scene) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    return random.Random(scene.key() if rng is None else rng)


def render(scene: Scene, size: int = 64, rng: random.Random | int | None = None) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image.

    ``rng`` is a ``random.Random``, an int seed, or None (a seed derived from the scene, so one scene
    always renders the same way). The same seed gives the same pixels; another seed moves, scales,
    rotates and tints every shape a little.
    """
    rng = _as_rng(rng, scene)
    canvas = size * SUPERSAMPLE
    background = tuple(
        min(255, max(0, c + rng.randint(-BACKGROUND_JITTER, BACKGROUND_JITTER))) for c in BACKGROUNDS[scene.background]
    )
    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, canvas, rng)
    return image.reduce(SUPERSAMPLE)


def render_array(scene: Scene, size: int = 64, rng: random.Random | int | None = None) -> np.ndarray:
    """``render`` as a uint8 array [size, size, 3] (compact for pools and worker transfer)."""
    return np.asarray(render(scene, size, rng), dtype=np.uint8)


def run_render_jobs(job: Callable[[T], object], jobs: Sequence[T], workers: int, desc: str, progress: bool = True) -> None:
    """Run rendering ``jobs`` (picklable, independent, each writing its own files) in ``workers``
    processes with a progress bar; any order, since every job is a pure function of its arguments."""
    with tqdm(total=len(jobs), desc=desc, disable=not progress) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for item in jobs:
                job(item)
                bar.update(1)
            return
        with mp.get_context().Pool(workers) as pool:
            for _ in pool.imap_unordered(job, jobs, chunksize=max(1, min(64, len(jobs) // (4 * workers)))):
                bar.update(1)
