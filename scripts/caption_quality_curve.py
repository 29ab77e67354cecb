"""Caption quality against retrieval quality: every method's score with every captioner, in one table and plot.

Fusion-Diff reads the reference (and a fused gallery) through captions, so its lead over image-only depends
on how good the captioner is. This script evaluates a list of methods once per captioner (worst to best,
with the benchmark's ground-truth captions as an oracle row) and measures each captioner's held-out
caption quality (``data_synth.shapes.caption_quality``: exact captions, per-attribute accuracy).

    python scripts/caption_quality_curve.py CONFIG.yaml [--out DIR]

CONFIG (YAML)::

    benchmark: {name: shapes, root: runs/demo/benchmark, split: test}  # any `fusion-diff eval` benchmark
    backbone: world          # the shapes world's backbone, or an embedder spec {backend: openclip, model_name: ...}
    heldout_scenes: 1000     # held-out scenes each captioner is scored on (0: skip)
    metric: R@1              # the table's number (default: R@1; mAP@5 on CIRCO-format benchmarks)
    methods:                 # row label -> constructor options (`method:` names the method when the label
      image-only: {}         # is not its name, as in configs/demo.yaml)
      sum: {}
      fusion-diff: {pipeline: runs/demo/stage2}
      fti4cir+mix: {method: fti4cir, checkpoint: runs/demo/fti4cir, gallery_mode: fused, mix_reference: 0.4}
    captioners:              # table rows; per-row `methods` override the options (settings selected on val)
      - {name: retrieval, spec: {type: retrieval, bank: runs/demo/pairs}}
      - {name: blip-2k, spec: {type: generative, model: runs/blip-2k}, methods: {fusion-diff: {pipeline: runs/fd-blip}}}
      - {name: scene, spec: {type: scene, model: runs/demo/captioner}}
      - {name: ground truth, spec: oracle}   # oracle row: the benchmark's ground-truth captions

Writes ``DIR/caption_curve.{json,md,png}``: every result with its full protocol, the table, and the plot of
each method's score against the captioner's per-object attribute accuracy (mean of shape, colour, size and
position; the exact-caption rate is in the table).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusion_diff.captioning.base import Captioner
from fusion_diff.embedding.base import ImageInput
from fusion_diff.errors import ConfigError, DataError
from fusion_diff.utils.io import atomic_path, write_json_atomic

ORACLE = "oracle"
CIRCO_FORMAT = ("circo", "shapes-open")


class OracleCaptioner(Captioner):
    """The benchmark's ground-truth captions ({image name or id: caption}) as a captioner: the oracle row only."""

    def __init__(self, captions_file: str | Path) -> None:
        from fusion_diff.benchmarks.shapes import load_oracle_captions

        self.path = Path(captions_file)
        self.captions = load_oracle_captions(self.path)
        self._digest = hashlib.sha1(self.path.read_bytes()).hexdigest()[:16]

    reads_paths = True  # captions are looked up by image file name, so the caption job passes paths

    @property
    def identity(self) -> dict[str, Any]:
        return {"type": ORACLE, "captions": self._digest}

    def describe(self) -> str:
        return f"oracle(ground-truth captions, {self.path.name})"

    def caption_candidates(
        self, images: Sequence[ImageInput], batch_size: int = 32, progress: bool = False
    ) -> list[list[str]]:
        out = []
        for image in images:
            stem = Path(str(image)).stem
            key = stem if stem in self.captions else str(int(stem)) if stem.isdigit() else stem
            if key not in self.captions:
                raise DataError(f"{self.path} has no ground-truth caption for image {image}.")
            out.append([self.captions[key]])
        return out


def _captioner(spec: Any, embedder, root: Path, split: str) -> Captioner:
    from fusion_diff.benchmarks.shapes import oracle_captions_path
    from fusion_diff.captioning import create_captioner

    if spec == ORACLE:
        return OracleCaptioner(oracle_captions_path(root, split))
    if not isinstance(spec, dict):
        raise ConfigError(f"captioner spec {spec!r}: a captioner dict ({{type: ..., ...}}) or 'oracle' expected.")
    return create_captioner(spec, embedder)


def _backbone(spec: Any):
    if spec in (None, "world"):
        from data_synth.shapes.backbone import load_world_embedder

        return load_world_embedder(train_if_missing=False)
    from fusion_diff.embedding.factory import create_embedder

    return create_embedder(spec)


