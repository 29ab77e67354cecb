"""The model-backed paths on tiny random models built offline: the LLM caption editor and the
diffusers realisation (text-to-image, InstructPix2Pix, CLIP filter)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from data_synth.triplets import corpus_edits, realise
from data_synth.triplets.corpus_edits import CorpusEditConfig, build_corpus_triplets
from data_synth.triplets.format import iter_triplets, verify_dataset
from data_synth.triplets.realise import RealiseConfig, realise_triplets

SIZE = 16


def byte_level_vocab() -> dict[str, int]:
    """A merge-free byte-level BPE vocabulary (GPT-2 / CLIP style) so tokenizers build offline."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    return {token: i for i, token in enumerate(tokens)}


def test_tiny_random_llm_through_a_transformers_pipeline(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    tokenizer = GPT2Tokenizer(vocab=byte_level_vocab(), merges=[])
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=16, n_layer=1, n_head=2))
    model.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red car\na small dog\n")
    config = CorpusEditConfig(corpus=str(corpus), llm_model=str(tmp_path / "llm"), llm_max_new_tokens=4)
    manifest = build_corpus_triplets(tmp_path / "out", config, progress=False)
    # a random model writes no parseable edit: every caption falls back to the rules, and that is counted
    assert manifest["dropped"]["llm_fallback_to_rule"] == 2 and manifest["num_samples"] == 2
    corpus_edits._llm.cache_clear()


def _components(in_channels: int) -> dict:
    """Tiny Stable Diffusion components (shapes as in diffusers' own fast pipeline tests)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=SIZE // 2,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=[8, 16],
        norm_num_groups=4,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )
    tokenizer = CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=32)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32,
            num_attention_heads=2, num_hidden_layers=1, vocab_size=len(tokenizer), max_position_embeddings=32,
        )  # fmt: skip
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory):
    """(text-to-image dir, InstructPix2Pix dir), written with save_pretrained and loaded by path like real ids."""
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline

    root = tmp_path_factory.mktemp("pipelines")
    StableDiffusionPipeline(**_components(4), requires_safety_checker=False).save_pretrained(root / "t2i")
    StableDiffusionInstructPix2PixPipeline(**_components(8), requires_safety_checker=False).save_pretrained(root / "ip2p")
    return str(root / "t2i"), str(root / "ip2p")


@pytest.mark.slow
def test_realise_end_to_end(tmp_path, tiny_pipelines, tiny_openclip_checkpoint):
    name, checkpoint = tiny_openclip_checkpoint
    corpus = tmp_path / "captions.jsonl"
    Image.new("RGB", (48, 48), (200, 30, 30)).save(tmp_path / "given.png")
    corpus.write_text(
        '{"caption": "a red car on a road"}\n{"caption": "two dogs in the snow"}\n'
        '{"caption": "a small cat on a mat", "image": "given.png"}\n'
    )
    build_corpus_triplets(tmp_path / "edits", CorpusEditConfig(corpus=str(corpus)), shard_size=2, progress=False)
    t2i, ip2p = tiny_pipelines
    keep_all = RealiseConfig(
        text_to_image_model=t2i,
        edit_model=ip2p,
        filter_embedder={"backend": "openclip", "model_name": name, "pretrained": str(checkpoint)},
        image_size=SIZE,
        text_to_image_steps=2,
        edit_steps=2,
        min_directional_similarity=-2.0,
        min_image_similarity=-2.0,
        batch_size=2,
        device="cpu",
    )
    manifest = realise_triplets(tmp_path / "edits", tmp_path / "real", keep_all, progress=False)
    verify_dataset(tmp_path / "real")
    triplets = list(iter_triplets(tmp_path / "real"))
    assert manifest["num_samples"] == len(triplets) == 3
    assert manifest["dropped"] == {"clip_directional_similarity": 0, "clip_image_similarity": 0}
    for t in triplets:
        assert t.reference_image.size == t.target_image.size == (SIZE, SIZE)
        assert -1.0 <= t.record["clip_directional_similarity"] <= 1.0
    given = next(t for t in triplets if t.reference_caption.startswith("a small cat"))
    assert given.reference_image.getpixel((5, 5)) == (200, 30, 30)  # the corpus image, not a drawn one



def test_clip_filter_drops_and_counts_failed_edits(tmp_path, monkeypatch):
    corpus = tmp_path / "captions.txt"
    corpus.write_text("a red car\na blue bus\na green tree\n")
    build_corpus_triplets(tmp_path / "edits", CorpusEditConfig(corpus=str(corpus), kinds=("colour",)), progress=False)
    image = Image.new("RGB", (8, 8))
    scores = {0: (0.5, 0.9), 1: (0.1, 0.9), 2: (0.5, 0.2)}  # kept; wrong direction; not an edit of the reference

    def fake_batch(records, indices, seed, config):
        return [image] * len(records), [image] * len(records), [scores[i][0] for i in indices], [scores[i][1] for i in indices]

    monkeypatch.setattr(realise, "realise_batch", fake_batch)
    config = RealiseConfig(min_directional_similarity=0.2, min_image_similarity=0.75, image_size=8)
    manifest = realise_triplets(tmp_path / "edits", tmp_path / "real", config, progress=False)
    assert manifest["dropped"] == {"clip_directional_similarity": 1, "clip_image_similarity": 1}
    assert [t.reference_caption for t in iter_triplets(tmp_path / "real")] == ["a red car"]


@pytest.mark.slow
def test_realise_two_processes_equal_one(tmp_path, tiny_pipelines, tiny_openclip_checkpoint):
    """``accelerate launch`` of ``synth realise`` on 2 CPU processes: each realises its own source shards."""
    import json

    from test_sharded_jobs import _launch, _one_thread_main

    name, checkpoint = tiny_openclip_checkpoint
    corpus = tmp_path / "captions.txt"
    corpus.write_text("a red car\na blue bus\na green tree\na white boat\n")
    build_corpus_triplets(tmp_path / "edits", CorpusEditConfig(corpus=str(corpus)), shard_size=2, progress=False)
    t2i, ip2p = tiny_pipelines
    argv = ["synth", "realise", "--triplets", str(tmp_path / "edits"), "--text-to-image-model", t2i, "--edit-model", ip2p,
            "--filter-embedder", json.dumps({"backend": "openclip", "model_name": name, "pretrained": str(checkpoint)}),
            "--image-size", str(SIZE), "--text-to-image-steps", "2", "--edit-steps", "2", "--batch-size", "2",
            "--min-directional-similarity", "-2", "--min-image-similarity", "-2", "--device", "cpu"]  # fmt: skip
    two = _launch([*argv, "--out", str(tmp_path / "two")], checkpoint, tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _one_thread_main([*argv, "--out", str(tmp_path / "one")]) == 0
    one, two_ = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert one["complete"] and two_["complete"] and one["num_samples"] == two_["num_samples"] == 4
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two_["shards"]]  # the same bytes


def test_issue20_text_to_image_default():
    """The default text-to-image id is one the hub still serves (checked by hand; the README says which ids and
    when), not one of the Stable Diffusion 2.x repositories Stability AI withdrew in November 2025."""
    from pathlib import Path

    from fusion_diff.cli import build_parser

    default = RealiseConfig().text_to_image_model
    assert default == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert not default.startswith(("stabilityai/stable-diffusion-2", "runwayml/"))
    args = build_parser().parse_args(["synth", "realise", "--triplets", "t", "--out", "o"])
    assert args.text_to_image_model == default
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"`{default}`" in readme and "checked on 2026-12-02" in readme
