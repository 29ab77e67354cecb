"""Generative captioning through transformers: BLIP / BLIP-2 class image-to-text models, any model id.

This is what CIReVL and FTI4CIR use for real images. The model is loaded with the Auto classes
(``AutoProcessor`` + ``AutoModelForImageTextToText``), so any image-text-to-text checkpoint whose
processor takes ``images=`` (and an optional text prompt) works; generation settings are options
and part of the captioner's identity. A checkpoint's own ``generation_config.json`` sets the defaults it
names (e.g. the shapes world's BLIP asks for captions long enough for four objects); the library's
``DEFAULT_GENERATION`` fills the rest, and the ``generation`` argument overrides both.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fusion_diff.captioning.base import Captioner
from fusion_diff.embedding.base import ImageInput
from fusion_diff.embedding.images import as_rgb
from fusion_diff.errors import ConfigError, MissingFileError
from fusion_diff.utils.runtime import announce

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_GENERATION: dict[str, Any] = {"max_new_tokens": 30, "num_beams": 3}


class GenerativeCaptioner(Captioner):
    """Captions images with a transformers image-to-text model (BLIP class).

    Args:
        model_id_or_path: a Hugging Face id present in the local HF cache, or a folder written by
            ``save_pretrained`` (model + processor).
        device, dtype: where and in which precision ("fp32" | "fp16" | "bf16") the model runs.
        prompt: optional text prefix for conditional captioning (e.g. "a photography of"); BLIP
            returns it as the start of the caption.
        num_candidates: captions kept per image (beam search's best ``num_candidates`` sequences).
        generation: keyword arguments for ``model.generate`` (default: what the checkpoint's generation
            config sets of ``DEFAULT_GENERATION``'s keys, else ``DEFAULT_GENERATION``).
    """

    def __init__(
        self,
        model_id_or_path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: str = "fp32",
        prompt: str | None = None,
        num_candidates: int = 1,
        generation: dict[str, Any] | None = None,
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if dtype not in DTYPES:
            raise ConfigError(f"Unknown captioner dtype {dtype!r}; choose one of {sorted(DTYPES)}.")
        if num_candidates < 1:
            raise ConfigError(f"num_candidates must be >= 1, got {num_candidates}.")
        self.model_id = str(model_id_or_path)
        self.device = torch.device(device)
        self.dtype = dtype
        announce(f"captioner {self.model_id}", self.device, dtype)
        self.prompt = prompt
        self.num_candidates = num_candidates
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_id)
            self.model = AutoModelForImageTextToText.from_pretrained(self.model_id, dtype=DTYPES[dtype])
        except OSError as err:
            raise MissingFileError(
                f"Could not load the captioning model {self.model_id!r} ({err}). Give a folder written by "
                "save_pretrained (model and processor), or a Hugging Face id already in the local cache: "
                "nothing is downloaded when HF_HUB_OFFLINE=1."
            ) from err
        except ValueError as err:
            raise ConfigError(
                f"{self.model_id!r} is not an image-to-text model that AutoModelForImageTextToText can load ({err}). "
                "Use a BLIP / BLIP-2 class captioning checkpoint."
            ) from err
        self.model.to(self.device).eval()
        checkpoint = self.model.generation_config.to_diff_dict()  # only what the checkpoint sets itself
        own = {k: checkpoint[k] for k in DEFAULT_GENERATION if k in checkpoint}
        self.generation = {**DEFAULT_GENERATION, **own, **(generation or {})}
        if num_candidates > 1:
            self.generation["num_return_sequences"] = num_candidates
            self.generation["num_beams"] = max(int(self.generation.get("num_beams", 1)), num_candidates)
        self._weights = folder_weights_digest(Path(self.model_id))

    @property
    def identity(self) -> dict[str, Any]:
        return {
            "type": "generative",
            "model": self.model_id,
            **({"weights": self._weights} if self._weights else {}),
            "dtype": self.dtype,
            "prompt": self.prompt,
            "num_candidates": self.num_candidates,
            "generation": dict(sorted(self.generation.items())),
        }

    def describe(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(self.generation.items()))
        prompt = f", prompt={self.prompt!r}" if self.prompt else ""
        return f"generative({self.model_id}, {settings}{prompt})"

    @torch.inference_mode()
    def _caption_batch(self, images: Sequence[ImageInput]) -> list[list[str]]:
        rgb = [as_rgb(image) for image in images]
        if self.prompt:
            inputs = self.processor(images=rgb, text=[self.prompt] * len(rgb), padding=True, return_tensors="pt")
        else:
            inputs = self.processor(images=rgb, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(DTYPES[self.dtype])
        tokens = self.model.generate(**inputs, **self.generation)
        texts = [t.strip() for t in self.processor.batch_decode(tokens, skip_special_tokens=True)]
        k = self.num_candidates  # generate returns the k sequences of an image next to each other
        return [texts[i : i + k] for i in range(0, len(texts), k)]

    def caption_candidates(
        self, images: Sequence[ImageInput], batch_size: int = 32, progress: bool = False
    ) -> list[list[str]]:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        starts = range(0, len(images), batch_size)
        out: list[list[str]] = []
        for start in tqdm(starts, desc="captioning", unit="batch", disable=not progress):
            out.extend(self._caption_batch(images[start : start + batch_size]))
        return out


def folder_weights_digest(folder: Path) -> str | None:
    """A hash of a local checkpoint's weight files, so that captions cached for a folder are not reused after
    it is retrained in place; None for a hub id (its id names the weights)."""
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha1()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
