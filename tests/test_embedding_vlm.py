"""VLM backend on a tiny random Qwen2-VL built offline, saved with save_pretrained and loaded back."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from fusion_diff.embedding import create_embedder
from fusion_diff.embedding.vlm import VLMEmbedder
from fusion_diff.errors import MissingFileError

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_qwen2vl(tmp_path_factory):
    """A ~100k-parameter Qwen2-VL with a byte-level tokenizer (no merges), as a save_pretrained folder."""
    from tokenizers import pre_tokenizers
    from transformers import (
        Qwen2Tokenizer,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    vocab = {token: i for i, token in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2)
    processor = Qwen2VLProcessor(image_processor, tokenizer, Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
            bos_token_id=0,
            eos_token_id=0,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        ),
        vision_config=dict(
            depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2, mlp_ratio=2
        ),
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(config)
    folder = tmp_path_factory.mktemp("tiny_qwen2vl")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vlm(tiny_qwen2vl):
    return VLMEmbedder(tiny_qwen2vl)


def _images() -> list[Image.Image]:
    return [
        Image.new("RGB", (60, 50), (200, 30, 30)),
        Image.new("RGB", (90, 70), (20, 40, 220)),
        Image.effect_noise((64, 64), 60).convert("RGB"),
    ]


def test_vlm_outputs_are_unit_norm_and_batch_invariant(vlm):
    images, texts = _images(), ["a red square", "a much longer description of two blue circles", "noise"]
    for out in (vlm.embed_images(images), vlm.embed_texts(texts), vlm.embed_pairs(images, texts)):
        assert out.shape == (3, 32) and out.dtype == torch.float32
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    # left padding + last-token pooling: a batch gives what each item gives alone
    torch.testing.assert_close(out, vlm.embed_pairs(images, texts, batch_size=1), atol=1e-5, rtol=1e-4)
    assert not vlm.supports_late_fusion


def test_vlm_identity_tracks_weights_and_instruction(vlm, tiny_qwen2vl):
    other = create_embedder(
        {"backend": "vlm", "model_id_or_path": str(tiny_qwen2vl), "instruction": "Describe the {modality}:"}
    )
    assert (vlm.identity.backend, vlm.identity.dim) == ("vlm", 32)
    assert vlm.identity.pretrained.split(";")[0] == other.identity.pretrained.split(";")[0]
    assert vlm.identity != other.identity
    assert not torch.allclose(vlm.embed_texts(["a red square"]), other.embed_texts(["a red square"]))


def test_issue20_vlm_identity_is_content(vlm, tiny_qwen2vl, tmp_path):
    """A save_pretrained folder moved under another name is the same embedder (identity by content)."""
    import shutil

    moved = shutil.copytree(tiny_qwen2vl, tmp_path / "renamed-folder")
    assert VLMEmbedder(moved).identity == vlm.identity
    assert vlm.identity.pretrained.startswith("sha256:") and "renamed" not in vlm.identity.describe()


def test_vlm_missing_folder_is_named(tmp_path):
    with pytest.raises(MissingFileError, match="no_such_vlm"):
        VLMEmbedder(tmp_path / "no_such_vlm")


def test_vlm_token_states_are_the_texts_own_tokens_right_padded(vlm, caplog):
    texts = ["a red square", "a much longer description of two blue circles"]
    tokens = vlm.encode_text_tokens(texts, max_tokens=64)
    lengths = [len(ids) for ids in vlm.processor.tokenizer(texts)["input_ids"]]
    assert tokens.states.shape == (2, 64, 32) and tokens.mask.tolist()[0][: lengths[0] + 1] == [True] * lengths[0] + [False]
    assert tokens.mask.sum(1).tolist() == lengths and not tokens.states[~tokens.mask].any()
    alone = vlm.encode_text_tokens(texts[:1], max_tokens=64)  # padding does not change a text's states
    torch.testing.assert_close(alone.states[0], tokens.states[0], atol=1e-5, rtol=1e-4)
    with caplog.at_level("WARNING"):
        short = vlm.encode_text_tokens(texts, max_tokens=8)
    assert short.mask.sum(1).tolist() == [min(n, 8) for n in lengths] and "2 of 2 texts" in caplog.text
