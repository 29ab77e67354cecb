"""Caption editing in the query (issue 18): the world caption editor, trained on a finished demo's triplets; the
edited caption as a query of its own (``edited-caption``) and as a term of Fusion-Diff's query
(``edited_caption_weight``), its weight chosen on **val**, then scored once on test.

    python scripts/edited_caption_eval.py --demo-dir runs/demo [--steps N] [--rows N] [--editor-seed N] [--num-beams 1] \
        [--weights 0.5 1 2] [--also runs/demo/ablation-regression/stage2] [--config configs/demo.yaml] [key=value ...]

The editor (``fusion-diff world caption-editor``) goes to ``<demo-dir>/caption_editor`` (cached). Every row uses
the demo's captioner for references and gallery and the demo's Fusion-Diff settings; ``--also`` pipelines get the
weight chosen for Fusion-Diff. Besides R@1 per edit kind it prints how often the edited caption equals the
captioner's caption of the target (an analysis of the editor, read after the fact; no method sees the target).
Tables go to ``<demo-dir>/results/edited-caption-{val,test}.{md,json}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_synth.shapes.benchmark_phrasings import phrasing_of
from data_synth.shapes.caption_editor import DEFAULT_STEPS, build_world_caption_editor
from fusion_diff.baselines import create_method
from fusion_diff.baselines.registry import load_pipeline, method_factory
from fusion_diff.benchmarks.evaluate import modification_texts
from fusion_diff.benchmarks.report import markdown_table, write_results
from fusion_diff.benchmarks.shapes import edit_kinds, kind_table
from fusion_diff.captioning.editor import CaptionEditor
from fusion_diff.cli.arguments import finite_float, non_negative_int, positive_int
from fusion_diff.demo import Demo, pipeline_row_name
from fusion_diff.utils.io import atomic_path


def exact_edits(editor: CaptionEditor, evaluator, kinds: dict[str, str]) -> str:
    """How often the edited caption is the captioner's caption of the target: per edit kind, and per benchmark
    phrasing of the single edits (which wordings the editor reads)."""
    unit = evaluator.units[0]
    queries = list(unit.queries)
    texts, _ = modification_texts(queries, unit.benchmark, evaluator.fiq_order, evaluator.circo_shared_concept)
    references = [c[0] for c in evaluator.captions(unit, [q.reference for q in queries])]
    targets = [c[0] for c in evaluator.captions(unit, [q.positives[0] for q in queries])]
    by_kind: dict[str, list[bool]] = {}
    by_phrasing: dict[tuple[str, str], list[bool]] = {}
    for query, text, edited, target in zip(queries, texts, editor.edit(references, texts), targets):
        kind = kinds[query.query_id]
        by_kind.setdefault(kind, []).append(edited == target)
        phrasing = phrasing_of(text, kind)
        if phrasing is not None:
            by_phrasing.setdefault((kind, phrasing), []).append(edited == target)
    every = [hit for kind_hits in by_kind.values() for hit in kind_hits]
    cells = [f"{kind} {100 * sum(h) / len(h):.1f}" for kind, h in sorted(by_kind.items())]
    lines = [f"edited caption = the captioner's caption of the target: {', '.join(cells)}; all {100 * sum(every) / len(every):.1f}%"]
    lines += ["", "| kind | benchmark phrasing | queries | exact % |", "|---|---|---|---|"]
    lines += [f"| {k} | {p} | {len(h)} | {100 * sum(h) / len(h):.1f} |" for (k, p), h in sorted(by_phrasing.items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", required=True, help="a finished `fusion-diff demo` output folder")
    parser.add_argument("--steps", type=positive_int, default=None, help="caption editor training steps (default: the demo's "
                        f"training.caption_editor_steps, else {DEFAULT_STEPS})")  # fmt: skip
    parser.add_argument("--rows", type=non_negative_int, default=None, help="caption editor training rows, the triplet "
                        "set's own topped up by its generator (default: the demo's training.caption_editor_rows)")  # fmt: skip
    parser.add_argument("--editor-seed", type=int, default=None, help="caption editor training seed (default: the demo's "
                        "seed): another draw of the same recipe, to see how much editor trainings differ")  # fmt: skip
    parser.add_argument("--weights", type=finite_float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 3.0], help="edited-caption weights tried on val")
    parser.add_argument("--num-beams", type=positive_int, default=None, help="the editor's beam width (default: CaptionEditor's)")
    parser.add_argument("--also", nargs="+", default=[], metavar="PIPELINE", help="other pipelines (ablations) to score")
    parser.add_argument("--config", default=None, help="the demo config that made it (default: configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="demo config overrides used for that run (section.key=value)")
    args = parser.parse_args()
    if any(w <= 0 for w in args.weights):
        parser.error(f"--weights must be > 0 (the plain row is always scored), got {args.weights}")

    demo = Demo.finished(args.demo_dir, args.config, args.overrides)
    steps = args.steps or demo.config.training.caption_editor_steps or DEFAULT_STEPS
    rows = demo.config.training.caption_editor_rows if args.rows is None else args.rows
    seed = demo.config.seed if args.editor_seed is None else args.editor_seed
    editor_dir = build_world_caption_editor(  # the demo's own editor when it trained one (same steps, rows and seed)
        demo.path("triplets"), demo.path("caption_editor"), steps=steps, seed=seed, rows=rows
    )
    editor = CaptionEditor.from_pretrained(editor_dir, generation={"num_beams": args.num_beams} if args.num_beams else None)
    pipelines = {"fusion-diff": demo.path("stage2"), **{pipeline_row_name(p): Path(p) for p in args.also}}
    options = demo.fusion_diff_options()

    chosen: dict[str, float] = {}  # Fusion-Diff row -> its edited-caption weight

    def rows(evaluator, weights: list[float]) -> list:
        results = [demo.scored(evaluator, create_method("image-only"))]
        results.append(demo.scored(evaluator, create_method("edited-caption", caption_editor=editor)))
        for name, path in pipelines.items():
            pipeline = load_pipeline(path)
            for weight in [0.0, *weights]:
                extra = {"caption_editor": editor, "edited_caption_weight": weight} if weight else {}
                row = f"{name} + {weight:g} x edited caption" if weight else name
                chosen[row] = weight
                method = method_factory("fusion-diff")(pipeline=pipeline, name=row, **options, **extra)
                results.append(demo.scored(evaluator, method))
        return results

    def report(split: str, results: list, note: str) -> None:
        kinds = edit_kinds(demo.path("benchmark"), split)
        table = f"Caption editing in the query, {split} split ({note})\n\n{markdown_table(results)}\n"
        table += f"\nR@1 per edit kind\n\n{kind_table(results, evaluators[split].units[0], kinds)}\n"
        table += f"\n{exact_edits(editor, evaluators[split], kinds)}\n"
        print(table, flush=True)
        write_results(results, demo.path("results"), f"edited-caption-{split}")
        with atomic_path(demo.path("results") / f"edited-caption-{split}.md") as tmp:
            tmp.write_text(table, encoding="utf-8")

    evaluators = {split: demo.evaluator(split) for split in ("val", "test")}
    val = rows(evaluators["val"], args.weights)
    fusion_rows = [r for r in val if r.method.startswith("fusion-diff + ")]
    best = max(fusion_rows, key=lambda r: r.metrics["R@1"])
    weight = chosen[best.method]
    report("val", val, f"weights {args.weights}; best for Fusion-Diff: {weight:g}")
    report("test", rows(evaluators["test"], [weight]), f"weight {weight:g}, chosen on val")


if __name__ == "__main__":
    main()
