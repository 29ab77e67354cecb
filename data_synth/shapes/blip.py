"""The shapes world's BLIP: a small ``BlipForConditionalGeneration`` trained on the world's image-caption pairs.

The scene captioner (``captioner.py``) reads the scene graph and is near-perfect, which real captioners on
real benchmarks are not. This one is a generative image-to-text model of the BLIP class, trained like one:
next-token prediction on the pair set's paraphrased captions (training scenes only, never a held-out scene,
never a benchmark annotation), decoded with beam search. As real BLIP starts from a pretrained ViT, its image
encoder starts from the world backbone's ViT (same sizes; ``vision_from_backbone``) unless asked to train
from scratch (then shape and position stayed at chance for 1,200 steps). It makes the errors generative
captioners make (a wrong shape or colour, a missed or invented object, a wrong position) at a rate set by its
training budget.

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
from safetensors.torch import load_file
from tqdm.auto import tqdm

from data_synth.shapes.captioner import load_pixels
from fusion_diff.embedding.base import ImageInput
from fusion_diff.errors import ConfigError, MissingFileError

MANIFEST_KIND = "shapes_blip_captioner"
# Measured (README, "Towards real-data conditions"): with the image encoder started from the backbone (batch 64,
# lr 1e-3, 18k pairs), held-out exact captions are 2% at 1,200 steps, 24% at 3,000 and 42% at 5,000 (shape 60%,
# colour 93%, size 78%, position 91% per object): 5,000 lands in the realistic middle, a captioner with errors.
DEFAULT_STEPS = 5000
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[SEP]")  # ids 0..3: pad, unknown, decoder start, end of caption
PAD, UNK, BOS, SEP = range(len(SPECIAL_TOKENS))
WORD_MARK = "▁"  # Metaspace's word-start mark: decoding restores the spaces, punctuation stays attached


@dataclass(frozen=True)
class BlipWorldConfig:
    """Architecture of the world's BLIP (a ViT encoder and a BERT-style decoder with cross-attention)."""

    image_size: int = 48  # the image encoder's sizes are the world backbone's ViT (shapes-vit-tiny), so it can
    patch_size: int = 8  # start from it
    width: int = 128
    vision_layers: int = 4
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


