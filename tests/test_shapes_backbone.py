"""The world backbone cache: loads through OpenCLIPEmbedder; a corrupt or partial cache is rebuilt, not used."""

from __future__ import annotations

import shutil

import pytest
import torch

from data_synth.shapes.backbone import BackboneCache, BackboneConfig, build_backbone, load_world_embedder
from fusion_diff.embedding import OpenCLIPEmbedder
from fusion_diff.errors import MissingFileError

QUICK = BackboneConfig.quick()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbone") / "cache"
    manifest = build_backbone(QUICK, cache=root, progress=False)
    return root, manifest


def test_backbone_loads_through_openclip_embedder_from_the_cache(built):
    root, manifest = built
    assert manifest["training"]["steps"] == QUICK.steps
    assert set(manifest["heldout_quality"]) == {
        "zero_shot_colour_acc",
        "zero_shot_shape_acc",
        "image_to_caption_r1",
        "caption_to_image_r1",
    }
    embedder = load_world_embedder(root, train_if_missing=False)
    assert isinstance(embedder, OpenCLIPEmbedder)
    assert embedder.identity.model == "shapes-vit-tiny" and embedder.dim == 256
    assert embedder.identity.pretrained.startswith("open_clip_model.safetensors@sha256:")
    z = embedder.embed_texts(["a large red circle at the center on a white background"])
    assert torch.allclose(z.norm(dim=-1), torch.ones(1))


def test_default_cache_dir_is_used(built, monkeypatch, tmp_path):
    monkeypatch.setenv("FUSION_DIFF_CACHE", str(tmp_path))
    shutil.copytree(built[0], tmp_path / "shapes_backbone")
    assert load_world_embedder(train_if_missing=False).identity.pretrained is not None


def test_truncated_or_missing_checkpoint_is_detected(built, tmp_path):
    root = tmp_path / "cache"
    shutil.copytree(built[0], root)
    store = BackboneCache.at(root)
    store.checkpoint.write_bytes(store.checkpoint.read_bytes()[:1000])
    assert not store.validate() and "partial or corrupt" in store.problems[0]
    store.checkpoint.unlink()
    assert not store.validate() and "missing" in store.problems[0]


@pytest.mark.parametrize("damage", ["corrupt", "no_manifest", "other_config"])
def test_damaged_cache_is_detected_and_rebuilt(built, tmp_path, damage):
    root = tmp_path / "cache"
    shutil.copytree(built[0], root)
    store = BackboneCache.at(root)
    config = QUICK
    if damage == "corrupt":  # one flipped byte: same size, other checksum
        data = bytearray(store.checkpoint.read_bytes())
        data[-100] ^= 0xFF
        store.checkpoint.write_bytes(bytes(data))
    elif damage == "no_manifest":  # an interrupted build: checkpoint written, manifest not yet
        store.manifest_path.unlink()
    else:
        config = BackboneConfig.quick(seed=1)
    assert not store.validate(config) and store.problems
    with pytest.raises(MissingFileError, match="fusion-diff world backbone"):
        load_world_embedder(root, train_if_missing=False, config=config)
    embedder = load_world_embedder(root, config=config, progress=False)
    assert store.validate(config)
    assert embedder.identity.pretrained.endswith(store.manifest()["checkpoint"]["sha256"][:16])
