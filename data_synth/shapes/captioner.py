"""The shapes world's own captioner: a small CNN that reads a scene graph off an image, written as a caption.

For real images the captioner is a BLIP-class model trained on web image-caption pairs. The shapes
world's analogue is trained here on the world's own image-caption pairs (the stage-1 pair set: training
scenes only, never a held-out one, never a benchmark annotation). Each pair's canonical caption *is* its
scene graph in words, so the model learns the graph directly: for each of the 3x3 grid cells, empty or a
(shape, colour, size), and the background. Cells are read independently, which is why it generalises to
the benchmark's held-out scene combinations where a retrieval captioner (nearest caption of a bank of
training scenes) cannot be exact. The caption it writes is ``canonical_caption`` of the parsed scene.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from data_synth.shapes.captions import canonical_caption
from data_synth.shapes.scene import BACKGROUNDS, COLOURS, GRID, MAX_OBJECTS, SHAPES, SIZES, Scene, SceneObject
from fusion_diff.captioning.base import Captioner
from fusion_diff.embedding.base import ImageInput
from fusion_diff.errors import MissingFileError
from fusion_diff.utils.runtime import adamw

DEFAULT_STEPS = 800  # batch 128 on the 20k-pair set: 96.9% exact captions of held-out scenes (1,500 steps: 99.1%)

_COLOURS = tuple(COLOURS)
_BACKGROUNDS = tuple(BACKGROUNDS)
EMPTY = len(SHAPES)  # the "no object in this cell" class, after the shapes
CELLS = GRID * GRID


@dataclass
class SceneParserOutput(BaseOutput):
    """Logits per cell ``[B, 9, classes]`` (``shape`` has an extra last class: empty) and of the background ``[B, 3]``."""

    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor
    background: torch.Tensor


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SceneParser(ModelMixin, ConfigMixin):
    """CNN ``image -> scene graph``: a strided conv stack pooled onto the 3x3 grid, one classifier per attribute."""

    @register_to_config
    def __init__(self, image_size: int = 64, width: int = 48):
        super().__init__()
        w = width
        # A 4x4 patchify stem keeps it cheap on a CPU; shapes span 3+ patches even when small.
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 4, 4), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            _conv(w, 2 * w, 1), _conv(2 * w, 3 * w, 2), _conv(3 * w, 3 * w, 1),
        )  # fmt: skip
        self.cell_pool = nn.AdaptiveAvgPool2d(GRID)
        self.shape_head = nn.Conv2d(3 * w, len(SHAPES) + 1, 1)
        self.colour_head = nn.Conv2d(3 * w, len(_COLOURS), 1)
        self.size_head = nn.Conv2d(3 * w, len(SIZES), 1)
        self.background_head = nn.Linear(3 * w, len(_BACKGROUNDS))

    def forward(self, pixels: torch.Tensor) -> SceneParserOutput:
        """``pixels``: uint8 or float in [0, 1], ``[B, 3, image_size, image_size]``."""
        if pixels.dtype == torch.uint8:
            pixels = pixels.float() / 255.0
        features = self.features(pixels.to(self.dtype) - 0.5)
        cells = self.cell_pool(features)

        def per_cell(head: nn.Module) -> torch.Tensor:
            return head(cells).flatten(2).transpose(1, 2)  # [B, 9, classes], cells in row-major order

        background = self.background_head(features.mean((2, 3)))
        return SceneParserOutput(per_cell(self.shape_head), per_cell(self.colour_head), per_cell(self.size_head), background)


def scene_labels(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Class indices per cell (``shape``: ``EMPTY`` where no object; ``colour``/``size``: -100 there, ignored)."""
    n = len(scenes)
    shape = torch.full((n, CELLS), EMPTY, dtype=torch.long)
    colour = torch.full((n, CELLS), -100, dtype=torch.long)
    size = torch.full((n, CELLS), -100, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            cell = obj.position[0] * GRID + obj.position[1]
            shape[i, cell] = SHAPES.index(obj.shape)
            colour[i, cell] = _COLOURS.index(obj.colour)
            size[i, cell] = SIZES.index(obj.size)
    background = torch.tensor([_BACKGROUNDS.index(s.background) for s in scenes], dtype=torch.long)
    return {"shape": shape, "colour": colour, "size": size, "background": background}


def parser_loss(out: SceneParserOutput, labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the four cross-entropies (colour and size only where a cell holds an object)."""
    loss = F.cross_entropy(out.shape.flatten(0, 1), labels["shape"].flatten())
    loss = loss + F.cross_entropy(out.colour.flatten(0, 1), labels["colour"].flatten(), ignore_index=-100)
    loss = loss + F.cross_entropy(out.size.flatten(0, 1), labels["size"].flatten(), ignore_index=-100)
    return loss + F.cross_entropy(out.background, labels["background"])


def decode_scenes(out: SceneParserOutput) -> list[Scene]:
    """The most likely scene per image, kept valid: at least one object, at most ``MAX_OBJECTS`` (the most certain)."""
    object_prob = 1.0 - out.shape.softmax(-1)[..., EMPTY]  # [B, 9]
    shape = out.shape[..., :EMPTY].argmax(-1)
    colour, size, background = out.colour.argmax(-1), out.size.argmax(-1), out.background.argmax(-1)
    occupied = object_prob > 0.5
    order = object_prob.argsort(-1, descending=True)
    scenes = []
    for i in range(object_prob.shape[0]):
        cells = [c for c in order[i].tolist() if occupied[i, c]][:MAX_OBJECTS] or [int(order[i, 0])]
        objects = tuple(
            SceneObject(
                position=divmod(c, GRID),
                shape=SHAPES[int(shape[i, c])],
                colour=_COLOURS[int(colour[i, c])],
                size=SIZES[int(size[i, c])],
            )
            for c in cells
        )
        scenes.append(Scene(objects=objects, background=_BACKGROUNDS[int(background[i])]))
    return scenes


def load_pixels(images: Sequence[ImageInput], image_size: int, workers: int = 4) -> torch.Tensor:
    """``[N, 3, S, S]`` uint8 from paths or PIL images (resized to ``image_size`` when they differ)."""

    def one(image: ImageInput) -> np.ndarray:
        if not isinstance(image, Image.Image):
            path = Path(image)
            if not path.is_file():
                raise MissingFileError(f"Scene captioner: image {path} does not exist.")
            image = Image.open(path)
        image = image.convert("RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BICUBIC)
        return np.asarray(image).transpose(2, 0, 1)

    with ThreadPoolExecutor(workers) as pool:
        arrays = list(pool.map(one, images))
    if not arrays:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays))


@torch.no_grad()
def parse_images(parser: SceneParser, pixels: torch.Tensor, batch_size: int = 256) -> list[Scene]:
    parser.eval()
    scenes: list[Scene] = []
    for start in range(0, len(pixels), batch_size):
        scenes += decode_scenes(parser(pixels[start : start + batch_size]))
    return scenes


def train_scene_parser(
    images: Sequence[ImageInput],
    scenes: Sequence[Scene],
    steps: int = DEFAULT_STEPS,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    seed: int = 0,
    image_size: int = 64,
    progress: bool = True,
) -> SceneParser:
    """Fit a ``SceneParser`` on (image, scene graph) pairs of training scenes (one-cycle Adam, flips are not
    used: they would move objects to other cells)."""
    torch.manual_seed(seed)
    pixels = load_pixels(images, image_size)
    labels = scene_labels(scenes)
    parser = SceneParser(image_size=image_size)
    optimizer = adamw(parser.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    parser.train()
    bar = tqdm(range(steps), desc="training scene captioner", disable=not progress)
    for _ in bar:
        rows = torch.randint(len(pixels), (batch_size,), generator=generator)
        loss = parser_loss(parser(pixels[rows]), {k: v[rows] for k, v in labels.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return parser.eval()


def _weights_digest(parser: SceneParser) -> str:
    digest = hashlib.sha1()
    for name, tensor in sorted(parser.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class SceneCaptioner(Captioner):
    """Captions shapes-world images with a trained ``SceneParser`` (a folder written by ``save_pretrained``)."""

    def __init__(self, checkpoint: str | os.PathLike):
        path = Path(checkpoint)
        if not (path / "config.json").is_file():
            raise MissingFileError(
                f"Scene captioner: no SceneParser checkpoint in {path} (config.json missing). "
                "Train one with `fusion-diff world captioner --pairs DIR --out DIR` (the demo writes its own to "
                "<out_dir>/captioner) or give the folder of one."
            )
        self.checkpoint = path
        self.parser = SceneParser.from_pretrained(path).eval()
        self._digest = _weights_digest(self.parser)

    @property
    def identity(self) -> dict[str, Any]:
        return {"type": "scene", "weights": self._digest}

    def describe(self) -> str:
        return f"scene-parser({self.checkpoint.name}, {self._digest[:8]})"

    def caption_candidates(
        self, images: Sequence[ImageInput], batch_size: int = 256, progress: bool = False
    ) -> list[list[str]]:
        pixels = load_pixels(images, self.parser.config.image_size)
        return [[canonical_caption(scene)] for scene in parse_images(self.parser, pixels, max(batch_size, 256))]


def build_scene_captioner(
    pair_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train a ``SceneParser`` on a pair set's images and scene graphs into ``out_dir`` (``save_pretrained``).

    Cached (``pairs.build_from_pair_set``): a folder whose manifest names the same pair set (its manifest),
    steps and seed is reused; any other is replaced. The weights land in a temporary folder renamed into
    place, so an interrupted run leaves nothing half-written.
    """
    from data_synth.shapes.pairs import build_from_pair_set

    def write(records, folder: Path) -> None:
        parser = train_scene_parser([r.image for r in records], [r.scene for r in records], steps=steps, seed=seed, progress=progress)
        parser.save_pretrained(folder)

    return build_from_pair_set(pair_dir, out_dir, "shapes_scene_captioner", {"steps": steps, "seed": seed}, seed, write)
