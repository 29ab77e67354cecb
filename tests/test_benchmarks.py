"""Loaders on the real annotation files (official counts), wrong-file errors, submission files, and an
end-to-end chance-level check on CIRR val, all over generated folders of blank images."""

from __future__ import annotations

import io
import json
import os
import shutil
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fusion_diff.benchmarks import (
    circo_submission,
    cirr_submission,
    load_circo,
    load_cirr,
    load_fashioniq,
    validate_submission,
    write_submission,
)
from fusion_diff.benchmarks.evaluate import Evaluator
from fusion_diff.benchmarks.submission import write_result_submissions
from fusion_diff.cli import main as cli_main
from fusion_diff.embedding.base import EmbedderIdentity, JointEmbedder
from fusion_diff.errors import DataError, MissingFileError
from fusion_diff.retrieval.method import QueryContext


def benchmarks_dir() -> Path:
    """``../shared/benchmarks`` beside the repository (``$FUSION_DIFF_BENCHMARKS`` overrides)."""
    override = os.environ.get("FUSION_DIFF_BENCHMARKS")
    return Path(override) if override else Path(__file__).parents[1].parent / "shared" / "benchmarks"


BENCH = benchmarks_dir()
CIRR, FIQ, CIRCO = BENCH / "cirr", BENCH / "fashion-iq", BENCH / "circo"


