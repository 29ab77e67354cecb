"""The demo end to end at toy sizes: every step runs, writes its table and plots, and a rerun is cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fusion_diff.demo import CONFIG_DIR, run_demo
from fusion_diff.embedding.cache import EmbeddingCache
from fusion_diff.errors import ConfigError

pytestmark = pytest.mark.slow


def toy_demo_config(tmp_path: Path) -> tuple[dict, Path]:
    """The quick demo's config at toy sizes (2 training steps everywhere), written to ``tmp_path/demo.yaml``."""
    config = yaml.safe_load((CONFIG_DIR / "demo_quick.yaml").read_text())
    config["out_dir"] = str(tmp_path / "demo")
    config["world"].update(
        backbone_steps=2,
        backbone_cache=str(tmp_path / "backbone"),
        val_queries=12,
        test_queries=16,
        open_test_queries=6,
    )
    config["data"].update(pairs=96, triplets=96, workers=1)
    training = config["training"]
    for stage in ("stage1", "stage2", "fti4cir"):
        training[stage] = str(CONFIG_DIR / training[stage])
    tiny = ["schedule.max_train_steps=2", "schedule.train_batch_size=16", "schedule.lr_warmup_steps=0"]
    training["stage1_overrides"] = tiny + ["checkpointing.every_n_steps=0"]
    training["stage2_overrides"] = tiny + ["checkpointing.every_n_steps=0"]
    training["fti4cir_overrides"] = tiny + ["validation.every_n_steps=0", "data.max_images=64"]
    training["scene_captioner_steps"] = 2
    training["blip_captioner_steps"] = 2  # the realistic captioner's rows, through the generative path
    training["caption_editor_steps"] = 2  # the caption editor's rows
    config["evaluation"]["plot_queries"] = 4
    config["budget"] = {"minutes": None}  # the reference schedule, whatever this machine's speed
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    return config, path


def test_demo_runs_end_to_end_and_resumes(tmp_path: Path, monkeypatch) -> None:
    import fusion_diff.demo_budget as budget

    config, path = toy_demo_config(tmp_path)
    # A machine 100x slower than the reference CPU (a fake probe): the budget halves every training length.
    config["budget"] = {"minutes": 20, "min_scale": 0.5}
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(budget, "probe_seconds", lambda threads: 100 * budget.REFERENCE_PROBE_SECONDS)
    # stage 2 with near-miss negatives: the demo embeds as many per triplet as the stage-2 config reads
    config["training"]["stage2_overrides"] += ["data.near_misses=2", "model.contrastive_weight=0.1"]
    config["data"]["open_probability"] = 0.5  # open instructions among the triplets (one right answer each)
    path.write_text(yaml.safe_dump(config))
    table = run_demo(config_path=path, progress=False)
    triplets = json.loads((tmp_path / "demo" / "triplets" / "manifest.json").read_text())
    assert triplets["config"]["open_probability"] == 0.5
    assert {"recolour_any", "add_anywhere"} & set(triplets["counts_per_edit_type"])
    embeddings = tmp_path / "demo" / "triplet_embeddings"
    near_misses = EmbeddingCache.read(embeddings / "near_miss_fused")
    assert len(near_misses) == 2 * len(EmbeddingCache.read(embeddings / "target_fused"))  # triplets halved: 48
    assert near_misses.identity["near_misses"] == 2
    stage2 = yaml.safe_load((tmp_path / "demo" / "stage2" / "training_config.yaml").read_text())
    assert stage2["data"]["near_misses"] == 2
    rows = {row["method"] for row in json.loads(table.with_suffix(".json").read_text())}
    assert {"image-only", "fusion-diff", "fti4cir", "oracle-target-fused", "fusion-diff@training-phrasing"} <= rows
    assert {"fusion-diff[image gallery]", "fti4cir+mix"} <= rows  # variant rows: another name, `method:` says which
    assert {"fusion-diff [world BLIP]", "fti4cir+mix [world BLIP]", "image-only [world BLIP]"} <= rows
    assert {"edited-caption", "fusion-diff + edited caption", "fusion-diff + edited caption [world BLIP]"} <= rows
    assert "[world BLIP]" in table.read_text() and "captioner generative(" in table.read_text()  # protocol lines
    open_rows = json.loads((tmp_path / "demo" / "results" / "shapes-open-test.json").read_text())
    assert {r["method"] for r in open_rows} >= {"image-only", "fusion-diff", "fti4cir+mix", "fusion-diff [world BLIP]"}
    assert all(r["protocol"]["benchmark"] == "shapes-open" and "mAP@5" in r["metrics"] for r in open_rows)
    assert (tmp_path / "demo" / "results" / "plots" / "query_space.png").stat().st_size > 0
    assert "schedule: scaled x0.50 (backbone x1.00) to a 20-min budget" in table.read_text()  # every row says so
    assert yaml.safe_load((tmp_path / "demo" / "stage1" / "training_config.yaml").read_text())["schedule"][
        "max_train_steps"
    ] == 1  # 2 steps halved

    timings = tmp_path / "demo" / "results" / "timings.json"
    timings.unlink()
    run_demo(config_path=path, progress=False)  # every stage cached: only evaluation and plots run again
    assert json.loads(timings.read_text())["stage 2: Control-Adapter"] < 5

    config["evaluation"]["methods"]["typo-row"] = {"method": "fusion-dif"}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="fusion-dif"):
        run_demo(config_path=path, progress=False)
