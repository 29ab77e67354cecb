"""Scene-graph edits and their training instructions: validity, re-derivation, parse-back."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from data_synth.shapes.edits import (
    ALL_KINDS,
    CompositeEdit,
    Edit,
    apply_edit,
    edit_from_dict,
    sample_edit,
    scene_difference,
)
from data_synth.shapes import benchmark_phrasings
from data_synth.shapes.instructions import (
    OPEN_TEMPLATES,
    REGION_WORDS,
    Phrasing,
    compile_template,
    describe_edit,
    describe_open_edit,
    instruction_matches_edit,
    open_instruction_matches,
    matches_training_phrasing,
    refer,
    resolve,
    training_templates,
)
from data_synth.shapes.open_edits import OPEN_KINDS, REGIONS, OpenEdit, sample_open_edit
from data_synth.shapes.scene import Scene, SceneObject, sample_scene


def _obj(row, col, shape="circle", colour="red", size="small"):
    return SceneObject(position=(row, col), shape=shape, colour=colour, size=size)


def _sampled(n=1500, seed=0, **kwargs):
    rng = random.Random(seed)
    for _ in range(n):
        scene = sample_scene(rng)
        edit = sample_edit(scene, rng, **kwargs)
        if edit is not None:
            yield scene, edit, rng


def test_sampled_edits_are_valid_and_rederived_from_the_scene_difference():
    kinds = Counter()
    for scene, edit, _ in _sampled():
        target = apply_edit(scene, edit)
        assert target != scene
        assert edit in scene_difference(scene, target)
        assert edit_from_dict(edit.to_dict()) == edit
        kinds.update(edit.kinds)
        if isinstance(edit, CompositeEdit):  # a composite is never reachable by one edit
            assert all(isinstance(d, CompositeEdit) for d in scene_difference(scene, target))
    assert set(kinds) == set(ALL_KINDS)


def test_edit_preconditions():
    full = Scene(tuple(_obj(0, c, shape=s) for c, s in enumerate(("circle", "star", "heart"))) + (_obj(1, 0, "cross"),))
    single = Scene((_obj(1, 1),))
    rng = random.Random(0)
    assert sample_edit(full, rng, kinds=("add",), allow_composite=False) is None  # no room for a 5th object
    assert sample_edit(single, rng, kinds=("remove",), allow_composite=False) is None  # would empty the scene
    assert sample_edit(single, rng, kinds=("swap",), allow_composite=False) is None
    twins = Scene((_obj(0, 0), _obj(2, 2)))
    assert sample_edit(twins, rng, kinds=("swap",), allow_composite=False) is None  # swapping twins changes nothing
    with pytest.raises(ValueError, match="not in the scene"):
        apply_edit(single, Edit("remove", (_obj(0, 0),)))
    with pytest.raises(ValueError, match="unknown edit kinds"):
        sample_edit(single, rng, kinds=("explode",))


def test_scene_difference_distinguishes_kinds():
    a = Scene((_obj(0, 0, "circle", "red"), _obj(1, 1, "star", "blue")))
    assert scene_difference(a, a) == []
    recoloured = a.with_objects((_obj(0, 0, "circle", "green"), _obj(1, 1, "star", "blue")))
    assert scene_difference(a, recoloured) == [Edit("recolour", (_obj(0, 0, "circle", "red"),), "green")]
    more = a.with_objects(a.objects + (_obj(2, 2, "circle", "red"),))
    assert [d.kind for d in scene_difference(a, more)] == ["change_count"]  # a second red circle: a count change
    new_kind = a.with_objects(a.objects + (_obj(2, 2, "heart", "red"),))
    assert [d.kind for d in scene_difference(a, new_kind)] == ["add"]
    swapped = a.with_objects((_obj(1, 1, "circle", "red"), _obj(0, 0, "star", "blue")))
    assert [d.kind for d in scene_difference(a, swapped)] == ["swap"]


def test_sampling_is_deterministic_under_a_seed():
    first = [(s, e) for s, e, _ in _sampled(200, seed=3)]
    second = [(s, e) for s, e, _ in _sampled(200, seed=3)]
    assert first == second
    assert first != [(s, e) for s, e, _ in _sampled(200, seed=4)]


def test_referring_expressions_are_unambiguous():
    rng = random.Random(1)
    for _ in range(500):
        scene = sample_scene(rng)
        for obj in scene.objects:
            assert resolve(scene, refer(scene, obj, rng)) == obj


def test_every_instruction_parses_back_to_its_edit():
    for scene, edit, rng in _sampled(1500, seed=2):
        text = describe_edit(scene, edit, rng)
        assert matches_training_phrasing(text), text
        assert instruction_matches_edit(text, scene, edit), (text, edit)


def test_a_wrong_instruction_is_rejected():
    scene = Scene((_obj(0, 0, "circle", "red"), _obj(1, 1, "star", "blue")))
    edit = Edit("recolour", (_obj(0, 0, "circle", "red"),), "green")
    assert instruction_matches_edit("make the circle green", scene, edit)
    assert not instruction_matches_edit("make the circle yellow", scene, edit)
    assert not instruction_matches_edit("make the star green", scene, edit)
    assert not instruction_matches_edit("paint it a nice shade of green", scene, edit)


def test_a_negated_removal_names_the_only_object_of_its_kind():
    red_star, blue_star = _obj(0, 0, "star", "red"), _obj(1, 1, "star", "blue")
    scene = Scene((red_star, blue_star))
    edit = Edit("remove", (red_star,))
    assert instruction_matches_edit("no more red star", scene, edit)
    assert instruction_matches_edit("there should be no red star", scene, edit)
    assert not instruction_matches_edit("no more blue star", scene, edit)
    # two red stars: "no more red star" would remove both, not the one edited
    two = Scene((red_star, _obj(2, 2, "star", "red"), blue_star))
    assert not instruction_matches_edit("no more red star", two, Edit("remove", (red_star,)))
    # asked for, removals are sometimes worded so, and every such instruction still parses back to its edit
    texts = []
    for scene, edit, rng in _sampled(300, seed=3, kinds=("remove",)):
        texts.append(text := describe_edit(scene, edit, rng, negated_removals=True))
        assert instruction_matches_edit(text, scene, edit), (text, edit)
    assert any(t.startswith(("no more", "there should be no")) for t in texts)


def test_training_and_benchmark_phrasings_are_disjoint():
    rng = random.Random(5)
    checked = 0
    for scene, edit, _ in _sampled(600, seed=5, kinds=benchmark_phrasings.BENCHMARK_KINDS):
        text = benchmark_phrasings.describe_edit_benchmark(scene, edit, rng)
        assert not matches_training_phrasing(text), text
        checked += 1
    assert checked > 500
    assert not set(training_templates()) & set(benchmark_phrasings.benchmark_templates())


def test_a_benchmark_instruction_is_traced_back_to_its_template():
    rng = random.Random(7)
    seen = set()
    for scene, edit, _ in _sampled(600, seed=7, kinds=benchmark_phrasings.BENCHMARK_KINDS):
        text = benchmark_phrasings.describe_edit_benchmark(scene, edit, random.Random(rng.random()))
        template = benchmark_phrasings.phrasing_of(text, edit.kind)
        if isinstance(edit, CompositeEdit):  # two templates joined: no single wording, not even its first part's
            assert template is None and benchmark_phrasings.phrasing_of(text, edit.first.kind) is None, text
            continue
        key = f"resize:{edit.value}" if edit.kind == "resize" else edit.kind
        assert template in benchmark_phrasings.TEMPLATES[key], (text, template)
        assert benchmark_phrasings.phrasing_of(text, "move" if edit.kind != "move" else "add") is None
        seen.add(template)
    assert "keep everything except {obj}" in seen and len(seen) > 25


def test_open_phrasings_read_back_and_stay_disjoint():
    """Open instructions: the training and benchmark wordings each parse back to the open edit, and no
    benchmark wording (open or composite with a closed part) parses as any training phrasing."""
    assert set(OPEN_TEMPLATES) == set(benchmark_phrasings.OPEN_TEMPLATES) and set(REGION_WORDS) == set(REGIONS)
    rng = random.Random(11)
    checked = Counter()
    for i in range(500):
        scene = sample_scene(rng, min_objects=2)
        edit = sample_open_edit(scene, rng, composite_with=benchmark_phrasings.BENCHMARK_KINDS if i % 3 == 0 else None)
        if edit is None:
            continue
        training = describe_open_edit(scene, edit, rng)
        benchmark = benchmark_phrasings.describe_open_edit_benchmark(scene, edit, rng)
        assert matches_training_phrasing(training) and open_instruction_matches(training, scene, edit), training
        assert open_instruction_matches(benchmark, scene, edit, benchmark_phrasings.BENCHMARK_PHRASING), benchmark
        assert not matches_training_phrasing(benchmark), benchmark
        checked[edit.kind if isinstance(edit, OpenEdit) else "composite"] += 1
    assert len(checked) == len(OPEN_KINDS) + 1 and min(checked.values()) >= 10
    scene = Scene((_obj(0, 0, "square", "red"), _obj(1, 1, "square", "blue"), _obj(2, 2, "star", "green")))
    one_of = OpenEdit("resize_one_of", scene.objects[:2], "large")
    assert open_instruction_matches("make one of the squares bigger", scene, one_of, benchmark_phrasings.BENCHMARK_PHRASING)
    assert not open_instruction_matches("make one of the stars bigger", scene, one_of, benchmark_phrasings.BENCHMARK_PHRASING)


def test_phrasing_grammar_reads_templates_back():
    grammar = Phrasing({"recolour": ("make {obj} {colour}",)}, [("first ", ", then ")])
    assert [p.key for p in grammar.parse_single("make the red circle blue")] == ["recolour"]
    assert len(grammar.parse("first make the star red, then make the circle blue")[0]) == 2
    assert not grammar.matches("make the circle bluish")
    with pytest.raises(ValueError, match="slot"):
        compile_template("make {obj} {mood}")
