"""Triplet embedding precompute: the four caches, resume after interruption, refusal of another backbone, and the
near-miss cache."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from data_synth.shapes.scene import Scene
from data_synth.triplets.embed import CACHE_KINDS, embed_triplets
from data_synth.triplets.format import decode, iter_samples, iter_triplets
from data_synth.triplets.shapes_builder import ShapesTripletConfig, build_shapes_triplets, near_misses_of
from fusion_diff.embedding.cache import EmbeddingCache
from fusion_diff.errors import CacheMismatchError, DataError
from fusion_diff.training.data import NEAR_MISS_CACHE, near_miss_ids

N = 12


@pytest.fixture(scope="module")
def triplet_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed") / "triplets"
    build_shapes_triplets(root, N, seed=0, shard_size=5, progress=False)
    return root


def test_embed_triplets_writes_four_consistent_caches(triplet_dir, tmp_path, tiny_openclip):
    caches = embed_triplets(triplet_dir, tiny_openclip, tmp_path / "emb", batch_size=4, progress=False)
    assert set(caches) == set(CACHE_KINDS)
    triplets = list(iter_triplets(triplet_dir))
    ids = [t.id for t in triplets]
    for name, cache in caches.items():
        assert cache.ids == ids and cache.dim == tiny_openclip.dim
        assert cache.identity["kind"] == CACHE_KINDS[name]
    _, ref_fused = caches["reference_fused"].load(ids)
    expected = tiny_openclip.embed_pairs([t.reference_image for t in triplets], [t.reference_caption for t in triplets])
    torch.testing.assert_close(ref_fused, expected, atol=1e-5, rtol=1e-5)
    _, instructions = caches["instruction_text"].load(ids)
    torch.testing.assert_close(
        instructions, tiny_openclip.embed_texts([t.instruction for t in triplets]), atol=1e-5, rtol=1e-5
    )


def test_embed_resumes_after_interruption(triplet_dir, tmp_path, tiny_openclip, monkeypatch):
    real_write = EmbeddingCache.write_shard
    calls = {"n": 0}

    def failing_write(self, number, ids, embeds):
        calls["n"] += 1
        if calls["n"] == 6:  # in the middle of the second shard
            raise KeyboardInterrupt("simulated kill")
        return real_write(self, number, ids, embeds)

    monkeypatch.setattr(EmbeddingCache, "write_shard", failing_write)
    with pytest.raises(KeyboardInterrupt):
        embed_triplets(triplet_dir, tiny_openclip, tmp_path / "emb", progress=False)
    monkeypatch.setattr(EmbeddingCache, "write_shard", real_write)
    partial = {name: len(EmbeddingCache.read(tmp_path / "emb" / name)) for name in CACHE_KINDS}
    assert min(partial.values()) < N
    caches = embed_triplets(triplet_dir, tiny_openclip, tmp_path / "emb", progress=False)
    for cache in caches.values():
        assert len(cache) == N and len(set(cache.ids)) == N


def test_another_backbone_is_refused(triplet_dir, tmp_path, tiny_openclip, tiny_openclip_checkpoint):
    from fusion_diff.embedding import OpenCLIPEmbedder

    embed_triplets(triplet_dir, tiny_openclip, tmp_path / "emb", progress=False)
    name, checkpoint = tiny_openclip_checkpoint
    other = OpenCLIPEmbedder(name, pretrained=checkpoint, fusion_weight=0.25)
    with pytest.raises(CacheMismatchError, match="fusion_weight"):
        embed_triplets(triplet_dir, other, tmp_path / "emb", progress=False)


def test_caption_only_triplets_are_refused_with_the_fix(tmp_path, tiny_openclip):
    from data_synth.triplets.corpus_edits import CorpusEditConfig, build_corpus_triplets

    (tmp_path / "c.txt").write_text("a red car\n")
    build_corpus_triplets(tmp_path / "corpus", CorpusEditConfig(corpus=str(tmp_path / "c.txt")), progress=False)
    with pytest.raises(DataError, match="synth realise"):
        embed_triplets(tmp_path / "corpus", tiny_openclip, tmp_path / "emb", progress=False)


def test_captioner_captions_replace_the_triplets_own_in_the_fused_caches(triplet_dir, tmp_path, tiny_openclip):
    from fusion_diff.captioning import RetrievalCaptioner

    bank = ["a small green star", "two shapes: a red circle and a blue square", "a large yellow heart"]
    captioner = RetrievalCaptioner(tiny_openclip, bank)
    caches = embed_triplets(triplet_dir, tiny_openclip, tmp_path / "emb", progress=False, captioner=captioner)
    triplets = list(iter_triplets(triplet_dir))
    ids = [t.id for t in triplets]
    targets = [t.target_image for t in triplets]
    expected = tiny_openclip.fuse(
        tiny_openclip.embed_images(targets), tiny_openclip.embed_texts(captioner.caption(targets))
    )
    torch.testing.assert_close(caches["target_fused"].load(ids)[1], expected, atol=1e-5, rtol=1e-5)
    assert caches["reference_fused"].identity["captions"]["type"] == "retrieval"
    assert "captions" not in caches["instruction_text"].identity  # unaffected by the caption source
    with pytest.raises(CacheMismatchError, match="captions"):  # annotation captions are not mixed in
        embed_triplets(triplet_dir, tiny_openclip, tmp_path / "emb", progress=False)


def test_issue18_instruction_token_cache_beside_the_pooled_one(triplet_dir, tmp_path, tiny_openclip):
    caches = embed_triplets(
        triplet_dir, tiny_openclip, tmp_path / "emb", batch_size=4, progress=False, max_text_tokens=12
    )
    triplets = list(iter_triplets(triplet_dir))
    _, tokens = caches["instruction_tokens"].load_tokens([t.id for t in triplets])
    expected = tiny_openclip.encode_text_tokens([t.instruction for t in triplets], 12)
    assert caches["instruction_tokens"].identity["max_text_tokens"] == 12 and len(caches) == len(CACHE_KINDS) + 1
    assert torch.equal(tokens.mask, expected.mask)
    torch.testing.assert_close(tokens.states, expected.states, atol=1e-5, rtol=1e-5)
    again = embed_triplets(triplet_dir, tiny_openclip, tmp_path / "emb", progress=False)  # pooled only: untouched
    assert set(again) == set(CACHE_KINDS) and (tmp_path / "emb/instruction_tokens/manifest.json").is_file()
    with pytest.raises(CacheMismatchError, match="max_text_tokens: cache has 12, requested 8"):
        embed_triplets(triplet_dir, tiny_openclip, tmp_path / "emb", progress=False, max_text_tokens=8)


def test_removal_probe_script_reads_the_caches_and_tables_every_kind(tmp_path, tiny_openclip, monkeypatch, capsys):
    """scripts/removal_probe.py on a toy set: the caches align with the records, the edited object's place is
    one-hot (a composite's is empty), and the table has a row per split with a cell per kind present."""
    import runpy
    import sys
    from pathlib import Path

    root = tmp_path / "triplets"
    build_shapes_triplets(root, 40, seed=0, shard_size=20, config=ShapesTripletConfig(negated_removals=True), progress=False)
    embed_triplets(root, tiny_openclip, tmp_path / "emb", batch_size=8, progress=False)
    script = Path(__file__).resolve().parents[1] / "scripts" / "removal_probe.py"
    module = runpy.run_path(str(script))
    tensors, labels = module["load"](str(root), str(tmp_path / "emb"))
    assert len(labels) == 40 and tensors["where"].shape[0] == tensors["target_fused"].shape[0] == 40
    single = torch.tensor([label != "composite" for label in labels])
    assert (tensors["where"][single].sum(1) == 2).all() and (tensors["where"][~single].sum(1) == 0).all()
    args = [str(script), str(root), str(tmp_path / "emb"), "--epochs", "1", "--oracle-kind", "--oracle-place", "--train-fraction", "0.5"]
    monkeypatch.setattr(sys, "argv", args)
    runpy.run_path(str(script), run_name="__main__")
    table = capsys.readouterr().out
    assert "| held-out (8) |" in table and "| training (8) |" in table and "trained on 20 triplets" in table
    monkeypatch.setattr(sys, "argv", args[:5] + ["--reverse-rerank", "3"])
    runpy.run_path(str(script), run_name="__main__")
    table = capsys.readouterr().out
    assert "| held-out, target in the forward top-3 |" in table and "| held-out, reverse score only |" in table
    assert "| held-out, forward + 0 x reverse |" in table and "forward top-3 by cos" in table
    monkeypatch.setattr(sys, "argv", args[:5] + ["--residual"])
    runpy.run_path(str(script), run_name="__main__")
    table = capsys.readouterr().out
    assert "| held-out (8) |" in table and "MLP probe of the change (residual" in table
    tensors, _ = module["load"](str(root), str(tmp_path / "emb"))
    train, test = torch.arange(30), torch.arange(30, 40)
    forward = torch.randn(10, tensors["target_fused"].shape[1])
    rows = dict((name, hits) for name, _, hits in module["reverse_rerank"](forward, tensors, train, test, 4, 1))
    own_first = module["recall_at_1"](forward, tensors["target_fused"][test])
    assert torch.equal(rows["held-out, forward + 0 x reverse"], own_first)  # w = 0: the forward ranking's top 1
    assert (rows["held-out, reverse score only"] <= rows["held-out, target in the forward top-4"]).all()
    for bad in (["--train-fraction", "0.9"], ["--reverse-rerank", "3", "--oracle-kind"], ["--attention", "--residual"]):
        monkeypatch.setattr(sys, "argv", args[:3] + bad)
        with pytest.raises(SystemExit):
            runpy.run_path(str(script), run_name="__main__")


def test_removal_probe_attention_reads_patches_and_tokens_of_the_caches_backbone(tmp_path, tiny_openclip, monkeypatch, capsys):
    """The attention probe reads the reference images' patch states and the instructions' token states from the
    backbone that made the caches, aligned with the cache rows; another backbone is refused, and the MLP-only
    and attention-only flags are not mixed."""
    import json
    import runpy
    import sys
    from pathlib import Path


    root, emb = tmp_path / "triplets", tmp_path / "emb"
    build_shapes_triplets(root, 24, seed=1, shard_size=12, progress=False)
    embed_triplets(root, tiny_openclip, emb, batch_size=8, progress=False)
    monkeypatch.setattr("data_synth.shapes.backbone.load_world_embedder", lambda *args, **kwargs: tiny_openclip)
    script = Path(__file__).resolve().parents[1] / "scripts" / "removal_probe.py"
    module = runpy.run_path(str(script))
    ids = EmbeddingCache.read(emb / "target_fused").ids
    states = module["backbone_states"](str(root), str(emb), ids, True, 12, None)
    triplets = {t.id: t for t in (decode(s) for s in iter_samples(root))}
    k = 5
    torch.testing.assert_close(states["patches"][k], tiny_openclip.encode_image_tokens([triplets[ids[k]].reference_image])[0])
    assert states["tokens"].shape[:2] == states["token_mask"].shape == (24, 12)
    torch.testing.assert_close(states["tokens"][k], tiny_openclip.encode_text_tokens([triplets[ids[k]].instruction], 12).states[0])

    args = [str(script), str(root), str(emb), "--attention", "--reference-patches", "--instruction-tokens", "12", "--epochs", "1"]
    monkeypatch.setattr(sys, "argv", args)
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "2-block transformer probe" in out and "reference patch states" in out and "token states (<= 12)" in out
    for bad in (args[:3] + ["--reference-patches"], args[:4] + ["--oracle-kind"]):
        monkeypatch.setattr(sys, "argv", bad)
        with pytest.raises(SystemExit):
            runpy.run_path(str(script), run_name="__main__")
    manifest = json.loads((emb / "manifest.json").read_text())
    manifest["embedder"]["pretrained"] = "sha256:0000"
    (emb / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheMismatchError, match="--backbone-cache"):
        module["backbone_states"](str(root), str(emb), ids, True, 0, None)


def test_near_miss_cache_embeds_training_scenes_that_miss_each_edit(triplet_dir, tmp_path, tiny_openclip):
    embed_triplets(triplet_dir, tiny_openclip, tmp_path / "emb", batch_size=4, progress=False)
    before = EmbeddingCache.read(tmp_path / "emb" / "target_fused").load()[1]
    caches = embed_triplets(triplet_dir, tiny_openclip, tmp_path / "emb", batch_size=4, progress=False, near_misses=2)
    assert set(caches) == {*CACHE_KINDS, NEAR_MISS_CACHE} and caches[NEAR_MISS_CACHE].identity["near_misses"] == 2
    assert torch.equal(caches["target_fused"].load()[1], before)  # the existing caches were resumed, not redone
    triplets = list(iter_triplets(triplet_dir))
    misses = [near_misses_of(t.record, 2) for t in triplets]
    for t, own in zip(triplets, misses):
        target = Scene.from_dict(t.record["target_scene"])
        assert len({m.scene.key() for m in own}) == 2 and target.key() not in {m.scene.key() for m in own}
        assert not any(m.scene.is_heldout() for m in own)  # training scenes only: no benchmark scene
        assert [m.caption for m in near_misses_of(t.record, 2)] == [m.caption for m in own]  # a function of the record
    assert Counter(m.why for own in misses for m in own)["wrong_object"] > 0
    flat = [m for own in misses for m in own]
    expected = tiny_openclip.embed_pairs([m.render(64) for m in flat], [m.caption for m in flat])
    rows = caches[NEAR_MISS_CACHE].load(near_miss_ids([t.id for t in triplets], 2))[1]
    torch.testing.assert_close(rows, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(CacheMismatchError, match="near_misses"):
        embed_triplets(triplet_dir, tiny_openclip, tmp_path / "emb", progress=False, near_misses=3)
    with pytest.raises(DataError, match="scene graph"):
        near_misses_of({"id": "corpus-1", "instruction": "make it red"}, 2)
