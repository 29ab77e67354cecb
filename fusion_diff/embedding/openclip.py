"""OpenCLIP backend: any open_clip architecture (built-in or registered) with a tag or a local checkpoint.

``f(I)`` and ``f(T)`` are the normalised tower outputs; ``f(I, T) = normalize(a·f(I) + (1-a)·f(T))``
(late fusion), so a fused cache can be built from cached image and text embeddings.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import load_state_dict

from fusion_diff.embedding.base import EmbedderIdentity, ImageInput, JointEmbedder, TextTokens
from fusion_diff.embedding.images import as_rgb, embed_in_batches, tokens_in_batches
from fusion_diff.embedding.registry import ensure_registered
from fusion_diff.embedding.text_checks import tokenize_checked
from fusion_diff.errors import ConfigError, DataError, MissingFileError
from fusion_diff.utils.io import atomic_path
from fusion_diff.utils.runtime import announce

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_PRECISIONS = ("fp32", "fp16", "bf16")


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write an open_clip-loadable checkpoint (safetensors if the suffix says so, else ``torch.save``), atomically."""
    path = Path(path)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(state, tmp)
    return path


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """``sha256:<16 hex>`` of a checkpoint file (or of a folder's weight files): identity by content alone,
    so moving or renaming the file keeps it, and another file under the same name cannot take it."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()[:16]}"


def input_dtype(tower: torch.nn.Module) -> torch.dtype:
    """The dtype a tower's first layer takes: under fp16/bf16 open_clip casts only convolutions, linear
    layers and projections, and keeps e.g. positional embeddings in float32, so the first parameter says nothing."""
    for module in tower.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            return module.weight.dtype
    return next(tower.parameters()).dtype


def _checkpoint_error(model_name: str, checkpoint: Path, err: Exception) -> Exception:
    """Explain why ``checkpoint`` did not load into ``model_name``: another architecture, or an unreadable file."""
    try:
        theirs = {key: tuple(value.shape) for key, value in load_state_dict(str(checkpoint)).items()}
    except Exception as read_err:  # pickle / safetensors header errors come in many types
        return DataError(f"Checkpoint {checkpoint} cannot be read ({type(read_err).__name__}: {read_err}). Re-save it.")
    ours = {key: tuple(value.shape) for key, value in open_clip.create_model(model_name).state_dict().items()}
    missing = sorted(ours.keys() - theirs.keys())
    unexpected = sorted(theirs.keys() - ours.keys())
    shapes = [
        f"{k}: checkpoint {theirs[k]} vs model {ours[k]}"
        for k in sorted(ours.keys() & theirs.keys())
        if ours[k] != theirs[k]
    ]
    parts = [f"{len(missing)} missing keys (e.g. {missing[:3]})"] if missing else []
    parts += [f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"] if unexpected else []
    parts += [f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})"] if shapes else []
    if not parts:
        return DataError(f"Checkpoint {checkpoint} did not load into {model_name!r}: {type(err).__name__}: {err}")
    return ConfigError(
        f"Checkpoint {checkpoint} was made for another architecture than {model_name!r}: {'; '.join(parts)}. "
        "Pass the model_name it was trained with."
    )


class OpenCLIPEmbedder(JointEmbedder):
    """An open_clip model as a ``JointEmbedder``.

    Args:
        model_name: an open_clip architecture (``"ViT-L-14"``, a config registered in
            ``fusion_diff/embedding/model_configs``), or ``"hf-hub:org/repo"`` / ``"local-dir:/path"``.
        pretrained: ``None`` (random weights), an open_clip pretrained tag, or a local checkpoint file
            (``torch.save(model.state_dict())`` or safetensors) made for ``model_name``.
        fusion_weight: ``a`` in ``f(I, T) = normalize(a·f(I) + (1-a)·f(T))``.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` weights; outputs are always float32 on CPU.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | os.PathLike | None = None,
        fusion_weight: float = 0.5,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if not 0.0 <= fusion_weight <= 1.0:
            raise ConfigError(f"fusion_weight must be in [0, 1], got {fusion_weight}.")
        if precision not in _PRECISIONS:
            raise ConfigError(f"precision must be one of {_PRECISIONS}, got {precision!r}.")
        ensure_registered()
        self.model_name = model_name
        self.fusion_weight = float(fusion_weight)
        self.device = torch.device(device)
        announce(f"open_clip {model_name} embedder", self.device, precision)
        checkpoint, tag = self._resolve_pretrained(model_name, pretrained)
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=str(checkpoint) if checkpoint is not None else tag,
                precision=precision,
                device=self.device,
                cache_dir=cache_dir,
            )
        except Exception as err:
            if checkpoint is not None:
                raise _checkpoint_error(model_name, checkpoint, err) from err
            if tag is not None:
                raise MissingFileError(
                    f"Could not load open_clip weights {model_name}:{tag} ({err}). Without network access, pass a "
                    "local checkpoint file as `pretrained` or pre-populate the Hugging Face cache."
                ) from err
            raise
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        self._dtype = input_dtype(self.model.visual)
        pretrained_id = checkpoint_fingerprint(checkpoint) if checkpoint is not None else tag
        if model_name.startswith("local-dir:"):
            pretrained_id = checkpoint_fingerprint(model_name.removeprefix("local-dir:"))
        dim = self._encode_texts([""]).shape[-1]
        self._identity = EmbedderIdentity("openclip", model_name, pretrained_id, int(dim), self.fusion_weight)

    @staticmethod
    def _resolve_pretrained(model_name: str, pretrained: str | os.PathLike | None) -> tuple[Path | None, str | None]:
        """Split ``pretrained`` into (local checkpoint, open_clip tag); fail early with the available choices."""
        if model_name.startswith(("hf-hub:", "local-dir:")):
            if pretrained is not None:
                raise ConfigError(f"{model_name!r} brings its own weights; drop `pretrained` ({pretrained!r}).")
            return None, None
        if open_clip.get_model_config(model_name) is None:
            close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5)
            raise ConfigError(
                f"Unknown open_clip architecture {model_name!r} (close names: {close}). Add a JSON config to "
                "fusion_diff/embedding/model_configs/ or call fusion_diff.embedding.register_model_configs(path)."
            )
        if pretrained is None:
            return None, None
        text = str(pretrained)
        if Path(text).is_file():
            return Path(text), None
        if open_clip.get_pretrained_cfg(model_name, text):
            return None, text
        if isinstance(pretrained, os.PathLike) or os.sep in text or text.endswith(CHECKPOINT_SUFFIXES):
            raise MissingFileError(f"Checkpoint file not found: {text}. Check the path given as `pretrained`.")
        raise ConfigError(
            f"{text!r} is neither a local checkpoint file nor a pretrained tag of {model_name!r} "
            f"(tags: {open_clip.list_pretrained_tags_by_model(model_name)})."
        )

    @property
    def identity(self) -> EmbedderIdentity:
        return self._identity

    @property
    def supports_late_fusion(self) -> bool:
        return True

    @torch.inference_mode()
    def _encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(as_rgb(image)) for image in images])
        return self.model.encode_image(pixels.to(self.device, self._dtype), normalize=True)

    @torch.inference_mode()
    def _encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = tokenize_checked(self.tokenizer, texts).to(self.device)
        return self.model.encode_text(tokens, normalize=True)

    @torch.inference_mode()
    def _encode_text_tokens(self, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One forward of the text transformer over the first ``L`` positions (``L`` = the longest text, at most
        ``max_tokens``): its attention is causal, so these states equal those of the full-context forward. The
        states after ``ln_final`` go through ``text_projection``, so the end-of-text state is the pooled
        embedding (before normalisation) and every token lives in the joint space's coordinates."""
        model = self.model
        if not hasattr(model, "token_embedding") or getattr(model, "text_pool_type", "argmax") not in ("argmax", "eos"):
            raise ConfigError(
                f"encode_text_tokens supports open_clip CLIP text transformers pooled at the end-of-text token; "
                f"{self.model_name} has another text tower. Use pooled text (max_text_tokens: 0)."
            )
        tokens = self.tokenizer(list(texts)).to(self.device)
        if model.text_pool_type == "argmax":
            end = tokens.argmax(dim=-1)
        else:
            end = (tokens == model.text_eos_id).int().argmax(dim=-1)
        long = end >= max_tokens
        end_token = tokens.gather(1, end[:, None]).squeeze(1)
        end = torch.clamp(end, max=max_tokens - 1)
        length = int(end.max()) + 1
        tokens = tokens[:, :length].clone()
        tokens[long, length - 1] = end_token[long]  # truncated as open_clip's tokenizer does: end-of-text kept last
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
        attn_mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
        x = model.ln_final(model.transformer(x, attn_mask=attn_mask))
        projection = model.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
        mask = torch.arange(length, device=x.device)[None] <= end[:, None]
        return x.float() * mask[..., None], mask, int(long.sum())

    @torch.inference_mode()
    def _encode_image_tokens(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """open_clip's own ``output_tokens`` path (patch states after ``ln_post``), then the tower's projection,
        as the pooled embedding gets it."""
        visual = self.model.visual
        if not hasattr(visual, "output_tokens") or getattr(visual, "proj", None) is None:
            raise ConfigError(
                f"encode_image_tokens supports open_clip ViT image towers with a projection; {self.model_name} has "
                "another image tower. Use pooled image embeddings."
            )
        pixels = torch.stack([self.preprocess(as_rgb(image)) for image in images]).to(self.device, self._dtype)
        before, visual.output_tokens = visual.output_tokens, True
        try:
            _, tokens = visual(pixels)
        finally:
            visual.output_tokens = before
        return tokens @ visual.proj

    def encode_image_tokens(self, images: Sequence[ImageInput], batch_size: int = 64) -> torch.Tensor:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        chunks = [self._encode_image_tokens(images[i : i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)]
        if not chunks:
            grid = self.model.visual.grid_size
            return torch.empty(0, grid[0] * grid[1], self.dim)
        return torch.cat(chunks)

    def encode_text_tokens(self, texts: Sequence[str], max_tokens: int, batch_size: int = 256) -> TextTokens:
        return tokens_in_batches(self._encode_text_tokens, texts, max_tokens, batch_size, f"open_clip {self.model_name}")

    def embed_images(self, images: Sequence[ImageInput], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        return embed_in_batches(self._encode_images, images, batch_size, self.dim, progress, "embedding images")

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        return embed_in_batches(self._encode_texts, texts, batch_size, self.dim, progress, "embedding texts")

    def embed_pairs(
        self, images: Sequence[ImageInput], texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> torch.Tensor:
        if len(images) != len(texts):
            raise ValueError(
                f"embed_pairs needs as many texts as images, got {len(images)} images, {len(texts)} texts."
            )
        return self.fuse(self.embed_images(images, batch_size, progress), self.embed_texts(texts, batch_size, progress))

    def fuse(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        a = self.fusion_weight
        return F.normalize(a * image_embeds + (1.0 - a) * text_embeds, dim=-1)
