"""FTI4CIR at inference: pseudo-word prompts, injection into the frozen open_clip text tower, retrieval.

An image's pseudo-words replace placeholder tokens of "a photo of S* with A1* ... Ar* [but {modification}]"
*as token embeddings*, before the text transformer. Prompts are assembled in token space (a tokenized
prefix, ``r`` placeholder ids, a tokenized suffix), so any number of attribute words per image is one
batched tensor op, user text can never create a stray placeholder, and the per-image pieces are
tokenized once. Only open_clip text towers with a token-embedding table (CLIP-style) can take injected
words; patch tokens come from ``model.forward_intermediates``, open_clip's supported API.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn
from tqdm import tqdm

from fusion_diff.embedding.base import EmbedderIdentity, ImageInput, JointEmbedder, upgrade_identity
from fusion_diff.embedding.images import as_rgb
from fusion_diff.errors import CacheMismatchError, ConfigError, MissingFileError
from fusion_diff.models.fti4cir import FTI4CIRMapper, FTI4CIRMapperOutput
from fusion_diff.retrieval.method import GalleryMode, QueryContext, check_mix_weight, mix_toward_reference

PLACEHOLDER = "*"
PREFIX_TEMPLATE = "a photo of {subject} with"
QUERY_SUFFIX_TEMPLATE = "but {modification}"


class PseudoWordPrompter:
    """Token ids of FTI4CIR's prompts for an open_clip ``SimpleTokenizer``-style tokenizer.

    The tokenizer must produce ``[SOT] tokens [EOT] padding`` rows of a fixed context length (every
    open_clip CLIP-style text tower does); ``splice`` relies on that layout.
    """

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]):
        self.tokenizer = tokenizer
        empty, star = tokenizer([""])[0], tokenizer([PLACEHOLDER])[0]
        if (
            empty.ndim != 1
            or len(star) < 4
            or star[0] != empty[0]
            or star[2] != empty[1]
            or (star[3:] != empty[2:-1]).any()
        ):
            raise ConfigError(
                f"FTI4CIR needs an open_clip SimpleTokenizer-style tokenizer ([SOT] tokens [EOT] padding) that "
                f"encodes {PLACEHOLDER!r} as one token; got {type(tokenizer).__name__}. Use a CLIP-style open_clip model."
            )
        self.eot_id = int(empty[1])
        self.placeholder_id = int(star[1])
        self.context_length = int(empty.shape[0])
        self._pseudo_prefix = tokenizer([PREFIX_TEMPLATE.format(subject=PLACEHOLDER)])
        self._empty = empty.unsqueeze(0)

    @staticmethod
    def template() -> str:
        return f"{PREFIX_TEMPLATE.format(subject='S*')} A1* ... Ar* {QUERY_SUFFIX_TEMPLATE}"

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """User text (captions, modifications) with any placeholder character removed."""
        return self.tokenizer([t.replace(PLACEHOLDER, " ") for t in texts])

    def splice(
        self, prefix_ids: torch.Tensor, counts: torch.Tensor, suffix_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows ``prefix content + counts[b] placeholders + suffix content + EOT``, truncated to the context.

        A long prefix is cut so that all placeholders fit; a long suffix is cut and ends with EOT.
        """
        batch, length = prefix_ids.shape
        counts = counts.to(prefix_ids.device).long()
        if suffix_ids is None:
            suffix_ids = self._empty.to(prefix_ids.device).expand(batch, -1)
        pos = torch.arange(length, device=prefix_ids.device).unsqueeze(0)
        prefix_end = (prefix_ids == self.eot_id).int().argmax(dim=1).clamp(max=length - 1 - counts).unsqueeze(1)
        suffix_start = prefix_end + counts.unsqueeze(1)
        from_suffix = suffix_ids.gather(1, (pos - suffix_start + 1).clamp(min=0))  # skips the suffix's SOT
        out = torch.where(
            pos < prefix_end, prefix_ids, torch.where(pos < suffix_start, self.placeholder_id, from_suffix)
        )
        out[:, -1] = torch.where((out == self.eot_id).any(dim=1), out[:, -1], self.eot_id)
        return out

    def pseudo_prompts(self, num_attributes: torch.Tensor, modifications: Sequence[str] | None = None) -> torch.Tensor:
        """Prompts "a photo of * with * ... * [but {modification}]", ``1 + num_attributes[b]`` placeholders in
        row ``b`` (training prompts, or retrieval queries with modifications)."""
        suffix = None
        if modifications is not None:
            suffix = self.tokenize([QUERY_SUFFIX_TEMPLATE.format(modification=m) for m in modifications])
        device = num_attributes.device
        prefix = self._pseudo_prefix.to(device).expand(len(num_attributes), -1)
        return self.splice(prefix, num_attributes, None if suffix is None else suffix.to(device))

    def subject_prompts(self, attribute_phrases: Sequence[str]) -> torch.Tensor:
        """Prompts "a photo of * with {t}": the subject word with the caption's attribute phrase."""
        prefix = PREFIX_TEMPLATE.format(subject=PLACEHOLDER)
        return self.tokenizer([f"{prefix} {t.replace(PLACEHOLDER, ' ')}" for t in attribute_phrases])

    def attribute_prefixes(self, subjects: Sequence[str]) -> torch.Tensor:
        """Prefixes "a photo of {s} with", spliced with the attribute placeholders at training time."""
        return self.tokenize([PREFIX_TEMPLATE.format(subject=s) for s in subjects])

    def caption_prompts(self, subjects: Sequence[str], attribute_phrases: Sequence[str]) -> torch.Tensor:
        """Sentences "a photo of {s} with {t}": the real sentences the regularisation pulls toward."""
        return self.tokenize([f"{PREFIX_TEMPLATE.format(subject=s)} {t}" for s, t in zip(subjects, attribute_phrases)])


