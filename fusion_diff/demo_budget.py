"""The demo's time budget: measure this machine, estimate the demo, and shorten its training to fit, saying so.

The reference schedule (``configs/demo.yaml``) takes ~18 min on the reference 2-core CPU and, by the step
times of a from-nothing run there, ~27 min on a 2-core AMD EPYC without AVX-512 (issue 19; ~50 min before
the fused optimiser and faster data paths). Before the first step the demo times a short fixed workload
(``probe_seconds``: a few training steps of the world backbone, the demo's costliest kind of work), turns
it into this machine's speed relative to the reference CPU, and estimates every step that is still to
run. When the estimate exceeds the budget, every training schedule and training-set size but the world
backbone's is scaled by one factor (the same number of epochs over fewer samples and fewer steps), never
the benchmark or the table's rows. The backbone is scaled last and, by default, not at all: at 480 of its
1,600 steps (x0.30) its held-out zero-shot shape accuracy fell from 96.7% to 31.9% and image->caption
R@1 from 88.3% to 25.2% (measured on the 2-core EPYC, issue 19), which would sink every row. The plan is printed, kept in ``<out_dir>/demo_budget.json`` (a rerun of the same config
resumes it instead of measuring again, so nothing retrains) and recorded in every result's protocol line. Its numbers are then
not the reference numbers. ``fusion-diff demo --no-budget`` runs the reference schedule.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusion_diff.training.config import load_config, require
from fusion_diff.utils.io import drop_when_off, write_json_atomic

if TYPE_CHECKING:
    from fusion_diff.demo import DemoConfig

PLAN_FILE = "demo_budget.json"
BACKBONE = "world backbone"  # the demo step that trains it
SHOWN = ("backbone_steps", "pairs", "triplets", "scene_captioner_steps", "max_train_steps")  # in the protocol line
SCALE_STEP = 0.05  # scales are multiples of this (rounded down), so that near-equal speeds give one plan
# What the probe would read on the reference CPU, calibrated on a whole demo rather than on the backbone
# alone: on the 2-core AMD EPYC (AVX2, no AVX-512) the probe read 0.229 s per step and the from-nothing demo
# then took 1,521 s for steps whose reference times (at its plan) sum to 1,046 s, i.e. 1.455x; 0.229 / 1.455.
# (The first value, 0.2, came from the backbone's own steps, which run relatively faster on that CPU (1.28x)
# than the rest of the demo (1.5-1.6x): with it the plan expected ~20 min and the demo took 25.5.)
REFERENCE_PROBE_SECONDS = 0.158


@dataclass(frozen=True)
class StepCost:
    """Seconds of a demo step on the reference CPU at the reference schedule: the part that a scaled schedule
    scales (training steps, training-set sizes) and the part it does not (benchmark, held-out evaluation)."""

    fixed: float
    scaled: float

    @property
    def total(self) -> float:
        return self.fixed + self.scaled


# README, "demo, from nothing" (idle reference CPU); each total is the measured step time, the split between
# fixed and scaled an estimate from what the step does.
REFERENCE_COSTS: dict[str, StepCost] = {
    "world backbone": StepCost(15, 320),  # 1,600 steps; held-out quality check and save
    "benchmark": StepCost(25, 0),  # never scaled; + the open-edit benchmark's 300 queries (~15 s, not an idle timing)
    "pair set + embeddings": StepCost(4, 24),  # 20k pairs
    "scene captioner": StepCost(5, 84),  # 800 steps
    "world BLIP": StepCost(600, 0),  # only with training.blip_captioner_steps (not scaled): ~0.5 s/step x 1,200
    "triplets + embeddings": StepCost(6, 130),  # 40k triplets: rendering, captioning 80k images, embedding
    "caption editor": StepCost(870, 0),  # only with training.caption_editor_steps (not scaled): 6,000 x ~0.145 s (Xeon)
    "stage 1: prior": StepCost(10, 74),  # 500 steps
    "stage 2: Control-Adapter": StepCost(25, 202),  # 1,600 steps; two val scorings
    "FTI4CIR": StepCost(6, 60),  # 300 steps; image features of the pair set
    "evaluation (test split)": StepCost(91, 0),  # the table: never scaled
    "plots": StepCost(1, 0),
    "query index (fusion-diff query)": StepCost(21, 0),  # not in that run: 31 s on the 2-core EPYC, / 1.455
}


@dataclass
class BudgetSection:
    """The demo's time budget (``minutes: null`` runs the reference schedule whatever the machine)."""

    minutes: float | None = 20.0
    min_scale: float = 0.25  # never train shorter than this share of the reference schedule
    backbone_min_scale: float = 1.0  # the world backbone's floor (scaled only once the rest is at min_scale)
    # A fixed schedule instead of measuring: every length but the backbone's at this scale, whatever the machine
    # (to compare with a run made elsewhere at its plan); null: measured and fitted to ``minutes``.
    scale: float | None = None

    def __post_init__(self) -> None:
        require(self.minutes is None or self.minutes > 0, "minutes", "must be > 0 or null")
        require(self.scale is None or 0 < self.scale <= 1, "scale", "must be in (0, 1] or null")
        require(0 < self.min_scale <= 1, "min_scale", "must be in (0, 1]")
        require(0 < self.backbone_min_scale <= 1, "backbone_min_scale", "must be in (0, 1]")


