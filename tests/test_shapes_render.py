"""Rendering: deterministic under a seed, different across seeds, anti-aliased."""

from __future__ import annotations

import random

import numpy as np

from data_synth.shapes.render import render, render_array
from data_synth.shapes.scene import COLOURS, Scene, SceneObject, sample_scene


def _scenes(n: int = 20) -> list[Scene]:
    rng = random.Random(7)
    return [sample_scene(rng) for _ in range(n)]


def test_same_seed_same_pixels_other_seed_other_pixels():
    for scene in _scenes():
        a, b, c = render_array(scene, 64, 3), render_array(scene, 64, 3), render_array(scene, 64, 4)
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c)


def test_default_seed_is_per_scene_and_size_is_configurable():
    scene = _scenes(1)[0]
    assert np.array_equal(np.asarray(render(scene)), np.asarray(render(scene)))
    assert render(scene, size=32).size == (32, 32)


def test_colours_are_drawn_and_edges_are_antialiased():
    scene = Scene((SceneObject((1, 1), "circle", "red", "large"),), background="white")
    pixels = render_array(scene, 64, 0).reshape(-1, 3).astype(int)
    red = np.array(COLOURS["red"])
    assert (np.abs(pixels - red).sum(1) < 60).sum() > 100  # the shape is there, in (jittered) red
    distinct = {tuple(p) for p in pixels}
    assert len(distinct) > 10  # blended edge pixels, not a 2-colour image
