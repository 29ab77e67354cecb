"""Generative captioning through transformers on a tiny random BLIP built and saved offline in the test."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from fusion_diff.captioning import GenerativeCaptioner, caption_with_cache, create_captioner
from fusion_diff.errors import MissingFileError

WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "a",
    "photo",
    "of",
    "red",
    "blue",
    "circle",
    "star",
    "and",
    "big",
]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> str:
    """A randomly initialised BLIP captioner (model + processor) written with ``save_pretrained``."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    root = tmp_path_factory.mktemp("tiny_blip")
    (root / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=BertTokenizer(str(root / "vocab.txt")),
    )
    config = BlipConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        text_config=dict(
            vocab_size=len(WORDS),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            encoder_hidden_size=32,
            max_position_embeddings=64,
            bos_token_id=2,
            sep_token_id=3,
            eos_token_id=3,
            pad_token_id=0,
        ),
        projection_dim=32,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BlipForConditionalGeneration(config)
    out = root / "blip"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


def _images(n: int) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(1)
    return [Image.fromarray((torch.rand(30 + 5 * i, 40, 3, generator=gen) * 255).byte().numpy()) for i in range(n)]


def test_generative_captioner_captions_a_batch(tiny_blip, tmp_path):
    captioner = GenerativeCaptioner(tiny_blip, generation={"max_new_tokens": 6, "num_beams": 1})
    images = _images(3)
    paths = []
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    captions = captioner.caption(images, batch_size=2)
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    assert all(word in WORDS for c in captions for word in c.split())
    assert captioner.caption(paths, batch_size=3) == captions  # paths or PIL, any batching: same captions
    assert captioner.identity["model"] == tiny_blip and captioner.identity["generation"]["max_new_tokens"] == 6


def test_generative_prompt_candidates_and_cache(tiny_blip, tmp_path):
    captioner = create_captioner(
        {
            "type": "generative",
            "model": tiny_blip,
            "prompt": "a photo of",
            "num_candidates": 2,
            "generation": {"max_new_tokens": 4},
        }
    )
    candidates = captioner.caption_candidates(_images(2), batch_size=2)
    assert [len(c) for c in candidates] == [2, 2] and all(
        c.startswith("a photo of") for caps in candidates for c in caps
    )
    captions = caption_with_cache(captioner, ["x", "y"], _images(2), tmp_path / "caps.json")
    assert captions == [c[0] for c in candidates]


def test_missing_generative_model_names_the_path(tmp_path):
    with pytest.raises(MissingFileError, match="no_such_model.*save_pretrained"):
        GenerativeCaptioner(str(tmp_path / "no_such_model"))


def test_caption_cli_generative(tiny_blip, tmp_path):
    from fusion_diff.cli import main

    (tmp_path / "images").mkdir()
    for i, image in enumerate(_images(2)):
        image.save(tmp_path / "images" / f"{i}.jpg")
    out = tmp_path / "caps.json"
    argv = ["caption", "--images", str(tmp_path / "images"), "--out", str(out), "--captioner", "generative",
            "--captioner-model", tiny_blip, "--caption-max-new-tokens", "4", "--caption-num-beams", "1"]  # fmt: skip
    assert main(argv) == 0
    assert sorted(json.loads(out.read_text())["captions"]) == ["0", "1"]
