"""How good is a shapes-world captioner? Exact-caption rate and per-attribute accuracy on held-out scenes.

Held-out scenes (never in any training set, so no captioner saw them) are rendered, captioned, and the
captions parsed back into attributes (``data_synth.shapes.captions.parse_caption``) and compared with the
scene graph. Any ``Captioner`` is scored the same way: the retrieval captioner, the scene captioner, the
world's BLIP through the generative path. ``scripts/eval_captioner.py`` is the command line.

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

import itertools
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from data_synth.shapes.captions import ParsedCaption, ParsedObject, canonical_caption, caption_matches, parse_caption
from data_synth.shapes.render import render
from data_synth.shapes.scene import Scene, SceneObject, sample_scene_in_split
from fusion_diff.captioning.base import Captioner

OBJECT_ATTRIBUTES = ("shape", "colour", "size", "position")
HELDOUT_SEED = 1234  # the held-out scenes every captioner is scored on (scripts/eval_captioner.py's default)


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


def format_quality(result: dict[str, Any]) -> str:
    """Three lines for a terminal: protocol, exact rates and counts, per-attribute accuracy."""
    protocol = result["protocol"]
    return (
        f"held-out quality ({protocol['heldout_scenes']} scenes, seed {protocol['seed']}, {protocol['captioner']}):\n"
        f"  exact captions {result['exact_match']:.1%} (complete {result['complete_exact_match']:.1%}), object count "
        f"{result['count']:.1%}, background {result['background']:.1%}, parse failures {result['parse_failures']}\n"
        "  per attribute: " + ", ".join(f"{k} {v:.1%}" for k, v in result["attribute_accuracy"].items())
    )
