"""The captioner quality measure (data_synth.shapes.caption_quality, scripts/eval_captioner.py) on hand-made captions."""

from __future__ import annotations

import random

from data_synth.shapes import caption_quality
from data_synth.shapes.captions import canonical_caption, caption_scene
from data_synth.shapes.scene import Scene, SceneObject

SCENE = Scene(
    (SceneObject((0, 0), "circle", "red", "large"), SceneObject((2, 2), "star", "blue", "small")), background="gray"
)


def test_true_paraphrases_score_perfectly():
    rng = random.Random(0)
    captions = [canonical_caption(SCENE)] + [caption_scene(SCENE, rng) for _ in range(20)]
    scores = caption_quality.score_captions([SCENE] * len(captions), captions)
    assert scores["exact_match"] == 1.0 and scores["count"] == 1.0 and scores["parse_failures"] == 0
    assert scores["attribute_accuracy"]["shape"] == scores["attribute_accuracy"]["colour"] == 1.0
    assert scores["complete_exact_match"] < 1.0  # some paraphrases leave positions or the background out


def test_errors_are_charged_to_the_right_attribute():
    wrong_colour = "a small blue star at the bottom right and a large green circle at the top left on a gray background"
    missing_object = "a large red circle at the top left on a gray background"
    scores = caption_quality.score_captions([SCENE, SCENE, SCENE], [wrong_colour, missing_object, "no shape here"])
    assert scores["exact_match"] == 0.0 and scores["parse_failures"] == 1
    accuracy = scores["attribute_accuracy"]  # 3 scenes x 2 objects
    assert accuracy["shape"] == 3 / 6 and accuracy["colour"] == 2 / 6 and accuracy["position"] == 3 / 6
    assert scores["count"] == 1 / 3 and scores["background"] == 2 / 3
