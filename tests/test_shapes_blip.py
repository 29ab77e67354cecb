"""The shapes world's BLIP: tokenizer, pixels, training, save/load through the generative path, the cache."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from data_synth.shapes.blip import (
    BlipWorldConfig,
    build_blip_captioner,
    build_caption_tokenizer,
    build_processor,
    caption_labels,
    normalise_pixels,
    save_blip,
    train_blip,
)
from data_synth.shapes.captioner import load_pixels
from data_synth.shapes.captions import canonical_caption, caption_scene
from data_synth.shapes.pairs import write_pair_set
from data_synth.shapes.render import render
from data_synth.shapes.scene import sample_scene
from fusion_diff.captioning import GenerativeCaptioner, create_captioner
from fusion_diff.errors import ConfigError

TINY = BlipWorldConfig(patch_size=16, width=32, vision_layers=1, text_layers=1, heads=2)
GENERATION = {"max_new_tokens": 12, "num_beams": 2}


def _pairs(n: int, seed: int = 0):
    rng = random.Random(seed)
    scenes = [sample_scene(rng, max_objects=2) for _ in range(n)]
    return [render(s, 64, random.Random(i)) for i, s in enumerate(scenes)], [caption_scene(s, rng) for s in scenes]


def test_tokenizer_gives_captions_back_exactly() -> None:
    rng = random.Random(1)
    scenes = [sample_scene(rng) for _ in range(60)]
    captions = [caption_scene(s, rng) for s in scenes] + [canonical_caption(s) for s in scenes]
    tokenizer = build_caption_tokenizer(captions)
    ids = tokenizer(captions).input_ids
    assert all(row[0] == tokenizer.bos_token_id and row[-1] == tokenizer.sep_token_id for row in ids)
    assert tokenizer.unk_token_id not in {i for row in ids for i in row}
    assert tokenizer.batch_decode(ids, skip_special_tokens=True) == captions  # punctuation and spaces intact
    assert any(";" in c or ":" in c for c in captions)


def test_pixels_match_the_processor_and_long_captions_are_refused() -> None:
    images, captions = _pairs(3)
    processor = build_processor(captions, 64)
    expected = processor(images=images, return_tensors="pt").pixel_values
    assert torch.allclose(normalise_pixels(load_pixels(images, 64), processor), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="max_length"):
        caption_labels(processor, captions, max_length=4)


def _generate(model, processor, images) -> list[str]:
    inputs = processor(images=images, return_tensors="pt")
    tokens = model.generate(**inputs, **GENERATION)
    return [t.strip() for t in processor.batch_decode(tokens, skip_special_tokens=True)]


def test_training_lowers_the_loss_and_the_saved_folder_captions_alike(tmp_path: Path) -> None:
    images, captions = _pairs(16)
    losses: list[float] = []
    model, processor = train_blip(
        images, captions, steps=60, batch_size=16, learning_rate=3e-3, model_config=TINY, progress=False, losses=losses
    )
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:3]) / 3
    save_blip(model, processor, tmp_path / "blip")
    captioner = GenerativeCaptioner(tmp_path / "blip", generation=GENERATION)
    with torch.no_grad():
        assert captioner.caption(images[:4], batch_size=3) == _generate(model, processor, images[:4])
    # The checkpoint's own generation config sets its caption length; an explicit setting still wins.
    assert GenerativeCaptioner(tmp_path / "blip").generation["max_new_tokens"] == TINY.max_length - 1
    assert captioner.generation["max_new_tokens"] == GENERATION["max_new_tokens"]


def test_build_is_cached_and_picked_up_by_the_generative_captioner(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs"
    write_pair_set(pairs, 12, seed=0, workers=1, chunk_size=6, progress=False)
    options = {"batch_size": 4, "model_config": TINY, "progress": False}
    out = build_blip_captioner(pairs, tmp_path / "blip", steps=2, **options)
    weights = next(out.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    spec = {"type": "generative", "model": str(out), "generation": GENERATION}
    captioner = create_captioner(spec)
    assert isinstance(captioner, GenerativeCaptioner) and captioner.identity["weights"]
    assert build_blip_captioner(pairs, out, steps=2, **options) == out
    assert weights.stat().st_mtime_ns == stamp  # same pair set and settings: reused
    build_blip_captioner(pairs, out, steps=3, **options)
    assert next(out.glob("*.safetensors")).stat().st_mtime_ns != stamp  # other settings: retrained
    assert create_captioner(spec).identity != captioner.identity  # retrained in place: captions not reused
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert len(create_captioner(spec).caption([render(sample_scene(random.Random(5)), 64)])) == 1


def test_world_cli_and_quality_script(tmp_path: Path, capsys) -> None:
    from fusion_diff.cli import main
    from fusion_diff.cli.bench import load_script

    pairs = tmp_path / "pairs"
    write_pair_set(pairs, 8, seed=0, workers=1, progress=False)
    argv = ["world", "blip-captioner", "--pairs", str(pairs), "--out", str(tmp_path / "blip"), "--steps", "1",
            "--batch-size", "2", "--eval-scenes", "2", "--from-scratch"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "--captioner generative --captioner-model" in printed and "per attribute: shape" in printed
    out = tmp_path / "quality.json"
    assert (
        load_script("eval_captioner").main(
            ["--generative-captioner", str(tmp_path / "blip"), "--n", "2", "--out", str(out)]
        )
        == 0
    )
    assert out.is_file() and "exact_match" in capsys.readouterr().out


def test_caption_command_keeps_the_checkpoints_caption_length(tmp_path: Path) -> None:
    """Without --caption-max-new-tokens the world BLIP's own generation config holds (four-object captions
    need ~45 tokens; the library default of 30 would cut them)."""
    import json

    from fusion_diff.cli import main

    images, captions = _pairs(2)
    model, processor = train_blip(images, captions, steps=1, batch_size=2, model_config=TINY, progress=False)
    folder = save_blip(model, processor, tmp_path / "blip")
    (tmp_path / "images").mkdir()
    images[0].save(tmp_path / "images" / "0.png")
    out = tmp_path / "caps.json"
    argv = ["caption", "--images", str(tmp_path / "images"), "--out", str(out), "--captioner", "generative",
            "--captioner-model", str(folder), "--caption-num-beams", "1"]  # fmt: skip
    assert main(argv) == 0
    generation = json.loads(out.read_text())["captioner"]["generation"]
    assert generation == {"max_new_tokens": TINY.max_length - 1, "num_beams": 1}


def _parses(caption: str) -> bool:
    from data_synth.shapes.captions import parse_caption

    try:
        parse_caption(caption)
    except ValueError:
        return False
    return True


def test_briefly_trained_blip_writes_parseable_captions_and_failures_are_reported() -> None:
    """The generation path (BOS start, SEP stop, decoding without special tokens) gives captions the shapes
    parser reads; a caption it cannot read is counted as a parse failure and wrong, never silently dropped."""
    from data_synth.shapes.caption_quality import score_captions

    rng = random.Random(0)
    scenes = [sample_scene(rng, max_objects=1) for _ in range(16)]
    images = [render(s, 64, random.Random(i)) for i, s in enumerate(scenes)]
    model, processor = train_blip(
        images, [canonical_caption(s) for s in scenes], steps=100, batch_size=16, learning_rate=3e-3,
        model_config=TINY, progress=False,
    )  # fmt: skip
    with torch.no_grad():
        captions = _generate(model, processor, images)
    failures = [c for c in captions if not _parses(c)]
    assert len(failures) <= len(captions) // 2, captions
    assert score_captions(scenes, captions)["parse_failures"] == len(failures)
    unreadable = score_captions(scenes[:1], ["a large"])  # names no shape
    assert unreadable["parse_failures"] == 1 and unreadable["exact_match"] == unreadable["count"] == 0.0
    assert set(unreadable["attribute_accuracy"].values()) == {0.0}


def _tiny_backbone(root: Path, tiny_openclip_checkpoint) -> Path:
    """A world-backbone cache folder holding the tiny open_clip model (ViT: 32 px, patch 8, width 32, 1 layer)."""
    import open_clip

    from data_synth.shapes.backbone import BackboneCache, BackboneConfig

    name, checkpoint = tiny_openclip_checkpoint
    model = open_clip.create_model(name, pretrained=str(checkpoint))
    cache = BackboneCache.at(root)
    cache.save_checkpoint(model)
    cache.commit(BackboneConfig(), {}, {})
    return root


TINY_LIKE_BACKBONE = BlipWorldConfig(image_size=32, patch_size=8, width=32, vision_layers=1, text_layers=1, heads=2)


def test_image_encoder_starts_from_the_world_backbone(tmp_path: Path, tiny_openclip_checkpoint) -> None:
    """BLIP's image encoder takes the backbone ViT's weights (its transformer blocks exactly, ``ln_pre`` folded
    into the embeddings), so it starts out computing the backbone's image features; other sizes are refused."""
    import open_clip
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import BlipForConditionalGeneration

    from data_synth.shapes.blip import vision_from_backbone

    root = _tiny_backbone(tmp_path / "backbone", tiny_openclip_checkpoint)
    state = load_file(str(root / "open_clip_model.safetensors"))
    clip = open_clip.create_model(tiny_openclip_checkpoint[0], pretrained=str(root / "open_clip_model.safetensors"))
    images, captions = _pairs(24)
    processor = build_processor(captions, 32)
    pixels = normalise_pixels(load_pixels(images, 32), processor)
    blip = BlipForConditionalGeneration(TINY_LIKE_BACKBONE.blip_config(len(processor.tokenizer))).eval()
    vision_from_backbone(blip, state, pixels)
    hidden = torch.randn(2, 17, 32)
    block, layer = clip.visual.transformer.resblocks[0].eval(), blip.vision_model.encoder.layers[0]
    with torch.no_grad():  # one transformer block: the same function
        assert torch.allclose(layer(hidden), block(hidden), atol=1e-5)
        features = blip.vision_model(pixel_values=pixels).pooler_output @ state["visual.proj"]
        cosine = F.cosine_similarity(features, clip.visual(pixels)).mean()
    assert cosine > 0.8, f"features of the started encoder vs the backbone's: mean cosine {cosine:.2f}"
    wide = BlipForConditionalGeneration(BlipWorldConfig(width=64, heads=2).blip_config(len(processor.tokenizer)))
    with pytest.raises(ConfigError, match="does not fit the BLIP image encoder"):
        vision_from_backbone(wide, state, pixels)


def test_build_from_the_backbone_is_cached_by_its_identity(tmp_path: Path, tiny_openclip_checkpoint) -> None:
    from fusion_diff.errors import MissingFileError

    pairs = tmp_path / "pairs"
    write_pair_set(pairs, 8, seed=0, workers=1, progress=False)
    root = _tiny_backbone(tmp_path / "backbone", tiny_openclip_checkpoint)
    options = {"steps": 2, "batch_size": 4, "model_config": TINY_LIKE_BACKBONE, "progress": False}
    out = build_blip_captioner(pairs, tmp_path / "blip", backbone=root, **options)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["vision_init"].startswith("world backbone sha256:")
    with pytest.raises(MissingFileError, match="no usable world backbone .*--from-scratch"):
        build_blip_captioner(pairs, tmp_path / "blip2", backbone=tmp_path / "nowhere", **options)
