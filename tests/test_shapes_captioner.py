"""The shapes world's trained scene captioner: labels, decoding, training, save/load and the demo's cache."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from data_synth.shapes.captioner import (
    EMPTY,
    SceneCaptioner,
    SceneParser,
    SceneParserOutput,
    build_scene_captioner,
    decode_scenes,
    load_pixels,
    parser_loss,
    scene_labels,
    train_scene_parser,
)
from data_synth.shapes.captions import canonical_caption, caption_matches
from data_synth.shapes.pairs import write_pair_set
from data_synth.shapes.render import render
from data_synth.shapes.scene import MAX_OBJECTS, SHAPES, sample_scene
from fusion_diff.captioning import create_captioner
from fusion_diff.errors import ConfigError, MissingFileError


def _one_hot_output(labels: dict[str, torch.Tensor]) -> SceneParserOutput:
    """Logits that put all mass on ``labels`` (ignored cells get an arbitrary class)."""

    def hot(index: torch.Tensor, classes: int) -> torch.Tensor:
        return torch.nn.functional.one_hot(index.clamp_min(0), classes).float() * 20.0

    return SceneParserOutput(
        shape=hot(labels["shape"], len(SHAPES) + 1),
        colour=hot(labels["colour"], 8),
        size=hot(labels["size"], 2),
        background=hot(labels["background"], 3),
    )


def test_labels_decode_back_to_the_same_scenes() -> None:
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(50)]
    decoded = decode_scenes(_one_hot_output(scene_labels(scenes)))
    assert [s.key() for s in decoded] == [s.key() for s in scenes]
    assert all(caption_matches(s, canonical_caption(d)) for s, d in zip(scenes, decoded))


def test_decoding_always_gives_a_valid_scene() -> None:
    labels = scene_labels([sample_scene(random.Random(1))])
    nothing = _one_hot_output({**labels, "shape": torch.full_like(labels["shape"], EMPTY)})
    nothing.shape[0, 4, 2] = 5.0  # cell 4 is the least empty one
    (scene,) = decode_scenes(nothing)
    assert [o.position for o in scene.objects] == [(1, 1)]
    crowded = _one_hot_output({**labels, "shape": torch.zeros_like(labels["shape"])})
    crowded.shape[0, :, EMPTY] = 19.0 - 0.5 * torch.arange(9.0)  # all occupied, the last cells most surely
    (scene,) = decode_scenes(crowded)
    assert len(scene.objects) == MAX_OBJECTS
    assert sorted(r * 3 + c for r, c in (o.position for o in scene.objects)) == [5, 6, 7, 8]


def test_training_lowers_the_loss_and_save_load_is_exact(tmp_path: Path) -> None:
    rng = random.Random(2)
    scenes = [sample_scene(rng) for _ in range(32)]
    images = [render(s, 64, random.Random(i)) for i, s in enumerate(scenes)]
    pixels, labels = load_pixels(images, 64), scene_labels(scenes)
    torch.manual_seed(0)
    untrained = SceneParser().eval()
    parser = train_scene_parser(images, scenes, steps=40, batch_size=32, learning_rate=3e-3, progress=False)
    with torch.no_grad():
        assert parser_loss(parser(pixels), labels) < 0.7 * parser_loss(untrained(pixels), labels)

    parser.save_pretrained(tmp_path / "parser")
    captioner = SceneCaptioner(tmp_path / "parser")
    with torch.no_grad():
        assert torch.equal(captioner.parser(pixels).shape, parser(pixels).shape)
    captions = captioner.caption(images)
    assert captions == [canonical_caption(s) for s in decode_scenes(parser(pixels))]
    assert captioner.identity["weights"] == SceneCaptioner(tmp_path / "parser").identity["weights"]
    assert create_captioner({"type": "scene", "model": str(tmp_path / "parser")}).identity == captioner.identity
    with torch.no_grad():
        next(parser.parameters()).add_(1.0)
    parser.save_pretrained(tmp_path / "changed")
    assert SceneCaptioner(tmp_path / "changed").identity != captioner.identity


def test_bad_checkpoint_and_spec_are_named(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=str(tmp_path / "nowhere")):
        SceneCaptioner(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="scene"):
        create_captioner({"type": "scenes"})
    with pytest.raises(ConfigError, match="bank"):
        create_captioner({"type": "scene", "model": "x", "bank": "y"})


def test_build_is_cached_and_atomic(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs"
    write_pair_set(pairs, 24, seed=0, workers=1, chunk_size=12, progress=False)
    out = build_scene_captioner(pairs, tmp_path / "captioner", steps=3, progress=False)
    weights = next(out.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    assert build_scene_captioner(pairs, out, steps=3, progress=False) == out
    assert weights.stat().st_mtime_ns == stamp  # same pair set and steps: reused
    build_scene_captioner(pairs, out, steps=4, progress=False)
    retrained = next(out.glob("*.safetensors")).stat().st_mtime_ns
    assert retrained != stamp  # another setting: retrained
    build_scene_captioner(pairs, out, steps=4, seed=1, progress=False)
    assert next(out.glob("*.safetensors")).stat().st_mtime_ns != retrained  # another seed too
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    with pytest.raises(MissingFileError, match="pair set"):
        build_scene_captioner(tmp_path / "empty", tmp_path / "c2", steps=1, progress=False)
