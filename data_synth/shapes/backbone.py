"""The shapes world's "pretrained" backbone: a small open_clip model trained contrastively on world pairs.

It stands in for a real CLIP: trained once with open_clip's own ``ClipLoss``, saved as an open_clip
checkpoint in ``cache_dir("shapes_backbone")`` beside a manifest (config, checksum, held-out quality),
and loaded back through ``OpenCLIPEmbedder``'s local-checkpoint path exactly like a real ViT.

Training data are fresh random *training-split* scenes every step (never held out), each caption a
random paraphrase; half of every batch are one-edit siblings of the other half, so the batch holds
hard negatives that differ in one attribute (what composed retrieval needs the space to resolve),
and half of the rest are single objects. Beside ``ClipLoss``, a throw-away linear head reads the
scene graph out of the image embedding (``SceneGraphHead``, shape weighted 5x): the world's stand-in
for the visual knowledge a real CLIP brings. What made shape learnable in ten CPU-minutes, measured
on held-out single objects (seed 0, about 100k training images each; every row is a
``fusion-diff world backbone`` command with ``--batch-size --steps --warmup-steps --single-fraction
--shape-loss-weight``):

=====================================================  =======  ===========  ===============
recipe                                                 warm-up  zero-shot    image->caption
                                                                shape        R@1
=====================================================  =======  ===========  ===============
batch 256 x 400 steps, head (the previous default)     60       18.9%        83.0%
 + 30% single objects, shape weight 3                  60       48.8%        84.6%
batch 128 x 800, 30% single objects, shape weight 3    120      73.1%        88.5%
batch 128 x 800, 50% single objects, shape weight 5    120      83.8%        84.6%
batch 64 x 1600, 30% single objects, shape weight 3    200      80.3%        91.2%
batch 64 x 1600, 50% single objects, shape weight 5    200      87.4%        86.4%
same, crescent instead of hexagon (this config)        200      97.0%        88.5%
=====================================================  =======  ===========  ===============

A tiny ViT from scratch learns shape by the number of updates more than by samples. At 87.4%,
103 of the 126 errors were circle <-> hexagon (both at chance between the two): at the model's 48-px
input a hexagon 8-14 px wide is a circle with one-pixel corners. The world's sixth shape is now a
crescent, which every render shows as a different silhouette; the other seven kept their 98%.
Hard-negative captions (the same wording with one attribute swapped) did not help and are not
implemented.

Negation (``negation_fraction``, off by default): a share of captions also name a kind of object their
scene lacks ("..., and no red circle", "..., without any red circle"), where possible the object its
one-edit partner in the batch has, so the only words telling the two captions apart are the negation.
Without them the text tower never reads "no" and embeds "there is no red circle" like "a red circle"
(pooled cosine 0.994); at 0.3, 0.75, with held-out shape and image->caption R@1 where they were (97.2%,
87.8%). It did not help composed retrieval's removals (README, "Removals: where they fail"), hence off.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data_synth.shapes.captions import absent_kinds, canonical_caption, caption_scene, negated_caption, object_phrase
from data_synth.shapes.edits import apply_edit, sample_edit
from data_synth.shapes.render import render, render_array, world_fingerprint
from data_synth.shapes.scene import COLOURS, GRID, MAX_OBJECTS, SHAPES, SIZES, Scene, SceneObject, sample_scene_in_split
from fusion_diff.embedding.openclip import OpenCLIPEmbedder, save_checkpoint
from fusion_diff.embedding.registry import ensure_registered
from fusion_diff.embedding.text_checks import fits_context, tokenize_checked
from fusion_diff.errors import MissingFileError
from fusion_diff.utils.io import artifact_manifest, drop_when_off, read_json, write_json_atomic
from fusion_diff.utils.paths import cache_dir
from fusion_diff.utils.runtime import adamw

logger = logging.getLogger(__name__)

WORLD_MODEL = "shapes-vit-tiny"  # fusion_diff/embedding/model_configs/shapes-vit-tiny.json
CHECKPOINT_NAME = "open_clip_model.safetensors"
MANIFEST_NAME = "manifest.json"
MANIFEST_KIND = "shapes_backbone"
# Edit kinds of the one-edit siblings, with weights. Shape is the slowest attribute to learn (colour,
# size and position alone tell most random scenes apart), so shape-only differences are over-sampled.
SIBLING_KINDS = {"replace_shape": 3.0, "recolour": 1.0, "resize": 1.0, "move": 1.0, "swap": 1.0, "add": 1.0, "remove": 1.0}


@dataclass(frozen=True)
class BackboneConfig:
    """How the world backbone is trained. ``time_budget_s`` (if set) ends training early and compresses
    the cosine schedule to the time actually available, so a slow machine still gets a finished schedule."""

    model_name: str = WORLD_MODEL
    steps: int = 1600
    batch_size: int = 64  # small batches, many steps: a tiny ViT from scratch learns shape by updates, not samples
    lr: float = 1e-3
    scene_loss_weight: float = 1.0
    shape_loss_weight: float = 5.0  # shape, inside the scene-graph loss: the attribute contrastive learning neglects
    weight_decay: float = 0.1
    warmup_steps: int = 200
    sibling_fraction: float = 0.5
    single_fraction: float = 0.5  # single-object scenes: there shape is what tells captions apart
    negation_fraction: float = 0.0  # captions that also name a kind the scene lacks ("..., and no red circle"); see above
    render_size: int = 64
    seed: int = 0
    data_workers: int = 1
    threads: int = 2
    time_budget_s: float | None = None
    eval_size: int = 1000  # held-out single objects, and held-out pairs for R@1
    world: str = field(default_factory=world_fingerprint)  # what the world looked like (not a setting)

    def __post_init__(self) -> None:
        for name in ("sibling_fraction", "single_fraction", "negation_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"BackboneConfig.{name} must be in [0, 1], got {getattr(self, name)}")

    @classmethod
    def for_steps(cls, steps: int, **overrides: Any) -> BackboneConfig:
        """The default recipe at another length: the warm-up stays an eighth of the steps (200 of 1,600)."""
        return cls(steps=steps, warmup_steps=max(1, round(steps * cls.warmup_steps / cls.steps)), **overrides)

    @classmethod
    def quick(cls, **overrides: Any) -> BackboneConfig:
        """A few tiny steps: for tests and smoke runs (the weights are not useful)."""
        return replace(cls(steps=3, batch_size=16, warmup_steps=1, data_workers=0, eval_size=16), **overrides)

    def identity(self) -> dict[str, Any]:
        """What determines the weights: everything but the torch threads and the loader workers."""
        ignored = {"data_workers", "threads"}
        identity = {k: v for k, v in asdict(self).items() if k not in ignored}
        return drop_when_off(identity, {"negation_fraction": 0.0})  # caches from before the setting stay valid


# --------------------------------------------------------------------------- data


def _sibling(scene: Scene, rng: random.Random) -> Scene:
    """A training-split scene one edit away from ``scene`` (``scene`` itself if none is found)."""
    kinds, weights = list(SIBLING_KINDS), list(SIBLING_KINDS.values())
    for _ in range(8):
        edit = sample_edit(scene, rng, kinds=rng.choices(kinds, weights), allow_composite=False)
        if edit is not None and not (other := apply_edit(scene, edit)).is_heldout():
            return other
    return scene


def training_scenes(rng: random.Random, n: int, sibling_fraction: float, single_fraction: float = 0.0) -> list[Scene]:
    """``n`` training scenes: random ones (a ``single_fraction`` share of them with one object), then
    one-edit siblings of the first of them."""
    n_siblings = int(n * sibling_fraction)
    n_base = n - n_siblings
    n_single = int(n_base * single_fraction)
    base = [sample_scene_in_split(rng, heldout=False, max_objects=1 if i < n_single else MAX_OBJECTS) for i in range(n_base)]
    return base + [_sibling(scene, rng) for scene in base[:n_siblings]]


def sibling_partners(n: int, sibling_fraction: float) -> list[int | None]:
    """Per scene of ``training_scenes(rng, n, sibling_fraction)``, the index of its one-edit partner (None if it has none)."""
    n_siblings = int(n * sibling_fraction)
    n_base = n - n_siblings
    partners: list[int | None] = [None] * n
    for i in range(n_siblings):
        partners[i], partners[n_base + i] = n_base + i, i
    return partners


def with_negations(
    scenes: list[Scene],
    captions: list[str],
    partners: list[int | None],
    fraction: float,
    rng: random.Random,
    fits: Callable[[list[str]], list[bool]],
) -> list[str]:
    """``captions`` where a ``fraction`` of them also say which kind of object their scene lacks.

    The kind named is one the scene's one-edit partner has, where there is one (an added or removed object):
    then the batch holds "A and B, and no C" beside the image of A, B and C, and only the negation tells the
    two apart, which is what teaches the text tower the word. Otherwise it is a random absent kind. A negated
    caption the text encoder would cut (``fits`` False) keeps its plain form, so no caption loses its end.
    """
    chosen: dict[int, str] = {}
    for i, scene in enumerate(scenes):
        if rng.random() >= fraction:
            continue
        absent = absent_kinds(scene)
        partner = partners[i]
        from_partner = [] if partner is None else [(o.colour, o.shape) for o in scenes[partner].objects if (o.colour, o.shape) in absent]
        chosen[i] = negated_caption(captions[i], rng.choice(from_partner or absent), rng)
    keep = fits(list(chosen.values()))
    out = list(captions)
    for (i, caption), ok in zip(chosen.items(), keep):
        if ok:
            out[i] = caption
    return out


def preprocess_batch(images: np.ndarray, preprocess_cfg: dict[str, Any]) -> torch.Tensor:
    """open_clip's eval transform (bicubic antialiased resize, normalise) on a uint8 batch [N, H, W, 3]
    at once: ~10x cheaper than per-image PIL transforms, same result up to resampling round-off."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    size = preprocess_cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(pixels.shape[-2:]) != size:
        pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False).clamp_(0.0, 1.0)
    mean = torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1)
    return (pixels - mean) / std


