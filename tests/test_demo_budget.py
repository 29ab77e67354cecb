"""The demo's time budget: given a measured speed, the scaled schedule fits, is applied to every training
length, is recorded in the protocol line, and a rerun keeps the first run's plan."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from fusion_diff.benchmarks.report import EvalResult
from fusion_diff.demo import DemoConfig, default_config_path
from fusion_diff.demo_budget import (
    PLAN_FILE,
    REFERENCE_COSTS,
    REFERENCE_PROBE_SECONDS,
    BudgetSection,
    Plan,
    announce,
    apply_plan,
    estimate_seconds,
    plan_as_record,
    plan_demo,
    plan_for,
    replan_after_backbone,
)
from fusion_diff.training.config import load_config, load_dataclass

STEPS = [s for s in REFERENCE_COSTS if s not in ("world BLIP", "caption editor")]  # the default demo trains neither
AFTER_BACKBONE = [s for s in STEPS if s != "world backbone"]  # the reference backbone is cached


@pytest.fixture
def demo():
    path = default_config_path(quick=False)
    return load_dataclass(DemoConfig, path), path.parent


def test_fast_machine_keeps_the_reference_schedule(demo):
    config, config_dir = demo
    plan = plan_for(1.0, STEPS, config.budget, config, config_dir)  # the reference CPU: ~18 min < 20
    assert plan.scale == 1.0 and plan.schedules is None and apply_plan(config, plan) is config
    assert plan.describe() == "reference schedule (configs/demo.yaml)"


@pytest.mark.parametrize("speed", [2.0, 2.6, 3.0])
def test_slow_machine_gets_a_schedule_that_fits(demo, speed):
    config, config_dir = demo
    plan = plan_for(speed, AFTER_BACKBONE, config.budget, config, config_dir)
    assert plan.estimate_s > config.budget.minutes * 60  # the reference schedule would not fit
    assert 0.25 <= plan.scale < 1.0 and plan.planned_s <= config.budget.minutes * 60
    assert plan.planned_s == round(estimate_seconds(speed, AFTER_BACKBONE, plan.scale))
    scaled = apply_plan(config, plan)
    assert scaled.world.backbone_steps == config.world.backbone_steps  # the cached reference backbone is kept
    assert scaled.data.pairs == round(config.data.pairs * plan.scale)
    assert scaled.data.triplets == round(config.data.triplets * plan.scale)
    assert scaled.world.test_queries == config.world.test_queries  # the benchmark is never scaled
    assert scaled.evaluation.methods == config.evaluation.methods  # nor the table's rows
    stage2 = load_config(config_dir / scaled.training.stage2, overrides=scaled.training.stage2_overrides)
    reference = load_config(config_dir / config.training.stage2, overrides=config.training.stage2_overrides)
    assert stage2.schedule.max_train_steps == round(reference.schedule.max_train_steps * plan.scale)
    assert stage2.optim.learning_rate == reference.optim.learning_rate  # only lengths change

    result = EvalResult(method="fusion-diff", metrics={"R@1": 1.0}, protocol=_protocol())
    result.protocol.update(plan_as_record(plan))
    line = result.protocol_line()
    assert (
        f"scaled x{plan.scale:.2f} (backbone x1.00) to a 20-min budget" in line and "not the reference numbers" in line
    )
    assert f"stage2.schedule.max_train_steps {stage2.schedule.max_train_steps}" in line


def test_too_slow_a_machine_stops_at_min_scale(demo):
    config, config_dir = demo
    plan = plan_for(10.0, STEPS, config.budget, config, config_dir)
    assert plan.scale == config.budget.min_scale and plan.planned_s > config.budget.minutes * 60


def test_plan_is_measured_once_and_kept_for_reruns(demo, tmp_path, capsys, monkeypatch):
    import fusion_diff.demo_budget as budget

    config, config_dir = demo
    probes = []

    def fake_probe(threads: int) -> float:
        probes.append(threads)
        return 2.6 * REFERENCE_PROBE_SECONDS  # a machine 2.6x slower than the reference CPU

    monkeypatch.setattr(budget, "probe_seconds", fake_probe)
    first, plan = plan_demo(config, config_dir, STEPS, tmp_path)
    assert plan.scale < 1.0 and "scaled x" in capsys.readouterr().out
    assert json.loads((tmp_path / PLAN_FILE).read_text())["probe_seconds_per_step"] == 2.6 * REFERENCE_PROBE_SECONDS
    again, replanned = plan_demo(config, config_dir, STEPS, tmp_path)
    assert len(probes) == 1 and replanned == plan and again == first  # same caches: nothing retrains
    assert "measured by the first run" in capsys.readouterr().out
    bigger = load_dataclass(DemoConfig, config_dir / "demo.yaml", ["data.triplets=50000"])
    _, replanned = plan_demo(bigger, config_dir, STEPS, tmp_path)  # another config: measured and planned again
    assert len(probes) == 2 and replanned.schedules["data.triplets"] == round(50000 * replanned.scale)

    unbudgeted = load_dataclass(DemoConfig, config_dir / "demo.yaml", ["budget.minutes=null"])
    kept, reference = plan_demo(unbudgeted, config_dir, STEPS, tmp_path)
    assert reference == Plan() and kept is unbudgeted and len(probes) == 2  # --no-budget: nothing measured
    assert plan_as_record(reference)["schedule"] == "reference schedule (configs/demo.yaml)"


def test_backbone_is_scaled_last_and_by_default_never(demo):
    """From nothing on a 2.6x slower CPU: the rest goes to its floor first; the backbone (whose held-out shape
    accuracy fell from 97% to 32% at 0.3 of its steps) keeps its length unless backbone_min_scale allows less."""
    config, config_dir = demo
    plan = plan_for(2.6, STEPS, config.budget, config, config_dir)
    assert (plan.scale, plan.backbone_scale) == (config.budget.min_scale, 1.0)
    assert plan.planned_s > config.budget.minutes * 60 and "still over budget" in announce(plan, 0.52)
    assert plan.schedules["world.backbone_steps"] == config.world.backbone_steps
    allowed = replace(config.budget, backbone_min_scale=0.3)
    shorter = plan_for(2.6, STEPS, allowed, config, config_dir)
    assert shorter.scale == config.budget.min_scale and 0.3 <= shorter.backbone_scale < 1.0
    assert shorter.planned_s <= config.budget.minutes * 60
    assert shorter.schedules["world.backbone_steps"] == round(config.world.backbone_steps * shorter.backbone_scale)
    assert shorter.planned_s == round(estimate_seconds(2.6, STEPS, shorter.scale, shorter.backbone_scale))


def test_budget_settings_are_checked():
    with pytest.raises(Exception, match="min_scale"):
        BudgetSection(minutes=20, min_scale=0)


def _protocol() -> dict:
    return {
        "benchmark": "shapes", "split": "test1", "queries_evaluated": 10, "backbone": {"name": "world"},
        "gallery_mode": "fused", "captioner": "scene", "reference_inputs": ["image", "fused"],
        "ranking": {"reference_removed": True}, "missing_images": 0, "method": {"method": "fusion-diff"},
    }  # fmt: skip


def test_scripts_adopt_the_plan_a_finished_demo_was_trained_with(demo, tmp_path, monkeypatch):
    """Scripts that evaluate a finished demo's models (the sampling sweep) name its schedule in their protocol
    lines, and refuse a folder whose plan was made for another config rather than guess."""
    import fusion_diff.demo_budget as budget
    from fusion_diff.demo import Demo
    from fusion_diff.errors import ConfigError

    config, config_dir = demo
    config = replace(config, out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=f"{PLAN_FILE} is missing or was made for another demo config"):
        Demo(config, config_dir).adopt_saved_plan()
    monkeypatch.setattr(budget, "probe_seconds", lambda threads: 2.6 * REFERENCE_PROBE_SECONDS)
    _, plan = plan_demo(config, config_dir, STEPS, tmp_path)
    later = Demo(config, config_dir)
    assert later.adopt_saved_plan() == plan and later.config.data.triplets == plan.schedules["data.triplets"]


def test_settings_added_later_keep_earlier_plans_and_get_their_own_backbone(demo):
    """A plan saved before the negation (and caption-editor) settings existed stays valid while they are off; turned on, they
    change the plan's config and train a backbone in a folder of its own (the shared one is never replaced)."""
    import hashlib
    from dataclasses import asdict

    from fusion_diff.demo import Demo
    from fusion_diff.demo_budget import config_digest

    config, config_dir = demo
    earlier = asdict(config)
    del earlier["world"]["backbone_negation_fraction"], earlier["data"]["negated_removals"], earlier["budget"]["scale"]
    del earlier["training"]["caption_editor_steps"], earlier["evaluation"]["edited_caption_weight"]
    del earlier["training"]["caption_editor_rows"], earlier["data"]["open_probability"]
    assert config_digest(config) == hashlib.sha256(json.dumps(earlier, sort_keys=True, default=str).encode()).hexdigest()
    negation = replace(config, world=replace(config.world, backbone_negation_fraction=0.3))
    assert config_digest(negation) != config_digest(config)
    open_edits = replace(config, data=replace(config.data, open_probability=0.3))
    assert config_digest(open_edits) != config_digest(config)
    assert Demo(config, config_dir, progress=False).backbone_root().name == "shapes_backbone"
    negated = Demo(negation, config_dir, progress=False)
    assert negated.backbone_root().name == "shapes_backbone-negation-0.3"
    assert negated.backbone_config().negation_fraction == 0.3
    assert negated.backbone_config().identity() != Demo(config, config_dir, progress=False).backbone_config().identity()


