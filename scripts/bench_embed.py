"""Embedding throughput: the embedding job (cache + DataLoader) against a plain open_clip loop on the same images.

    python scripts/bench_embed.py                                  # ViT-L-14 (random weights), 256 images, batch 32
    python scripts/bench_embed.py --images 64 --model toy          # a tiny model: proves the script works

Random weights (the cost does not depend on them) at the real architecture, generated 256 px images
on disk. Both paths decode and preprocess the same files in batches of ``--batch-size`` and run
``encode_image``; the job also writes the safetensors cache. The overhead of the cache and loader
is ``1 - job rate / plain rate`` (issue 19 asks for <= 10%). Reports wall and process CPU time: on a
shared machine the CPU time / threads estimates the idle wall time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from fusion_diff.embedding import OpenCLIPEmbedder, save_checkpoint, write_model_config
from fusion_diff.embedding.images import load_image
from fusion_diff.embedding.job import embed_sharded
from fusion_diff.smoke import PROFILES, generated_image


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_embed(model: str, images: int, batch_size: int, num_workers: int, root: Path) -> dict[str, float]:
    name = model
    if model == "toy":
        name = "fd-bench-toy"
        write_model_config(name, PROFILES["toy"].openclip, root / "model_configs")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(open_clip.create_model(name), root / f"{name}.safetensors")
    paths = []
    for i in range(images):
        paths.append(root / "images" / f"{i:06d}.png")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        generated_image(i, 256).save(paths[-1])
    embedder = OpenCLIPEmbedder(name, pretrained=checkpoint)
    model_, preprocess = embedder.model, embedder.preprocess

    @torch.inference_mode()
    def plain() -> None:
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([preprocess(load_image(p)) for p in paths[start : start + batch_size]])
            F.normalize(model_.encode_image(batch).float(), dim=-1)

    def job() -> None:
        identity = {**embedder.identity.as_dict(), "kind": "image"}
        embed_sharded(
            root / "cache", identity, [p.stem for p in paths], paths,
            lambda batch: embedder.embed_images(batch, batch_size=len(batch)),
            chunk_size=1024, batch_size=batch_size, num_workers=num_workers, progress=False,
        )  # fmt: skip

    plain()  # warm-up (allocator, kernels), not timed
    plain_wall, plain_cpu = _timed(plain)
    job_wall, job_cpu = _timed(job)
    return {
        "plain_images_per_s": images / plain_wall,
        "job_images_per_s": images / job_wall,
        "overhead": 1 - plain_wall / job_wall,
        "plain_cpu_s": plain_cpu,
        "job_cpu_s": job_cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-L-14", help="open_clip architecture, or 'toy'")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the job")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        r = bench_embed(args.model, args.images, args.batch_size, args.num_workers, Path(tmp))
    print(
        f"{args.model}, {args.images} images, batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"{args.num_workers} workers: plain open_clip loop {r['plain_images_per_s']:.2f} images/s "
        f"(CPU {r['plain_cpu_s']:.1f} s), embedding job {r['job_images_per_s']:.2f} images/s "
        f"(CPU {r['job_cpu_s']:.1f} s); overhead {100 * r['overhead']:.1f}%"
    )


if __name__ == "__main__":
    main()
