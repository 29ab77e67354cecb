"""Caption editing: (the reference's caption, the instruction) -> a caption of the target, with a seq2seq model.

Removing an object is hard in an embedding (issue 18: the query keeps the object's look) and easy in words: drop
its phrase. Text-centric zero-shot methods (CIReVL, LDRE) ask an LLM for the edited caption; here any
transformers sequence-to-sequence checkpoint does it (``AutoModelForSeq2SeqLM``: a FLAN-T5 with the default
prompt, or the shapes world's small T5 trained on synthetic triplets, ``data_synth.shapes.caption_editor``). The
edited caption's text embedding is a query of its own (``edited-caption``) or a term of Fusion-Diff's query
(``edited_caption_weight``). The reference caption comes from a captioner, never from annotations.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fusion_diff.captioning.generative import folder_weights_digest
from fusion_diff.errors import ConfigError, DataError, MissingFileError
from fusion_diff.utils.io import read_json, write_json_atomic

EDITOR_CONFIG = "caption_editor.json"  # the prompt a checkpoint was trained with, saved beside its weights
DEFAULT_PROMPT = "Edit the image caption as the instruction says.\nCaption: {caption}\nInstruction: {instruction}"
DEFAULT_GENERATION: dict[str, Any] = {"max_new_tokens": 64, "num_beams": 3}  # beams: val R@1 45.2 -> 45.8 (world editor)


class CaptionEditor:
    """Edits captions as instructions say, batched, with a transformers seq2seq model and its tokenizer.

    ``prompt`` is the model's input, with ``{caption}`` and ``{instruction}`` slots; ``generation`` holds keyword
    arguments for ``model.generate`` over ``DEFAULT_GENERATION``; ``name`` and ``weights`` identify the model in
    protocol lines. Load a saved one with ``CaptionEditor.from_pretrained``.
    """

    def __init__(
        self,
        model,
        tokenizer,
        prompt: str = DEFAULT_PROMPT,
        generation: dict[str, Any] | None = None,
        name: str = "caption editor",
        weights: str | None = None,
    ) -> None:
        for slot in ("{caption}", "{instruction}"):
            if slot not in prompt:
                raise ConfigError(f"The caption editor's prompt {prompt!r} has no {slot} slot; add it.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.generation = {**DEFAULT_GENERATION, **(generation or {})}
        self.name = name
        self.weights = weights

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike,
        prompt: str | None = None,
        generation: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ) -> CaptionEditor:
        """A folder written by ``save_pretrained`` (model, tokenizer and ``caption_editor.json`` with the prompt it
        was trained with), or a Hugging Face id in the local cache (e.g. ``google/flan-t5-large``, with
        ``DEFAULT_PROMPT``; nothing is downloaded when ``HF_HUB_OFFLINE=1``)."""
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        name = str(model_id_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForSeq2SeqLM.from_pretrained(name)
        except OSError as err:
            raise MissingFileError(
                f"Could not load the caption editor {name!r} ({err}). Give a folder written by "
                "`fusion-diff world caption-editor` or save_pretrained (model and tokenizer), or a Hugging Face id "
                "already in the local cache: nothing is downloaded when HF_HUB_OFFLINE=1."
            ) from err
        except ValueError as err:
            raise ConfigError(
                f"{name!r} is not a sequence-to-sequence model that AutoModelForSeq2SeqLM can load ({err}). "
                "Use a T5 / BART class checkpoint."
            ) from err
        saved = Path(name) / EDITOR_CONFIG
        own = read_json(saved, "caption editor config").get("prompt") if saved.is_file() else None
        return cls(
            model.to(torch.device(device)),
            tokenizer,
            prompt=prompt or own or DEFAULT_PROMPT,
            generation=generation,
            name=name,
            weights=folder_weights_digest(Path(name)),
        )

    @property
    def identity(self) -> dict[str, Any]:
        """What the edited captions depend on (model, weights, prompt, generation), for protocol lines."""
        return {
            "type": "seq2seq",
            "model": self.name,
            **({"weights": self.weights} if self.weights else {}),
            "prompt": self.prompt,
            "generation": dict(sorted(self.generation.items())),
        }

    def describe(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(self.generation.items()))
        return f"seq2seq editor({self.name}, {settings})"

    @torch.inference_mode()
    def edit(
        self, captions: Sequence[str], instructions: Sequence[str], batch_size: int = 256, progress: bool = False
    ) -> list[str]:
        """The edited caption of each (caption, instruction) row."""
        if len(captions) != len(instructions):
            raise DataError(f"{len(captions)} captions for {len(instructions)} instructions: give one of each per row.")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        prompts = [self.prompt.format(caption=c, instruction=i) for c, i in zip(captions, instructions)]
        edited: list[str] = []
        for start in tqdm(range(0, len(prompts), batch_size), desc="editing captions", disable=not progress):
            inputs = self.tokenizer(prompts[start : start + batch_size], padding=True, return_tensors="pt")
            tokens = self.model.generate(**inputs.to(self.model.device), **self.generation)
            edited.extend(t.strip() for t in self.tokenizer.batch_decode(tokens, skip_special_tokens=True))
        return edited

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Model, tokenizer and the prompt, loadable with ``CaptionEditor.from_pretrained(out_dir)``."""
        out = Path(out_dir)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        write_json_atomic(out / EDITOR_CONFIG, {"prompt": self.prompt})
        return out


def load_caption_editor(editor: str | os.PathLike | CaptionEditor) -> CaptionEditor:
    """A ``CaptionEditor`` from a folder / model id, or the editor itself."""
    return editor if isinstance(editor, CaptionEditor) else CaptionEditor.from_pretrained(editor)


def edited_caption_embeddings(
    editor: CaptionEditor,
    captions: Sequence[str] | None,
    instructions: Sequence[str],
    embedder,
    method: str,
    batch_size: int = 256,
) -> torch.Tensor:
    """``f(edit(caption, instruction))`` ``[Q, d]``, normalised: the text embedding of each edited caption.
    ``captions`` are the references' captioner captions; None (no captioner configured) is refused, naming
    ``method``."""
    if captions is None:
        raise DataError(
            f"{method}: editing a caption needs the references' captions; configure a captioner for the references "
            "(--captioner, or evaluation.captioner in a config)."
        )
    edited = editor.edit(captions, instructions, batch_size=batch_size)
    return torch.nn.functional.normalize(embedder.embed_texts(edited).float(), dim=-1)