def inject_pseudo_words(
    token_ids: torch.Tensor,
    token_embeds: torch.Tensor,
    placeholder_id: int,
    pseudo_words: torch.Tensor,
    counts: torch.Tensor,
) -> torch.Tensor:
    """Replace the ``i``-th placeholder of row ``b`` by ``pseudo_words[b, i]``; other tokens are untouched.

    ``token_ids [B, L]``, ``token_embeds [B, L, w]``, ``pseudo_words [B, P, w]``, ``counts [B]`` (row ``b``
    must hold exactly ``counts[b] <= P`` placeholders). Differentiable w.r.t. ``pseudo_words``.
    """
    is_placeholder = token_ids == placeholder_id
    if not torch.equal(is_placeholder.sum(dim=1), counts.to(token_ids.device)):
        raise ValueError(
            f"placeholder count per row {is_placeholder.sum(dim=1).tolist()} != pseudo-word count {counts.tolist()}"
        )
    rank = (is_placeholder.cumsum(dim=1) - 1).clamp(0, pseudo_words.shape[1] - 1)
    gathered = pseudo_words.gather(1, rank.unsqueeze(-1).expand(-1, -1, pseudo_words.shape[-1]))
    return torch.where(is_placeholder.unsqueeze(-1), gathered.to(token_embeds.dtype), token_embeds)


class PseudoWordTextEncoder(nn.Module):
    """open_clip's ``encode_text`` with pseudo-words injected into the token embeddings.

    Without pseudo-words it equals ``model.encode_text``. For causal towers pooled at EOT, rows are
    trimmed to the batch's last EOT: later positions cannot influence it, and prompts are short.
    """

    def __init__(self, model: nn.Module, placeholder_id: int, eot_id: int):
        super().__init__()
        tower = model.text if hasattr(model, "text") else model
        if not hasattr(tower, "token_embedding") or getattr(tower, "cls_emb", None) is not None:
            raise ConfigError(
                f"FTI4CIR injects pseudo-words into a token-embedding table; the text tower "
                f"{type(tower).__name__} has none (or appends a CLS token). Use a CLIP-style open_clip model."
            )
        if getattr(tower, "use_pad_mask", False):
            raise ConfigError(f"FTI4CIR supports causal or plain text towers; {type(tower).__name__} uses a pad mask.")
        self.tower = tower
        self.pool_type = getattr(tower, "text_pool_type", None) or tower.pool_type
        self.eos_id = getattr(tower, "text_eos_id", None) or getattr(tower, "eos_id", None)
        self.placeholder_id = placeholder_id
        self.eot_id = eot_id

    def forward(
        self, token_ids: torch.Tensor, pseudo_words: torch.Tensor | None = None, counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, d]`` text features (not normalised)."""
        tower = self.tower
        attn_mask = tower.attn_mask
        if attn_mask is not None and self.pool_type in ("argmax", "eos"):
            length = int((token_ids == self.eot_id).int().argmax(dim=1).max()) + 1
            token_ids, attn_mask = token_ids[:, :length], attn_mask[:length, :length]
        cast_dtype = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(token_ids).to(cast_dtype)
        if pseudo_words is not None:
            x = inject_pseudo_words(token_ids, x, self.placeholder_id, pseudo_words, counts)
        x = x + tower.positional_embedding[: x.shape[1]].to(cast_dtype)
        x = tower.transformer(x, attn_mask=attn_mask)
        x = tower.ln_final(x)
        x = text_global_pool(x, token_ids, self.pool_type, eos_token_id=self.eos_id)
        projection = tower.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def visual_features(model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the visual tower: unit-norm global features ``[B, d]`` and final patch tokens ``[B, P, w]``.

    Patch tokens are the last block's output after the tower's final LayerNorm (open_clip's
    ``forward_intermediates`` with ``normalize_intermediates``), without the class token.
    """
    if not hasattr(model, "forward_intermediates"):
        raise ConfigError(
            f"{type(model).__name__} has no forward_intermediates; FTI4CIR needs open_clip >= 2.32 models."
        )
    out = model.forward_intermediates(
        image=pixel_values, image_indices=1, normalize=True, normalize_intermediates=True, image_output_fmt="NLC"
    )
    return out["image_features"], out["image_intermediates"][-1]