def test_pipelines_scored_beside_the_demo_get_readable_row_names():
    from fusion_diff.demo import pipeline_row_name

    assert pipeline_row_name("runs/demo/ablation-regression/stage2") == "ablation: regression"
    assert pipeline_row_name("runs/demo/ablation-no-stage1/stage2") == "ablation: no-stage1"
    assert pipeline_row_name("runs/stage2-2880") == "stage2-2880"
    assert pipeline_row_name("runs/k3/stage2") == "k3"


def test_a_backbone_slower_than_the_probe_read_replans_the_rest(demo, tmp_path, monkeypatch):
    """The probe's few steps read 1.27x; the backbone then took 1.53x its reference time (as on a noisy 2-core
    Xeon): the steps left shrink to what is left of the budget, the new plan is saved for reruns and says why.
    A backbone as fast as the probe read, or faster, leaves the plan alone."""
    import fusion_diff.demo_budget as budget

    config, config_dir = demo
    monkeypatch.setattr(budget, "probe_seconds", lambda threads: 1.27 * REFERENCE_PROBE_SECONDS)
    _, plan = plan_demo(config, config_dir, STEPS, tmp_path)
    backbone_reference = estimate_seconds(1.0, ["world backbone"])
    for as_read in (1.0, 1.27):
        kept = replan_after_backbone(tmp_path, config, config_dir, plan, as_read * backbone_reference, AFTER_BACKBONE)
        assert kept is None
    backbone_s = 1.53 * backbone_reference
    new = replan_after_backbone(tmp_path, config, config_dir, plan, backbone_s, AFTER_BACKBONE)
    assert plan.scale == 0.7 and new is not None and new.scale == 0.4 and new.speed == 1.53  # README's figures
    assert new.planned_s <= new.budget_s  # backbone as measured + the rest at the backbone's speed fits
    assert new.planned_s == round(backbone_s + estimate_seconds(1.53, AFTER_BACKBONE, new.scale))
    assert apply_plan(config, new).data.triplets == round(config.data.triplets * new.scale)
    assert "as its backbone's" in new.describe() and f"x{new.scale:.2f}" in new.describe()
    again, kept = plan_demo(config, config_dir, AFTER_BACKBONE, tmp_path)  # a rerun: the backbone is cached now
    assert kept == new and again == apply_plan(config, new)
    record = json.loads((tmp_path / PLAN_FILE).read_text())
    assert record["probe_seconds_per_step"] == 1.27 * REFERENCE_PROBE_SECONDS  # what the probe read stays on record


