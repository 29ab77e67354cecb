"""Embedding cache: round trip, resume after interruption, crash recovery, refusal of foreign caches."""

from __future__ import annotations

import json

import pytest
import torch

from fusion_diff.embedding import EmbeddingCache, embed_with_cache
from fusion_diff.embedding.cache import MANIFEST
from fusion_diff.errors import CacheMismatchError, DataError, MissingFileError

IDENTITY = {
    "backend": "openclip",
    "model": "fd-test-tiny",
    "pretrained": "x@sha256:0",
    "dim": 8,
    "fusion_weight": 0.5,
    "kind": "image",
}


def _table(n: int, dim: int = 8) -> tuple[list[str], torch.Tensor]:
    return [f"img-{i:03d}" for i in range(n)], torch.nn.functional.normalize(
        torch.randn(n, dim, generator=torch.Generator().manual_seed(n)), dim=-1
    )


def test_append_load_roundtrip_in_requested_order(tmp_path):
    ids, embeds = _table(10)
    cache = EmbeddingCache.open(tmp_path / "c", IDENTITY)
    cache.append(ids[:4], embeds[:4])
    cache.append(ids[4:], embeds[4:])
    reopened = EmbeddingCache.open(tmp_path / "c", IDENTITY, create=False)
    assert len(reopened) == 10 and reopened.dim == 8 and reopened.missing(ids + ["new", "new"]) == ["new"]
    loaded_ids, loaded = reopened.load()
    assert loaded_ids == ids and torch.equal(loaded, embeds)
    order = [ids[7], ids[1], ids[7]]
    assert torch.equal(reopened.load(order)[1], embeds[[7, 1, 7]])
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert manifest["count"] == 10 and manifest["identity"] == IDENTITY and len(manifest["shards"]) == 2
    with pytest.raises(DataError, match="not in embedding cache"):
        reopened.load(["nope"])


def test_resume_after_interruption_without_duplicates_or_loss(tmp_path):
    ids, embeds = _table(23)
    table = dict(zip(ids, embeds))
    calls: list[list[str]] = []

    def flaky(items: list[str]) -> torch.Tensor:
        calls.append(items)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the job is killed while embedding the third chunk
        return torch.stack([table[item] for item in items])

    cache = EmbeddingCache.open(tmp_path / "c", IDENTITY)
    with pytest.raises(KeyboardInterrupt):
        embed_with_cache(cache, ids, ids, flaky, batch_size=5, progress=False)
    assert len(EmbeddingCache.open(tmp_path / "c", IDENTITY)) == 10
    calls.clear()
    resumed = EmbeddingCache.open(tmp_path / "c", IDENTITY)
    out = embed_with_cache(resumed, ids[::-1], ids[::-1], flaky, batch_size=50, progress=False)
    assert sorted(item for chunk in calls for item in chunk) == sorted(ids[10:])  # only what was missing
    assert torch.equal(out, embeds.flip(0))
    stored_ids, _ = EmbeddingCache.open(tmp_path / "c", IDENTITY).load()
    assert sorted(stored_ids) == sorted(ids) and len(stored_ids) == len(set(stored_ids))


def test_shard_written_before_a_crash_is_adopted(tmp_path, monkeypatch):
    ids, embeds = _table(6)
    cache = EmbeddingCache.open(tmp_path / "c", IDENTITY)
    cache.append(ids[:3], embeds[:3])
    monkeypatch.setattr(EmbeddingCache, "_write_manifest", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        cache.append(ids[3:], embeds[3:])  # shard renamed into place, manifest not updated
    monkeypatch.undo()
    recovered = EmbeddingCache.open(tmp_path / "c", IDENTITY)
    assert recovered.missing(ids) == [] and torch.equal(recovered.load(ids)[1], embeds)
    assert json.loads((tmp_path / "c" / MANIFEST).read_text())["count"] == 6


def test_interrupted_compact_leaves_a_consistent_cache(tmp_path, monkeypatch):
    ids, embeds = _table(6)
    cache = EmbeddingCache.open(tmp_path / "c", IDENTITY)
    cache.append(ids[:3], embeds[:3])
    cache.append(ids[3:], embeds[3:])
    monkeypatch.setattr(EmbeddingCache, "_write_manifest", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        cache.compact()  # merged shard renamed into place, manifest still lists the two old shards
    monkeypatch.undo()
    recovered = EmbeddingCache.open(tmp_path / "c", IDENTITY)
    loaded_ids, loaded = recovered.load()
    assert loaded_ids == ids and torch.equal(loaded, embeds)
    assert len(list((tmp_path / "c").glob("shard-*.safetensors"))) == 2


def test_wrong_dimension_is_refused_with_a_clear_error(tmp_path):
    ids, embeds = _table(4)
    cache = EmbeddingCache.open(tmp_path / "c", IDENTITY)
    cache.append(ids, embeds)
    with pytest.raises(CacheMismatchError, match="refusing 16-d") as info:
        cache.append(["other"], torch.randn(1, 16))
    assert str(tmp_path / "c") in str(info.value)
    with pytest.raises(CacheMismatchError, match=r"dim: cache has 8, requested 16") as info:
        EmbeddingCache.open(tmp_path / "c", {**IDENTITY, "dim": 16})
    assert str(tmp_path / "c") in str(info.value) and "Delete" in str(info.value)


def test_cache_of_another_embedder_is_refused_naming_keys(tmp_path):
    EmbeddingCache.open(tmp_path / "c", IDENTITY)
    with pytest.raises(CacheMismatchError, match="backend: cache has 'openclip', requested 'vlm'.*kind"):
        EmbeddingCache.open(tmp_path / "c", {**IDENTITY, "backend": "vlm", "kind": "text"})


def test_duplicates_refused_and_compact_keeps_content(tmp_path):
    ids, embeds = _table(6)
    cache = EmbeddingCache.open(tmp_path / "c", IDENTITY)
    cache.append(ids[:3], embeds[:3])
    with pytest.raises(DataError, match="1 already cached"):
        cache.append([ids[0], "new"], embeds[:2])
    with pytest.raises(DataError, match="1 repeated"):
        cache.append(["a", "a"], embeds[:2])
    cache.append(ids[3:], embeds[3:])
    cache.compact()
    assert len(list((tmp_path / "c").glob("shard-*.safetensors"))) == 1
    reread = EmbeddingCache.read(tmp_path / "c")
    assert reread.identity == IDENTITY and torch.equal(reread.load()[1], embeds)


def test_missing_cache_and_corrupt_shard_name_the_folder(tmp_path):
    with pytest.raises(MissingFileError, match="No embedding cache"):
        EmbeddingCache.open(tmp_path / "absent", IDENTITY, create=False)
    ids, embeds = _table(3)
    EmbeddingCache.open(tmp_path / "c", IDENTITY).append(ids, embeds)
    next((tmp_path / "c").glob("shard-*.safetensors")).write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match="corrupt"):
        EmbeddingCache.open(tmp_path / "c", IDENTITY)


def test_embed_with_cache_through_the_embedder(tiny_openclip, tmp_path):
    texts = ["a red circle", "a blue star", "a red circle"]
    identity = {**tiny_openclip.identity.as_dict(), "kind": "text"}
    cache = EmbeddingCache.open(tmp_path / "t", identity)
    out = embed_with_cache(cache, ["a", "b", "a"], texts, tiny_openclip.embed_texts, batch_size=1, progress=False)
    torch.testing.assert_close(out, tiny_openclip.embed_texts(texts))
    assert len(cache) == 2