def _blank(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(buffer, format=fmt)
    return buffer.getvalue()


def write_blank_images(paths) -> None:
    """One tiny blank image per path: hard links to one file per format (fast for thousands)."""
    sources: dict[str, Path] = {}
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix not in sources:
            path.write_bytes(_blank({".png": "PNG", ".jpg": "JPEG"}[path.suffix]))
            sources[path.suffix] = path
        else:
            os.link(sources[path.suffix], path)


class HashEmbedder(JointEmbedder):
    """A stand-in backbone: every image path / text maps to a fixed pseudo-random unit vector (vectorised)."""

    def __init__(self, dim: int = 64) -> None:
        self._identity = EmbedderIdentity("test-hash", "hash", None, dim, 0.5)
        self.frequencies = torch.randn(dim, generator=torch.Generator().manual_seed(0)) * 1e-3

    @property
    def identity(self) -> EmbedderIdentity:
        return self._identity

    def _vectors(self, keys) -> torch.Tensor:
        seeds = torch.tensor([zlib.crc32(str(k).encode()) for k in keys], dtype=torch.float64)  # stable across runs
        return F.normalize(torch.sin(seeds[:, None] * self.frequencies.double()[None] * 7919.0).float(), dim=-1)

    def embed_images(self, images, batch_size=64, progress=False):
        return self._vectors(Path(str(i)).name for i in images)

    def embed_texts(self, texts, batch_size=256, progress=False):
        return self._vectors(f"text:{t}" for t in texts)

    def embed_pairs(self, images, texts, batch_size=64, progress=False):
        return F.normalize(self.embed_images(images) + self.embed_texts(texts), dim=-1)

    @property
    def supports_late_fusion(self) -> bool:
        return True

    def fuse(self, image_embeds, text_embeds):
        return F.normalize(image_embeds + text_embeds, dim=-1)


class RandomRanking:
    """Random unit query vectors: over a gallery of pseudo-random vectors, a uniformly random ranking."""

    name = "random"
    gallery_mode = "image"

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def protocol(self):
        return {"method": self.name, "seed": 0}

    def query_embeddings(self, context: QueryContext) -> torch.Tensor:
        return F.normalize(torch.randn(len(context.query_ids), context.embedder.dim, generator=self.generator), dim=-1)


# --------------------------------------------------------------------------- blank image folders
@pytest.fixture(scope="module")
def cirr_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cirr_images")
    for split in ("val", "test1"):
        names = json.loads((CIRR / "image_splits" / f"split.rc2.{split}.json").read_text())
        write_blank_images(root / rel for rel in names.values())
    return root


@pytest.fixture(scope="module")
def fiq_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fiq_images")
    ids = set()
    for category in ("dress", "shirt", "toptee"):
        ids |= set(json.loads((FIQ / "image_splits" / f"split.{category}.val.json").read_text()))
    write_blank_images(root / f"{i}.png" for i in ids)
    return root


@pytest.fixture(scope="module")
def circo_images(tmp_path_factory) -> Path:
    """Only the images CIRCO's queries refer to, plus 300 distractors: a small gallery, not 123k images."""
    root = tmp_path_factory.mktemp("circo_images")
    ids = set(range(1, 301))
    for split in ("val", "test"):
        for q in json.loads((CIRCO / "annotations" / f"{split}.json").read_text()):
            ids |= {q["reference_img_id"], *q.get("gt_img_ids", [])}
    write_blank_images(root / f"{i:012d}.jpg" for i in ids)
    return root


# --------------------------------------------------------------------------- official counts
def test_cirr_official_counts(cirr_images):
    val = load_cirr(CIRR, "val", image_root=cirr_images)
    assert (len(val.queries), len(val.gallery), val.missing) == (4181, 2297, [])
    assert val.has_ground_truth and val.has_groups and val.exclude_reference
    assert all(len(q.group) == 6 and q.reference in q.group for q in val.queries)
    test = load_cirr(CIRR, "test", image_root=cirr_images)
    assert (test.split, len(test.queries), len(test.gallery), test.missing) == ("test1", 4148, 2315, [])
    assert not test.has_ground_truth and test.has_groups


def test_fashioniq_counts_per_category(fiq_images):
    units = load_fashioniq(FIQ, "val", image_root=fiq_images)
    counts = {u.subset: (len(u.queries), len(u.gallery), len(u.missing)) for u in units}
    assert counts == {"dress": (2017, 3817, 0), "shirt": (2038, 6346, 0), "toptee": (1961, 5373, 0)}
    for unit in units:  # the same as the files say
        assert len(unit.queries) == len(json.loads(unit.annotation_files[0].read_text()))
        assert all(len(q.texts) == 2 and len(q.positives) == 1 for q in unit.queries)
        assert not unit.exclude_reference


def test_circo_counts_with_a_small_gallery(circo_images):
    val = load_circo(CIRCO, "val", gallery="folder", image_root=circo_images)
    assert len(val.queries) == 220 and val.missing == [] and val.has_ground_truth
    assert sum(len(q.positives) for q in val.queries) == 916  # 4.16 ground truths per val query
    assert all(
        q.positives[0] == str(e["target_img_id"])
        for q, e in zip(val.queries, json.loads((CIRCO / "annotations" / "val.json").read_text()))
    )
    assert len(val.gallery) == len(list(circo_images.glob("*.jpg")))
    assert val.protocol_extra == {"gallery_source": "folder"}
    test = load_circo(CIRCO, "test", gallery="folder", image_root=circo_images)
    assert len(test.queries) == 800 and not test.has_ground_truth
    assert test.queries[0].shared_concept


# --------------------------------------------------------------------------- wrong files, missing images
def test_missing_images_are_listed_or_counted(cirr_images, tmp_path):
    with pytest.raises(MissingFileError, match=r"2297 of 2297 images of CIRR val are missing(.|\n)*dev-244-0-img0.png"):
        load_cirr(CIRR, "val", image_root=tmp_path)
    victim = cirr_images / "dev" / "dev-244-0-img0.png"
    victim.rename(tmp_path / "moved.png")
    try:
        with pytest.raises(MissingFileError, match="1 of 2297"):
            load_cirr(CIRR, "val", image_root=cirr_images)
        assert load_cirr(CIRR, "val", image_root=cirr_images, allow_missing=True).missing == ["dev-244-0-img0"]
    finally:
        (tmp_path / "moved.png").rename(victim)


def test_root_of_another_benchmark_says_which(tmp_path):
    with pytest.raises(MissingFileError, match="looks like a FashionIQ folder: use --benchmark fashioniq"):
        load_cirr(FIQ, "val")
    with pytest.raises(MissingFileError, match="looks like a CIRR folder: use --benchmark cirr"):
        load_circo(CIRR, "val")


def _fake_cirr_root(tmp_path: Path, captions_source: Path) -> Path:
    (tmp_path / "captions").mkdir(parents=True)
    (tmp_path / "image_splits").mkdir()
    shutil.copy(captions_source, tmp_path / "captions" / "cap.rc2.val.json")
    shutil.copy(CIRR / "image_splits" / "split.rc2.val.json", tmp_path / "image_splits" / "split.rc2.val.json")
    return tmp_path


def test_annotation_file_of_another_benchmark_or_split(tmp_path):
    root = _fake_cirr_root(tmp_path / "a", FIQ / "captions" / "cap.dress.val.json")
    with pytest.raises(DataError, match="is a FashionIQ annotation file, but a CIRR captions file was expected"):
        load_cirr(root, "val", allow_missing=True)
    root = _fake_cirr_root(tmp_path / "b", CIRR / "captions" / "cap.rc2.test1.json")
    with pytest.raises(DataError, match="CIRR test file .* split 'val' was asked for"):
        load_cirr(root, "val", allow_missing=True)
    circo = tmp_path / "c" / "annotations"
    circo.mkdir(parents=True)
    shutil.copy(CIRCO / "annotations" / "test.json", circo / "val.json")
    with pytest.raises(DataError, match="CIRCO test file"):
        load_circo(circo.parent, "val", gallery="folder", allow_missing=True)


def test_circo_gallery_sources(circo_images, tmp_path):
    root = tmp_path / "circo"
    shutil.copytree(CIRCO / "annotations", root / "annotations")
    ids = sorted(int(p.stem) for p in circo_images.glob("*.jpg"))
    info = root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]}))
    auto = load_circo(root, "val", image_root=circo_images)  # "auto" picks the COCO info file
    assert auto.protocol_extra == {"gallery_source": "coco-info"} and len(auto.gallery) == len(ids)
    some_gt = auto.queries[0].positives[1]
    id_list = tmp_path / "ids.txt"
    id_list.write_text("\n".join(str(i) for i in ids if str(i) != some_gt))
    with pytest.raises(DataError, match=f"lacks 1 ground-truth images .*{some_gt}"):
        load_circo(root, "val", gallery=id_list, image_root=circo_images)
    partial = load_circo(root, "val", gallery=id_list, image_root=circo_images, allow_missing=True)
    assert partial.missing == [some_gt] and len(partial.gallery) == len(ids) - 1


