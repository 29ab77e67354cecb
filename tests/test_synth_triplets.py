"""The shapes triplet set: determinism, manifest counts, consistency with the scene graph, resume, corruption."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from data_synth.shapes import benchmark_phrasings
from data_synth.shapes.captions import caption_matches
from data_synth.shapes.edits import apply_edit, edit_from_dict, scene_difference
from data_synth.shapes.instructions import instruction_matches_edit, open_instruction_matches
from data_synth.shapes.open_edits import open_edit_from_dict, satisfies
from data_synth.shapes.scene import Scene
from data_synth.triplets import shapes_builder
from data_synth.triplets.format import SHARD_DIR, iter_samples, iter_triplets, load_manifest, verify_dataset
from data_synth.triplets.shapes_builder import ShapesTripletConfig, build_shapes_triplets
from data_synth.triplets.stream import TripletStream
from fusion_diff.errors import CacheMismatchError, DataError

N, SHARD = 120, 40


def _build(out: Path, seed: int = 0, workers: int = 1, **kwargs):
    return build_shapes_triplets(out, N, seed=seed, shard_size=SHARD, workers=workers, progress=False, **kwargs)


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / SHARD_DIR).iterdir())}


def _manifest_without_time(root: Path) -> dict:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.pop("created")
    return manifest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("triplets") / "a"
    _build(root)
    return root


def test_same_seed_same_bytes_whatever_the_worker_count(built, tmp_path):
    _build(tmp_path / "b", workers=2)
    assert _files(tmp_path / "b") == _files(built)
    assert _manifest_without_time(tmp_path / "b") == _manifest_without_time(built)
    _build(tmp_path / "c", seed=1)
    assert _files(tmp_path / "c").keys() == _files(built).keys()
    assert all(_files(tmp_path / "c")[name] != data for name, data in _files(built).items())


def test_manifest_counts_match_the_shards(built):
    manifest = load_manifest(built)
    samples = list(iter_samples(built))
    assert manifest["num_samples"] == len(samples) == N
    labels = Counter(json.loads(s.files["json"])["edit_label"] for s in samples)
    assert manifest["counts_per_label"] == dict(labels)
    assert sum(manifest["counts_per_edit_type"].values()) == N
    assert manifest["counts_per_edit_type"]["composite"] == sum(v for k, v in labels.items() if k.startswith("composite"))
    assert [s["count"] for s in manifest["shards"]] == [SHARD] * (N // SHARD)
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(N)]  # no duplicates, no holes
    assert manifest["generator"] == shapes_builder.GENERATOR and manifest["seed"] == 0 and manifest["source"]


def test_every_triplet_is_consistent_with_its_scene_graphs(built):
    for triplet in iter_triplets(built):
        record = triplet.record
        reference, target = Scene.from_dict(record["reference_scene"]), Scene.from_dict(record["target_scene"])
        assert not reference.is_heldout() and not target.is_heldout()  # no benchmark scene in training
        assert apply_edit(reference, edit_from_dict(record["edit"])) == target
        explanations = scene_difference(reference, target)
        assert any(instruction_matches_edit(triplet.instruction, reference, d) for d in explanations), triplet.instruction
        assert caption_matches(reference, triplet.reference_caption) and caption_matches(target, triplet.target_caption)
        assert triplet.reference_image.size == triplet.target_image.size == (64, 64)


def test_no_benchmark_phrasing_in_the_training_set(built, built_open):
    benchmark = benchmark_phrasings.BENCHMARK_PHRASING
    assert benchmark.matches("the red star is gone now") and benchmark.matches("give the circle another colour")
    for root in (built, built_open):  # the check can fail (above), and never does on closed or open triplets
        for triplet in iter_triplets(root, images=False):
            assert not benchmark.matches(triplet.instruction), triplet.instruction


@pytest.fixture(scope="module")
def built_open(tmp_path_factory):
    root = tmp_path_factory.mktemp("triplets") / "open"
    _build(root, config=ShapesTripletConfig(open_probability=0.5))
    return root


def test_open_instructions_have_their_target_among_the_right_answers(built_open):
    opened = 0
    for triplet in iter_triplets(built_open, images=False):
        record = triplet.record
        if "open_edit" not in record:
            continue
        opened += 1
        reference, target = Scene.from_dict(record["reference_scene"]), Scene.from_dict(record["target_scene"])
        open_edit = open_edit_from_dict(record["open_edit"])
        assert not target.is_heldout() and satisfies(reference, open_edit, target)
        assert apply_edit(reference, edit_from_dict(record["edit"])) == target
        assert len(open_edit.realisations(reference)) >= 2 and record["edit_label"] == open_edit.kind
        assert open_instruction_matches(triplet.instruction, reference, open_edit), triplet.instruction
    assert 0.3 * N < opened < 0.7 * N
    assert "open_probability" not in ShapesTripletConfig().to_dict()  # closed-only sets keep their identity


def test_interrupted_build_resumes_to_the_same_result(built, tmp_path, monkeypatch):
    real = shapes_builder.make_shapes_shard

    def crash_on_second_shard(items, seed, config):
        if items.start == SHARD:
            raise KeyboardInterrupt("simulated kill")
        return real(items, seed, config)

    monkeypatch.setattr(shapes_builder, "make_shapes_shard", crash_on_second_shard)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _build(out)
    with pytest.raises(DataError, match="incomplete"):
        load_manifest(out)
    monkeypatch.setattr(shapes_builder, "make_shapes_shard", real)
    # what a kill can leave behind: a temp file, and a shard renamed into place without its record
    (out / SHARD_DIR / ".shard-000001.tar.abc.tmp").write_bytes(b"partial")
    (out / SHARD_DIR / "shard-000002.tar").write_bytes(b"not a finished shard")
    _build(out)
    assert _files(out) == _files(built)
    verify_dataset(out)


def test_corrupt_shard_is_reported_by_name(built, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(built, root)
    shard = root / SHARD_DIR / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard-000001.tar"):
        verify_dataset(root)
    with pytest.raises(DataError, match="shard-000001.tar"):
        list(iter_triplets(root))
    shard.write_bytes(bytes(data[:700]))  # truncated: unreadable even without the checksum
    with pytest.raises(DataError, match="shard-000001.tar"):
        list(iter_samples(root, verify=False))


def test_another_build_in_the_same_directory_is_refused(built):
    with pytest.raises(CacheMismatchError, match="seed"):
        _build(built, seed=7)
    with pytest.raises(CacheMismatchError, match="config"):
        _build(built, config=ShapesTripletConfig(image_size=32))


def test_stream_splits_shards_between_ranks(built):
    ranks = [[t.id for t in TripletStream(built, rank=r, world_size=2, images=False)] for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == [f"{i:09d}" for i in range(N)]
    epoch0 = [t.id for t in TripletStream(built, shuffle_seed=0, images=False)]
    stream = TripletStream(built, shuffle_seed=0, images=False)
    stream.set_epoch(1)
    assert sorted(epoch0) == sorted(t.id for t in stream)


def _cli(argv: list[str]) -> int:
    """Run one command through the synth CLI module alone (the full parser imports every backend)."""
    import argparse

    from fusion_diff.cli import synth

    parser = argparse.ArgumentParser(prog="fusion-diff")
    synth.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_builds_and_verifies(tmp_path, capsys):
    out = tmp_path / "cli"
    assert _cli(["synth", "shapes", "--n", "12", "--out", str(out), "--workers", "1", "--shard-size", "5"]) == 0
    assert "12 triplets in 3 shards" in capsys.readouterr().out
    assert _cli(["synth", "verify", str(out)]) == 0
    assert "all shards intact" in capsys.readouterr().out