def caption_curve(config: dict[str, Any], out_dir: str | Path, progress: bool = False) -> list[dict[str, Any]]:
    """One row per captioner: its held-out caption quality and every method's metrics (see the module doc)."""
    from data_synth.shapes.caption_quality import HELDOUT_SEED, OBJECT_ATTRIBUTES, evaluate_captioner, heldout_scenes
    from fusion_diff.baselines.registry import create_method
    from fusion_diff.benchmarks import load_benchmark
    from fusion_diff.benchmarks.evaluate import Evaluator

    try:
        bench, methods, rows = config["benchmark"], config["methods"], config["captioners"]
        root, name, split = Path(bench["root"]), bench["name"], bench.get("split", "test")
    except (KeyError, TypeError) as err:
        raise ConfigError(
            f"caption-curve config lacks {err}: it needs benchmark {{name, root}}, methods, captioners."
        ) from err
    units = load_benchmark(name, root, split)
    embedder = _backbone(config.get("backbone"))
    n_scenes = int(config.get("heldout_scenes", 1000))
    scenes = heldout_scenes(n_scenes, HELDOUT_SEED) if n_scenes else None
    out = Path(out_dir)
    results = []
    for row in rows:
        captioner = _captioner(row["spec"], embedder, root, split)
        if row["spec"] == ORACLE:
            perfect = dict.fromkeys(OBJECT_ATTRIBUTES, 1.0)
            quality = {"exact_match": 1.0, "attribute_accuracy": perfect, "note": "ground-truth captions"}
        elif scenes is not None:
            quality = evaluate_captioner(captioner, *scenes, HELDOUT_SEED)
        else:
            quality = {}
        evaluator = Evaluator(units, embedder, captioner=captioner, cache_root=out / "cache", progress=progress)
        scores = {}
        for label, options in {**methods, **row.get("methods", {})}.items():
            options = dict(options or {})
            method = options.pop("method", label)  # "fti4cir+mix: {method: fti4cir, ...}", as in configs/demo.yaml
            if method.startswith(ORACLE):
                options["data"] = units[0]
            result = evaluator.evaluate(create_method(method, **options))
            scores[label] = {"metrics": result.metrics, "protocol": result.protocol}
        results.append(
            {"captioner": row["name"], "describe": captioner.describe(), "quality": quality, "methods": scores}
        )
    return results


def attribute_accuracy(quality: dict[str, Any]) -> float | None:
    """Mean per-object attribute accuracy (shape, colour, size, position): the curve's x axis. Exact captions
    need every attribute of every object right, so weak captioners all sit at ~0% exact while their
    attributes still range from chance to near-perfect."""
    accuracy = quality.get("attribute_accuracy")
    return sum(accuracy.values()) / len(accuracy) if accuracy else None


def markdown(results: list[dict[str, Any]], metric: str) -> str:
    methods = list(dict.fromkeys(m for r in results for m in r["methods"]))
    lines = [
        f"| captioner | exact captions | attribute accuracy | {' | '.join(f'{m} {metric}' for m in methods)} |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for r in results:
        exact, attributes = r["quality"].get("exact_match"), attribute_accuracy(r["quality"])
        cells = [
            f"{r['methods'][m]['metrics'].get(metric, float('nan')):.2f}" if m in r["methods"] else "" for m in methods
        ]
        quality = ["" if value is None else f"{value:.1%}" for value in (exact, attributes)]
        lines.append(f"| {r['captioner']} | {' | '.join(quality)} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if attribute_accuracy(r["quality"]) is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(m for r in rows for m in r["methods"]):
        points = [
            (attribute_accuracy(r["quality"]) * 100, r["methods"][method]["metrics"][metric])
            for r in rows
            if method in r["methods"]
        ]
        ax.plot(*zip(*points), marker="o", label=method)
    for r in rows:
        ax.annotate(r["captioner"], (attribute_accuracy(r["quality"]) * 100, 0), fontsize=7, rotation=45)
    ax.set_xlabel("per-object attribute accuracy on held-out scenes (%)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML file (see the module docstring)")
    parser.add_argument("--out", default="runs/caption_curve", help="output folder (default %(default)s)")
    args = parser.parse_args(argv)
    import yaml

    config = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    metric = config.get("metric") or ("mAP@5" if config["benchmark"]["name"] in CIRCO_FORMAT else "R@1")
    results = caption_curve(config, args.out, progress=True)
    out = Path(args.out)
    table = markdown(results, metric)
    write_json_atomic(out / "caption_curve.json", {"config": config, "metric": metric, "rows": results})
    with atomic_path(out / "caption_curve.md") as tmp:
        tmp.write_text(table, encoding="utf-8")
    plot(results, metric, out / "caption_curve.png")
    print(table)
    print(f"wrote {out / 'caption_curve.json'}, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
