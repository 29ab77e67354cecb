"""The smoke run: every heavy path once, at real sizes on a GPU or toy sizes on a CPU, with throughput.

``fusion-diff smoke --device cuda`` builds random-weight models at the sizes a real run uses (open_clip
ViT-L-14, a BLIP-large-shaped captioner, the recipe's prior and adapter for a 768-d space), then
embeds generated images, captions them, trains stage 1 and stage 2 through Accelerate, samples query
embeddings and evaluates on a fake CIRR tree: the official CIRR val annotation files cut to the
first queries, with generated images. Weights are random, so the retrieval numbers mean nothing;
the point is that every step runs on the device and how fast. ``--profile toy`` (the default on a
CPU) runs the same steps at tiny sizes in well under a minute, as a test.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fusion_diff.errors import MissingFileError


def default_cirr_annotations() -> Path:
    """``$FUSION_DIFF_BENCHMARKS/cirr``, else ``../shared/benchmarks/cirr`` beside the repository (as the tests)."""
    override = os.environ.get("FUSION_DIFF_BENCHMARKS")
    root = Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
    return root / "cirr"


@dataclass(frozen=True)
class SmokeProfile:
    """The sizes of one smoke run."""

    images: int
    image_size: int
    openclip: dict[str, Any] | str  # an open_clip config (toy) or a built-in architecture name
    blip: dict[str, Any]  # vision / text config overrides of BlipConfig
    vocab_size: int
    prior: dict[str, int]
    adapter_blocks: int
    steps: int  # of each training stage
    batch_size: int
    queries: int  # sampled query embeddings
    eval_queries: int  # CIRR val queries in the fake tree
    caption_tokens: int


PROFILES = {
    "real": SmokeProfile(
        images=2000,
        image_size=256,
        openclip="ViT-L-14",
        blip={  # Salesforce/blip-image-captioning-large's shapes
            "vision": {
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "image_size": 384,
                "patch_size": 16,
            },
            "text": {
                "hidden_size": 768,
                "intermediate_size": 3072,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "encoder_hidden_size": 1024,
                "max_position_embeddings": 512,
            },
        },
        vocab_size=30524,
        prior={"hidden_dim": 1024, "num_layers": 12, "num_heads": 16},  # configs/recipes/vit-l-14 prior
        adapter_blocks=3,
        steps=200,
        batch_size=256,
        queries=10_000,
        eval_queries=200,
        caption_tokens=20,
    ),
    "toy": SmokeProfile(
        images=16,
        image_size=32,
        openclip={
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 1},
        },
        blip={
            "vision": {
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "image_size": 32,
                "patch_size": 8,
            },
            "text": {
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "encoder_hidden_size": 32,
                "max_position_embeddings": 64,
            },
        },
        vocab_size=64,
        prior={"hidden_dim": 32, "num_layers": 2, "num_heads": 2},
        adapter_blocks=1,
        steps=2,
        batch_size=8,
        queries=64,
        eval_queries=6,
        caption_tokens=5,
    ),
}


class StepReport:
    """Times each step and prints its throughput and the peak memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rows: list[dict[str, Any]] = []

    @contextmanager
    def step(self, name: str, items: int, unit: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        print(f"==> {name}", flush=True)
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = f"peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB"
        else:  # the process's peak resident set so far (Linux: KiB)
            peak = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
        seconds = time.perf_counter() - start
        rate = items / seconds if seconds > 0 else float("inf")
        self.rows.append({"step": name, "seconds": seconds, "items": items, "unit": unit, "rate": rate, "peak": peak})
        print(f"    {name}: {items} {unit} in {seconds:.1f} s = {rate:,.1f} {unit}/s; {peak}", flush=True)


def generated_image(index: int, size: int) -> Image.Image:
    """A deterministic noise image (the cost of embedding or captioning does not depend on the content)."""
    generator = torch.Generator().manual_seed(index)
    return Image.fromarray((torch.rand(size, size, 3, generator=generator) * 255).byte().numpy())


def fake_cirr(root: Path, annotations: Path, queries: int, image_size: int) -> Path:
    """The first ``queries`` CIRR val queries of the official files, with generated images for every image they name."""
    captions_file = annotations / "captions" / "cap.rc2.val.json"
    split_file = annotations / "image_splits" / "split.rc2.val.json"
    for path in (captions_file, split_file):
        if not path.is_file():
            raise MissingFileError(
                f"CIRR annotation file not found: {path}. Pass --cirr-annotations (a CIRR checkout)."
            )
    entries = json.loads(captions_file.read_text())[:queries]
    split = json.loads(split_file.read_text())
    names = sorted({n for e in entries for n in (e["reference"], e["target_hard"], *e["img_set"]["members"])})
    subset = {name: split[name] for name in names}
    for sub, payload in (("captions/cap.rc2.val.json", entries), ("image_splits/split.rc2.val.json", subset)):
        (root / "cirr" / sub).parent.mkdir(parents=True, exist_ok=True)
        (root / "cirr" / sub).write_text(json.dumps(payload))
    for number, (name, relative) in enumerate(subset.items()):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        generated_image(10_000 + number, image_size).save(path)
    return root


def build_openclip(profile: SmokeProfile, root: Path, device: str, precision: str):
    """A random-weight open_clip embedder at the profile's size, through a local checkpoint (the real loading path)."""
    import open_clip

    from fusion_diff.embedding import OpenCLIPEmbedder, save_checkpoint, write_model_config

    name = profile.openclip if isinstance(profile.openclip, str) else "fd-smoke-toy"
    if not isinstance(profile.openclip, str):
        write_model_config(name, profile.openclip, root / "model_configs")
    checkpoint = save_checkpoint(open_clip.create_model(name), root / f"{name}.safetensors")
    return OpenCLIPEmbedder(name, pretrained=checkpoint, device=device, precision=precision)


def build_blip(profile: SmokeProfile, root: Path) -> Path:
    """A random-weight BLIP captioner of the profile's shape, saved with ``save_pretrained``."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (root / "vocab.txt").write_text("\n".join(special + [f"w{i}" for i in range(profile.vocab_size - 5)]) + "\n")
    size = profile.blip["vision"]["image_size"]
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": size, "width": size}),
        tokenizer=BertTokenizer(str(root / "vocab.txt")),
    )
    text = {**profile.blip["text"], "vocab_size": profile.vocab_size, "bos_token_id": 2, "sep_token_id": 3,
            "eos_token_id": 3, "pad_token_id": 0}  # fmt: skip
    config = BlipConfig(vision_config=profile.blip["vision"], text_config=text, projection_dim=256)
    out = root / "blip"
    BlipForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _train(task: str, out: Path, data: Path, profile: SmokeProfile, device: str, precision: str, model: dict):
    from fusion_diff.training.config import config_from_dict
    from fusion_diff.training.loop import train

    data_key = {"prior": "pair_embeddings", "adapter": "triplet_embeddings"}[task]
    config = config_from_dict(
        {
            "task": task,
            "output_dir": str(out),
            "model": model,
            "data": {data_key: str(data)},
            "schedule": {
                "max_train_steps": profile.steps,
                "train_batch_size": profile.batch_size,
                "lr_warmup_steps": 0,
            },
            "checkpointing": {"every_n_steps": 0},
            "accelerate": {"mixed_precision": "no" if precision == "fp32" else precision, "cpu": device == "cpu"},
            "logging": {"report_to": "none", "progress_bar": False},
        }
    )
    return train(config)


def run_smoke(
    out: str | Path,
    device: str = "cpu",
    profile: str | None = None,
    precision: str | None = None,
    cirr_annotations: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Run every step; return the per-step report (it is also printed). Any failure raises."""
    from fusion_diff.baselines import ImageOnly
    from fusion_diff.benchmarks import load_benchmark
    from fusion_diff.benchmarks.evaluate import Evaluator
    from fusion_diff.captioning import create_captioner
    from fusion_diff.captioning.job import caption_sharded
    from fusion_diff.embedding.job import embed_sharded
    from fusion_diff.pipelines.fusion_diff import FusionDiffPipeline
    from fusion_diff.pipelines.method import FusionDiffMethod
    from fusion_diff.training.data import PAIR_FIELDS, TRIPLET_FIELDS, write_random_caches

    out = Path(out)
    size = PROFILES[profile or ("real" if device.startswith("cuda") else "toy")]
    precision = precision or ("bf16" if device.startswith("cuda") else "fp32")
    report = StepReport(torch.device(device))
    print(f"smoke run: profile {profile or 'auto'}, device {device}, precision {precision}, out {out}")

    with report.step("build models (random weights)", 2, "models"):
        embedder = build_openclip(size, out / "models", device, precision)
        captioner = create_captioner(
            {"type": "generative", "model": str(build_blip(size, out / "models")), "device": device,
             "dtype": precision, "generation": {"max_new_tokens": size.caption_tokens, "num_beams": 1}}
        )  # fmt: skip
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(size.images):
        paths.append(images / f"img{i:06d}.png")
        if not paths[-1].is_file():
            generated_image(i, size.image_size).save(paths[-1])
    ids = [p.stem for p in paths]

    def embed_batch(batch: list[Any]) -> torch.Tensor:
        return embedder.embed_images(batch, batch_size=len(batch))

    with report.step("embed images", size.images, "images"):
        identity = {**embedder.identity.as_dict(), "kind": "image"}
        embed_sharded(out / "image_cache", identity, ids, paths, embed_batch, batch_size=32, progress=False)
    with report.step("caption images", size.images, "images"):
        caption_sharded(captioner, ids, paths, out / "captions.json", batch_size=32, progress=False)

    dim = embedder.dim
    identity = embedder.identity.as_dict()  # random stand-ins for its embeddings: throughput does not depend on them
    pairs, triplets = out / "pairs", out / "triplets"
    samples = size.steps * size.batch_size
    for root, fields in ((pairs, PAIR_FIELDS), (triplets, TRIPLET_FIELDS)):
        if not root.is_dir():
            write_random_caches(root, fields, max(size.batch_size * 4, 64), dim, embedder_identity=identity)
    with report.step(f"stage 1: {size.steps} steps", samples, "samples"):
        _train("prior", out / "stage1", pairs, size, device, precision, size.prior)
    with report.step(f"stage 2: {size.steps} steps", samples, "samples"):
        adapter = {"prior_path": str(out / "stage1"), "num_blocks": size.adapter_blocks}
        _train("adapter", out / "stage2", triplets, size, device, precision, adapter)

    pipeline = FusionDiffPipeline.from_pretrained(str(out / "stage2")).to(device)
    generator = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(size.queries, dim, generator=generator), dim=-1)
    control = torch.nn.functional.normalize(torch.randn(size.queries, dim, generator=generator), dim=-1)
    with report.step("sample queries (10 steps)", size.queries, "queries"):
        pipeline.sample(text, control_embeds=control, num_inference_steps=10, batch_size=1024,
                        precision="bf16" if precision == "bf16" else "fp32")  # fmt: skip

    annotations = Path(cirr_annotations) if cirr_annotations else default_cirr_annotations()
    bench = fake_cirr(out / "cirr", annotations, size.eval_queries, size.image_size)
    units = load_benchmark("cirr", bench, "val")
    evaluator = Evaluator(
        units, embedder, captioner=captioner, cache_root=out / "eval_cache", progress=False, device=device
    )
    with report.step("evaluate on the fake CIRR val tree", len(units[0].queries), "queries"):
        rows = [evaluator.evaluate(ImageOnly()), evaluator.evaluate(FusionDiffMethod(pipeline, gallery_mode="fused"))]
    for row in rows:
        print(f"    {row.method}: R@1 {row.metrics['R@1']:.2f} (random weights: a check that it runs, not a result)")
    return report.rows


def smoke_main(args: Any) -> int:
    """CLI body: run, print the summary table, exit non-zero (with the failing step named) on any failure."""
    try:
        rows = run_smoke(args.out, device=args.device, profile=args.profile, precision=args.precision,
                   cirr_annotations=args.cirr_annotations)  # fmt: skip
    except Exception as err:  # the smoke run's job is to report any failure as a non-zero exit
        print(f"SMOKE RUN FAILED: {type(err).__name__}: {err}", flush=True)
        raise
    print("\n| step | seconds | throughput | peak memory |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['seconds']:.1f} | {r['rate']:,.1f} {r['unit']}/s | {r['peak']} |")
    return 0
