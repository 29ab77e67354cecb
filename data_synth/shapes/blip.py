"""The shapes world's BLIP: a small ``BlipForConditionalGeneration`` trained on the world's image-caption pairs.

The scene captioner (``captioner.py``) reads the scene graph and is near-perfect, which real captioners on
real benchmarks are not. This one is a generative image-to-text model of the BLIP class, trained like one:
next-token prediction on the pair set's paraphrased captions (training scenes only, never a held-out scene,
never a benchmark annotation), decoded with beam search. It makes the errors generative captioners make
(a wrong colour, a missed or invented object, a position left out) at a rate set by its training budget.

It is saved as a transformers folder (model, processor with a word-level tokenizer built from the captions'
vocabulary, ``BlipImageProcessor`` at the world's image size, generation defaults), so the project loads it
exactly as it loads ``Salesforce/blip-image-captioning-large``: ``--captioner generative --captioner-model DIR``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from data_synth.shapes.captioner import load_pixels
from fusion_diff.embedding.base import ImageInput
from fusion_diff.errors import ConfigError

MANIFEST_KIND = "shapes_blip_captioner"
# Provisional, not calibrated: 1,200 steps (batch 64, lr 1e-3, 20k pairs) give 0.2% exact held-out captions, with
# colour 84% and size 74% per object but shape and position at chance (README: learning curve; lr 3e-4 and 3e-3
# alike); the budget that lands in a realistic middle (40-75% exact) is not measured yet.
DEFAULT_STEPS = 3000
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[SEP]")  # ids 0..3: pad, unknown, decoder start, end of caption
PAD, UNK, BOS, SEP = range(len(SPECIAL_TOKENS))
WORD_MARK = "▁"  # Metaspace's word-start mark: decoding restores the spaces, punctuation stays attached


@dataclass(frozen=True)
class BlipWorldConfig:
    """Architecture of the world's BLIP (a ViT encoder and a BERT-style decoder with cross-attention)."""

    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    vision_layers: int = 3
    text_layers: int = 2
    heads: int = 4
    max_length: int = 64  # tokens of a caption with its [BOS] and [SEP]; generation stops there

    def blip_config(self, vocab_size: int):
        """The ``transformers.BlipConfig`` (weights initialised with std 0.02 in both towers: trained from scratch)."""
        from transformers import BlipConfig

        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}.")
        common = {"hidden_size": self.width, "intermediate_size": 4 * self.width, "num_attention_heads": self.heads}
        return BlipConfig(
            vision_config=dict(
                **common,
                num_hidden_layers=self.vision_layers,
                image_size=self.image_size,
                patch_size=self.patch_size,
                initializer_range=0.02,
            ),
            text_config=dict(
                **common,
                vocab_size=vocab_size,
                num_hidden_layers=self.text_layers,
                encoder_hidden_size=self.width,
                max_position_embeddings=self.max_length,
                bos_token_id=BOS,
                sep_token_id=SEP,
                eos_token_id=SEP,
                pad_token_id=PAD,
            ),
            projection_dim=self.width,
        )


def build_caption_tokenizer(captions: Sequence[str]):
    """A word-level tokenizer over the words and punctuation of ``captions``, as a ``PreTrainedTokenizerFast``.

    Spaces become a word-start mark and punctuation its own token, so decoding gives back the caption
    exactly (``"a red star, and ..."``): the caption parser reads what the model wrote, not a
    tokenizer artefact. Every sequence is ``[BOS] words [SEP]``, as the BLIP decoder is trained and
    generates.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=WORD_MARK, prepend_scheme="always"),
            pre_tokenizers.Punctuation("isolated"),
        ]
    )
    words = sorted({w for caption in captions for w, _ in pre_tokenizer.pre_tokenize_str(caption.lower())})
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS[UNK]))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.Metaspace(replacement=WORD_MARK, prepend_scheme="always")
    bos, sep = SPECIAL_TOKENS[BOS], SPECIAL_TOKENS[SEP]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {sep}", special_tokens=[(bos, BOS), (sep, SEP)]
    )
    names = dict(zip(("pad_token", "unk_token", "bos_token", "sep_token"), SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=sep, **names)


def build_processor(captions: Sequence[str], image_size: int):
    """``BlipProcessor`` = the captions' tokenizer + ``BlipImageProcessor`` at the world's image size."""
    from transformers import BlipImageProcessor, BlipProcessor

    return BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=build_caption_tokenizer(captions),
    )


def normalise_pixels(pixels: torch.Tensor, processor) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` at the processor's size -> its ``pixel_values`` (rescale, then mean/std), batched
    in torch instead of per image in numpy; equal to ``processor(images=...)`` (tested)."""
    image = processor.image_processor
    mean = torch.tensor(image.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image.image_std).view(1, 3, 1, 1)
    return (pixels.float() * image.rescale_factor - mean) / std