def test_fashioniq_caption_and_split_files_of_different_categories(tmp_path):
    for sub in ("captions", "image_splits"):
        (tmp_path / sub).mkdir()
    shutil.copy(FIQ / "captions" / "cap.dress.val.json", tmp_path / "captions" / "cap.dress.val.json")
    shutil.copy(FIQ / "image_splits" / "split.shirt.val.json", tmp_path / "image_splits" / "split.dress.val.json")
    with pytest.raises(DataError, match="different categories or splits"):
        load_fashioniq(tmp_path, "val", categories=["dress"], allow_missing=True)


# --------------------------------------------------------------------------- submissions
def test_cirr_submission_round_trip_and_validator(cirr_images, tmp_path):
    test = load_cirr(CIRR, "test", image_root=cirr_images)
    query_ids = [q.query_id for q in test.queries]
    top50 = [[g for g in test.gallery if g != q.reference][:50] for q in test.queries]
    top3 = [[m for m in q.group if m != q.reference][:3] for q in test.queries]
    paths = [
        write_submission(tmp_path / "recall.json", cirr_submission("recall", query_ids, top50), test),
        write_submission(tmp_path / "subset.json", cirr_submission("recall_subset", query_ids, top3), test),
    ]
    for path, metric, length in zip(paths, ("recall", "recall_subset"), (50, 3)):
        loaded = json.loads(path.read_text())
        validate_submission(path, test)
        assert loaded["version"] == "rc2" and loaded["metric"] == metric
        assert set(loaded) - {"version", "metric"} == set(query_ids) and len(query_ids) == 4148
        assert all(len(v) == length for k, v in loaded.items() if k not in ("version", "metric"))
        assert path.stat().st_size < 5 * 1024 * 1024

    argv = ["validate-submission", str(paths[1]), "--benchmark", "cirr", "--split", "test", "--root", str(CIRR)]
    assert cli_main(argv) == 0

    broken = json.loads(paths[0].read_text())
    del broken[query_ids[0]]
    broken[query_ids[1]] = broken[query_ids[1]][:49] + [test.queries[1].reference]
    broken[query_ids[2]] = [broken[query_ids[2]][0]] * 50
    broken["version"] = "rc1"
    with pytest.raises(DataError) as err:
        validate_submission(broken, test)
    message = str(err.value)
    for expected in ('"version" must be "rc2"', "1 queries have no entry", "lists its own reference", "repeated ids"):
        assert expected in message


