"""Pair sets: training scenes only, deterministic, resumable after an interruption, embeddable."""

from __future__ import annotations

import pytest
import torch

from data_synth.shapes.captions import caption_matches, subject_attribute_split
from data_synth.shapes.pairs import embed_pair_set, read_pair_set, write_pair_set
from fusion_diff.errors import CacheMismatchError, MissingFileError


def test_pair_set_records_are_training_scenes_with_true_captions(tmp_path):
    write_pair_set(tmp_path, 25, seed=1, workers=2, chunk_size=10, progress=False)
    records = read_pair_set(tmp_path)
    assert [r.id for r in records] == [f"pair-{i:07d}" for i in range(25)]
    for r in records:
        assert r.image.is_file()
        assert not r.scene.is_heldout()
        assert caption_matches(r.scene, r.caption) and caption_matches(r.scene, r.canonical_caption)
        assert (r.subject, r.attributes) == subject_attribute_split(r.scene)


def test_interrupted_build_resumes_to_the_same_bytes(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    write_pair_set(full, 25, seed=1, workers=1, chunk_size=10, progress=False)
    write_pair_set(resumed, 25, seed=1, workers=1, chunk_size=10, progress=False)
    # simulate a crash after the first chunk: later parts, the jsonl and the manifest are gone
    for name in ("manifest.json", "pairs.jsonl", "parts/part-00001.jsonl", "parts/part-00002.jsonl"):
        (resumed / name).unlink()
    with pytest.raises(MissingFileError):
        read_pair_set(resumed)
    write_pair_set(resumed, 25, seed=1, workers=2, chunk_size=10, progress=False)
    assert (resumed / "pairs.jsonl").read_bytes() == (full / "pairs.jsonl").read_bytes()
    with pytest.raises(CacheMismatchError):
        write_pair_set(resumed, 25, seed=2, workers=1, chunk_size=10, progress=False)


def test_other_seed_other_set(tmp_path):
    write_pair_set(tmp_path / "a", 5, seed=1, workers=1, progress=False)
    write_pair_set(tmp_path / "b", 5, seed=2, workers=1, progress=False)
    assert (tmp_path / "a" / "pairs.jsonl").read_bytes() != (tmp_path / "b" / "pairs.jsonl").read_bytes()


def test_embed_pair_set_writes_image_text_and_fused_caches(tmp_path, tiny_openclip):
    write_pair_set(tmp_path / "pairs", 12, seed=0, workers=1, progress=False)
    caches = embed_pair_set(tmp_path / "pairs", tiny_openclip, tmp_path / "emb", batch_size=5, progress=False)
    ids = [r.id for r in read_pair_set(tmp_path / "pairs")]
    loaded = {kind: cache.load(ids)[1] for kind, cache in caches.items()}
    assert all(t.shape == (12, tiny_openclip.dim) for t in loaded.values())
    expected = tiny_openclip.fuse(loaded["image"], loaded["text"])
    assert (loaded["fused"] - expected).abs().max() < 1e-6
    again = embed_pair_set(tmp_path / "pairs", tiny_openclip, tmp_path / "emb", progress=False)  # resumes: no-op
    assert len(again["fused"]) == 12


def test_issue18_embed_pair_set_token_cache(tmp_path, tiny_openclip):
    write_pair_set(tmp_path / "pairs", 6, seed=0, workers=1, progress=False)
    caches = embed_pair_set(
        tmp_path / "pairs", tiny_openclip, tmp_path / "emb", batch_size=4, progress=False, max_text_tokens=24
    )
    records = read_pair_set(tmp_path / "pairs")
    _, tokens = caches["text_tokens"].load_tokens([r.id for r in records])
    expected = tiny_openclip.encode_text_tokens([r.caption for r in records], 24)
    assert torch.equal(tokens.mask, expected.mask) and caches["text_tokens"].identity["kind"] == "text"
    torch.testing.assert_close(tokens.states, expected.states, atol=1e-5, rtol=1e-5)
