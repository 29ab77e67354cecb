"""How good are the shapes world's captioner captions? Exact-match rate and per-attribute accuracy.

Held-out scenes (never in any training set, so their own captions are never in the bank) are rendered,
captioned by the retrieval captioner over the pair set's captions with the world backbone, by the
world's trained scene captioner, or by a generative (BLIP-class) captioner such as the world's BLIP
(``fusion-diff world blip-captioner``), and scored by ``data_synth.shapes.caption_quality``.

    python scripts/eval_captioner.py --pairs DIR [--n 1000] [--top-k 1] [--include-truth] [--out FILE.json]
    python scripts/eval_captioner.py --scene-captioner runs/demo/captioner [--n 1000] [--out FILE.json]
    python scripts/eval_captioner.py --generative-captioner DIR [--n 1000] [--out FILE.json]

Metrics: see ``data_synth.shapes.caption_quality``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from data_synth.shapes.caption_quality import HELDOUT_SEED, evaluate_captioner, heldout_scenes
from data_synth.shapes.captions import canonical_caption
from fusion_diff.captioning import RetrievalCaptioner, create_captioner, load_caption_bank
from fusion_diff.embedding.base import JointEmbedder
from fusion_diff.utils.io import write_json_atomic


def evaluate_retrieval_captioner(
    embedder: JointEmbedder,
    bank: Sequence[str],
    n: int = 1000,
    seed: int = HELDOUT_SEED,
    top_k: int = 1,
    include_truth: bool = False,
    bank_cache: str | None = None,
) -> dict[str, Any]:
    """Caption ``n`` held-out scenes with a retrieval captioner over ``bank`` and score the captions.

    ``include_truth`` adds the scenes' canonical captions to the bank: an upper-bound diagnostic that
    separates the backbone's ranking from the bank's coverage (never a reportable captioner).
    """
    scenes, images = heldout_scenes(n, seed)
    bank = list(bank) + ([canonical_caption(s) for s in scenes] if include_truth else [])
    captioner = RetrievalCaptioner(
        embedder, bank, top_k=top_k, bank_name="pairs+truth" if include_truth else "pairs", cache_dir=bank_cache
    )
    start = time.perf_counter()
    captioner.bank_embeddings(progress=True)
    bank_seconds = time.perf_counter() - start
    result = evaluate_captioner(captioner, scenes, images, seed)
    result["protocol"].update(backbone=embedder.identity.as_dict(), include_truth=include_truth)
    result["timing_s"]["bank_embedding"] = round(bank_seconds, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--pairs", help="retrieval captioner: pair-set folder (its captions are the bank) or a caption file")
    which.add_argument("--scene-captioner", help="the world's trained scene captioner: its folder (the demo's captioner/)")
    which.add_argument(
        "--generative-captioner",
        help="a BLIP-class captioner through the generative path: a save_pretrained folder (the world's BLIP: "
        "fusion-diff world blip-captioner) or a local Hugging Face id",
    )
    parser.add_argument("--n", type=int, default=1000, help="held-out scenes to caption")
    parser.add_argument("--seed", type=int, default=HELDOUT_SEED)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument(
        "--include-truth", action="store_true", help="diagnostic: add the scenes' canonical captions to the bank"
    )
    parser.add_argument("--bank-cache", help="folder for the bank's text-embedding cache")
    parser.add_argument("--backbone-cache", help="world backbone folder (default: the fusion_diff cache's)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)

    if args.scene_captioner or args.generative_captioner:
        spec = {"type": "scene", "model": args.scene_captioner} if args.scene_captioner else {
            "type": "generative", "model": args.generative_captioner
        }  # fmt: skip
        result = evaluate_captioner(create_captioner(spec), *heldout_scenes(args.n, args.seed), args.seed)
    else:
        from data_synth.shapes.backbone import load_world_embedder

        embedder = load_world_embedder(args.backbone_cache, train_if_missing=False)
        bank, _ = load_caption_bank(args.pairs)
        result = evaluate_retrieval_captioner(
            embedder, bank, args.n, args.seed, args.top_k, args.include_truth, args.bank_cache
        )
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=1))
    if args.out:
        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