@dataclass(frozen=True)
class Plan:
    """The schedule the demo runs: ``scale`` 1 is the reference; below 1 every training length is scaled."""

    scale: float = 1.0
    backbone_scale: float = 1.0
    speed: float | None = None  # this machine's seconds per reference second (None: not measured)
    estimate_s: float | None = None  # estimated seconds of the steps left, at the reference schedule
    planned_s: float | None = None  # the same at ``scale``
    budget_s: float | None = None
    schedules: dict[str, int] | None = None  # the scaled lengths and sizes (None at the reference schedule)
    backbone_s: float | None = None  # set when re-planned after the backbone ran slower than the probe read

    def describe(self) -> str:
        """The protocol line's schedule: reference, or scaled (by how much, to what, and why)."""
        if self.scale >= 1.0 and self.backbone_scale >= 1.0:
            return "reference schedule (configs/demo.yaml)"
        lengths = ", ".join(f"{k} {v}" for k, v in (self.schedules or {}).items() if k.endswith(SHOWN))
        if self.speed is None:
            return (
                f"scaled x{self.scale:.2f} (backbone x{self.backbone_scale:.2f}) as fixed by budget.scale ({lengths}); "
                "not the reference numbers (fusion-diff demo --no-budget)"
            )
        measured = f", as its backbone's {self.backbone_s:.0f} s showed" if self.backbone_s is not None else ""
        return (
            f"scaled x{self.scale:.2f} (backbone x{self.backbone_scale:.2f}) to a {self.budget_s / 60:.0f}-min budget on a machine {self.speed:.1f}x slower "
            f"than the reference CPU{measured} ({lengths}); not the reference numbers (fusion-diff demo --no-budget)"
        )

    def reference_seconds(self) -> dict[str, float]:
        """Each step's reference-CPU seconds under this plan (for the remaining-time estimate)."""
        return {
            name: cost.fixed + (self.backbone_scale if name == BACKBONE else self.scale) * cost.scaled
            for name, cost in REFERENCE_COSTS.items()
        }


def estimate_seconds(speed: float, steps: list[str], scale: float = 1.0, backbone_scale: float = 1.0) -> float:
    """Seconds ``steps`` should take on a machine ``speed`` times slower than the reference, at these scales."""
    return speed * sum(
        REFERENCE_COSTS[s].fixed + (backbone_scale if s == BACKBONE else scale) * REFERENCE_COSTS[s].scaled
        for s in steps
    )


def _fit(speed: float, steps: list[str], budget_s: float, floor: float, other_s: float) -> float:
    """The largest multiple of ``SCALE_STEP`` in [floor, 1] at which ``steps`` (plus ``other_s``) fit the budget."""
    fixed = speed * sum(REFERENCE_COSTS[s].fixed for s in steps) + other_s
    scaled = speed * sum(REFERENCE_COSTS[s].scaled for s in steps)
    if fixed + scaled <= budget_s:
        return 1.0
    fits = (budget_s - fixed) / scaled if scaled else 1.0
    return round(max(floor, math.floor(fits / SCALE_STEP + 1e-9) * SCALE_STEP), 4)


def choose_scales(speed: float, steps: list[str], budget: BudgetSection) -> tuple[float, float]:
    """(scale of the other steps, scale of the backbone): the others shrink first, down to ``min_scale``; the
    backbone, whose quality falls fastest with its length, only then, down to ``backbone_min_scale``."""
    assert budget.minutes is not None
    budget_s = budget.minutes * 60
    rest = [s for s in steps if s != BACKBONE]
    backbone = [s for s in steps if s == BACKBONE]
    scale = _fit(speed, rest, budget_s, budget.min_scale, estimate_seconds(speed, backbone))
    if not backbone or scale > budget.min_scale:
        return scale, 1.0
    return scale, _fit(speed, backbone, budget_s, budget.backbone_min_scale, estimate_seconds(speed, rest, scale))