# Per grid cell, the attributes the scene-graph head reads out of the image embedding (0 = empty cell).
CELL_ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES}


def scene_targets(scenes: list[Scene]) -> torch.Tensor:
    """[N, GRID*GRID, len(CELL_ATTRIBUTES)] class indices: per cell, 0 if empty, else 1 + the value's index."""
    targets = torch.zeros(len(scenes), GRID * GRID, len(CELL_ATTRIBUTES), dtype=torch.long)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            cell = obj.position[0] * GRID + obj.position[1]
            for j, (attribute, values) in enumerate(CELL_ATTRIBUTES.items()):
                targets[i, cell, j] = 1 + values.index(getattr(obj, attribute))
    return targets


class SceneGraphHead(torch.nn.Module):
    """A linear read-out of every cell's occupancy, shape, colour and size from the image embedding,
    trained beside the contrastive loss and then thrown away (it is not part of the checkpoint).

    Why: a real CLIP arrives knowing shapes from 400M pairs; in ten CPU-minutes, contrastive learning
    alone does not find them: zero-shot shape stays at chance (11%) while colour reaches 100%, because
    colour, size and count already tell most captions apart, and the text tower then maps shape words
    onto one another. ``weights`` scale single attributes' terms (the backbone weights shape 5x).
    The recipe without the head: `fusion-diff world backbone --scene-loss-weight 0`.
    """

    def __init__(self, embed_dim: int, weights: dict[str, float] | None = None) -> None:
        super().__init__()
        self.weights = dict(weights or {})
        # per cell: occupied or not, then each attribute's value (scored on occupied cells only)
        self.sizes = [2] + [len(values) for values in CELL_ATTRIBUTES.values()]
        self.proj = torch.nn.Linear(embed_dim, GRID * GRID * sum(self.sizes))

    def loss(self, image_features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum of the occupancy loss and one cross-entropy per attribute over the occupied cells."""
        logits = self.proj(image_features).view(len(image_features), GRID * GRID, sum(self.sizes))
        occupancy, *attributes = logits.split(self.sizes, dim=-1)
        occupied = targets[..., 0] > 0
        loss = F.cross_entropy(occupancy.reshape(-1, 2), occupied.long().reshape(-1))
        for j, (name, attribute_logits) in enumerate(zip(CELL_ATTRIBUTES, attributes)):
            term = F.cross_entropy(attribute_logits[occupied], targets[..., j][occupied] - 1)
            loss = loss + self.weights.get(name, 1.0) * term
        return loss


class PairStream(torch.utils.data.IterableDataset):
    """Endless (pixels, tokens, scene targets) batches of fresh training scenes. Batch ``i`` depends only
    on (seed, i), so any number of loader workers yields the same sequence."""

    def __init__(self, config: BackboneConfig, preprocess_cfg: dict[str, Any], tokenizer: Callable) -> None:
        super().__init__()
        self.config, self.preprocess_cfg, self.tokenizer = config, preprocess_cfg, tokenizer

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        rng = random.Random(f"{cfg.seed}:{index}")
        scenes = training_scenes(rng, cfg.batch_size, cfg.sibling_fraction, cfg.single_fraction)
        images = np.stack([render_array(s, cfg.render_size, rng) for s in scenes])
        captions = [caption_scene(s, rng) for s in scenes]
        if cfg.negation_fraction:
            context = self.tokenizer.context_length
            partners = sibling_partners(len(scenes), cfg.sibling_fraction)
            fits = functools.partial(fits_context, self.tokenizer, context=context)
            captions = with_negations(scenes, captions, partners, cfg.negation_fraction, rng, fits)
        tokens = tokenize_checked(self.tokenizer, captions)
        return preprocess_batch(images, self.preprocess_cfg), tokens, scene_targets(scenes)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        torch.set_num_threads(1)  # leave the cores to the training process
        for index in itertools.count(start, step):
            yield self.batch(index)


# --------------------------------------------------------------------------- training


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's recipe: no decay on gains, biases, embeddings-like 1-d tensors and the logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        exclude = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (on a shared machine, wall time is not the cost)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _lr_factor(progress: float, step: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_backbone(config: BackboneConfig = BackboneConfig(), progress: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the world backbone from scratch; return (model, training stats)."""
    ensure_registered()
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    model = open_clip.create_model(config.model_name)
    tokenizer = open_clip.get_tokenizer(config.model_name)
    loader = torch.utils.data.DataLoader(
        PairStream(config, dict(model.visual.preprocess_cfg), tokenizer),
        batch_size=None,
        num_workers=config.data_workers,
        prefetch_factor=4 if config.data_workers else None,
        persistent_workers=False,
    )
    groups = _param_groups(model, config.weight_decay)
    scene_head = SceneGraphHead(open_clip.get_model_config(config.model_name)["embed_dim"], {"shape": config.shape_loss_weight})
    if config.scene_loss_weight:
        groups.append({"params": list(scene_head.parameters()), "weight_decay": 0.0})
    optimizer = adamw(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    model.train()
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    bar = tqdm(total=config.steps, desc="training world backbone", unit="step", disable=not progress)
    step, loss_value = 0, float("nan")
    batches = iter(loader)
    for step, (pixels, tokens, targets) in enumerate(batches):
        elapsed = time.perf_counter() - start
        done = step / config.steps
        if config.time_budget_s:
            done = max(done, elapsed / config.time_budget_s)
        if done >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(done, step, config.warmup_steps)
        image_features = model.encode_image(pixels)
        text_features = model.encode_text(tokens, normalize=True)
        loss = loss_fn(F.normalize(image_features, dim=-1), text_features, model.logit_scale.exp())
        if config.scene_loss_weight:
            loss = loss + config.scene_loss_weight * scene_head.loss(image_features, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        loss_value = loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
    bar.close()
    del batches  # joins the loader workers, so their CPU time is counted below
    model.eval()
    stats = {
        "steps": step,
        "samples": step * config.batch_size,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(_cpu_seconds() - cpu_start, 1),  # this process + finished workers: load-independent
        "final_loss": round(loss_value, 4),
    }
    return model, stats


# --------------------------------------------------------------------------- held-out quality


def _heldout_scenes(rng: random.Random, n: int, distinct: bool, **kwargs: Any) -> list[Scene]:
    scenes: list[Scene] = []
    seen: set[str] = set()
    while len(scenes) < n:
        scene = sample_scene_in_split(rng, heldout=True, **kwargs)
        if distinct and scene.key() in seen:
            continue
        seen.add(scene.key())
        scenes.append(scene)
    return scenes


def _class_prompts(attribute: str) -> dict[str, list[str]]:
    """Prompt ensembles for zero-shot classification: every object phrase with that value, positions left out."""
    values = {"colour": list(COLOURS), "shape": list(SHAPES)}[attribute]
    prompts: dict[str, list[str]] = {}
    for value in values:
        objects = [
            SceneObject((0, 0), shape=value if attribute == "shape" else shape, colour=value if attribute == "colour" else colour, size=size)
            for shape in (SHAPES if attribute == "colour" else [value])
            for colour in (COLOURS if attribute == "shape" else [value])
            for size in SIZES
        ]
        prompts[value] = [object_phrase(o, with_position=False) for o in objects]
    return prompts


def evaluate_backbone(embedder: OpenCLIPEmbedder, n_objects: int = 1000, n_pairs: int = 1000, seed: int = 1234) -> dict[str, float]:
    """Held-out quality: zero-shot colour / shape accuracy on single-object scenes (prompt ensembles) and
    image->caption / caption->image R@1 among ``n_pairs`` distinct held-out scenes with canonical captions."""
    rng = random.Random(seed)
    metrics: dict[str, float] = {}
    singles = _heldout_scenes(rng, n_objects, distinct=False, min_objects=1, max_objects=1)
    image_embeds = embedder.embed_images([render(s, rng=rng) for s in singles], batch_size=250)
    for attribute in ("colour", "shape"):
        prompts = _class_prompts(attribute)
        names = list(prompts)
        flat = [p for name in names for p in prompts[name]]
        text = embedder.embed_texts(flat).view(len(names), -1, embedder.dim).mean(1)
        predicted = (image_embeds @ F.normalize(text, dim=-1).T).argmax(1)
        truth = torch.tensor([names.index(getattr(s.objects[0], attribute)) for s in singles])
        metrics[f"zero_shot_{attribute}_acc"] = (predicted == truth).float().mean().item()
    scenes = _heldout_scenes(rng, n_pairs, distinct=True)
    image_embeds = embedder.embed_images([render(s, rng=rng) for s in scenes], batch_size=250)
    text_embeds = embedder.embed_texts([canonical_caption(s) for s in scenes])
    sims = image_embeds @ text_embeds.T
    truth = torch.arange(len(scenes))
    metrics["image_to_caption_r1"] = (sims.argmax(1) == truth).float().mean().item()
    metrics["caption_to_image_r1"] = (sims.argmax(0) == truth).float().mean().item()
    return {k: round(v, 4) for k, v in metrics.items()}


# --------------------------------------------------------------------------- cache


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class BackboneCache:
    """A backbone cache folder: ``open_clip_model.safetensors`` + ``manifest.json`` (written last, so a
    manifest means a finished checkpoint; its size and sha256 catch truncation and corruption)."""

    root: Path
    problems: list[str] = field(default_factory=list)

    @classmethod
    def at(cls, root: str | os.PathLike | None = None) -> BackboneCache:
        return cls(Path(root) if root is not None else cache_dir("shapes_backbone"))

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT_NAME

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def manifest(self) -> dict[str, Any]:
        return read_json(self.manifest_path, "backbone manifest")

    def validate(self, config: BackboneConfig | None = None) -> bool:
        """True if the cache holds a complete, uncorrupted checkpoint (of ``config``, if given);
        otherwise False, with the reasons in ``self.problems``."""
        self.problems = []
        if not self.manifest_path.is_file():
            self.problems.append(f"no manifest at {self.manifest_path} (never built, or interrupted)")
            return False
        try:
            manifest = self.manifest()
        except Exception as err:  # noqa: BLE001 - any unreadable manifest means "rebuild"
            self.problems.append(str(err))
            return False
        if manifest.get("kind") != MANIFEST_KIND:
            self.problems.append(f"{self.manifest_path} is not a shapes-backbone manifest")
            return False
        if not self.checkpoint.is_file():
            self.problems.append(f"checkpoint {self.checkpoint} is missing")
            return False
        expected = manifest.get("checkpoint", {})
        if self.checkpoint.stat().st_size != expected.get("bytes") or _sha256(self.checkpoint) != expected.get("sha256"):
            self.problems.append(f"checkpoint {self.checkpoint} does not match its manifest's size/sha256 (partial or corrupt)")
            return False
        if config is not None and manifest.get("config") != config.identity():
            self.problems.append(f"{self.root} holds a backbone trained with another config")
            return False
        return True

    def save_checkpoint(self, model: torch.nn.Module) -> None:
        """Step 1 of a build: the manifest goes first, so until ``commit`` the cache reads as partial."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest_path.unlink(missing_ok=True)
        save_checkpoint(model, self.checkpoint)

    def commit(self, config: BackboneConfig, stats: dict[str, Any], metrics: dict[str, float]) -> None:
        """Step 2: the manifest (checkpoint size + sha256), written atomically; the cache is now valid."""
        checkpoint = {"file": CHECKPOINT_NAME, "bytes": self.checkpoint.stat().st_size, "sha256": _sha256(self.checkpoint)}
        manifest = artifact_manifest(
            MANIFEST_KIND,
            config.identity(),
            config.seed,
            model_name=config.model_name,
            checkpoint=checkpoint,
            training=stats,
            heldout_quality=metrics,
        )
        write_json_atomic(self.manifest_path, manifest)

    def clear(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)


def build_backbone(
    config: BackboneConfig = BackboneConfig(), cache: str | os.PathLike | None = None, progress: bool = True, evaluate: bool = True
) -> dict[str, Any]:
    """Train, evaluate on held-out scenes, and write the cache; return its manifest."""
    store = BackboneCache.at(cache)
    model, stats = train_backbone(config, progress)
    metrics: dict[str, float] = {}
    store.clear()
    store.save_checkpoint(model)
    if evaluate:  # through the saved checkpoint and OpenCLIPEmbedder, exactly as users will load it
        metrics = evaluate_backbone(_embedder(store, config.model_name), config.eval_size, config.eval_size)
    store.commit(config, stats, metrics)
    return store.manifest()


def _embedder(store: BackboneCache, model_name: str, fusion_weight: float = 0.5) -> OpenCLIPEmbedder:
    return OpenCLIPEmbedder(model_name, pretrained=store.checkpoint, fusion_weight=fusion_weight)


def load_world_embedder(
    cache: str | os.PathLike | None = None,
    train_if_missing: bool = True,
    config: BackboneConfig | None = None,
    fusion_weight: float = 0.5,
    progress: bool = True,
) -> OpenCLIPEmbedder:
    """The world backbone as an ``OpenCLIPEmbedder`` loaded from its cached checkpoint.

    A missing, partial or corrupt cache (or, when ``config`` is given, one trained with another config)
    is rebuilt when ``train_if_missing``, else refused with the command that builds it.
    """
    store = BackboneCache.at(cache)
    if not store.validate(config):
        if not train_if_missing:
            raise MissingFileError(
                f"No usable shapes-world backbone in {store.root}: {'; '.join(store.problems)}. "
                "Build it with `fusion-diff world backbone`."
            )
        logger.warning("Rebuilding the shapes-world backbone in %s: %s", store.root, "; ".join(store.problems))
        build_backbone(config or BackboneConfig(), cache=store.root, progress=progress)
    model_name = store.manifest().get("model_name", WORLD_MODEL)
    return _embedder(store, model_name, fusion_weight)
