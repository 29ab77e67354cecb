"""How good are the shapes world's captioner captions? Exact-match rate and per-attribute accuracy.

Held-out scenes (never in any training set, so their own captions are never in the bank) are rendered,
captioned by the retrieval captioner over the pair set's captions with the world backbone, or by the
world's trained scene captioner, and the captions are parsed back into attributes
(``data_synth.shapes.captions.parse_caption``) and compared with the scene graph.

    python scripts/eval_captioner.py --pairs DIR [--n 1000] [--top-k 1] [--include-truth] [--out FILE.json]
    python scripts/eval_captioner.py --scene-captioner runs/demo/captioner [--n 1000] [--out FILE.json]

Metrics (top-1 caption):
* ``exact_match``: the caption is true of the scene and names every object once
  (``caption_matches``: every attribute it states is right; a paraphrase may leave positions out);
* ``complete_exact_match``: exact, and it states every attribute (positions and background too);
* per attribute (shape, colour, size, position): share of the scene's objects whose matched caption
  object states that attribute correctly (objects are matched one-to-one, best agreement first;
  an unmatched or unstated attribute counts as wrong); ``background`` and ``count`` per scene;
* ``parse_failures``: captions the parser could not read (counted as wrong everywhere).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from data_synth.shapes.captions import ParsedCaption, ParsedObject, canonical_caption, caption_matches, parse_caption
from data_synth.shapes.render import render
from data_synth.shapes.scene import Scene, SceneObject, sample_scene_in_split
from fusion_diff.captioning import Captioner, RetrievalCaptioner, load_caption_bank
from fusion_diff.embedding.base import JointEmbedder
from fusion_diff.utils.io import write_json_atomic

OBJECT_ATTRIBUTES = ("shape", "colour", "size", "position")


def _agreement(parsed: ParsedObject, obj: SceneObject) -> tuple[bool, ...]:
    return tuple(getattr(parsed, a) == getattr(obj, a) for a in OBJECT_ATTRIBUTES)


def _best_matching(parsed: ParsedCaption, scene: Scene) -> list[tuple[bool, ...]]:
    """Per scene object, which attributes its matched caption object gets right (one-to-one, max agreement)."""
    objects, said = list(scene.objects), list(parsed.objects)
    none = (False,) * len(OBJECT_ATTRIBUTES)
    best: list[tuple[bool, ...]] = [none] * len(objects)
    best_total = -1
    for chosen in itertools.combinations(range(len(said)), min(len(said), len(objects))):
        for targets in itertools.permutations(range(len(objects)), len(chosen)):
            rows = [none] * len(objects)
            for s, o in zip(chosen, targets, strict=True):
                rows[o] = _agreement(said[s], objects[o])
            total = sum(map(sum, rows))
            if total > best_total:
                best, best_total = rows, total
    return best


def score_captions(scenes: Sequence[Scene], captions: Sequence[str]) -> dict[str, Any]:
    """Exact-match rates and per-attribute accuracies of ``captions`` against their ``scenes`` (see module doc)."""
    correct: dict[str, int] = defaultdict(int)
    by_count: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    n_objects = failures = 0
    for scene, caption in zip(scenes, captions, strict=True):
        n_objects += len(scene.objects)
        by_count[len(scene.objects)][1] += 1
        try:
            parsed = parse_caption(caption)
            exact = caption_matches(scene, caption)
        except ValueError:
            failures += 1
            continue
        complete = (
            exact
            and parsed.background is not None
            and all(None not in (p.position, p.size, p.colour) for p in parsed.objects)
        )
        correct["exact_match"] += exact
        correct["complete_exact_match"] += complete
        by_count[len(scene.objects)][0] += exact
        correct["count"] += len(parsed.objects) == len(scene.objects)
        correct["background"] += parsed.background == scene.background
        for row in _best_matching(parsed, scene):
            for attribute, ok in zip(OBJECT_ATTRIBUTES, row, strict=True):
                correct[attribute] += ok
    n = len(scenes)
    out: dict[str, Any] = {"scenes": n, "objects": n_objects, "parse_failures": failures}
    for key in ("exact_match", "complete_exact_match", "count", "background"):
        out[key] = correct[key] / n
    out["attribute_accuracy"] = {a: correct[a] / n_objects for a in OBJECT_ATTRIBUTES}
    out["exact_match_by_object_count"] = {k: v[0] / v[1] for k, v in sorted(by_count.items())}
    return out


def heldout_scenes(n: int, seed: int, size: int = 64) -> tuple[list[Scene], list]:
    """``n`` random held-out scenes and one render of each (deterministic under ``seed``)."""
    rng = random.Random(seed)
    scenes = [sample_scene_in_split(rng, heldout=True) for _ in range(n)]
    return scenes, [render(scene, size=size, rng=rng.randrange(2**31)) for scene in scenes]


def evaluate_retrieval_captioner(
    embedder: JointEmbedder,
    bank: Sequence[str],
    n: int = 1000,
    seed: int = 1234,
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


def evaluate_captioner(captioner: Captioner, scenes: Sequence[Scene], images: Sequence, seed: int) -> dict[str, Any]:
    """Caption ``images`` (renders of ``scenes``) and score the captions, with the protocol and timing."""
    start = time.perf_counter()
    captions = captioner.caption(images, batch_size=250, progress=True)
    caption_seconds = time.perf_counter() - start
    return {
        "protocol": {"captioner": captioner.describe(), "heldout_scenes": len(scenes), "seed": seed},
        "timing_s": {"captioning": round(caption_seconds, 1)},
        **score_captions(scenes, captions),
        "examples": [
            {"scene": canonical_caption(s), "caption": c} for s, c in list(zip(scenes, captions, strict=True))[:8]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--pairs", help="retrieval captioner: pair-set folder (its captions are the bank) or a caption file")
    which.add_argument("--scene-captioner", help="the world's trained scene captioner: its folder (the demo's captioner/)")
    parser.add_argument("--n", type=int, default=1000, help="held-out scenes to caption")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument(
        "--include-truth", action="store_true", help="diagnostic: add the scenes' canonical captions to the bank"
    )
    parser.add_argument("--bank-cache", help="folder for the bank's text-embedding cache")
    parser.add_argument("--backbone-cache", help="world backbone folder (default: the fusion_diff cache's)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)

    if args.scene_captioner:
        from data_synth.shapes.captioner import SceneCaptioner

        result = evaluate_captioner(SceneCaptioner(args.scene_captioner), *heldout_scenes(args.n, args.seed), args.seed)
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