def plan_for(speed: float, steps: list[str], budget: BudgetSection, config: DemoConfig, config_dir: Path) -> Plan:
    """The plan for a machine ``speed`` times slower than the reference, with ``steps`` still to run."""
    assert budget.minutes is not None
    scale, backbone_scale = choose_scales(speed, steps, budget)
    scaled = scale < 1.0 or backbone_scale < 1.0
    return Plan(
        scale=scale,
        backbone_scale=backbone_scale,
        speed=round(speed, 3),
        estimate_s=round(estimate_seconds(speed, steps)),
        planned_s=round(estimate_seconds(speed, steps, scale, backbone_scale)),
        budget_s=budget.minutes * 60,
        schedules=scaled_schedules(config, config_dir, scale, backbone_scale) if scaled else None,
    )


def _scaled(value: int, scale: float) -> int:
    return max(1, round(value * scale)) if value > 0 else value


def _stage_lengths(config_dir: Path, path: str, overrides: list[str]) -> dict[str, int]:
    """A training config's step counts after the demo's overrides (the values a scaled plan scales)."""
    config = load_config(config_dir / path, overrides=overrides)
    return {
        "schedule.max_train_steps": config.schedule.max_train_steps,
        "schedule.lr_warmup_steps": config.schedule.lr_warmup_steps,
        "validation.every_n_steps": config.validation.every_n_steps,
        "checkpointing.every_n_steps": config.checkpointing.every_n_steps,
    }


def scaled_schedules(config: DemoConfig, config_dir: Path, scale: float, backbone_scale: float = 1.0) -> dict[str, int]:
    """Every training length and training-set size of ``config`` at ``scale``, the backbone's at ``backbone_scale``
    (flat keys, for the record)."""
    out = {
        "world.backbone_steps": _scaled(config.world.backbone_steps, backbone_scale),
        "data.pairs": _scaled(config.data.pairs, scale),
        "data.triplets": _scaled(config.data.triplets, scale),
        "training.scene_captioner_steps": _scaled(config.training.scene_captioner_steps, scale),
    }
    training = config.training
    for stage in ("stage1", "stage2", "fti4cir"):
        path = getattr(training, stage)
        if path is None:
            continue
        for key, value in _stage_lengths(config_dir, path, getattr(training, f"{stage}_overrides")).items():
            out[f"{stage}.{key}"] = _scaled(value, scale)
    return out


def apply_plan(config: DemoConfig, plan: Plan) -> DemoConfig:
    """``config`` with the plan's scaled lengths (later stage overrides win over the demo config's own)."""
    if not plan.schedules:
        return config
    s = plan.schedules
    training = replace(config.training, scene_captioner_steps=s["training.scene_captioner_steps"])
    for stage in ("stage1", "stage2", "fti4cir"):
        prefix = f"{stage}."
        extra = [f"{k.removeprefix(prefix)}={v}" for k, v in s.items() if k.startswith(prefix)]
        training = replace(training, **{f"{stage}_overrides": [*getattr(training, f"{stage}_overrides"), *extra]})
    return replace(
        config,
        world=replace(config.world, backbone_steps=s["world.backbone_steps"]),
        data=replace(config.data, pairs=s["data.pairs"], triplets=s["data.triplets"]),
        training=training,
    )


