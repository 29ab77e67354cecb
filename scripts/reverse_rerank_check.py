"""Does analysis by synthesis fix removals on the benchmark? (issue 18; ``removal_probe.py --reverse-rerank`` is the
probe version.)

    python scripts/reverse_rerank_check.py --demo-dir runs/demo --reverse-dir runs/stage2-reverse [--k 20]

Trains (once; an existing ``--reverse-dir`` is reused) a *reverse* Control-Adapter: the demo's stage-2 config on the
demo's triplet caches with the reference and target caches swapped, so that it learns ``(target, instruction) ->
reference``. Then, on the benchmark's **val** split, it re-ranks the demo Fusion-Diff's top-``k`` gallery items
(reference excluded, as the evaluator does) by ``forward score + w x cos(reverse(candidate, instruction),
reference)``: which candidate, edited back with the same instruction, gives the reference? Both directions use the
demo's query settings and captioner. Prints R@1 per edit kind for several ``w`` (w = 0 is the demo's own val R@1).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from fusion_diff.baselines.registry import load_pipeline, method_factory
from fusion_diff.benchmarks.evaluate import modification_texts
from fusion_diff.benchmarks.shapes import edit_kinds
from fusion_diff.demo import Demo
from fusion_diff.retrieval.method import QueryContext, run_method
from fusion_diff.training.config import load_config
from fusion_diff.training.loop import FINAL_CONFIG, MANIFEST, train

SWAPPED = {"reference_fused": "target_fused", "target_fused": "reference_fused"}  # the other two caches as they are
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, None)  # None: the reverse score alone


def train_reverse(demo: Demo, out: Path) -> Path:
    """The reverse adapter in ``out`` (trained unless it is there), on symlinked swapped caches in ``out``-caches."""
    if (out / MANIFEST).is_file():
        return out
    caches = demo.path("triplet_embeddings")
    swapped = out.parent / f"{out.name}-caches"
    swapped.mkdir(parents=True, exist_ok=True)
    for name in ("reference_fused", "target_fused", "instruction_text", "reference_image"):
        link = swapped / name
        if not link.is_symlink():
            link.symlink_to((caches / SWAPPED.get(name, name)).resolve(), target_is_directory=True)
    overrides = [f"output_dir={out}", f"data.triplet_embeddings={swapped}"]
    train(load_config(demo.path("stage2") / FINAL_CONFIG, overrides=overrides), resume="latest")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", required=True, help="a finished `fusion-diff demo` output folder")
    parser.add_argument("--reverse-dir", required=True, help="where the reverse adapter is (or is trained)")
    parser.add_argument("--k", type=int, default=20, help="gallery items re-ranked per query")
    parser.add_argument("--config", default=None, help="the demo config that made it (default: configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="demo config overrides used for that run (section.key=value)")
    args = parser.parse_args()
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")

    demo = Demo.finished(args.demo_dir, args.config, args.overrides)
    reverse_dir = train_reverse(demo, Path(args.reverse_dir))
    evaluator = demo.evaluator("val")
    unit = evaluator.units[0]
    options = {**demo.fusion_diff_options(), "seed": demo.config.seed}
    forward = method_factory("fusion-diff")(pipeline=load_pipeline(demo.path("stage2")), **options)
    reverse = method_factory("fusion-diff")(pipeline=load_pipeline(reverse_dir), **options)

    queries, gallery = list(unit.queries), list(unit.gallery)
    position = {g: i for i, g in enumerate(gallery)}
    gallery_embeds = F.normalize(evaluator.fused(unit, gallery), dim=-1)
    query_embeds = evaluator.query_embeddings(forward, unit, queries)
    if query_embeds.ndim != 2:
        raise SystemExit("reverse_rerank_check scores one query embedding per query; the demo's Fusion-Diff settings "
                         "keep several samples (multi-sample scoring): run it with averaged samples.")
    scores = query_embeds @ gallery_embeds.T
    scores[torch.arange(len(queries)), torch.tensor([position[q.reference] for q in queries])] = float("-inf")
    forward_scores, candidates = scores.topk(min(args.k, len(gallery)), dim=1)
    k = candidates.shape[1]
    references = F.normalize(evaluator.fused(unit, [q.reference for q in queries]), dim=-1)
    texts, _ = modification_texts(queries, unit.benchmark, evaluator.fiq_order, evaluator.circo_shared_concept)
    text_embeds = evaluator.text_embeddings(texts)

    edited_back = []
    for rows in torch.arange(len(queries)).split(max(1, 1024 // k)):  # every (query, candidate) pair, batched
        pair_query = rows.repeat_interleave(k)
        control = gallery_embeds[candidates[rows].flatten()]
        context = QueryContext(
            embedder=evaluator.embedder,
            query_ids=[f"{queries[q].query_id}@{c}" for q, c in zip(pair_query.tolist(), candidates[rows].flatten().tolist())],
            modification_texts=[texts[q] for q in pair_query.tolist()],
            modification_text_embeds=text_embeds[pair_query],
            reference_image_embeds=control,  # not read: the fused control below is
            reference_image_paths=[unit.image_paths[gallery[c]] for c in candidates[rows].flatten().tolist()],
            reference_fused_embeds=control,
        )
        edited_back.append(F.normalize(run_method(reverse, context), dim=-1).view(len(rows), k, -1))
    reverse_scores = (torch.cat(edited_back) * references[:, None]).sum(-1)

    kinds = edit_kinds(demo.path("benchmark"), "val")
    labels = [kinds[q.query_id] for q in queries]
    shown = sorted(set(labels))
    target = torch.tensor([position[q.positives[0]] for q in queries])[:, None]
    print("| val R@1 (%) | " + " | ".join([*shown, "all"]) + " |")
    print("|---|" + "---|" * (len(shown) + 1))
    rows = [(f"target in the forward top-{k}", (candidates == target).any(1))]
    for weight in WEIGHTS:
        combined = reverse_scores if weight is None else forward_scores + weight * reverse_scores
        name = "reverse score only" if weight is None else f"forward + {weight:g} x reverse"
        rows.append((name, (candidates.gather(1, combined.argmax(1, keepdim=True)) == target).squeeze(1)))
    for name, hits in rows:
        cells = [100 * float(hits[torch.tensor([label == kind for label in labels])].float().mean()) for kind in shown]
        print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {100 * float(hits.float().mean()):.2f} |")
    print(
        f"\nVal split of {demo.path('benchmark')}, {len(queries)} queries; forward: {demo.path('stage2')}, reverse: "
        f"{reverse_dir} (stage 2's config on swapped reference/target caches); both with the demo's query settings "
        f"{options} and captioner; top-{k} re-ranked (reference excluded)."
    )


if __name__ == "__main__":
    main()
