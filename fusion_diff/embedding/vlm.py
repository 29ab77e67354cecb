"""VLM backend (Qwen2-VL / Qwen2.5-VL class, through transformers): one prompt, the last token's state.

Images, texts and pairs all go through the model's own chat template with an instruction that asks
for a one-word summary (the E5-V recipe); ``z`` is the L2-normalised final hidden state of the
last prompt token. The fusion happens inside the model, so there is no late fusion.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from fusion_diff.embedding.base import EmbedderIdentity, ImageInput, JointEmbedder, TextTokens
from fusion_diff.embedding.images import as_rgb, embed_in_batches, tokens_in_batches
from fusion_diff.embedding.openclip import checkpoint_fingerprint
from fusion_diff.errors import ConfigError, MissingFileError
from fusion_diff.utils.runtime import announce

DEFAULT_INSTRUCTION = "Summarize above {modality} in one word:"
_MODALITY = {"image": "image", "text": "sentence", "pair": "image and sentence"}


class VLMEmbedder(JointEmbedder):
    """A vision-language model (``AutoModel`` + ``AutoProcessor`` with a chat template) as a ``JointEmbedder``.

    Args:
        model_id_or_path: Hugging Face id (e.g. ``"Qwen/Qwen2-VL-2B-Instruct"``) or a local
            ``save_pretrained`` folder holding the model and its processor.
        instruction: appended after the input; ``{modality}`` becomes "image", "sentence" or
            "image and sentence".
        dtype: weights dtype (``"float32"``, ``"bfloat16"``, ``"float16"``); outputs are float32 CPU.
        max_pixels: optional cap on image resolution handed to the processor (speed vs detail).
    """

    def __init__(
        self,
        model_id_or_path: str | os.PathLike,
        instruction: str = DEFAULT_INSTRUCTION,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        max_pixels: int | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        from transformers import AutoModel, AutoProcessor

        self.model_id = str(model_id_or_path)
        self.instruction = instruction
        self.device = torch.device(device)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        announce(f"VLM embedder {self.model_id}", self.device, dtype)
        local = Path(self.model_id).is_dir()
        if not local and (self.model_id.startswith(("/", ".", "~")) or self.model_id.count("/") > 1):
            raise MissingFileError(f"VLM folder not found: {self.model_id}. Pass a save_pretrained folder or a hub id.")
        processor_kwargs = {"max_pixels": max_pixels} if max_pixels else {}
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_id, cache_dir=cache_dir, **processor_kwargs)
            self.model = AutoModel.from_pretrained(self.model_id, dtype=dtype, cache_dir=cache_dir)
        except OSError as err:
            raise MissingFileError(
                f"Could not load the VLM {self.model_id} ({err}). Offline, pass a local save_pretrained folder."
            ) from err
        if not getattr(self.processor, "chat_template", None):
            raise ConfigError(f"The processor of {self.model_id} has no chat template; the VLM backend needs one.")
        self.processor.tokenizer.padding_side = "left"
        self.model.to(self.device).eval()
        weights = checkpoint_fingerprint(self.model_id) if local else getattr(self.model.config, "_commit_hash", None)
        prompt = hashlib.sha256(instruction.encode()).hexdigest()[:8]
        name = self.model.config.model_type if local else self.model_id  # a local folder: by content, not its name
        dim = self.model.config.get_text_config().hidden_size
        self._identity = EmbedderIdentity("vlm", name, f"{weights};prompt={prompt}", int(dim), None)

    @property
    def identity(self) -> EmbedderIdentity:
        return self._identity

    def _prompt(self, modality: str, text: str | None) -> str:
        instruction = self.instruction.format(modality=_MODALITY[modality])
        content = [{"type": "image"}] if modality in ("image", "pair") else []
        content.append({"type": "text", "text": f"{text}\n{instruction}" if text is not None else instruction})
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    @torch.inference_mode()
    def _encode(self, modality: str, batch: Sequence) -> torch.Tensor:
        """One forward over a batch of images, texts or (image, text) pairs; the last real token's state."""
        images = [as_rgb(item[0] if modality == "pair" else item) for item in batch] if modality != "text" else None
        texts = (
            [item[1] for item in batch]
            if modality == "pair"
            else list(batch)
            if modality == "text"
            else [None] * len(batch)
        )
        prompts = [self._prompt(modality, text) for text in texts]
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True).to(self.device)
        hidden = self.model(**inputs).last_hidden_state  # [B, L, H]
        mask = inputs["attention_mask"]
        last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)  # last real token, whatever the padding side
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    @torch.inference_mode()
    def _encode_text_tokens(self, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The language model's final hidden states over the bare text (no chat template, no instruction: the
        tokens are the text's own), the first ``max_tokens`` tokens, moved to the left (right padding)."""
        tokenizer = self.processor.tokenizer
        lengths = [len(ids) for ids in tokenizer(list(texts))["input_ids"]]
        inputs = tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**inputs).last_hidden_state  # [B, L, H], padded on the tokenizer's side
        keep = inputs["attention_mask"].bool()
        position = keep.long().cumsum(1) - 1  # each real token's place once the padding is moved to the right
        states = hidden.new_zeros(hidden.shape)
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(position)
        states[rows[keep], position[keep]] = hidden[keep]
        mask = torch.arange(keep.shape[1], device=keep.device)[None] < keep.sum(1, keepdim=True)
        return states, mask, sum(length > max_tokens for length in lengths)

    def encode_text_tokens(self, texts: Sequence[str], max_tokens: int, batch_size: int = 64) -> TextTokens:
        return tokens_in_batches(self._encode_text_tokens, texts, max_tokens, batch_size, f"VLM {self.model_id}")

    def embed_images(self, images: Sequence[ImageInput], batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        return embed_in_batches(
            partial(self._encode, "image"), images, batch_size, self.dim, progress, "embedding images"
        )

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        return embed_in_batches(partial(self._encode, "text"), texts, batch_size, self.dim, progress, "embedding texts")

    def embed_pairs(
        self, images: Sequence[ImageInput], texts: Sequence[str], batch_size: int = 16, progress: bool = False
    ) -> torch.Tensor:
        if len(images) != len(texts):
            raise ValueError(
                f"embed_pairs needs as many texts as images, got {len(images)} images, {len(texts)} texts."
            )
        pairs = list(zip(images, texts))
        return embed_in_batches(partial(self._encode, "pair"), pairs, batch_size, self.dim, progress, "embedding pairs")