def probe_seconds(threads: int, steps: int = 3) -> float:
    """Seconds per training step of the world backbone (batch 64, its own threads), after one warm-up step."""
    import open_clip
    import torch
    import torch.nn.functional as F

    from data_synth.shapes.backbone import BackboneConfig, PairStream, SceneGraphHead, _param_groups
    from fusion_diff.embedding.registry import ensure_registered
    from fusion_diff.utils.runtime import adamw

    ensure_registered()
    config = BackboneConfig(threads=threads)
    before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = open_clip.create_model(config.model_name)
        stream = PairStream(config, dict(model.visual.preprocess_cfg), open_clip.get_tokenizer(config.model_name))
        pixels, tokens, targets = stream.batch(0)
        head = SceneGraphHead(open_clip.get_model_config(config.model_name)["embed_dim"])
        optimizer = adamw([*_param_groups(model, config.weight_decay), {"params": list(head.parameters())}], lr=1e-4)
        loss_fn = open_clip.ClipLoss()
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            image = model.encode_image(pixels)
            text = model.encode_text(tokens, normalize=True)
            loss = loss_fn(F.normalize(image, dim=-1), text, model.logit_scale.exp()) + head.loss(image, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return min(times[1:])  # the least disturbed step: other processes only ever slow it down


# Settings added after plans were first saved: left out of the digest at their off value, so earlier plans stay valid.
LATER_SETTINGS: dict[str, dict[str, Any]] = {
    "world": {"backbone_negation_fraction": 0.0},
    "data": {"negated_removals": False, "open_probability": 0.0},
    "budget": {"scale": None},
    "training": {"caption_editor_steps": 0, "caption_editor_rows": 0},
    "evaluation": {"edited_caption_weight": 3.0},  # EvaluationSection's default (never off: the editor's weight)
}


def config_digest(config: DemoConfig) -> str:
    """What a saved plan was made for: the whole demo config before scaling (another size or schedule, another plan)."""
    record = asdict(config)
    for section, off in LATER_SETTINGS.items():
        record[section] = drop_when_off(record[section], off)
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def saved_plan(out: Path, config: DemoConfig) -> Plan | None:
    """The plan an earlier run in ``out`` chose for the same config and budget (its caches were made with it)."""
    path = out / PLAN_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    return Plan(**record["plan"]) if record.get("config") == config_digest(config) else None


def save_plan(out: Path, config: DemoConfig, plan: Plan, probe_s: float | None) -> None:
    budget = config.budget
    record = {
        "config": config_digest(config),
        "budget": asdict(budget),
        "probe_seconds_per_step": probe_s,
        "reference_probe_seconds_per_step": REFERENCE_PROBE_SECONDS,
        "plan": asdict(plan),
    }
    write_json_atomic(out / PLAN_FILE, record)


def announce(plan: Plan, probe_s: float | None) -> str:
    """What the demo prints about its schedule before the first step."""
    if plan.speed is None:
        return f"    schedule: {plan.describe()}" if plan.schedules else "    schedule: reference (no budget)"
    measured = (
        f"probe: {probe_s:.2f} s per backbone training step vs {REFERENCE_PROBE_SECONDS} s derived for the "
        "reference CPU"
        if probe_s is not None
        else f"measured by the first run, plan kept in {PLAN_FILE}: delete it to measure again"
    )
    line = (
        f"    this machine: {plan.speed:.1f}x the reference CPU's time ({measured}); "
        f"steps left: ~{plan.estimate_s / 60:.0f} min"
    )
    if plan.scale >= 1.0 and plan.backbone_scale >= 1.0:
        return line + f" at the reference schedule, within the {plan.budget_s / 60:.0f}-min budget"
    note = f"\n    {plan.describe()}; estimate ~{plan.planned_s / 60:.0f} min"
    if plan.planned_s > plan.budget_s:
        note += " (still over budget: the scales reached their floors, budget.min_scale / backbone_min_scale)"
    return line + note


def plan_demo(config: DemoConfig, config_dir: Path, steps: list[str], out: Path) -> tuple[DemoConfig, Plan]:
    """Measure (or reuse the saved plan), decide the schedule, print it; return the config to run and the plan."""
    budget = config.budget
    if budget.minutes is None:
        plan, probe = Plan(), None
    elif budget.scale is not None:  # fixed, not measured; saved like a measured plan, for the scripts that read it
        plan, probe = Plan(scale=budget.scale, schedules=scaled_schedules(config, config_dir, budget.scale)), None
        save_plan(out, config, plan, None)
    else:
        plan, probe = saved_plan(out, config), None
        if plan is None:
            from data_synth.shapes.backbone import BackboneConfig

            probe = probe_seconds(BackboneConfig().threads)
            plan = plan_for(probe / REFERENCE_PROBE_SECONDS, steps, budget, config, config_dir)
            save_plan(out, config, plan, probe)
    print(announce(plan, probe), flush=True)
    return apply_plan(config, plan), plan


def replan_after_backbone(
    out: Path, config: DemoConfig, config_dir: Path, plan: Plan, backbone_s: float, steps_left: list[str]
) -> Plan | None:
    """The plan for ``steps_left`` once the backbone trained in ``backbone_s``: when that shows a machine slower
    than the probe's few steps read (a noisy or shared machine), the other steps shrink further to fit what is
    left of the budget, and the plan is saved (no scaled step has run yet); None when the plan stands.

    The speed taken is the larger of the two readings: the probe is calibrated on whole demos, on which the
    backbone can run relatively faster than the rest (the EPYC: 1.28x vs 1.455x), never slower."""
    if plan.speed is None or plan.budget_s is None:
        return None
    speed = backbone_s / estimate_seconds(1.0, [BACKBONE], backbone_scale=plan.backbone_scale)
    left_s = plan.budget_s - backbone_s
    scale = _fit(speed, steps_left, left_s, config.budget.min_scale, 0.0) if speed > plan.speed else plan.scale
    if scale >= plan.scale:
        return None
    new = replace(
        plan,
        scale=scale,
        speed=round(speed, 3),
        planned_s=round(backbone_s + estimate_seconds(speed, steps_left, scale)),
        schedules=scaled_schedules(config, config_dir, scale, plan.backbone_scale),
        backbone_s=round(backbone_s, 1),
    )
    record = json.loads((out / PLAN_FILE).read_text(encoding="utf-8")) if (out / PLAN_FILE).is_file() else {}
    save_plan(out, config, new, record.get("probe_seconds_per_step"))
    return new


def plan_as_record(plan: Plan) -> dict[str, Any]:
    """The plan as recorded in each result's protocol."""
    return {"schedule": plan.describe(), "schedule_scale": plan.scale, "backbone_scale": plan.backbone_scale}