def caption_labels(processor, captions: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[N, L]`` of ``captions`` (padded to the longest); refuses captions
    longer than ``max_length`` tokens instead of cutting them (a cut caption teaches a wrong one)."""
    tokens = processor.tokenizer(list(captions), padding="longest", return_tensors="pt")
    longest = tokens.input_ids.shape[1]
    if longest > max_length:
        raise ConfigError(
            f"The longest training caption has {longest} tokens, more than the model's max_length {max_length}. "
            "Raise BlipWorldConfig.max_length."
        )
    return tokens.input_ids, tokens.attention_mask


def train_blip(
    images: Sequence[ImageInput],
    captions: Sequence[str],
    steps: int = DEFAULT_STEPS,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    model_config: BlipWorldConfig = BlipWorldConfig(),
    progress: bool = True,
    losses: list[float] | None = None,
    callback: Callable[[int, Any, Any], None] | None = None,
    callback_every: int = 0,
):
    """Train a ``BlipForConditionalGeneration`` from scratch on (image, caption) pairs; returns (model, processor).

    Captioning loss of the BLIP decoder (next token, pad ignored), AdamW with a one-cycle schedule. Pixels
    and tokens are prepared once; each step draws a random batch. ``losses``, if given, receives each
    step's loss; ``callback(step, model, processor)``, if given, runs every ``callback_every`` steps (a
    learning curve within one run; the model is in eval mode during the call).
    """
    from transformers import BlipForConditionalGeneration

    if steps < 1 or batch_size < 1:
        raise ConfigError(f"steps and batch_size must be positive, got {steps} and {batch_size}.")
    if len(images) != len(captions) or not captions:
        raise ConfigError(f"train_blip needs as many images as captions (got {len(images)} and {len(captions)}).")
    torch.manual_seed(seed)
    processor = build_processor(captions, model_config.image_size)
    input_ids, attention_mask = caption_labels(processor, captions, model_config.max_length)
    pixels = load_pixels(images, model_config.image_size)
    model = BlipForConditionalGeneration(model_config.blip_config(len(processor.tokenizer)))
    model.generation_config.max_new_tokens = model_config.max_length - 1  # a whole caption after [BOS]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="training world BLIP", disable=not progress)
    for step in bar:
        rows = torch.randint(len(pixels), (batch_size,), generator=generator)
        mask = attention_mask[rows]
        width = int(mask.sum(1).max())
        ids, mask = input_ids[rows, :width], mask[:, :width]
        out = model(
            pixel_values=normalise_pixels(pixels[rows], processor),
            input_ids=ids,
            attention_mask=mask,
            labels=ids.masked_fill(mask == 0, -100),
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if losses is not None:
            losses.append(out.loss.item())
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
        if callback is not None and callback_every and (step + 1) % callback_every == 0 and step + 1 < steps:
            callback(step + 1, model.eval(), processor)
            model.train()
    return model.eval(), processor


def save_blip(model, processor, out_dir: str | os.PathLike) -> Path:
    """``save_pretrained`` of model and processor into one folder (what ``AutoProcessor`` /
    ``AutoModelForImageTextToText.from_pretrained`` read)."""
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_blip_captioner(
    pair_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    model_config: BlipWorldConfig = BlipWorldConfig(),
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    progress: bool = True,
) -> Path:
    """Train the world's BLIP on a pair set's images and (paraphrased) captions into ``out_dir``.

    Cached like the other world artifacts: a folder made from the same pair set with the same settings is
    reused, any other replaced; the folder appears only when complete.
    """
    from data_synth.shapes.pairs import build_from_pair_set

    config: dict[str, Any] = {
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "model": asdict(model_config),
    }

    def write(records, folder: Path) -> None:
        model, processor = train_blip(
            [r.image for r in records],
            [r.caption for r in records],
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
            model_config=model_config,
            progress=progress,
        )
        save_blip(model, processor, folder)

    return build_from_pair_set(pair_dir, out_dir, MANIFEST_KIND, config, seed, write)