def test_a_fixed_scale_skips_the_probe_and_says_so(demo, tmp_path, monkeypatch, capsys):
    """``budget.scale`` runs every length at that scale without measuring (a run made elsewhere, compared at its
    plan); the protocol line says where the scale came from (a config without it keeps its saved plans:
    the settings-added-later test)."""
    import fusion_diff.demo_budget as budget
    from fusion_diff.demo_budget import saved_plan, scaled_schedules

    config, config_dir = demo
    monkeypatch.setattr(budget, "probe_seconds", lambda threads: pytest.fail("a fixed scale measures nothing"))
    fixed = load_dataclass(DemoConfig, config_dir / "demo.yaml", ["budget.scale=0.9"])
    scaled, plan = plan_demo(fixed, config_dir, STEPS, tmp_path)
    assert plan.scale == 0.9 and plan.schedules == scaled_schedules(fixed, config_dir, 0.9)
    assert scaled.data.triplets == 36000 and saved_plan(tmp_path, fixed) == plan  # what Demo.finished adopts
    assert "as fixed by budget.scale" in plan.describe() and "as fixed by budget.scale" in capsys.readouterr().out
    assert replan_after_backbone(tmp_path, fixed, config_dir, plan, 1e6, AFTER_BACKBONE) is None  # never re-planned
    with pytest.raises(Exception, match="scale"):
        load_dataclass(DemoConfig, config_dir / "demo.yaml", ["budget.scale=1.5"])