def vision_from_backbone(model, backbone: dict[str, torch.Tensor], pixel_values: torch.Tensor) -> None:
    """Start BLIP's image encoder from the world backbone's ViT (open_clip ``visual.*`` weights), as real BLIP
    starts from a pretrained ViT rather than from scratch.

    The two are the same pre-norm transformer (fused qkv, GELU MLP, final LayerNorm) except that open_clip
    normalises the embedded tokens once more (``ln_pre``), which BLIP has no place for. It is folded into the
    embeddings: exactly for the class token (the same for every image), and for the patch tokens as the affine
    map it is on average over ``pixel_values`` (the mean token std, and each position's mean token offset).
    """
    import torch.nn.functional as F

    v = {key.removeprefix("visual."): value for key, value in backbone.items() if key.startswith("visual.")}
    cfg = model.config.vision_config
    layers = sum(key.endswith("attn.in_proj_weight") for key in v)
    wanted = (cfg.hidden_size, cfg.num_hidden_layers, cfg.patch_size, (cfg.image_size // cfg.patch_size) ** 2 + 1)
    found = (v["conv1.weight"].shape[0], layers, v["conv1.weight"].shape[-1], v["positional_embedding"].shape[0])
    if wanted != found:
        raise ConfigError(
            f"The backbone's ViT (width, layers, patch, tokens) = {found} does not fit the BLIP image encoder's "
            f"{wanted}: give BlipWorldConfig the backbone's sizes (image_size, vision_layers, patch_size, width)."
        )
    gamma, beta, position = v["ln_pre.weight"], v["ln_pre.bias"], v["positional_embedding"]
    with torch.no_grad():
        patches = F.conv2d(pixel_values, v["conv1.weight"], stride=cfg.patch_size).flatten(2).transpose(1, 2)
        patches = patches + position[1:]
        scale = gamma / patches.std(-1).mean()  # [width]
        offset = patches.mean(-1).mean(0)  # [tokens - 1]: each position's mean over channels, averaged over images
        positions = torch.cat([position[:1] * scale, (position[1:] - offset[:, None]) * scale + beta])
        first = F.layer_norm(v["class_embedding"] + position[0], (cfg.hidden_size,), gamma, beta) - positions[0]
    state = {
        "embeddings.patch_embedding.weight": v["conv1.weight"] * scale.view(-1, 1, 1, 1),
        "embeddings.patch_embedding.bias": torch.zeros(cfg.hidden_size),
        "embeddings.class_embedding": first.view(1, 1, -1),
        "embeddings.position_embedding": positions.unsqueeze(0),
        "post_layernorm.weight": v["ln_post.weight"],
        "post_layernorm.bias": v["ln_post.bias"],
    }
    names = {"self_attn.qkv": "attn.in_proj_", "self_attn.projection": "attn.out_proj.", "layer_norm1": "ln_1.",
             "layer_norm2": "ln_2.", "mlp.fc1": "mlp.c_fc.", "mlp.fc2": "mlp.c_proj."}  # fmt: skip
    for i in range(layers):
        for blip_name, clip_name in names.items():
            for kind in ("weight", "bias"):
                clip_key = f"transformer.resblocks.{i}.{clip_name}{kind}"
                state[f"encoder.layers.{i}.{blip_name}.{kind}"] = v[clip_key]
    model.vision_model.load_state_dict(state, strict=True)


def padded_tokens(tokenizer, texts: Sequence[str], max_length: int, what: str, fix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[N, L]`` of ``texts`` (padded to the longest); refuses texts longer
    than ``max_length`` tokens instead of cutting them (a cut caption teaches a wrong one), naming ``fix``."""
    tokens = tokenizer(list(texts), padding="longest", return_tensors="pt")
    longest = tokens.input_ids.shape[1]
    if longest > max_length:
        raise ConfigError(
            f"The longest {what} has {longest} tokens, more than the model's max_length {max_length}. Raise {fix}."
        )
    return tokens.input_ids, tokens.attention_mask


def caption_labels(processor, captions: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The BLIP decoder's padded caption tokens (``padded_tokens``)."""
    return padded_tokens(processor.tokenizer, captions, max_length, "training caption", "BlipWorldConfig.max_length")


def one_cycle(model: torch.nn.Module, learning_rate: float, steps: int):
    """AdamW (weight decay 0.01) with a one-cycle schedule (10% warm-up): the world's small models' optimiser."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.1)


def descend(model: torch.nn.Module, loss: torch.Tensor, optimizer, schedule) -> None:
    """One optimiser step on ``loss``, gradients clipped to norm 1."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()


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
    vision_init: dict[str, torch.Tensor] | None = None,
):
    """Train a ``BlipForConditionalGeneration`` on (image, caption) pairs; returns (model, processor). The text
    decoder starts from scratch; the image encoder too, or from ``vision_init`` (the world backbone's
    open_clip state dict, see ``vision_from_backbone``).

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
    if vision_init is not None:
        vision_from_backbone(model, vision_init, normalise_pixels(pixels[:256], processor))
    model.generation_config.max_new_tokens = model_config.max_length - 1  # a whole caption after [BOS]
    optimizer, schedule = one_cycle(model, learning_rate, steps)
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
        descend(model, out.loss, optimizer, schedule)
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
    backbone: str | os.PathLike | None = None,
) -> Path:
    """Train the world's BLIP on a pair set's images and (paraphrased) captions into ``out_dir``, its image
    encoder started from the world backbone cached in ``backbone`` (None: from scratch).

    Cached like the other world artifacts: a folder made from the same pair set, backbone and settings is
    reused, any other replaced; the folder appears only when complete.
    """
    from data_synth.shapes.backbone import BackboneCache
    from data_synth.shapes.pairs import build_from_pair_set

    vision_init, backbone_identity = None, None
    if backbone is not None:
        cache = BackboneCache.at(Path(backbone))
        if not cache.validate():
            raise MissingFileError(
                f"World BLIP: no usable world backbone in {backbone} ({'; '.join(cache.problems)}). Build it "
                "(fusion-diff world backbone) or train the BLIP from scratch (--from-scratch)."
            )
        backbone_identity = cache.manifest()["checkpoint"]["sha256"]
        vision_init = load_file(str(cache.checkpoint))
    config: dict[str, Any] = {
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "model": asdict(model_config),
        "vision_init": backbone_identity and f"world backbone sha256:{backbone_identity[:16]}",
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
            vision_init=vision_init,
        )
        save_blip(model, processor, folder)

    return build_from_pair_set(pair_dir, out_dir, MANIFEST_KIND, config, seed, write)