def test_circo_submission_round_trip_and_validator(circo_images, tmp_path):
    test = load_circo(CIRCO, "test", gallery="folder", image_root=circo_images)
    query_ids = [q.query_id for q in test.queries]
    path = write_submission(tmp_path / "circo.json", circo_submission(query_ids, [test.gallery[:50]] * 800), test)
    loaded = json.loads(path.read_text())
    assert set(loaded) == {str(i) for i in range(800)}
    assert all(len(set(v)) == 50 and all(isinstance(i, int) for i in v) for v in loaded.values())
    validate_submission(path, test)
    loaded["5"] = loaded["5"][:10]
    loaded["6"] = [str(i) for i in loaded["6"]]
    loaded["7"] = loaded["7"][:49] + [999_999_999]
    with pytest.raises(DataError, match=r"(?s)5: 10 ids, 50 expected.*6: must be a list of int ids.*7: ids outside"):
        validate_submission(loaded, test)


# --------------------------------------------------------------------------- end to end at chance level
def test_random_ranking_on_cirr_val_is_at_chance(cirr_images, tmp_path):
    val = load_cirr(CIRR, "val", image_root=cirr_images)
    evaluator = Evaluator(val, HashEmbedder(), cache_root=tmp_path / "cache", progress=False)
    result = evaluator.evaluate(RandomRanking())
    q, candidates = len(val.queries), len(val.gallery) - 1  # the reference is removed from each ranking
    for k in (1, 5, 10, 50):
        p = k / candidates
        tolerance = 5 * (p * (1 - p) / q) ** 0.5 * 100 + 0.05
        assert result.metrics[f"R@{k}"] == pytest.approx(100 * p, abs=tolerance), k
    for k in (1, 2, 3):  # 5 group candidates once the reference is removed
        p = k / 5
        assert result.metrics[f"Rsubset@{k}"] == pytest.approx(100 * p, abs=5 * (p * (1 - p) / q) ** 0.5 * 100), k
    assert result.protocol["ranking"]["reference_removed"] and result.protocol["missing_images"] == 0
    assert all(q.reference not in ids for q in val.queries for ids in [result.rankings["cirr/val"][q.query_id]])


def test_engine_writes_valid_cirr_test_submissions(cirr_images, tmp_path):
    test = load_cirr(CIRR, "test", image_root=cirr_images)
    result = Evaluator(test, HashEmbedder(), cache_root=tmp_path / "cache", progress=False).evaluate(RandomRanking())
    assert result.metrics == {}  # no ground truth on test
    written = write_result_submissions(result, [test], tmp_path)
    assert [w.path.name for w in written] == ["random.cirr.test1.recall.json", "random.cirr.test1.recall_subset.json"]
    assert all(w.unanswered == 0 and w.queries == len(test.queries) for w in written)
    for w in written:
        validate_submission(w.path, test)
