"""The world backbone cache: loads through OpenCLIPEmbedder; a corrupt or partial cache is rebuilt, not used."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from data_synth.shapes.backbone import (
    CELL_ATTRIBUTES,
    BackboneCache,
    BackboneConfig,
    SceneGraphHead,
    build_backbone,
    load_world_embedder,
    scene_targets,
    sibling_partners,
    training_scenes,
    with_negations,
)
from data_synth.shapes.captions import absent_kinds, caption_scene
from data_synth.shapes import render as render_module
from data_synth.shapes.scene import COLOURS, GRID, SHAPES, SIZES, Scene, SceneObject, sample_scene
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
    assert embedder.identity.pretrained.startswith("sha256:")
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


@pytest.mark.parametrize("damage", ["corrupt", "no_manifest", "other_config", "other_world"])
def test_damaged_cache_is_detected_and_rebuilt(built, tmp_path, damage, monkeypatch):
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
    elif damage == "other_config":
        config = BackboneConfig.quick(seed=1)
    else:  # the world changed under the cache (a shape redrawn): its renders are not what it was trained on
        monkeypatch.setitem(render_module.OUTLINES, "star", render_module._star(points=6))
        config = BackboneConfig.quick()
        assert config.world != QUICK.world
    assert not store.validate(config) and store.problems
    with pytest.raises(MissingFileError, match="fusion-diff world backbone"):
        load_world_embedder(root, train_if_missing=False, config=config)
    embedder = load_world_embedder(root, config=config, progress=False)
    assert store.validate(config)
    assert embedder.identity.pretrained.endswith(store.manifest()["checkpoint"]["sha256"][:16])


def test_scene_targets_put_each_object_in_its_cell():
    scene = Scene(
        objects=(
            SceneObject((0, 2), shape="star", colour="blue", size="small"),
            SceneObject((2, 0), shape="circle", colour="red", size="large"),
        )
    )
    targets = scene_targets([scene])
    assert targets.shape == (1, GRID * GRID, len(CELL_ATTRIBUTES))
    assert targets[0, 2].tolist() == [1 + SHAPES.index("star"), 1 + list(COLOURS).index("blue"), 1 + SIZES.index("small")]
    assert targets[0, 6].tolist() == [1 + SHAPES.index("circle"), 1 + list(COLOURS).index("red"), 1 + SIZES.index("large")]
    assert targets[0, [0, 1, 3, 4, 5, 7, 8]].eq(0).all()  # empty cells


def test_scene_graph_head_learns_a_fixed_batch_and_ignores_empty_cells_attributes():
    torch.manual_seed(0)
    scenes = [sample_scene(random.Random(i)) for i in range(32)]
    targets = scene_targets(scenes)
    features = torch.randn(32, 16)
    head = SceneGraphHead(16)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    first = head.loss(features, targets).item()
    for _ in range(200):
        optimizer.zero_grad()
        loss = head.loss(features, targets)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first
    # an empty cell's attribute logits get no gradient: only its occupancy is scored
    head.zero_grad()
    one = scene_targets([Scene(objects=(SceneObject((0, 0), shape="star", colour="blue", size="small"),))])
    head.loss(torch.randn(1, 16), one).backward()
    grad = head.proj.weight.grad.view(GRID * GRID, sum(head.sizes), 16)
    assert grad[1:, 2:].abs().sum() == 0 and grad[1:, :2].abs().sum() > 0



def test_training_scenes_hold_the_asked_share_of_single_objects_and_siblings():
    scenes = training_scenes(random.Random(0), 64, sibling_fraction=0.5, single_fraction=0.5)
    assert len(scenes) == 64
    assert all(len(s.objects) == 1 for s in scenes[:16])  # half of the 32 base scenes
    assert not any(s.is_heldout() for s in scenes)


def test_negated_captions_name_a_kind_the_scene_lacks_and_prefer_the_partners_extra_object():
    rng = random.Random(0)
    scenes = training_scenes(rng, 64, sibling_fraction=0.5)
    partners = sibling_partners(64, 0.5)
    assert all(partners[p] == i for i, p in enumerate(partners) if p is not None)
    captions = [caption_scene(s, rng) for s in scenes]
    negated = with_negations(scenes, captions, partners, 1.0, rng, fits=lambda texts: [True] * len(texts))
    assert all(n.startswith(c) and n != c for c, n in zip(captions, negated))
    for i, (scene, caption, text) in enumerate(zip(scenes, captions, negated)):
        clause = text[len(caption) :]
        named = [k for k in absent_kinds(scene) if f" {k[0]} {k[1]}" in clause]
        assert len(named) == 1, text  # exactly one kind, and one the scene lacks
        extra = set() if partners[i] is None else {(o.colour, o.shape) for o in scenes[partners[i]].objects}
        extra &= set(absent_kinds(scene))
        assert not extra or named[0] in extra, (text, extra)
    # a negated caption the encoder would cut keeps its plain form; fraction 0 changes nothing
    assert with_negations(scenes, captions, partners, 1.0, rng, fits=lambda texts: [False] * len(texts)) == captions
    assert with_negations(scenes, captions, partners, 0.0, rng, fits=lambda texts: [True] * len(texts)) == captions
    with pytest.raises(ValueError, match="negation_fraction"):
        BackboneConfig(negation_fraction=1.5)
    # off, the setting is not part of a cache's identity (caches from before it stay valid); on, it is
    assert "negation_fraction" not in BackboneConfig().identity()
    assert BackboneConfig(negation_fraction=0.3).identity()["negation_fraction"] == 0.3


def test_scene_graph_head_weights_scale_one_attribute():
    torch.manual_seed(0)
    targets = scene_targets([sample_scene(random.Random(i)) for i in range(8)])
    features = torch.randn(8, 16)
    plain, shaped = SceneGraphHead(16), SceneGraphHead(16, {"shape": 3.0})
    shaped.load_state_dict(plain.state_dict())
    zero_shape = SceneGraphHead(16, {"shape": 0.0})
    zero_shape.load_state_dict(plain.state_dict())
    shape_term = plain.loss(features, targets) - zero_shape.loss(features, targets)
    assert torch.allclose(shaped.loss(features, targets), plain.loss(features, targets) + 2 * shape_term)
