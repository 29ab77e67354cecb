"""The world benchmark: exact CIRR schema, every image present, held-out scenes only, unseen phrasings."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from data_synth.shapes.benchmark import (
    FILLER_REASONS,
    GROUP_SIZE,
    QUERY_KINDS,
    BenchmarkConfig,
    load_meta,
    write_benchmark,
)
from data_synth.shapes.benchmark_phrasings import benchmark_templates, describe_edit_benchmark
from data_synth.shapes.captions import caption_matches, parse_caption
from data_synth.shapes.edits import apply_edit, edit_from_dict, sample_edit
from data_synth.shapes.instructions import matches_training_phrasing, training_templates
from data_synth.shapes.scene import Scene, SceneObject, sample_scene
from fusion_diff.benchmarks.report import EvalResult
from fusion_diff.benchmarks.shapes import (
    COMPOSITE_NEAR_MISS,
    OUTSIDE,
    TARGET,
    edit_kinds,
    first_result_reasons,
    first_result_table,
    kind_table,
    load_shapes,
    recall_at_1_by_kind,
)

SPLITS = ("val", "test1")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes_bench")
    write_benchmark(root, BenchmarkConfig(val_queries=35, test_queries=21, seed=3), workers=2, progress=False)
    return root


def _read(root: Path, rel: str):
    return json.loads((root / rel).read_text(encoding="utf-8"))


def test_files_follow_the_cirr_rc2_schema(bench):
    pairids = []
    for split in SPLITS:
        captions = _read(bench, f"captions/cap.rc2.{split}.json")
        images = _read(bench, f"image_splits/split.rc2.{split}.json")
        assert len(captions) == {"val": 35, "test1": 21}[split]
        for q in captions:
            assert set(q) == {"pairid", "reference", "target_hard", "target_soft", "caption", "img_set"}
            assert isinstance(q["pairid"], int) and isinstance(q["caption"], str) and q["caption"]
            assert q["target_soft"] == {q["target_hard"]: 1.0}
            group = q["img_set"]
            assert set(group) == {"id", "members", "reference_rank", "target_rank"}
            members = group["members"]
            assert len(members) == GROUP_SIZE == len(set(members))
            assert members[group["reference_rank"]] == q["reference"]
            assert members[group["target_rank"]] == q["target_hard"] != q["reference"]
            assert set(members) <= set(images)
            pairids.append(q["pairid"])
        folder = "dev" if split == "val" else "test1"
        for name, rel in images.items():
            assert rel == f"./{folder}/{name}.png"
            assert (bench / rel).is_file(), rel
    assert len(pairids) == len(set(pairids))


def test_every_scene_is_held_out_and_targets_are_the_edited_references(bench):
    for split in SPLITS:
        oracle = _read(bench, f"oracle/captions.{split}.json")
        assert set(oracle) == set(_read(bench, f"image_splits/split.rc2.{split}.json"))
        captions = {q["pairid"]: q for q in _read(bench, f"captions/cap.rc2.{split}.json")}
        for meta in load_meta(bench, split):
            reference, target = Scene.from_dict(meta["reference_scene"]), Scene.from_dict(meta["target_scene"])
            assert apply_edit(reference, edit_from_dict(meta["edit"])) == target
            query = captions[meta["pairid"]]
            assert caption_matches(reference, oracle[query["reference"]])
            assert caption_matches(target, oracle[query["target_hard"]])
            assert reference.is_heldout() and target.is_heldout()
        for caption in oracle.values():  # every image, negatives included, shows a held-out scene
            assert _scene_of(caption).is_heldout()


def _scene_of(canonical: str) -> Scene:
    parsed = parse_caption(canonical)
    return Scene(tuple(SceneObject(o.position, o.shape, o.colour, o.size) for o in parsed.objects), parsed.background)


def test_all_kinds_and_hard_negatives_are_present(bench):
    meta = load_meta(bench, "val")
    assert {m["kind"].split(":")[0] for m in meta} == set(QUERY_KINDS)
    reasons = {n["reason"] for m in meta for n in m["negatives"]}
    assert {"wrong_object", "wrong_value", "wrong_edit"} <= reasons


def test_benchmark_phrasings_are_disjoint_from_the_training_templates(bench):
    assert not set(benchmark_templates()) & set(training_templates())
    for split in SPLITS:
        for q in _read(bench, f"captions/cap.rc2.{split}.json"):
            assert not matches_training_phrasing(q["caption"]), q["caption"]
        for q in _read(bench, f"captions_train_phrasing/cap.rc2.{split}.json"):
            assert matches_training_phrasing(q["caption"]), q["caption"]
    rng = random.Random(0)
    for _ in range(500):  # beyond the written queries: every template and joiner, many scenes
        scene = sample_scene(rng, min_objects=2)
        edit = sample_edit(scene, rng, kinds=("recolour", "resize", "move", "add", "remove", "replace_shape"))
        if edit is not None:
            assert not matches_training_phrasing(describe_edit_benchmark(scene, edit, rng))


def test_same_seed_same_files(bench, tmp_path):
    write_benchmark(tmp_path, BenchmarkConfig(val_queries=35, test_queries=21, seed=3), workers=1, progress=False)
    for rel in ("captions/cap.rc2.val.json", "captions/cap.rc2.test1.json", "image_splits/split.rc2.test1.json"):
        assert (tmp_path / rel).read_bytes() == (bench / rel).read_bytes()
    name = next(iter(_read(bench, "image_splits/split.rc2.val.json")))
    assert (tmp_path / "dev" / f"{name}.png").read_bytes() == (bench / "dev" / f"{name}.png").read_bytes()


def test_recall_at_1_by_kind_counts_each_query_under_its_edit_kind(bench):
    data = load_shapes(bench, "val")
    kinds = edit_kinds(bench, "val")
    assert set(kinds.values()) <= set(QUERY_KINDS) | {"composite"}
    chosen = kinds[str(data.queries[0].query_id)]
    ranking = {  # the target first for the chosen kind's queries, a wrong image first for the others
        q.query_id: [q.positives[0] if kinds[str(q.query_id)] == chosen else q.reference] for q in data.queries
    }
    result = EvalResult(method="probe", metrics={}, protocol={}, rankings={data.name: ranking})
    by_kind = recall_at_1_by_kind(result, data, kinds)
    assert by_kind[chosen] == 100.0
    assert all(value == 0.0 for kind, value in by_kind.items() if kind != chosen)
    table = kind_table([result], data, kinds)
    assert f"| {chosen} | {sum(k == chosen for k in kinds.values())} | 100.0 |" in table


def test_first_result_table_says_where_each_kind_lands(bench):
    data = load_shapes(bench, "val")
    reasons = first_result_reasons(bench, "val")
    assert sorted(reasons) == sorted(str(q.query_id) for q in data.queries)
    kind_of = {qid: kind for qid, (kind, _) in reasons.items()}
    # every query's first result: one of its hard negatives where it has one, else an image outside its group
    ranking, expected = {}, Counter()
    for q in data.queries:
        kind, negatives = reasons[str(q.query_id)]
        outside = next(name for name in data.gallery if name not in q.group)
        first = next(iter(negatives), outside)
        ranking[q.query_id] = [first, q.positives[0]]
        expected[kind, negatives.get(first, OUTSIDE)] += 1
    result = EvalResult(method="probe", metrics={}, protocol={}, rankings={data.name: ranking})
    table = first_result_table(result, data, reasons)
    header = table.splitlines()[0].strip("| ").split(" | ")
    assert header[:3] == ["edit kind", "queries", TARGET] and header[-1] == OUTSIDE
    for line in table.splitlines()[2:]:
        kind, total, *cells = line.strip("| ").split(" | ")
        assert int(total) == sum(k == kind for k in kind_of.values())
        shares = dict(zip(header[2:], map(float, cells)))
        assert shares[TARGET] == 0.0 and abs(sum(shares.values()) - 100.0) < 0.5
        for (k, where), n in expected.items():
            if k == kind:
                assert abs(shares[where] - 100.0 * n / int(total)) < 0.051
    # a composite's near misses are one column; fillers keep their own reason
    composite = [negs for kind, negs in reasons.values() if kind == "composite"]
    assert composite and all(set(n.values()) <= {COMPOSITE_NEAR_MISS, *FILLER_REASONS} for n in composite)


def test_removal_analysis_counts_first_results_that_still_show_the_object(bench):
    """scripts/edit_kind_breakdown.py: a removal ranked with its own reference first (which shows the object) is
    a wrong first result that holds the very object; one ranked with its target first is not wrong."""
    import runpy

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "edit_kind_breakdown.py"))
    data = load_shapes(bench, "val")
    kinds = edit_kinds(bench, "val")
    removals = [q for q in data.queries if kinds[str(q.query_id)] == "remove"]
    assert len(removals) >= 2
    ranking = {q.query_id: [q.reference if k % 2 else q.positives[0]] for k, q in enumerate(removals)}
    result = EvalResult(method="probe", metrics={}, protocol={}, rankings={data.name: ranking})
    line = script["removed_object_kept"](result, data, bench)
    wrong = len(removals) // 2
    assert line == (
        f"probe: of {wrong} wrong first results, 100.0% still hold the very object, 100.0% one of its shape and colour"
    )
