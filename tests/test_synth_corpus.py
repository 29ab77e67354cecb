"""Real-corpus caption edits: corpus readers, keyword rules, the optional LLM path, the triplet build."""

from __future__ import annotations

import json
import random

import pytest

from data_synth.triplets.corpus_edits import (
    RULES,
    CorpusEditConfig,
    LLMCaptionEditor,
    build_corpus_triplets,
    read_corpus,
    rule_edit,
)
from data_synth.triplets.format import iter_triplets
from fusion_diff.errors import DataError, MissingFileError

CAPTIONS = [
    "a red car parked next to a wooden bench",
    "two dogs playing in the snow",
    "a photo of a small cat with a blue hat",
    "a woman holding an umbrella",
    "sunset",
]


def test_corpus_readers(tmp_path):
    (tmp_path / "c.txt").write_text("a red car\n\n  a blue bus \n")
    assert [(i.id, i.caption) for i in read_corpus(tmp_path / "c.txt")] == [("0", "a red car"), ("2", "a blue bus")]
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": "x", "text": "a cat", "image": "img/x.png"}) + "\n")
    item = read_corpus(tmp_path / "c.jsonl", caption_field="text")[0]
    assert (item.id, item.caption, item.image) == ("x", "a cat", str(tmp_path / "img/x.png"))
    (tmp_path / "c.csv").write_text("caption,id\na dog,7\n")
    assert read_corpus(tmp_path / "c.csv")[0].id == "7"
    with pytest.raises(DataError, match=r"c\.jsonl.*'caption'"):
        read_corpus(tmp_path / "c.jsonl")
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1"):
        read_corpus(tmp_path / "bad.jsonl")
    with pytest.raises(MissingFileError, match="nope.txt"):
        read_corpus(tmp_path / "nope.txt")


@pytest.mark.parametrize(
    "kind, caption, target_has, instruction_has",
    [
        ("colour", "a red car on the road", None, "car"),
        ("object", "a dog on the sofa", None, None),
        ("count", "two dogs playing in the snow", "dogs", "dogs"),
        ("count", "a cat on a mat", "cats", "cats"),
        ("material", "a wooden table in a kitchen", "table", "table"),
        ("size", "a small cat on a mat", "large cat", "large"),
        ("style", "a photo of a lake", "of a lake", None),
        ("add", "a lake at dawn", "a lake at dawn", None),
        ("remove", "a man riding a bicycle with a dog", None, "dog"),
    ],
)
def test_rule_edits(kind, caption, target_has, instruction_has):
    edit = RULES[kind](caption, random.Random(0))
    assert edit is not None and edit.kind == kind and edit.target != caption
    if target_has:
        assert target_has in edit.target
    if instruction_has:
        assert instruction_has in edit.instruction
    if edit.new and kind not in ("remove", "count"):
        assert edit.new in edit.target and edit.new in edit.instruction
    if edit.old and kind in ("colour", "material", "object", "size"):
        assert edit.old not in edit.target.split()


def test_rule_edit_returns_none_when_nothing_applies():
    assert rule_edit("sunset", random.Random(0), kinds=("colour", "count", "remove")) is None


def test_corpus_build_counts_drops_and_is_deterministic(tmp_path):
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(CAPTIONS))
    config = CorpusEditConfig(corpus=str(corpus), kinds=("colour", "count", "size", "remove"))
    manifest = build_corpus_triplets(tmp_path / "a", config, seed=0, shard_size=2, progress=False)
    assert manifest["dropped"] == {"llm_fallback_to_rule": 0, "no_applicable_rule": 1}  # "sunset"
    assert manifest["num_samples"] == 4 and sum(manifest["counts_per_edit_type"].values()) == 4
    triplets = list(iter_triplets(tmp_path / "a"))
    assert [t.reference_caption for t in triplets] == CAPTIONS[:4]
    assert all(t.reference_image is None and t.target_caption != t.reference_caption for t in triplets)
    build_corpus_triplets(tmp_path / "b", config, seed=0, shard_size=2, progress=False)
    names = sorted(p.name for p in (tmp_path / "a" / "shards").iterdir())
    assert all((tmp_path / "a" / "shards" / n).read_bytes() == (tmp_path / "b" / "shards" / n).read_bytes() for n in names)


def test_llm_output_is_parsed_and_bad_output_falls_back_to_rules(monkeypatch):
    editor = LLMCaptionEditor.__new__(LLMCaptionEditor)
    editor.max_new_tokens = 8
    editor.generator = lambda prompt, **kw: [{"generated_text": " make the car blue\nEdited caption: a blue car\n"}]
    edit = editor.edit("a red car")
    assert (edit.instruction, edit.target, edit.method) == ("make the car blue", "a blue car", "llm")
    editor.generator = lambda prompt, **kw: [{"generated_text": "gibberish"}]
    assert editor.edit("a red car") is None
