"""The open-edit world benchmark: CIRCO's files, every right answer a ground truth and nothing else, held out."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from data_synth.shapes.benchmark_open import OpenBenchmarkConfig, load_open_meta, write_open_benchmark
from data_synth.shapes.benchmark_phrasings import BENCHMARK_PHRASING
from data_synth.shapes.edits import apply_edit
from data_synth.shapes.instructions import matches_training_phrasing, open_instruction_matches
from data_synth.shapes.open_edits import OpenComposite, open_edit_from_dict, satisfies
from data_synth.shapes.scene import Scene
from fusion_diff.baselines.registry import create_method
from fusion_diff.benchmarks import circo_submission, load_benchmark, load_circo, validate_submission
from fusion_diff.benchmarks.evaluate import Evaluator
from fusion_diff.benchmarks.shapes import edit_kinds, kind_table
from fusion_diff.errors import DataError

# The official CIRCO val annotation's fields, less the optional ``semantic_aspects``.
CIRCO_FIELDS = {"id", "reference_img_id", "relative_caption", "shared_concept", "target_img_id", "gt_img_ids"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes_open")
    write_open_benchmark(root, OpenBenchmarkConfig(val_queries=6, test_queries=6, seed=4), workers=1, progress=False)
    return root


def _annotations(root: Path, split: str) -> list[dict]:
    return json.loads((root / "annotations" / f"{split}.json").read_text(encoding="utf-8"))


def _gallery(root: Path) -> dict[int, Scene]:
    scenes = json.loads((root / "meta" / "gallery.json").read_text(encoding="utf-8"))
    return {int(i): Scene.from_dict(s) for i, s in scenes.items()}


def test_files_are_circo_and_load_with_the_circo_loader(bench):
    val = load_circo(bench, "val")  # the real CIRCO loader, strict: schema, split, every image and ground truth
    assert val.benchmark == "circo" and val.has_ground_truth and not val.missing
    assert all(set(entry) == CIRCO_FIELDS for split in ("val", "test") for entry in _annotations(bench, split))
    with pytest.raises(DataError, match="test"):
        load_circo(bench, "test")  # the real CIRCO test split hides its ground truths; this world keeps them
    (test,) = load_benchmark("shapes-open", bench, "test")
    assert test.benchmark == "shapes-open" and test.has_ground_truth and not test.exclude_reference
    assert set(test.gallery) == set(val.gallery) == {str(i) for i in _gallery(bench)}  # one shared gallery
    submission = circo_submission([q.query_id for q in val.queries], [list(val.gallery[:50])] * len(val.queries))
    validate_submission(submission, val)


def test_ground_truths_are_exactly_the_right_answers(bench):
    gallery = _gallery(bench)
    assert all(scene.is_heldout() for scene in gallery.values())
    kinds = set()
    for split in ("val", "test"):
        for entry, meta in zip(_annotations(bench, split), load_open_meta(bench, split), strict=True):
            reference = gallery[entry["reference_img_id"]]
            edit = open_edit_from_dict(meta["edit"])
            assert Scene.from_dict(meta["reference_scene"]) == reference
            # The instruction, read back by the benchmark phrasing's grammar, states exactly this open edit ...
            assert open_instruction_matches(entry["relative_caption"], reference, edit, BENCHMARK_PHRASING)
            assert not matches_training_phrasing(entry["relative_caption"]), entry["relative_caption"]
            assert open_instruction_matches(meta["train_phrasing"], reference, edit)
            # ... and the gallery images that answer it (scene-graph difference) are its ground truths, no other.
            right = {i for i, scene in gallery.items() if satisfies(reference, edit, scene)}
            assert set(entry["gt_img_ids"]) == right and len(right) >= 2
            assert entry["target_img_id"] == entry["gt_img_ids"][0]
            assert {n["id"] for n in meta["negatives"]}.isdisjoint(right) and len(meta["negatives"]) == 4
            assert meta["right_answers"]["held_out"] >= 2
            kinds.add(meta["kind"])
    assert kinds == {"recolour_any", "reshape_any", "resize_one_of", "add_anywhere", "move_to_region", "composite"}


def test_realisations_and_satisfies_agree():
    """The enumerated realisations and the structural check are two implementations of one meaning."""
    from data_synth.shapes.benchmark_phrasings import BENCHMARK_KINDS
    from data_synth.shapes.open_edits import sample_open_edit
    from data_synth.shapes.scene import sample_scene

    rng = random.Random(7)
    checked = 0
    for i in range(300):
        scene = sample_scene(rng, min_objects=2)
        edit = sample_open_edit(scene, rng, composite_with=BENCHMARK_KINDS if i % 2 else None)
        if edit is None:
            continue
        answers = {apply_edit(scene, r) for r in edit.realisations(scene)}
        assert len(answers) >= 2 and all(satisfies(scene, edit, a) for a in answers)
        assert not satisfies(scene, edit, scene)
        if isinstance(edit, OpenComposite):  # its closed part alone, or its open part alone, is not an answer
            assert not satisfies(scene, edit, apply_edit(scene, edit.closed))
            for realisation in edit.realisations(scene):
                try:
                    open_only = apply_edit(scene, realisation.second)
                except ValueError:  # the open part needs the scene after the closed one
                    continue
                assert not satisfies(scene, edit, open_only)
        checked += 1
    assert checked > 250


def test_the_evaluator_scores_it_with_circo_metrics(bench, tiny_openclip):
    (unit,) = load_benchmark("shapes-open", bench, "test")
    result = Evaluator(unit, tiny_openclip, progress=False).evaluate(create_method("image-only"))
    assert sorted(result.metrics) == ["mAP@10", "mAP@25", "mAP@5", "mAP@50"]
    assert all(0.0 <= v <= 100.0 for v in result.metrics.values())
    assert result.protocol["benchmark"] == "shapes-open" and not result.protocol["ranking"]["reference_removed"]
    kinds = edit_kinds(bench, "test", benchmark="shapes-open")
    assert sorted(kinds) == sorted(q.query_id for q in unit.queries)
    table = kind_table([result], unit, kinds)
    assert "| add_anywhere | 1 |" in table and "| composite | 1 |" in table


def test_world_and_eval_commands(tmp_path, tiny_openclip_checkpoint, capsys):
    from fusion_diff.cli import main

    root = tmp_path / "open"
    assert main(["world", "benchmark-open", "--out", str(root), "--val", "6", "--test", "6", "--workers", "1"]) == 0
    assert "ground truths per query" in capsys.readouterr().out
    name, checkpoint = tiny_openclip_checkpoint
    out = tmp_path / "eval"
    argv = ["eval", "--benchmark", "shapes-open", "--split", "test", "--root", str(root), "--model", name,
            "--pretrained", str(checkpoint), "--method", "image-only", "--method", "oracle-target-text",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 0
    records = json.loads((out / "shapes-open-test.json").read_text())
    assert [r["method"] for r in records] == ["image-only", "oracle-target-text"]
    assert all("mAP@5" in r["metrics"] for r in records) and not list(out.glob("*submission*"))


def test_same_seed_same_files(bench, tmp_path):
    write_open_benchmark(
        tmp_path, OpenBenchmarkConfig(val_queries=6, test_queries=6, seed=4), workers=2, progress=False
    )
    for rel in ("annotations/val.json", "annotations/test.json", "meta/gallery.json"):
        assert (tmp_path / rel).read_bytes() == (bench / rel).read_bytes()
    images = sorted(p.name for p in (bench / "COCO2017_unlabeled" / "unlabeled2017").iterdir())
    assert images == sorted(p.name for p in (tmp_path / "COCO2017_unlabeled" / "unlabeled2017").iterdir())
    assert all(
        (bench / "COCO2017_unlabeled" / "unlabeled2017" / n).read_bytes()
        == (tmp_path / "COCO2017_unlabeled" / "unlabeled2017" / n).read_bytes()
        for n in images
    )
