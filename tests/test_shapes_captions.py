"""Captions: every paraphrase reads back to attributes that are true of its scene graph."""

from __future__ import annotations

import random

import pytest

from data_synth.shapes.captions import (
    canonical_caption,
    caption_matches,
    caption_scene,
    parse_caption,
    subject_attribute_split,
)
from data_synth.shapes.scene import Scene, SceneObject, sample_scene


def test_every_paraphrase_is_consistent_with_its_scene():
    rng = random.Random(0)
    for _ in range(2000):
        scene = sample_scene(rng)
        caption = caption_scene(scene, rng)
        assert caption_matches(scene, caption), (scene, caption)
        assert caption_matches(scene, canonical_caption(scene))


def test_captions_vary():
    rng = random.Random(2)
    scene = sample_scene(rng, min_objects=3, max_objects=3)
    captions = {caption_scene(scene, rng) for _ in range(100)}
    assert len(captions) > 50  # templates, synonyms, order and joiners: text is not one fixed pattern


def test_parse_reads_back_all_attributes_of_the_canonical_caption():
    scene = Scene(
        (SceneObject((0, 0), "star", "red", "large"), SceneObject((1, 1), "heart", "cyan", "small")), background="gray"
    )
    caption = canonical_caption(scene)
    assert caption == "a large red star at the top left and a small cyan heart at the center on a gray background"
    parsed = parse_caption(caption)
    assert parsed.background == "gray"
    assert {(o.shape, o.colour, o.size, o.position) for o in parsed.objects} == {
        ("star", "red", "large", (0, 0)),
        ("heart", "cyan", "small", (1, 1)),
    }


def test_a_wrong_caption_is_detected():
    rng = random.Random(1)
    for _ in range(200):
        a, b = sample_scene(rng), sample_scene(rng)
        if a.key() != b.key():
            assert not caption_matches(a, canonical_caption(b))
    with pytest.raises(ValueError):
        parse_caption("a red blue circle")


def test_subject_attribute_split_covers_the_scene():
    scene = Scene((SceneObject((2, 2), "cross", "green", "small"), SceneObject((0, 1), "circle", "blue", "large")))
    subject, attributes = subject_attribute_split(scene)
    assert subject == "a circle and a cross"
    assert attributes == "large blue at the top, small green at the bottom right, on a white background"
    assert caption_matches(scene, "a large blue circle at the top and a small green cross at the bottom right")
