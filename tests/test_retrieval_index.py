"""Gallery search: exact chunked top-K equals brute force (with exclusion); FAISS equals exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusion_diff.errors import ConfigError, DataError
from fusion_diff.retrieval import FaissGalleryIndex, GalleryIndex, build_index


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    gallery = F.normalize(torch.randn(1000, 24, generator=gen), dim=-1)
    queries = F.normalize(torch.randn(70, 24, generator=gen), dim=-1)
    ids = [f"g{i}" for i in range(1000)]
    # queries exclude 0-3 ids each, mostly among their own true top-5, plus an id not in the gallery
    truth = (queries @ gallery.T).topk(5, dim=1).indices.tolist()
    exclude = [
        [ids[j] for j in row[: q % 4]] + (["not-in-gallery"] if q % 5 == 0 else []) for q, row in enumerate(truth)
    ]
    return gallery, queries, ids, exclude


def brute_force(gallery, queries, ids, exclude, k):
    scores = queries @ gallery.T
    for q, items in enumerate(exclude):
        scores[q, [ids.index(i) for i in items if i in ids]] = float("-inf")
    return scores.topk(k, dim=1)


@pytest.mark.parametrize("chunk_size, query_block", [(128, 16), (100000, 1024)])
def test_exact_search_equals_brute_force_with_exclusion(data, chunk_size, query_block):
    gallery, queries, ids, exclude = data
    index = GalleryIndex(gallery, ids, chunk_size=chunk_size, query_block=query_block)
    result = index.search(queries, k=50, exclude=exclude)
    scores, indices = brute_force(gallery, queries, ids, exclude, 50)
    assert torch.equal(result.indices, indices)
    torch.testing.assert_close(result.scores, scores)
    assert result.ids == [[ids[j] for j in row] for row in indices.tolist()]
    assert all(not set(row) & set(ex) for row, ex in zip(result.ids, exclude))


def test_faiss_flat_equals_exact(data):
    gallery, queries, ids, exclude = data
    exact = GalleryIndex(gallery, ids).search(queries, k=20, exclude=exclude)
    approx = build_index(gallery, ids, backend="faiss").search(queries, k=20, exclude=exclude)
    assert torch.equal(approx.indices, exact.indices) and approx.ids == exact.ids
    torch.testing.assert_close(approx.scores, exact.scores)


def test_faiss_ivf_with_all_lists_probed_is_exact(data):
    gallery, queries, ids, _ = data
    ivf = FaissGalleryIndex(gallery, ids, factory="IVF8,Flat", search_params="nprobe=8")
    assert torch.equal(ivf.search(queries, k=10).indices, GalleryIndex(gallery, ids).search(queries, k=10).indices)


def test_small_gallery_and_exclusion_leave_fewer_results(data):
    gallery, queries, ids, _ = data
    index = GalleryIndex(gallery[:3], ids[:3])
    result = index.search(queries[:2], k=50, exclude=[[ids[0]], []])
    assert result.indices.shape == (2, 3)
    assert result.indices[0, -1] == -1 and result.scores[0, -1] == float("-inf") and len(result.ids[0]) == 2
    assert sorted(result.ids[1]) == ids[:3]


def test_scores_for_candidate_subsets(data):
    gallery, queries, ids, _ = data
    index = GalleryIndex(gallery, ids)
    candidates = [[ids[q], ids[q + 1], ids[999]] for q in range(len(queries))]
    candidates[0] = candidates[0][:2]
    scores = index.scores_for(queries, candidates)
    expected = torch.stack([queries[q] @ gallery[[q, q + 1, 999]].T for q in range(len(queries))])
    expected[0, 2] = float("-inf")
    torch.testing.assert_close(scores, expected)
    with pytest.raises(DataError, match="not in the gallery"):
        index.scores_for(queries[:1], [["missing"]])


def test_bad_inputs_fail_clearly(data):
    gallery, queries, ids, _ = data
    with pytest.raises(DataError, match="same embedder"):
        GalleryIndex(gallery, ids).search(queries[:, :8])
    with pytest.raises(DataError, match="unique"):
        GalleryIndex(gallery[:2], ["a", "a"])
    with pytest.raises(ConfigError, match="Unknown search backend"):
        build_index(gallery, ids, backend="annoy")


def test_index_folder_metadata_is_columnar_and_read_per_hit(tmp_path, data):
    """An index folder's items stay on disk (memory-mapped columns): search, exclusion and add give the same
    answers as the in-memory index, and a folder with only items.jsonl (older layout) still opens."""
    import numpy as np

    from fusion_diff.retrieval.items import IDS, OFFSETS, ItemTable
    from fusion_diff.retrieval.store import PersistentIndex

    gallery, queries, ids, exclude = data
    items = [
        {"id": i, "path": f"/g/{i}.png", "caption": f"a shape ñ {n}" + ("\nline two, {x}" * (n % 5 == 0)) if n % 3 else None}
        for n, i in enumerate(ids)
    ]  # captions with newlines, commas, braces and non-ASCII: the hits' rows are decoded in one gather
    index = PersistentIndex.write(tmp_path / "idx", {"space": "test"}, gallery[:900], items[:900])
    assert isinstance(index.items, ItemTable) and isinstance(index.items._data.base, np.memmap)
    assert isinstance(index.ids.arrays[0].base, np.memmap) and isinstance(index.ids.arrays[1].base, np.memmap)
    index = index.add(gallery[900:], items[900:])
    expected = GalleryIndex(gallery, ids).search(queries, k=10, exclude=exclude)
    found = PersistentIndex.load(tmp_path / "idx").search(queries, k=10, exclude=exclude)
    assert found.ids == expected.ids
    assert found.items == [[items[ids.index(i)] for i in row] for row in expected.ids]
    assert index.position["g917"] == 917 and "nope" not in index.position and "g917" in index.position
    assert index.ids.rows(["g3", "x" * 99, "g999"]).tolist() == [3, -1, 999]
    assert index.items.rows([10, 2, 10]) == [items[10], items[2], items[10]] and index.ids.take(np.array([10, 2])) == ["g10", "g2"]
    with pytest.raises(DataError, match="refusing ids already indexed"):
        index.add(gallery[:1], items[:1])
    generation = tmp_path / "idx" / index.manifest["generation"]
    for name in (OFFSETS, IDS, "ids.order.npy"):
        (generation / name).unlink()
    legacy = PersistentIndex.load(tmp_path / "idx").search(queries, k=10, exclude=exclude)
    assert legacy.ids == expected.ids and legacy.items == found.items


def test_exact_search_of_many_queries_runs_in_faiss_and_equals_torch(data):
    """From FAISS_KNN_MIN_QUERIES queries on, CPU exact search goes through faiss.knn: same ranking as torch's."""
    from fusion_diff.retrieval.index import FAISS_KNN_MIN_QUERIES

    gallery, _, ids, _ = data
    queries = F.normalize(
        torch.randn(FAISS_KNN_MIN_QUERIES, gallery.shape[1], generator=torch.Generator().manual_seed(1)), dim=-1
    )
    exclude = [[ids[q]] for q in range(len(queries))]
    many = GalleryIndex(gallery, ids).search(queries, k=20, exclude=exclude)
    few = [
        GalleryIndex(gallery, ids).search(queries[q : q + 1], k=20, exclude=exclude[q : q + 1])
        for q in range(0, len(queries), 37)
    ]
    assert [r.ids[0] for r in few] == many.ids[::37]
    assert torch.allclose(torch.cat([r.scores for r in few]), many.scores[::37], atol=1e-5)
