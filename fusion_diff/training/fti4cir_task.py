"""FTI4CIR training as a ``TrainingTask`` of the shared Accelerate loop: unlabeled images only.

Losses (Lin et al., SIGIR 2024), on one batch of images with their pseudo-words ``S*``, ``A1*..Ar*``:

* contrastive: the image's global feature vs. "a photo of S* with A1* ... Ar*" (NT-Xent, temperature 0.2);
* orthogonality: the ``num_queries`` local features of an image should be mutually orthogonal (MSE of
  their Gram matrix to the identity);
* tri-wise caption regularisation: with the image's caption split into a subject ``s`` and an attribute
  phrase ``t``, "a photo of S* with {t}", "a photo of {s} with A1*..Ar*" and "a photo of S* with A1*..Ar*"
  are each pulled toward the real sentence "a photo of {s} with {t}" (1 - cosine).

The backbone is frozen, so its global features and patch tokens are computed once per image into
an ``EmbeddingCache`` (resumable) and the caption sentences' text features likewise; a training step
runs only the mapper and one batched text-tower pass over the ``3B`` pseudo-word prompts. Patch
tokens cost ~1 MB per image at ViT-L/14, so ``data.feature_mode: on_the_fly`` keeps only the small
caption features and runs the frozen image tower on each batch instead (DataLoader workers decode
and preprocess the images): more compute per step, no feature disk for 100K+ images.

Captions: a shapes-world pair set carries the scene graph's split (``subject`` / ``attributes``);
for a folder of real images a captioner (``fusion_diff.captioning``, e.g. BLIP through transformers)
writes captions and ``split_caption`` splits them (a rule-based stand-in for the reference's spaCy
noun-phrase split).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fusion_diff.captioning.base import identity_digest
from fusion_diff.embedding.base import ImageInput, JointEmbedder
from fusion_diff.embedding.cache import EmbeddingCache, embed_with_cache
from fusion_diff.embedding.images import as_rgb
from fusion_diff.errors import ConfigError, DataError, MissingFileError
from fusion_diff.models.fti4cir import FTI4CIRMapper, FTI4CIRMapperOutput
from fusion_diff.pipelines.fti4cir import (
    FTI4CIRPipeline,
    PseudoWordPrompter,
    PseudoWordTextEncoder,
    backbone_dims,
    backbone_identity,
    encode_images,
    pseudo_word_batch,
    visual_features,
)
from fusion_diff.training.config import TrainConfig, require
from fusion_diff.training.data import CachedEmbeddingDataset
from fusion_diff.training.task import TaskSpec, ValidationFn
from fusion_diff.utils.paths import cache_dir

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# --------------------------------------------------------------------------- configs
@dataclass
class FTI4CIRModelConfig:
    """The backbone, the mapper (``FTI4CIRMapper`` arguments; reference values) and the loss weights.

    ``backbone`` is an embedder spec for ``fusion_diff.embedding.create_embedder`` (an open_clip
    CLIP-style model), or ``{"backend": "world"}`` for the shapes world's trained backbone.
    """

    backbone: dict[str, Any] = field(
        default_factory=lambda: {"backend": "openclip", "model_name": "ViT-L-14", "pretrained": "openai"}
    )
    num_queries: int = 24
    max_attributes: int = 12
    threshold: float = 0.05
    score_temperature: float = 0.05
    hidden_dim: int | None = None
    num_layers: int = 3
    num_heads: int = 1
    mlp_ratio: float = 2.0
    mapper_hidden_mult: int = 4
    mapper_dropout: float = 0.5
    temperature: float = 0.2  # contrastive loss
    orthogonality_weight: float = 1.0
    regularisation_weight: float = 1.4

    def __post_init__(self) -> None:
        require(1 <= self.max_attributes <= self.num_queries, "max_attributes", "must be in [1, num_queries]")
        require(0 < self.threshold < 1, "threshold", "must be in (0, 1)")
        require(self.score_temperature > 0 and self.temperature > 0, "temperature", "and score_temperature must be > 0")
        require(0 <= self.mapper_dropout < 1, "mapper_dropout", "must be in [0, 1)")
        require(
            self.orthogonality_weight >= 0 and self.regularisation_weight >= 0,
            "orthogonality_weight",
            "and regularisation_weight must be >= 0",
        )

    def mapper_kwargs(self) -> dict[str, Any]:
        names = ("num_queries", "max_attributes", "threshold", "score_temperature", "hidden_dim", "num_layers",
                 "num_heads", "mlp_ratio", "mapper_hidden_mult", "mapper_dropout")  # fmt: skip
        return {name: getattr(self, name) for name in names}


FEATURE_MODES = ("cached", "on_the_fly")


@dataclass
class FTI4CIRDataConfig:
    """Unlabeled training images: a pair set (``pair_dir``) or a folder of images captioned on the fly.

    ``captioner`` is a ``fusion_diff.captioning.create_captioner`` spec (e.g. ``{"type": "generative",
    "model": "Salesforce/blip-image-captioning-base"}``), required with ``image_dir``; captions are
    cached (``caption_cache`` or the default caption cache). ``val_fraction`` of the images (chosen by
    a hash of their id) are held out for validation.
    """

    pair_dir: str | None = None
    image_dir: str | None = None
    captioner: dict[str, Any] | None = None
    caption_cache: str | None = None
    max_images: int | None = None
    val_fraction: float = 0.02
    feature_cache: str | None = None  # default: <cache root>/fti4cir
    feature_batch_size: int = 64
    feature_mode: str = "cached"  # cached: patch tokens on disk | on_the_fly: the frozen tower runs per batch

    def __post_init__(self) -> None:
        require((self.pair_dir is None) != (self.image_dir is None), "pair_dir", "or image_dir: set exactly one")
        require(self.image_dir is None or self.captioner is not None, "captioner", "is required with image_dir")
        require(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        require(self.max_images is None or self.max_images > 0, "max_images", "must be > 0 or null")
        require(self.feature_batch_size > 0, "feature_batch_size", "must be > 0")
        require(self.feature_mode in FEATURE_MODES, "feature_mode", f"must be one of {FEATURE_MODES}")


# --------------------------------------------------------------------------- captions
# fmt: off
_DETERMINERS = frozenset({
    "a", "an", "the", "one", "two", "three", "four", "five", "some", "several", "many", "this", "that", "these",
    "those", "his", "her", "their", "its",
})
_BOUNDARIES = frozenset({  # prepositions, conjunctions, copulas, relative pronouns, common participles
    "with", "without", "on", "in", "of", "at", "near", "under", "over", "above", "below", "behind", "beside", "next",
    "by", "from", "to", "into", "onto", "for", "along", "across", "against", "between", "through", "and", "or", "but",
    "while", "is", "are", "was", "were", "has", "have", "that", "which", "who", "sitting", "standing", "lying",
    "laying", "holding", "wearing",
})
# fmt: on
_CAPTIONER_ARTIFACTS = re.compile(r"\b(?:arafed|araffe|arafe|araffed)\b\s*", re.IGNORECASE)


def split_caption(caption: str) -> tuple[str, str] | None:
    """Split a caption into ``(subject noun phrase, attribute phrase)``; None when it cannot be split.

    Heuristic (no POS tagger offline): drop captioner artefacts ("arafed") and a trailing run of a
    repeated word, then the subject is an optional determiner plus the words up to (excluding) the
    first boundary word after at least one content word: a preposition, conjunction, copula,
    relative pronoun, or an "-ing" verb. "a man riding a horse on a beach" -> ("a man", "riding a
    horse on a beach"). Captions under 4 words, or with nothing after the subject, are not split
    (the reference drops such images too).
    """
    words = _CAPTIONER_ARTIFACTS.sub("", caption).strip().rstrip(".").lower().split()
    while len(words) > 1 and words[-1] == words[-2]:
        words.pop()
    if len(words) < 4:
        return None
    start = 1 if words[0] in _DETERMINERS else 0
    end = start + 1
    while (
        end < len(words) and words[end] not in _BOUNDARIES and not (words[end].endswith("ing") and len(words[end]) > 4)
    ):
        end += 1
    if end >= len(words):
        return None
    return " ".join(words[:end]), " ".join(words[end:])


@dataclass
class TrainingImages:
    """Images (PIL or paths) with their caption split, and an identity of the set for the feature cache."""

    ids: list[str]
    images: Sequence[ImageInput]
    subjects: list[str]
    attributes: list[str]
    source: dict[str, Any]

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not (len(self.images) == len(self.subjects) == len(self.attributes) == n):
            raise ValueError("TrainingImages fields must have one entry per id")
        if n == 0:
            raise DataError(f"No training images in {self.source}. Check the data section of the config.")


def _files_digest(root: Path, files: Sequence[Path]) -> str:
    """Identifies an image set by names, sizes and modification times (content changes invalidate caches)."""
    digest = hashlib.sha1()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def read_pair_set_images(pair_dir: str | os.PathLike, max_images: int | None = None) -> TrainingImages:
    """A shapes-world pair set: each record's image with the scene graph's subject / attribute split."""
    from data_synth.shapes.pairs import MANIFEST_FILE, read_pair_set

    root = Path(pair_dir)
    records = read_pair_set(root)[:max_images]
    # The set's manifest changes whenever the set is rebuilt; features are cached per image id within it.
    source = {
        "pair_dir": str(root.resolve()),
        "manifest": hashlib.sha1((root / MANIFEST_FILE).read_bytes()).hexdigest()[:16],
    }
    return TrainingImages(
        [r.id for r in records],
        [r.image for r in records],
        [r.subject for r in records],
        [r.attributes for r in records],
        source,
    )


def read_captioned_folder(
    image_dir: str | os.PathLike,
    captioner_spec: dict[str, Any],
    embedder: JointEmbedder,
    caption_cache: str | None = None,
    max_images: int | None = None,
) -> TrainingImages:
    """Every image under ``image_dir`` (sorted), captioned (cached) and split; unsplittable captions are dropped."""
    from fusion_diff.captioning import cache as caption_cache_module
    from fusion_diff.captioning.factory import create_captioner

    root = Path(image_dir)
    if not root.is_dir():
        raise MissingFileError(f"Training image folder not found: {root}. Fix data.image_dir.")
    every = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    source = {"image_dir": str(root.resolve()), "files": _files_digest(root, every)}
    paths = every[:max_images]
    ids = [str(p.relative_to(root)) for p in paths]
    captioner = create_captioner(captioner_spec, embedder)
    cache = caption_cache or caption_cache_module.default_caption_cache_path(root.name, captioner)
    captions = caption_cache_module.caption_with_cache(captioner, ids, paths, cache=cache, progress=True)
    splits = [split_caption(c) for c in captions]
    keep = [i for i, s in enumerate(splits) if s is not None]
    return TrainingImages(
        [ids[i] for i in keep],
        [paths[i] for i in keep],
        [splits[i][0] for i in keep],
        [splits[i][1] for i in keep],
        source,
    )


def load_backbone(spec: dict[str, Any]) -> JointEmbedder:
    """The frozen backbone: an embedder spec (``fusion_diff.embedding.create_embedder``), e.g.
    ``{"backend": "world", "cache": optional dir}`` for the shapes world's backbone, which must already be built
    (``fusion-diff world backbone``): it is not trained here.
    """
    from fusion_diff.embedding.factory import BACKENDS, create_embedder

    spec = dict(spec)
    if BACKENDS.resolve(spec.get("backend", "openclip")) == "world":
        spec.setdefault("train_if_missing", False)
    return create_embedder(spec)


# --------------------------------------------------------------------------- losses
def nt_xent_loss(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric NT-Xent (the reference's PALAVRA loss): ``a_i``'s positive is ``b_i``; the other ``2B - 2``
    rows of ``[a; b]`` are negatives."""
    joint = F.normalize(torch.cat([a, b]), dim=-1)
    n = a.shape[0]
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=joint.device)
    logits = (joint @ joint.T / temperature).masked_fill(self_pairs, float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(joint.device)
    return F.cross_entropy(logits, targets)


def orthogonality_loss(local_features: torch.Tensor) -> torch.Tensor:
    """MSE between the Gram matrix of each image's unit-norm local features and the identity."""
    gram = local_features @ local_features.transpose(1, 2)
    eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype).expand_as(gram)
    return F.mse_loss(gram, eye)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos`` (``CosineEmbeddingLoss`` with target 1)."""
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


# --------------------------------------------------------------------------- data
class FTI4CIRDataset(CachedEmbeddingDataset):
    """Precomputed per-image tensors; batches gathered with one ``index_select`` per field.

    Fields: ``image_embeds [d]`` (unit norm), ``patch_tokens [P, w]``, ``subject_prompt_ids [L]``
    ("a photo of * with {t}"), ``attribute_prefix_ids [L]`` ("a photo of {s} with"),
    ``caption_embeds [d]`` (unit-norm features of "a photo of {s} with {t}"). On the fly (``images``
    and ``preprocess`` given), ``image_embeds`` and ``patch_tokens`` are not stored: batches carry the
    preprocessed ``pixels [3, H, W]`` instead, and the task runs the frozen tower on them.
    """

    def __init__(
        self,
        ids: list[str],
        tensors: dict[str, torch.Tensor],
        identities: dict[str, dict] | None = None,
        images: Sequence[ImageInput] | None = None,
        preprocess: Any = None,
    ):
        self.ids, self.tensors, self.identities = ids, tensors, identities or {}
        self.images, self.preprocess = images, preprocess

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(index)
        if self.images is not None:
            item["pixels"] = self.preprocess(as_rgb(self.images[index]))
        return item

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = super().__getitems__(indices)
        if self.images is not None:
            batch["pixels"] = torch.stack([self.preprocess(as_rgb(self.images[i])) for i in indices])
        return batch


def _cached(
    root: Path, identity: dict[str, Any], ids: list[str], items: Sequence, embed_fn, batch_size: int
) -> torch.Tensor:
    """``embed_with_cache`` into ``root/<kind>-<identity digest>``: another identity gets another folder.

    Patch tokens are large (4 bytes x (d + P x w) per image: 19 KB for the shapes world, 1 MB for a
    ViT-L/14 at 224 px), so a cache that would not fit on its disk is refused before any work.
    """
    cache = EmbeddingCache.open(root / f"{identity['kind']}-{identity_digest(identity)}", identity)
    needed = len(cache.missing(ids)) * 4 * identity["dim"]
    free = shutil.disk_usage(cache.root).free
    if needed > free:
        raise DataError(
            f"The FTI4CIR feature cache {cache.root} needs {needed / 2**30:.1f} GiB more but the disk has "
            f"{free / 2**30:.1f} GiB free. Point data.feature_cache at a larger disk or lower data.max_images."
        )
    return embed_with_cache(cache, ids, items, embed_fn, batch_size=batch_size, progress=True)


def build_fti4cir_dataset(
    embedder: JointEmbedder,
    prompter: PseudoWordPrompter,
    text_encoder: PseudoWordTextEncoder,
    images: TrainingImages,
    cache_root: Path,
    batch_size: int = 64,
    feature_mode: str = "cached",
) -> FTI4CIRDataset:
    """Features of every image (one pass of the frozen towers, cached; the image tower's only with
    ``feature_mode="cached"``) plus the tokenized prompts."""
    model = embedder.model
    dims = backbone_dims(model)
    d, p, w = dims["embed_dim"], dims["num_patches"], dims["patch_dim"]
    backbone = backbone_identity(embedder)

    def visual(items: list[ImageInput]) -> torch.Tensor:
        pooled, patches = encode_images(model, embedder.preprocess, items, batch_size=batch_size)
        return torch.cat([pooled, patches.flatten(1)], dim=1)

    visual_identity = {
        **backbone,
        "kind": "fti4cir-visual",
        "num_patches": p,
        "patch_dim": w,
        "dim": d + p * w,
        "source": images.source,
    }
    sentences = [f"{s} | {t}" for s, t in zip(images.subjects, images.attributes)]
    text_identity = {
        **backbone,
        "kind": "fti4cir-caption",
        "prompt": prompter.template(),
        "sentences": hashlib.sha1("\n".join(sentences).encode()).hexdigest()[:16],
    }

    def caption_features(pairs: list[tuple[str, str]]) -> torch.Tensor:
        subjects, attributes = zip(*pairs)
        ids = prompter.caption_prompts(subjects, attributes).to(next(model.parameters()).device)
        with torch.no_grad():
            return F.normalize(text_encoder(ids).float(), dim=-1)

    pairs = list(zip(images.subjects, images.attributes))
    caption_embeds = _cached(cache_root, text_identity, images.ids, pairs, caption_features, 1024)
    tensors = {
        "subject_prompt_ids": prompter.subject_prompts(images.attributes),
        "attribute_prefix_ids": prompter.attribute_prefixes(images.subjects),
        "caption_embeds": caption_embeds,
    }
    if feature_mode == "on_the_fly":
        return FTI4CIRDataset(
            images.ids, tensors, {"caption_embeds": text_identity}, list(images.images), embedder.preprocess
        )
    table = _cached(cache_root, visual_identity, images.ids, images.images, visual, batch_size * 16)
    tensors["image_embeds"] = table[:, :d]
    tensors["patch_tokens"] = table[:, d:].view(-1, p, w)  # a view: rows are copied once, by the split
    return FTI4CIRDataset(images.ids, tensors, {"image_embeds": visual_identity, "caption_embeds": text_identity})


def is_validation(image_id: str, fraction: float) -> bool:
    """A stable hash split: the same id is always on the same side, whatever the order or size of the set."""
    return int(hashlib.sha1(image_id.encode()).hexdigest()[:8], 16) < fraction * 0xFFFFFFFF


# --------------------------------------------------------------------------- the task
class FTI4CIRTask:
    """``TrainingTask`` for FTI4CIR; the backbone (visual and text towers) stays frozen."""

    name = "fti4cir"

    def __init__(
        self,
        model_config: FTI4CIRModelConfig,
        embedder: JointEmbedder,
        images: TrainingImages,
        val_fraction: float = 0.02,
        feature_cache: str | os.PathLike | None = None,
        feature_batch_size: int = 64,
        validation_fn: ValidationFn | None = None,
        feature_mode: str = "cached",
    ):
        if not all(hasattr(embedder, a) for a in ("model", "tokenizer", "preprocess")):
            raise ConfigError(
                f"FTI4CIR trains on an open_clip backbone (.model/.tokenizer/.preprocess); got {type(embedder).__name__}."
            )
        self.config = model_config
        self.embedder = embedder
        embedder.model.requires_grad_(False)  # frozen: gradients flow through the text tower, not into it
        self.validation_fn = validation_fn
        dims = backbone_dims(embedder.model)
        self.mapper = FTI4CIRMapper(
            embed_dim=dims["embed_dim"],
            patch_dim=dims["patch_dim"],
            token_dim=dims["token_dim"],
            embedder_identity=backbone_identity(embedder),
            **model_config.mapper_kwargs(),
        )
        self.prompter = PseudoWordPrompter(embedder.tokenizer)
        self.text_encoder = PseudoWordTextEncoder(embedder.model, self.prompter.placeholder_id, self.prompter.eot_id)
        cache_root = Path(feature_cache) if feature_cache else cache_dir("fti4cir")
        dataset = build_fti4cir_dataset(
            embedder, self.prompter, self.text_encoder, images, cache_root, feature_batch_size, feature_mode
        )
        val = torch.tensor([is_validation(i, val_fraction) for i in images.ids])
        if val.all():
            raise DataError(f"All {len(val)} training images fell into the validation split; lower data.val_fraction.")
        self.dataset = _rows(dataset, (~val).nonzero().squeeze(1))
        self.val_dataset = _rows(dataset, val.nonzero().squeeze(1)) if val.any() else None

    # -- TrainingTask -----------------------------------------------------------------------------
    def trainable_module(self) -> nn.Module:
        return self.mapper

    def frozen_modules(self) -> Iterable[nn.Module]:
        return (self.embedder.model,)

    def train_dataset(self) -> torch.utils.data.Dataset:
        return self.dataset

    def with_image_features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch with ``image_embeds`` and ``patch_tokens``: cached, or from the frozen tower on its pixels."""
        if "pixels" not in batch:
            return batch
        parameter = next(self.embedder.model.parameters())
        with torch.no_grad():
            pooled, patches = visual_features(self.embedder.model, batch["pixels"].to(parameter.device, parameter.dtype))
        return {**batch, "image_embeds": pooled.float(), "patch_tokens": patches}

    def losses(self, output: FTI4CIRMapperOutput, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The three loss terms; the three pseudo-word prompts go through the text tower as one batch."""
        r = output.num_attributes
        full_ids = self.prompter.pseudo_prompts(r)
        attribute_ids = self.prompter.splice(batch["attribute_prefix_ids"], r)
        token_ids = torch.cat([full_ids, batch["subject_prompt_ids"], attribute_ids])
        both, both_counts = pseudo_word_batch(output, "both")
        subject, subject_counts = pseudo_word_batch(output, "subject")
        attributes, attribute_counts = pseudo_word_batch(output, "attributes")
        width = both.shape[1]
        words = torch.cat([both, F.pad(subject, (0, 0, 0, width - 1)), F.pad(attributes, (0, 0, 0, 1))])
        counts = torch.cat([both_counts, subject_counts, attribute_counts])
        full, subject_only, attribute_only = self.text_encoder(token_ids, words, counts).float().chunk(3)
        caption = batch["caption_embeds"]
        return {
            "contrastive": nt_xent_loss(batch["image_embeds"], full, self.config.temperature),
            "orthogonality": orthogonality_loss(output.local_features),
            "regularisation": cosine_distance(subject_only, caption)
            + cosine_distance(attribute_only, caption)
            + cosine_distance(full, caption),
        }

    def compute_loss(
        self, trainable: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        batch = self.with_image_features(batch)
        devices = [batch["image_embeds"].device] if batch["image_embeds"].is_cuda else []
        with torch.random.fork_rng(devices=devices):  # the mappers' dropout draws from the step's generator
            torch.manual_seed(generator.initial_seed())
            output = trainable(batch["image_embeds"], batch["patch_tokens"].float())
        terms = self.losses(output, batch)
        cfg = self.config
        loss = (
            terms["contrastive"]
            + cfg.orthogonality_weight * terms["orthogonality"]
            + cfg.regularisation_weight * terms["regularisation"]
        )
        logged = {name: float(value.detach()) for name, value in terms.items()}
        logged["num_attributes"] = float(output.num_attributes.float().mean())
        return loss, logged

    @torch.no_grad()
    def validate(self, trainable: nn.Module, batch_size: int = 256) -> dict[str, float]:
        """With ``validation_fn``: it scores an ``FTI4CIRPipeline``. Otherwise, on the held-out images: the
        losses, the mean attribute count, and recall@1 of each image from its own pseudo-sentence
        ("a photo of S* with A1* ... Ar*") among all held-out images."""
        if self.validation_fn is not None:
            return self.validation_fn(
                FTI4CIRPipeline(trainable, self.embedder.model, self.embedder.tokenizer, self.embedder.preprocess)
            )
        if self.val_dataset is None:
            return {}
        device = next(trainable.parameters()).device
        sums: dict[str, float] = {}
        queries, gallery = [], []
        n = len(self.val_dataset)
        for start in range(0, n, batch_size):
            rows = list(range(start, min(start + batch_size, n)))
            batch = {k: v.to(device) for k, v in self.val_dataset.__getitems__(rows).items()}
            batch = self.with_image_features(batch)
            gallery.append(batch["image_embeds"])
            output = trainable(batch["image_embeds"], batch["patch_tokens"].float())
            terms = {name: float(value) for name, value in self.losses(output, batch).items()}
            terms["num_attributes"] = float(output.num_attributes.float().mean())
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value * len(output.num_attributes) / n
            both, counts = pseudo_word_batch(output, "both")
            queries.append(self.text_encoder(self.prompter.pseudo_prompts(output.num_attributes), both, counts).float())
        ranks = (F.normalize(torch.cat(queries), dim=-1) @ torch.cat(gallery).T).argmax(dim=1)
        sums["pseudo_sentence_image_r1"] = float((ranks == torch.arange(n, device=device)).float().mean())
        return sums

    def save_final(self, trainable: nn.Module, output_dir: Path) -> None:
        trainable.save_pretrained(output_dir)


def _rows(dataset: FTI4CIRDataset, rows: torch.Tensor) -> FTI4CIRDataset:
    tensors = {name: tensor.index_select(0, rows) for name, tensor in dataset.tensors.items()}
    images = None if dataset.images is None else [dataset.images[i] for i in rows.tolist()]
    return FTI4CIRDataset([dataset.ids[i] for i in rows.tolist()], tensors, dataset.identities, images, dataset.preprocess)


def build(config: TrainConfig, validation_fn: ValidationFn | None = None) -> FTI4CIRTask:
    """The task of a ``task: fti4cir`` config: backbone, images and their captions, cached features."""
    data: FTI4CIRDataConfig = config.data
    embedder = load_backbone(config.model.backbone)
    if data.pair_dir is not None:
        images = read_pair_set_images(data.pair_dir, data.max_images)
    else:
        images = read_captioned_folder(data.image_dir, data.captioner, embedder, data.caption_cache, data.max_images)
    return FTI4CIRTask(
        config.model,
        embedder,
        images,
        data.val_fraction,
        data.feature_cache,
        data.feature_batch_size,
        validation_fn,
        data.feature_mode,
    )


TASK = TaskSpec(name="fti4cir", model_config=FTI4CIRModelConfig, data_config=FTI4CIRDataConfig, build=build)
