"""The shapes world's caption editor: a small T5 that learns to edit captions from the synthetic triplets.

In real data an instruction-tuned language model (FLAN-T5, an LLM) edits a captioner's caption as the instruction
says. The world has no such model, so it trains one the way instruction-following editors are fine-tuned: on
(caption, instruction, edited caption) rows of the synthetic triplet set (training scenes, the training
generator's phrasings; never a benchmark's). Captions are the canonical form the scene captioner writes
(``canonical_caption`` of each triplet's two scenes), so the editor reads and writes what the demo's captioner
produces. A ``transformers`` ``T5ForConditionalGeneration`` with a word-level tokenizer over the rows' words
(``blip.build_caption_tokenizer``); saved with ``save_pretrained`` and loaded like any checkpoint by
``fusion_diff.captioning.editor.CaptionEditor``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from data_synth.shapes.blip import build_caption_tokenizer, descend, one_cycle, padded_tokens
from data_synth.shapes.captions import canonical_caption
from data_synth.shapes.scene import Scene
from data_synth.triplets.format import iter_triplets, load_manifest
from data_synth.triplets.shapes_builder import ShapesTripletConfig, make_triplet_record
from fusion_diff.captioning.editor import CaptionEditor
from fusion_diff.errors import ConfigError, DataError
from fusion_diff.utils.io import build_cached_folder, drop_when_off

MANIFEST_KIND = "shapes_caption_editor"
PROMPT = "{caption} | {instruction}"  # the world model's input; a real LLM gets CaptionEditor's DEFAULT_PROMPT
DEFAULT_STEPS = 6000
# Share of instruction words replaced by [UNK] in each training batch (word dropout): a benchmark's unseen verb
# reaches the model as [UNK], so it learns to read an edit from the rest of the instruction and the caption.
INSTRUCTION_DROPOUT = 0.15


@dataclass(frozen=True)
class CaptionEditorWorldConfig:
    """The world editor's T5: small enough to train on 2 CPU cores in minutes."""

    width: int = 128
    layers: int = 2  # encoder and decoder each
    head_dim: int = 32
    max_length: int = 96  # tokens of a prompt or an edited caption, [BOS] and [SEP] included

    def t5_config(self, tokenizer):
        from transformers import T5Config

        return T5Config(
            vocab_size=len(tokenizer),
            d_model=self.width,
            d_kv=self.head_dim,
            d_ff=4 * self.width,
            num_layers=self.layers,
            num_decoder_layers=self.layers,
            num_heads=self.width // self.head_dim,
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.bos_token_id,
        )


@dataclass(frozen=True)
class EditRow:
    caption: str
    instruction: str
    edited: str


def editor_rows(triplet_dir: str | os.PathLike, total: int = 0) -> list[EditRow]:
    """(canonical reference caption, instruction, canonical target caption) of every triplet of a shapes set, then,
    up to ``total`` rows, those of the items its generator makes next (same seed and config, indices after the
    set's own: training scenes and training phrasings, captions only). ``total`` at or below the set's size: the
    set's own rows alone."""
    rows = []
    for triplet in iter_triplets(triplet_dir, images=False):
        record = triplet.record
        if "reference_scene" not in record or "target_scene" not in record:
            raise DataError(
                f"Triplet {triplet.id} of {triplet_dir} has no scene graphs: the world caption editor learns from "
                "shapes-world triplets (`fusion-diff synth shapes`). For real captions use a pretrained seq2seq "
                "editor (CaptionEditor('google/flan-t5-large'))."
            )
        rows.append(_edit_row(record))
    if not rows:
        raise DataError(f"{triplet_dir} holds no triplets to train a caption editor on.")
    if total > len(rows):
        manifest = load_manifest(triplet_dir)
        settings = dict(manifest["config"], kinds=tuple(manifest["config"]["kinds"]))
        config, start = ShapesTripletConfig(**settings), int(manifest["num_requested"])
        more = range(start, start + total - len(rows))
        rows += [_edit_row(make_triplet_record(manifest["seed"], index, config)[0]) for index in more]
    return rows


def _edit_row(record: dict[str, Any]) -> EditRow:
    reference, target = Scene.from_dict(record["reference_scene"]), Scene.from_dict(record["target_scene"])
    return EditRow(canonical_caption(reference), record["instruction"], canonical_caption(target))


