"""Caption editing (issue 18): the world's T5 editor, its folder, the edited-caption method and Fusion-Diff's term."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_models import one_thread  # noqa: F401  (autouse fixture)
from test_pipeline import FakeEmbedder, context, make_pipeline

from data_synth.shapes.blip import build_caption_tokenizer
from data_synth.shapes.caption_editor import (
    PROMPT,
    CaptionEditorWorldConfig,
    EditRow,
    build_world_caption_editor,
    editor_rows,
    instruction_positions,
    train_caption_editor,
)
from data_synth.shapes.captions import canonical_caption
from data_synth.shapes.scene import Scene
from data_synth.triplets.format import iter_triplets
from data_synth.triplets.shapes_builder import build_shapes_triplets
from fusion_diff.baselines.registry import create_method
from fusion_diff.captioning.editor import EDITOR_CONFIG, CaptionEditor, edited_caption_embeddings
from fusion_diff.errors import ConfigError, DataError, MissingFileError
from fusion_diff.pipelines import FusionDiffMethod

ROWS = [
    EditRow("a large red circle at the top left on a white background", "remove the red circle", "on a white background"),
    EditRow("a small blue star at the center on a black background", "make the star red", "a small red star at the center on a black background"),
    EditRow("a large red circle at the top left on a white background", "make the circle blue", "a large blue circle at the top left on a white background"),
    EditRow("a small blue star at the center on a black background", "delete the blue star", "on a black background"),
]  # fmt: skip
TINY = CaptionEditorWorldConfig(width=64, layers=1, head_dim=32, max_length=32)


@pytest.fixture(scope="module")
def tiny_editor() -> CaptionEditor:
    """A world editor that has learned ``ROWS`` by heart (a few hundred steps on four rows)."""
    return train_caption_editor(ROWS, steps=300, batch_size=8, learning_rate=3e-3, model_config=TINY, progress=False)


def test_the_world_editor_learns_its_rows_and_writes_them_back_word_for_word(tiny_editor):
    edited = tiny_editor.edit([r.caption for r in ROWS], [r.instruction for r in ROWS], batch_size=3)
    assert edited == [r.edited for r in ROWS]
    assert tiny_editor.prompt == PROMPT and tiny_editor.identity["type"] == "seq2seq"


def test_a_saved_editor_loads_with_its_prompt_and_edits_the_same(tiny_editor, tmp_path):
    folder = tiny_editor.save_pretrained(tmp_path / "editor")
    assert json.loads((folder / EDITOR_CONFIG).read_text())["prompt"] == PROMPT
    loaded = CaptionEditor.from_pretrained(folder)
    captions, instructions = [r.caption for r in ROWS], [r.instruction for r in ROWS]
    assert loaded.edit(captions, instructions) == tiny_editor.edit(captions, instructions)
    assert loaded.prompt == PROMPT and loaded.identity["weights"]  # a folder's weights are named in protocol lines
    with pytest.raises(MissingFileError, match="HF_HUB_OFFLINE"):
        CaptionEditor.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(DataError, match="2 captions for 1 instructions"):
        loaded.edit(captions[:2], instructions[:1])
    with pytest.raises(ConfigError, match="no \\{instruction\\} slot"):
        CaptionEditor(loaded.model, loaded.tokenizer, prompt="{caption}")


def test_editor_rows_are_the_triplets_canonical_captions_and_the_folder_is_cached(tmp_path):
    triplets = tmp_path / "triplets"
    build_shapes_triplets(triplets, 6, seed=0, shard_size=3, progress=False)
    rows = editor_rows(triplets)
    for row, triplet in zip(rows, iter_triplets(triplets, images=False)):
        assert row.caption == canonical_caption(Scene.from_dict(triplet.record["reference_scene"]))
        assert row.edited == canonical_caption(Scene.from_dict(triplet.record["target_scene"]))
        assert row.instruction == triplet.instruction
    small = dict(batch_size=4, model_config=CaptionEditorWorldConfig(width=64, layers=1), progress=False, rows=0)
    out = build_world_caption_editor(triplets, tmp_path / "editor", steps=2, **small)
    manifest = (out / "manifest.json").read_text()
    assert json.loads(manifest)["rows"] == 6 and "rows" not in json.loads(manifest)["config"]  # earlier folders stay valid
    again = build_world_caption_editor(triplets, out, steps=2, **small)
    assert (again / "manifest.json").read_text() == manifest  # reused, not retrained
    other = build_world_caption_editor(triplets, out, steps=3, **small)
    assert json.loads((other / "manifest.json").read_text())["config"]["steps"] == 3  # other settings: replaced
    with pytest.raises(ConfigError, match="not empty and was not written as a shapes_caption_editor folder"):
        build_world_caption_editor(triplets, triplets, steps=2, **small)  # never deleted
    assert editor_rows(triplets)


def test_editor_rows_are_topped_up_by_the_items_the_sets_generator_makes_next(tmp_path):
    build_shapes_triplets(tmp_path / "four", 4, seed=3, shard_size=4, progress=False)
    build_shapes_triplets(tmp_path / "seven", 7, seed=3, shard_size=7, progress=False)
    assert editor_rows(tmp_path / "four", total=7) == editor_rows(tmp_path / "seven")  # captions only, nothing rendered
    assert editor_rows(tmp_path / "four", total=2) == editor_rows(tmp_path / "four")  # never fewer than its own


def test_word_dropout_reaches_the_instruction_words_only():
    prompts = [PROMPT.format(caption=r.caption, instruction=r.instruction) for r in ROWS]
    tokenizer = build_caption_tokenizer([*prompts, *(r.edited for r in ROWS)])
    tokens = tokenizer(prompts, padding="longest", return_tensors="pt")
    where = instruction_positions(tokenizer, ROWS, tokens.attention_mask)
    for row, ids, chosen in zip(ROWS, tokens.input_ids, where):
        words = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(row.instruction))
        assert ids[chosen].tolist() == words  # every instruction word, nothing of the caption, "|" or [SEP]
    with pytest.raises(ConfigError, match="instruction_dropout"):
        train_caption_editor(ROWS, steps=1, model_config=TINY, instruction_dropout=1.0)


def test_a_caption_too_long_for_the_editor_is_refused_not_cut():
    with pytest.raises(ConfigError, match="longest prompt .* Raise CaptionEditorWorldConfig.max_length"):
        train_caption_editor(ROWS, steps=1, model_config=CaptionEditorWorldConfig(width=64, layers=1, max_length=8))


def test_edited_caption_method_embeds_the_edited_caption(tiny_editor):
    embedder = FakeEmbedder()
    ctx = context(embedder, fused=True)
    method = create_method("edited-caption", caption_editor=tiny_editor)
    edited = tiny_editor.edit(ctx.reference_captions, ctx.modification_texts)
    torch.testing.assert_close(method.query_embeddings(ctx), F.normalize(embedder.embed_texts(edited), dim=-1))
    assert method.protocol()["caption_editor"] == tiny_editor.identity and method.gallery_mode == "fused"
    with pytest.raises(DataError, match="configure a captioner"):
        method.query_embeddings(context(embedder, fused=False))
    with pytest.raises(ConfigError, match="edited-caption.caption_editor=DIR"):
        create_method("edited-caption")


@pytest.mark.parametrize("reduction", ["mean", "max"])
def test_fusion_diff_adds_the_weighted_edited_caption_to_its_query(tiny_editor, reduction):
    pipe = make_pipeline()
    pipe.embedder = FakeEmbedder()
    ctx = context(pipe.embedder, fused=True)
    settings = dict(num_inference_steps=2, seed=3, num_samples=2, sample_reduction=reduction)
    plain = FusionDiffMethod(pipe, **settings).query_embeddings(ctx)
    method = FusionDiffMethod(pipe, caption_editor=tiny_editor, edited_caption_weight=0.7, **settings)
    edited = edited_caption_embeddings(tiny_editor, ctx.reference_captions, ctx.modification_texts, pipe.embedder, "x")
    edited = edited.unsqueeze(1) if plain.ndim == 3 else edited
    torch.testing.assert_close(method.query_embeddings(ctx), F.normalize(plain + 0.7 * edited, dim=-1))
    assert method.protocol()["edited_caption_weight"] == 0.7
    assert method.protocol()["caption_editor"] == tiny_editor.identity
    assert "caption_editor" not in FusionDiffMethod(pipe, **settings).protocol()  # off: protocols as before
    with pytest.raises(ConfigError, match="go together"):
        FusionDiffMethod(pipe, caption_editor=tiny_editor)
    with pytest.raises(ConfigError, match="go together"):
        FusionDiffMethod(pipe, edited_caption_weight=1.0)
