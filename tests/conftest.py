"""Shared test set-up: offline hubs, a private cache, few threads, tiny models built on the fly."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own FUSION_DIFF_CACHE so that no test reads the user's real cache."""
    monkeypatch.setenv("FUSION_DIFF_CACHE", str(tmp_path_factory.mktemp("fusion_diff_cache")))


# --------------------------------------------------------------------------- tiny open_clip (helper A)
TINY_OPENCLIP_NAME = "fd-test-tiny"
TINY_OPENCLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_openclip_checkpoint(tmp_path_factory):
    """``(model_name, checkpoint path)`` of a tiny random open_clip ViT registered through our config registry."""
    import open_clip

    from fusion_diff.embedding import save_checkpoint, write_model_config

    root = tmp_path_factory.mktemp("tiny_openclip")
    write_model_config(TINY_OPENCLIP_NAME, TINY_OPENCLIP_CONFIG, root / "model_configs")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = open_clip.create_model(TINY_OPENCLIP_NAME)
    return TINY_OPENCLIP_NAME, save_checkpoint(model, root / f"{TINY_OPENCLIP_NAME}.safetensors")


@pytest.fixture(scope="session")
def tiny_openclip(tiny_openclip_checkpoint):
    """An ``OpenCLIPEmbedder`` loaded from the tiny checkpoint file (the real local-checkpoint path)."""
    from fusion_diff.embedding import OpenCLIPEmbedder

    name, checkpoint = tiny_openclip_checkpoint
    return OpenCLIPEmbedder(name, pretrained=checkpoint)
