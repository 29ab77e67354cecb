"""Pooled vs token-level text condition on the shapes world (issue 18): val R@1, overall and per edit kind.

    python scripts/text_condition_compare.py [--config configs/demo_quick.yaml] [--max-text-tokens 32]
        [--out runs/text-condition] [--captioner retrieval] [--val-queries 1000] [--stage1-steps N --stage2-steps N]
        [data.pairs=2000 world.backbone_cache=DIR ...]   # demo config overrides

Both variants run the demo's own steps (``fusion_diff.demo.Demo``) at the sizes of ``--config``, on the same
world backbone, benchmark, pair set and triplet set (built once under ``<out>/shared``; the token-level run
also embeds the token caches), with the same stage-1/2 configs and steps; only ``model.max_text_tokens`` of
stage 1 differs (stage 2 follows its prior). Fusion-Diff is scored on the benchmark's *val* split with the
config's Fusion-Diff query settings; the table gives R@1 per edit kind and overall. Finished steps are cached,
so a second run only evaluates.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from fusion_diff.demo import CONFIG_DIR, Demo, DemoConfig
from fusion_diff.training.config import load_dataclass

SHARED = ("benchmark", "pairs", "pair_embeddings", "triplets", "triplet_embeddings", "eval_cache")


def variant(base: DemoConfig, out: Path, name: str, stage1: list[str], stage2: list[str], captioner: str) -> Demo:
    """A demo of ``base`` in ``out/name`` whose data folders are links into ``out/shared``; the reference
    schedule (no time budget: both variants must train alike) and no FTI4CIR, open-edit benchmark or val hook."""
    training = replace(
        base.training,
        fti4cir=None,
        validate=False,
        stage1_overrides=[*base.training.stage1_overrides, *stage1],
        stage2_overrides=[*base.training.stage2_overrides, *stage2],
    )
    evaluation = replace(base.evaluation, captioner={"type": captioner}, training_phrasing=False)
    config = replace(
        base,
        out_dir=str(out / name),
        world=replace(base.world, open_test_queries=0),
        training=training,
        evaluation=evaluation,
        budget=replace(base.budget, minutes=None),
    )
    root = out / name
    root.mkdir(parents=True, exist_ok=True)
    for folder in SHARED:
        (out / "shared" / folder).mkdir(parents=True, exist_ok=True)
        link = root / folder
        if not link.is_symlink():
            link.symlink_to(out / "shared" / folder, target_is_directory=True)
    # The scene captioner's builder renames a finished folder into place, which a link cannot take: the first
    # variant builds it in its own folder and the next ones link to that one.
    captioner = root / "captioner"
    built = [p for p in out.glob("*/captioner") if p.is_dir() and not p.is_symlink() and p != captioner]
    if built and not captioner.exists():
        captioner.symlink_to(built[0].resolve(), target_is_directory=True)
    return Demo(config, CONFIG_DIR, progress=False)


def run(demo: Demo, name: str) -> dict:
    """The demo's data and stages 1-2 (``Demo.prepare``: cached after the first variant), then Fusion-Diff on
    val: overall and per edit kind."""
    from fusion_diff.baselines import create_method
    from fusion_diff.benchmarks.shapes import edit_kinds, recall_at_1_by_kind

    _, stage2 = demo.prepare()
    start = time.perf_counter()  # not a demo.step: the demo's time estimate knows only its own steps
    evaluator = demo.evaluator("val")
    method = create_method("fusion-diff", pipeline=str(stage2), name=name, **demo.fusion_diff_options())
    result = evaluator.evaluate(method)
    demo.timings["evaluation (val split)"] = time.perf_counter() - start
    by_kind = recall_at_1_by_kind(result, evaluator.units[0], edit_kinds(demo.path("benchmark"), "val"))
    return {"metrics": result.metrics, "r1_by_kind": by_kind, "protocol": result.protocol, "timings_s": demo.timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG_DIR / "demo_quick.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/text-condition"))
    parser.add_argument("--max-text-tokens", type=int, default=32)
    parser.add_argument("--captioner", choices=("retrieval", "scene"), default="retrieval")
    parser.add_argument("--val-queries", type=int, default=1000)
    parser.add_argument("--stage1-steps", type=int, default=None, help="override both variants' stage-1 steps")
    parser.add_argument("--stage2-steps", type=int, default=None, help="override both variants' stage-2 steps")
    parser.add_argument("--only", choices=("pooled", "tokens"), default=None, help="run one variant")
    parser.add_argument("overrides", nargs="*", help="demo config overrides, e.g. data.pairs=2000")
    args = parser.parse_args()
    overrides = [f"world.val_queries={args.val_queries}", *args.overrides]
    base = load_dataclass(DemoConfig, args.config, overrides=overrides)
    steps = [f"schedule.max_train_steps={args.stage1_steps}"] if args.stage1_steps else []
    steps2 = [f"schedule.max_train_steps={args.stage2_steps}"] if args.stage2_steps else []
    variants = {  # token-level first: it embeds the token caches beside the pooled ones the other run reuses
        f"tokens<={args.max_text_tokens}": ("tokens", [*steps, f"model.max_text_tokens={args.max_text_tokens}"]),
        "pooled": ("pooled", steps),
    }
    results = {}
    for name, (folder, stage1) in variants.items():
        if args.only in (None, folder):
            demo = variant(base, args.out.resolve(), folder, stage1, steps2, args.captioner)
            results[name] = run(demo, name)
    kinds = sorted({kind for r in results.values() for kind in r["r1_by_kind"]})
    lines = [
        (
            f"Fusion-Diff R@1 on the shapes benchmark's val split ({args.val_queries} queries; {args.config.name} "
            f"sizes{', ' + ' '.join(args.overrides) if args.overrides else ''}, stage steps "
            f"{args.stage1_steps or 'of the config'}/{args.stage2_steps or 'of the config'}, {args.captioner} captioner, "
            "query settings of the config), pooled vs token-level text:"
        ),
        "",
        "| text condition | R@1 | R@5 | " + " | ".join(kinds) + " |",
        "|---|---|---|" + "---|" * len(kinds),
    ]
    for name, r in results.items():
        cells = [f"{r['r1_by_kind'].get(kind, float('nan')):.1f}" for kind in kinds]
        lines.append(f"| {name} | {r['metrics']['R@1']:.2f} | {r['metrics']['R@5']:.2f} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