def instruction_positions(tokenizer, rows: Sequence[EditRow], source_mask: torch.Tensor) -> torch.Tensor:
    """``[N, L]`` True at each prompt's instruction tokens: after "[BOS] caption |", before the final [SEP]."""
    prefix = tokenizer([PROMPT.split("{instruction}")[0].format(caption=r.caption).rstrip() for r in rows]).input_ids
    positions = torch.arange(source_mask.shape[1])
    start = torch.tensor([len(p) - 1 for p in prefix])[:, None]  # the prefix's own [SEP] is not in the prompt
    return (positions >= start) & (positions < source_mask.sum(1, keepdim=True) - 1)


def train_caption_editor(
    rows: Sequence[EditRow],
    steps: int = DEFAULT_STEPS,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    model_config: CaptionEditorWorldConfig = CaptionEditorWorldConfig(),
    progress: bool = True,
    instruction_dropout: float = INSTRUCTION_DROPOUT,
) -> CaptionEditor:
    """Train the world's T5 on ``rows`` (teacher forcing, next-token loss, AdamW with a one-cycle schedule);
    tokens are prepared once and each step draws a random batch, cut to its longest row, with
    ``instruction_dropout`` of its instruction words replaced by [UNK]."""
    from transformers import T5ForConditionalGeneration

    if steps < 1 or batch_size < 1:
        raise ConfigError(f"steps and batch_size must be positive, got {steps} and {batch_size}.")
    if not rows:
        raise ConfigError("train_caption_editor needs at least one row.")
    if not 0 <= instruction_dropout < 1:
        raise ConfigError(f"instruction_dropout must be in [0, 1), got {instruction_dropout}.")
    torch.manual_seed(seed)
    prompts = [PROMPT.format(caption=r.caption, instruction=r.instruction) for r in rows]
    tokenizer = build_caption_tokenizer([*prompts, *(r.edited for r in rows)])
    fix = "CaptionEditorWorldConfig.max_length"
    source, source_mask = padded_tokens(tokenizer, prompts, model_config.max_length, "prompt", fix)
    target, target_mask = padded_tokens(tokenizer, [r.edited for r in rows], model_config.max_length, "edited caption", fix)
    in_instruction = instruction_positions(tokenizer, rows, source_mask)
    model = T5ForConditionalGeneration(model_config.t5_config(tokenizer))
    optimizer, schedule = one_cycle(model, learning_rate, steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="training world caption editor", disable=not progress)
    for _ in bar:
        batch = torch.randint(len(rows), (batch_size,), generator=generator)
        mask = source_mask[batch]
        width = int(mask.sum(1).max())
        drop = in_instruction[batch, :width] & (torch.rand(batch_size, width, generator=generator) < instruction_dropout)
        out_mask = target_mask[batch]
        out_width = int(out_mask.sum(1).max())
        edited = target[batch, :out_width]  # [BOS] words [SEP]: the decoder reads all but the last, predicts the rest
        labels = edited[:, 1:].masked_fill(out_mask[:, 1:out_width] == 0, -100)
        loss = model(
            input_ids=source[batch, :width].masked_fill(drop, tokenizer.unk_token_id),
            attention_mask=mask[:, :width],
            decoder_input_ids=edited[:, :-1],
            labels=labels.contiguous(),
        ).loss
        descend(model, loss, optimizer, schedule)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return CaptionEditor(model.eval(), tokenizer, prompt=PROMPT, name="world caption editor (not saved)")


def build_world_caption_editor(
    triplet_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    model_config: CaptionEditorWorldConfig = CaptionEditorWorldConfig(),
    progress: bool = True,
    instruction_dropout: float = INSTRUCTION_DROPOUT,
    rows: int = 0,
) -> Path:
    """Train the world caption editor on a shapes triplet set into ``out_dir`` (cached: the same triplet set and
    settings reuse the folder; it appears only when complete). ``rows`` above the set's size tops it up with further
    items of its generator (:func:`editor_rows`, captions only): on the demo's set, 200k rows instead of its own 36k
    did not read the benchmark's phrasings better on val (README, "Removals: where they fail" 7.), so the default
    is the set's own rows."""
    triplet_set = {k: v for k, v in load_manifest(triplet_dir).items() if k != "created"}
    config: dict[str, Any] = {
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "model": asdict(model_config),
        "prompt": PROMPT,
        "instruction_dropout": instruction_dropout,
        "triplet_set": triplet_set,
        "rows": rows,
    }
    config = drop_when_off(config, {"rows": 0})  # editors made before the option stay valid

    def write(folder: Path) -> dict[str, Any]:
        training_rows = editor_rows(triplet_dir, rows)
        editor = train_caption_editor(
            training_rows, steps, batch_size, learning_rate, seed, model_config, progress, instruction_dropout
        )
        editor.save_pretrained(folder)
        return {"rows": len(training_rows)}

    return build_cached_folder(out_dir, MANIFEST_KIND, config, seed, write)