@torch.no_grad()
def encode_images(
    model: nn.Module, preprocess: Callable, images: Sequence[ImageInput], batch_size: int = 64, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``visual_features`` of images (PIL or paths), batched: ``[N, d]`` unit-norm and ``[N, P, w]``, on the model's device."""
    parameter = next(model.parameters())
    outs = []
    for start in tqdm(range(0, len(images), batch_size), disable=not progress, desc="FTI4CIR image features"):
        pixels = torch.stack([preprocess(as_rgb(image)) for image in images[start : start + batch_size]])
        outs.append(visual_features(model, pixels.to(parameter.device, parameter.dtype)))
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def backbone_dims(model: nn.Module) -> dict[str, int]:
    """``embed_dim``, ``patch_dim``, ``num_patches`` and ``token_dim`` of an open_clip model (one dry run)."""
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    parameter = next(model.parameters())
    with torch.no_grad():
        pooled, patches = visual_features(
            model, torch.zeros(1, 3, *size, device=parameter.device, dtype=parameter.dtype)
        )
    tower = model.text if hasattr(model, "text") else model
    return {
        "embed_dim": pooled.shape[-1],
        "patch_dim": patches.shape[-1],
        "num_patches": patches.shape[1],
        "token_dim": tower.token_embedding.embedding_dim,
    }


def pseudo_word_batch(output: FTI4CIRMapperOutput, parts: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pseudo_words [B, P, w], counts [B])`` for prompts holding the subject and/or attribute words.

    ``parts`` is "both" (S* then A1*..Ar*), "subject" or "attributes".
    """
    subject = output.subject_embeds.unsqueeze(1)
    if parts == "subject":
        return subject, torch.ones_like(output.num_attributes)
    if parts == "attributes":
        return output.attribute_embeds, output.num_attributes
    return torch.cat([subject, output.attribute_embeds], dim=1), output.num_attributes + 1


def backbone_identity(embedder: JointEmbedder) -> dict[str, Any]:
    """What of an embedder's identity the pseudo-words depend on (not e.g. its fusion weight)."""
    return EmbedderIdentity.select(embedder.identity.as_dict(), EmbedderIdentity.SPACE_KEYS)


def load_fti4cir(path: str | os.PathLike, embedder: JointEmbedder | None = None) -> FTI4CIRMapper:
    """A trained mapper (``save_pretrained`` folder); refuses an embedder other than its training backbone."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise MissingFileError(
            f"No FTI4CIR mapper at {path} (config.json missing). Train one with `fusion-diff train fti4cir --config "
            "configs/fti4cir.yaml` or fix the checkpoint path."
        )
    mapper = FTI4CIRMapper.from_pretrained(path).eval()
    trained_on = upgrade_identity(mapper.config.embedder_identity)
    if embedder is not None and backbone_identity(embedder) != trained_on:
        raise CacheMismatchError(
            f"FTI4CIR mapper {path} was trained on {trained_on} but the embedder is {backbone_identity(embedder)}. "
            "Evaluate with the training backbone, or retrain on this one."
        )
    return mapper


class FTI4CIRPipeline:
    """Composed queries from reference images and modification texts, with a trained mapper.

    ``clip_model``, ``tokenizer`` and ``preprocess`` are the open_clip parts of the backbone (an
    ``OpenCLIPEmbedder`` exposes them); the gallery is matched with that backbone's image embeddings.
    """

    def __init__(self, mapper: FTI4CIRMapper, clip_model: nn.Module, tokenizer: Callable, preprocess: Callable):
        self.clip_model = clip_model.eval()
        self.device = next(clip_model.parameters()).device
        self.mapper = mapper.to(self.device).eval()
        self.preprocess = preprocess
        self.prompter = PseudoWordPrompter(tokenizer)
        self.text_encoder = PseudoWordTextEncoder(clip_model, self.prompter.placeholder_id, self.prompter.eot_id)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, embedder: JointEmbedder) -> FTI4CIRPipeline:
        mapper = load_fti4cir(path, embedder)
        return cls(mapper, embedder.model, embedder.tokenizer, embedder.preprocess)

    @torch.no_grad()
    def compose(
        self, image_embeds: torch.Tensor, patch_tokens: torch.Tensor, modifications: Sequence[str]
    ) -> torch.Tensor:
        """``[Q, d]`` unit-norm features of "a photo of S* with A1* ... Ar* but {modification}"."""
        output = self.mapper(image_embeds.to(self.device), patch_tokens.to(self.device))
        pseudo_words, counts = pseudo_word_batch(output, "both")
        token_ids = self.prompter.pseudo_prompts(output.num_attributes, modifications).to(self.device)
        return F.normalize(self.text_encoder(token_ids, pseudo_words, counts).float(), dim=-1)

    def __call__(
        self, reference_images: Sequence[ImageInput], modifications: Sequence[str], batch_size: int = 64
    ) -> torch.Tensor:
        if len(reference_images) != len(modifications):
            raise ValueError(f"{len(reference_images)} reference images but {len(modifications)} modification texts")
        out = []
        for start in range(0, len(modifications), batch_size):
            stop = start + batch_size
            image_embeds, patch_tokens = encode_images(
                self.clip_model, self.preprocess, reference_images[start:stop], batch_size
            )
            out.append(self.compose(image_embeds, patch_tokens, modifications[start:stop]).cpu())
        return torch.cat(out) if out else torch.empty(0, self.mapper.config.embed_dim)


class FTI4CIRMethod:
    """FTI4CIR as a ``RetrievalMethod``: pseudo-sentence queries matched against gallery *image* embeddings
    (the paper's protocol) or, with ``gallery_mode="fused"``, against ``f(I, caption)`` of a captioner.

    ``mix_reference`` (0 = the paper's query) pulls the pseudo-sentence embedding toward the reference
    in the gallery's space: ``normalize((1 - m) q + m r)`` with ``r = f(I_ref)`` (image gallery) or
    ``f(I_ref, caption)`` (fused). The text query carries the edit, the reference what the target keeps;
    choose ``m`` on a validation split.
    """

    name = "fti4cir"

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        batch_size: int = 64,
        mix_reference: float = 0.0,
        name: str = "fti4cir",
        gallery_mode: GalleryMode = "image",
    ):
        check_mix_weight(mix_reference)
        if gallery_mode not in ("image", "fused"):
            raise ConfigError(f"FTI4CIR: gallery_mode={gallery_mode!r}; choose 'image' or 'fused'.")
        self.gallery_mode = gallery_mode
        self.checkpoint = Path(checkpoint)
        self.batch_size = batch_size
        self.mix_reference = mix_reference
        self.name = name
        self.mapper = load_fti4cir(self.checkpoint)
        self._bound: tuple[JointEmbedder, FTI4CIRPipeline] | None = None

    def protocol(self) -> dict[str, Any]:
        cfg = self.mapper.config
        return {
            "method": self.name,
            "checkpoint": str(self.checkpoint),
            "backbone": cfg.embedder_identity,
            "prompt": PseudoWordPrompter.template(),
            "threshold": cfg.threshold,
            "score_temperature": cfg.score_temperature,
            "max_attributes": cfg.max_attributes,
            "num_queries": cfg.num_queries,
            "gallery_mode": self.gallery_mode,
            "mix_reference": self.mix_reference,
            "mix_anchor": "f(I_ref)" if self.gallery_mode == "image" else "f(I_ref, caption)",
        }

    def _pipeline(self, embedder: JointEmbedder) -> FTI4CIRPipeline:
        """The pipeline bound to the evaluator's embedder (built once; the backbone is checked first)."""
        if self._bound is None or self._bound[0] is not embedder:
            load_fti4cir(self.checkpoint, embedder)
            if not all(hasattr(embedder, a) for a in ("model", "tokenizer", "preprocess")):
                raise ConfigError(
                    f"FTI4CIR needs an open_clip embedder (.model/.tokenizer/.preprocess); got {type(embedder).__name__}."
                )
            self._bound = (
                embedder,
                FTI4CIRPipeline(self.mapper, embedder.model, embedder.tokenizer, embedder.preprocess),
            )
        return self._bound[1]

    def query_embeddings(self, context: QueryContext) -> torch.Tensor:
        pipeline = self._pipeline(context.embedder)
        queries = pipeline(context.reference_image_paths, context.modification_texts, self.batch_size)
        if self.mix_reference == 0.0:
            return queries
        reference = context.reference_image_embeds if self.gallery_mode == "image" else context.reference_fused_embeds
        if reference is None:  # the evaluator gives fused references whenever it has a captioner
            raise ConfigError("FTI4CIR: mixing toward a fused reference needs a captioner (--captioner).")
        return mix_toward_reference(queries, reference, self.mix_reference)
