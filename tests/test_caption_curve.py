"""scripts/caption_quality_curve.py at toy size: every method per captioner, caption quality, table and plot."""

from __future__ import annotations

import json
import random

import yaml

from data_synth.shapes.benchmark import BenchmarkConfig, write_benchmark
from data_synth.shapes.blip import BlipWorldConfig, save_blip, train_blip
from data_synth.shapes.captions import caption_scene
from data_synth.shapes.render import render
from data_synth.shapes.scene import sample_scene
from fusion_diff.cli.bench import load_script


def test_caption_curve_table_for_every_captioner(tmp_path, tiny_openclip_checkpoint):
    root = tmp_path / "bench"
    write_benchmark(root, BenchmarkConfig(val_queries=4, test_queries=7, seed=2), workers=1, progress=False)
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(8)]
    model, processor = train_blip(
        [render(s, 64, i) for i, s in enumerate(scenes)], [caption_scene(s, rng) for s in scenes], steps=2,
        batch_size=4, model_config=BlipWorldConfig(patch_size=16, width=32, vision_layers=1, text_layers=1, heads=2),
        progress=False,
    )  # fmt: skip
    save_blip(model, processor, tmp_path / "blip")
    name, checkpoint = tiny_openclip_checkpoint
    config = {
        "benchmark": {"name": "shapes", "root": str(root), "split": "test"},
        "backbone": {"backend": "openclip", "model_name": name, "pretrained": str(checkpoint)},
        "heldout_scenes": 3,
        "methods": {"image-only": {}, "sum": {}, "sum[text-heavy]": {"method": "sum", "image_weight": 0.1}},
        "captioners": [
            {
                "name": "tiny blip",
                "spec": {"type": "generative", "model": str(tmp_path / "blip"), "generation": {"max_new_tokens": 8}},
            },
            {"name": "truth", "spec": "oracle", "methods": {"sum": {"image_weight": 0.25}}},
        ],
    }
    (tmp_path / "curve.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    out = tmp_path / "out"
    assert load_script("caption_quality_curve").main([str(tmp_path / "curve.yaml"), "--out", str(out)]) == 0
    record = json.loads((out / "caption_curve.json").read_text())
    rows = {r["captioner"]: r for r in record["rows"]}
    assert record["metric"] == "R@1" and list(rows) == ["tiny blip", "truth"]
    assert rows["tiny blip"]["quality"]["scenes"] == 3 and rows["truth"]["quality"]["exact_match"] == 1.0
    assert rows["truth"]["methods"]["sum"]["protocol"]["method"]["image_weight"] == 0.25  # per-row settings
    assert rows["truth"]["methods"]["sum"]["protocol"]["captioner_identity"]["type"] == "oracle"
    assert rows["truth"]["methods"]["sum[text-heavy]"]["protocol"]["method"]["image_weight"] == 0.1
    table = (out / "caption_curve.md").read_text()
    assert "| tiny blip |" in table and "image-only R@1" in table and (out / "caption_curve.png").stat().st_size > 0
