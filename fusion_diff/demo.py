"""The end-to-end shapes-world demo: from nothing to one results table.

Steps, each cached or resumable in ``out_dir`` (run it again and finished steps are skipped):

1. the world backbone (a small CLIP trained on rendered scenes; cached under the cache root);
2. the CIR benchmark (CIRR format; held-out scenes and phrasings), and the open-edit benchmark (CIRCO
   format, several right answers per query; ``world.open_test_queries``);
3. the image-caption pair set and its embeddings (image / text / fused caches);
   the world's scene captioner, trained on the pair set (when ``evaluation.captioner`` is ``type: scene``);
   the world's BLIP, a generative captioner (when ``training.blip_captioner_steps`` > 0);
4. the synthetic triplet set and its embeddings (fused with captioner captions, as at test time);
5. stage 1 (prior) and stage 2 (Control-Adapter) training, validated on the benchmark's *val* split;
6. FTI4CIR training on the pair set's images;
7. evaluation on the *test* split: baselines, emb2emb, Fusion-Diff, FTI4CIR and the oracle rows, with
   reference and gallery captions from the captioner (never from annotations), plus
   Fusion-Diff on the same test edits in the training phrasing; a markdown + JSON table (every row again
   with the world BLIP's captions when it was trained); every method on the open-edit benchmark (mAP@k);
8. the joint-space plots.

The sizes and the training configs come from ``configs/demo.yaml`` (``configs/demo_quick.yaml``
for ``--quick``), loaded as strictly as the training configs. Before step 1 the demo measures this
machine and, if the steps left would exceed ``budget.minutes``, shortens every training schedule to
fit and records that in the table (``fusion_diff.demo_budget``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from fusion_diff.demo_budget import (
    PLAN_FILE, REFERENCE_COSTS, BudgetSection, Plan, apply_plan, plan_as_record, plan_demo, replan_after_backbone,
    saved_plan,
)
from fusion_diff.errors import CacheMismatchError, ConfigError, MissingFileError
from fusion_diff.training.config import did_you_mean, load_config, load_dataclass, require
from fusion_diff.utils.io import atomic_path, write_json_atomic

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the checkout's configs/ folder
T = TypeVar("T")
INPUTS_FILE = "demo_inputs.json"  # beside each trained model: digests of what it was trained on
BLIP_ROW_SUFFIX = " [world BLIP]"  # table rows whose captions come from the world's BLIP
OPEN_BENCHMARK_FOLDERS = {"test": "benchmark_open", "val": "benchmark_open_val"}  # one split per folder (own gallery)


@dataclass
class WorldSection:
    """The world backbone and the benchmark."""

    backbone_steps: int = 1600  # open_clip training steps of the world backbone
    backbone_cache: str | None = None  # default: <cache root>/shapes_backbone (a shared, reusable cache)
    backbone_negation_fraction: float = 0.0  # share of backbone captions naming an absent object ("..., and no red circle")
    val_queries: int = 1000
    test_queries: int = 2000
    open_test_queries: int = 300  # the open-edit benchmark (CIRCO format, several right answers); 0: none

    def __post_init__(self) -> None:
        require(self.backbone_steps > 0, "backbone_steps", "must be > 0")
        require(0.0 <= self.backbone_negation_fraction <= 1.0, "backbone_negation_fraction", "must be in [0, 1]")
        require(self.val_queries > 0 and self.test_queries > 0, "val_queries", "and test_queries must be > 0")
        require(self.open_test_queries >= 0, "open_test_queries", "must be >= 0")


@dataclass
class DataSection:
    """Training data sizes (training scenes only; the benchmark's scenes are held out by construction)."""

    pairs: int = 30_000
    triplets: int = 40_000
    workers: int = 2
    # Captions inside the triplets' fused embeddings: "captioner" (evaluation.captioner, as at test time)
    # or "annotation" (the triplets' own scene-graph captions).
    triplet_captions: str = "captioner"
    negated_removals: bool = False  # removal instructions may also be worded as negations ("no more red stars")
    open_probability: float = 0.0  # share of triplets with an open instruction ("give the circle another colour")

    def __post_init__(self) -> None:
        require(self.pairs > 0 and self.triplets > 0, "pairs", "and triplets must be > 0")
        require(0.0 <= self.open_probability <= 1.0, "open_probability", "must be in [0, 1]")
        require(self.workers > 0, "workers", "must be > 0")
        require(self.triplet_captions in ("captioner", "annotation"), "triplet_captions", "must be captioner or annotation")


@dataclass
class TrainingSection:
    """Training configs (paths relative to the demo config's folder) and overrides for each."""

    stage1: str = "stage1_prior.yaml"
    stage2: str = "stage2_adapter.yaml"
    fti4cir: str | None = "fti4cir_quick.yaml"  # null: no FTI4CIR row
    stage1_overrides: list[str] = field(default_factory=list)
    stage2_overrides: list[str] = field(default_factory=list)
    fti4cir_overrides: list[str] = field(default_factory=list)
    validate: bool = True  # score Fusion-Diff on the benchmark's val split during / after stage 2
    scene_captioner_steps: int = 800  # the world's captioner (evaluation.captioner type scene); captioner.DEFAULT_STEPS
    # The world's BLIP (a generative captioner with real-world errors): > 0 trains it for this many steps and
    # adds every method again with it as the captioner ("<row> [world BLIP]"); 0: not trained (it costs minutes).
    blip_captioner_steps: int = 0
    # The world's caption editor (a small T5 on the triplets' captions and instructions): > 0 trains it for this many
    # steps and adds the rows "edited-caption" and "fusion-diff + edited caption"; 0: not trained (it costs minutes).
    caption_editor_steps: int = 0
    caption_editor_rows: int = 0  # > the triplet set's size: its rows topped up by its generator (captions only)

    def __post_init__(self) -> None:
        require(self.blip_captioner_steps >= 0, "blip_captioner_steps", "must be >= 0")
        require(self.caption_editor_steps >= 0, "caption_editor_steps", "must be >= 0")
        require(self.caption_editor_rows >= 0, "caption_editor_rows", "must be >= 0")


@dataclass
class EvaluationSection:
    """What the table shows. ``methods`` maps each row to its method's options (see ``fusion-diff eval``); the
    row's name is the method's, or, for a variant row, any name with ``method: <name>`` among its options."""

    # The world's trained scene captioner (the demo trains it on the pair set); {"type": "retrieval"} ranks the
    # pair set's captions with the backbone instead.
    captioner: dict[str, Any] = field(default_factory=lambda: {"type": "scene"})
    methods: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "image-only": {},
            "text-only": {},
            "sum": {},
            "emb2emb": {},
            "fusion-diff": {},
            "fti4cir": {},
            "oracle-target-text": {},
            "oracle-target-fused": {},
        }
    )
    training_phrasing: bool = True  # also Fusion-Diff on the test edits in the training phrasing
    plot_queries: int = 12
    # The weight of the edited caption in Fusion-Diff's query, when the caption editor is trained (val-selected by
    # scripts/edited_caption_eval.py: the largest of 0.5-3, i.e. toward the edited caption alone).
    edited_caption_weight: float = 3.0

    def __post_init__(self) -> None:
        require("fusion-diff" in self.methods, "methods", "must include fusion-diff")
        require(self.edited_caption_weight > 0, "edited_caption_weight", "must be > 0")


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo"
    seed: int = 0
    world: WorldSection = field(default_factory=WorldSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    budget: BudgetSection = field(default_factory=BudgetSection)

    def __post_init__(self) -> None:
        require(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32) (numpy's seed range)")


def default_config_path(quick: bool) -> Path:
    path = CONFIG_DIR / ("demo_quick.yaml" if quick else "demo.yaml")
    if not path.is_file():
        raise MissingFileError(
            f"Demo config {path} not found (configs/ ships with the source checkout); pass --config FILE."
        )
    return path


def remaining_estimate(done: dict[str, float], todo: Iterable[str], reference: dict[str, float]) -> float | None:
    """Seconds the ``todo`` steps should take: their ``reference`` (reference-CPU) times x (measured / reference)
    of the steps done that did real work (>= 1 s: cached steps say nothing about speed); None before any such step."""
    worked = {name: seconds for name, seconds in done.items() if seconds >= 1.0 and name in reference}
    if not worked:
        return None
    speed = sum(worked.values()) / sum(reference[name] for name in worked)
    return speed * sum(reference.get(name, 0.0) for name in todo)


class Demo:
    """Runs the steps in order; each step prints its name, whether it was cached, its time and the time left."""

    def __init__(self, config: DemoConfig, config_dir: Path, progress: bool = True):
        self.config = config
        self.config_dir = config_dir
        self.progress = progress
        self.out = Path(config.out_dir)
        self.timings: dict[str, float] = {}
        self.planned: list[str] = []
        self.plan = Plan()  # the reference schedule until ``run`` measures this machine
        self.embedder = None
        self.captioner = None

    # ------------------------------------------------------------------ plumbing
    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"\n==> {name}", flush=True)
        start = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - start
        todo = [s for s in self.planned if s not in self.timings]
        left = remaining_estimate(self.timings, todo, self.plan.reference_seconds())
        estimate = f"; about {left / 60:.1f} min left (estimate)" if left is not None and left > 0 else ""
        print(f"    {name}: {self.timings[name]:.0f} s{estimate}", flush=True)

    def path(self, name: str) -> Path:
        return self.out / name

    # ------------------------------------------------------------------ steps
    def run(self) -> Path:
        stage1, stage2 = self.prepare()
        fti4cir = None
        if self.config.training.fti4cir and "fti4cir" in self.config.evaluation.methods:
            with self.step("FTI4CIR"):
                paths = {"data.pair_dir": self.path("pairs"), "model.backbone.cache": self.backbone_root()}
                fti4cir = self.train_stage("fti4cir", paths)
        with self.step("evaluation (test split)"):
            table = self.evaluate(stage1, stage2, fti4cir)
        with self.step("plots"):
            self.plot(stage2)
        with self.step("query index (fusion-diff query)"):
            self.build_query_index(stage2)
        write_json_atomic(self.path("results") / "timings.json", self.timings)
        print(f"\nTotal {sum(self.timings.values()) / 60:.1f} min. Table: {table}")
        return table

    def prepare(self) -> tuple[Path, Path]:
        """Steps 1-5 (backbone, benchmarks, pairs, captioners, triplets, stage 1, stage 2): the stage-1 and stage-2
        folders. First the time budget fixes the schedule for this machine. Shared with ``scripts/ablations.py``,
        which trains its variants on the same data and schedule."""
        self.out.mkdir(parents=True, exist_ok=True)
        runs = {
            "scene captioner": self.config.evaluation.captioner.get("type") == "scene",
            "world BLIP": self.config.training.blip_captioner_steps > 0,
            "caption editor": self.config.training.caption_editor_steps > 0,
            "FTI4CIR": bool(self.config.training.fti4cir and "fti4cir" in self.config.evaluation.methods),
        }
        self.planned = [name for name in REFERENCE_COSTS if runs.get(name, True)]
        todo = [name for name in self.planned if name != "world backbone" or not self.backbone_cached()]
        unscaled = self.config
        self.config, self.plan = plan_demo(self.config, self.config_dir, todo, self.out)
        with self.step("world backbone"):
            self.embedder = self.build_backbone()
        if "world backbone" in todo:  # trained now: its time tells this machine's speed better than the probe
            rest = [name for name in todo if name != "world backbone"]
            plan = replan_after_backbone(
                self.out, unscaled, self.config_dir, self.plan, self.timings["world backbone"], rest
            )
            if plan is not None:
                print(f"    the backbone ran slower than the probe read: re-planned, {plan.describe()}", flush=True)
                self.config, self.plan = apply_plan(unscaled, plan), plan
        with self.step("benchmark"):
            self.build_benchmark()
            if self.config.world.open_test_queries:
                self.build_open_benchmark()
        with self.step("pair set + embeddings"):
            self.build_pairs()
        if runs["scene captioner"]:
            with self.step("scene captioner"):
                self.build_scene_captioner()
        if runs["world BLIP"]:
            with self.step("world BLIP"):
                self.build_blip_captioner()
        with self.step("triplets + embeddings"):
            self.build_triplets()
        if runs["caption editor"]:
            with self.step("caption editor"):
                self.build_caption_editor()
        with self.step("stage 1: prior"):
            stage1 = self.train_stage("stage1", self.stage1_inputs())
        with self.step("stage 2: Control-Adapter"):
            validation = self.val_fn() if self.config.training.validate else None
            stage2 = self.train_stage("stage2", self.stage2_inputs(stage1), validation)
        return stage1, stage2

    @classmethod
    def finished(cls, demo_dir: str | Path, config_path: str | Path | None = None, overrides: Sequence[str] = ()) -> Demo:
        """A finished demo in ``demo_dir`` for scripts that score its models: the config it ran with (``config_path``,
        default ``configs/demo.yaml``, plus its ``overrides``), its saved schedule, and its world backbone loaded."""
        config_path = Path(config_path) if config_path else default_config_path(quick=False)
        config = load_dataclass(DemoConfig, config_path, [*overrides, f"out_dir={demo_dir}"])
        demo = cls(config, config_path.parent, progress=False)
        demo.adopt_saved_plan()
        demo.embedder = demo.build_backbone()
        return demo

    def adopt_saved_plan(self) -> Plan:
        """Take the schedule the demo in ``out_dir`` was trained with (its ``demo_budget.json``): for scripts
        that evaluate a finished demo's models, so that their protocol lines name the schedule they come from."""
        if self.config.budget.minutes is not None:
            plan = saved_plan(self.out, self.config)
            if plan is None:
                raise ConfigError(
                    f"{self.out / PLAN_FILE} is missing or was made for another demo config: pass the config and "
                    "overrides the demo ran with (--config, section.key=value), or run the demo first."
                )
            self.config, self.plan = apply_plan(self.config, plan), plan
        return self.plan

    def scored(self, evaluator, method):
        """``evaluator.evaluate(method)`` with the schedule this demo's models were trained with in the protocol
        (the rows of scripts that evaluate a finished demo's models)."""
        result = evaluator.evaluate(method)
        result.protocol.update(plan_as_record(self.plan))
        return result

    def stage1_inputs(self) -> dict[str, Path]:
        return {"data.pair_embeddings": self.path("pair_embeddings")}

    def stage2_inputs(self, stage1: Path) -> dict[str, Path]:
        return {"model.prior_path": stage1, "data.triplet_embeddings": self.path("triplet_embeddings")}

    def backbone_root(self) -> Path:
        """The world backbone's cache folder (FTI4CIR must use the same backbone as everything else); a backbone of
        another length than the reference (a time-budgeted one) gets a folder of its own, never replacing it."""
        from fusion_diff.utils.paths import cache_dir

        world = self.config.world
        name = "shapes_backbone" if world.backbone_steps == WorldSection.backbone_steps else f"shapes_backbone-{world.backbone_steps}-steps"
        if world.backbone_negation_fraction:
            name += f"-negation-{world.backbone_negation_fraction:g}"
        return Path(world.backbone_cache or cache_dir(name))

    def backbone_config(self):
        from data_synth.shapes.backbone import BackboneConfig

        world = self.config.world
        return BackboneConfig.for_steps(world.backbone_steps, seed=self.config.seed, negation_fraction=world.backbone_negation_fraction)

    def backbone_cached(self) -> bool:
        from data_synth.shapes.backbone import BackboneCache

        return BackboneCache.at(self.backbone_root()).validate(self.backbone_config())

    def build_backbone(self):
        from data_synth.shapes.backbone import load_world_embedder

        return load_world_embedder(cache=self.backbone_root(), config=self.backbone_config(), progress=self.progress)

    def build_benchmark(self) -> None:
        from data_synth.shapes.benchmark import BenchmarkConfig, write_benchmark

        world = self.config.world
        config = BenchmarkConfig(world.val_queries, world.test_queries, seed=self.config.seed)
        self._write_benchmark(self.path("benchmark"), config, write_benchmark)

    def build_open_benchmark(self, split: str = "test", queries: int | None = None) -> None:
        """The open-edit benchmark (CIRCO format; held-out scenes and phrasings), one split per folder: a CIRCO
        gallery is shared by its splits, so a val split written beside the test split would add distractors to
        the test numbers. The demo writes the test split (``world.open_test_queries``); the sampling sweep
        writes a val split to select settings on."""
        from data_synth.shapes.benchmark_open import OpenBenchmarkConfig, write_open_benchmark

        if split not in OPEN_BENCHMARK_FOLDERS:
            raise ConfigError(f"Open-edit benchmark split {split!r}: choose one of {list(OPEN_BENCHMARK_FOLDERS)}.")
        queries = self.config.world.open_test_queries if queries is None else queries
        counts = {f"{name}_queries": queries if name == split else 0 for name in OPEN_BENCHMARK_FOLDERS}
        config = OpenBenchmarkConfig(**counts, seed=self.config.seed)
        self._write_benchmark(self.path(OPEN_BENCHMARK_FOLDERS[split]), config, write_open_benchmark)

    def _write_benchmark(self, root: Path, config: Any, write: Callable[..., Any]) -> None:
        """``write(root, config, ...)`` unless ``root`` already holds a benchmark written with ``config``."""
        manifest = root / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text())["config"] == _plain(config):
            print(f"    cached ({root})")
            return
        shutil.rmtree(root, ignore_errors=True)  # another config or an interrupted write: rebuild
        write(root, config, workers=self.config.data.workers, progress=self.progress)

    def build_pairs(self) -> None:
        from data_synth.shapes.pairs import embed_pair_set, write_pair_set

        data = self.config.data
        write_pair_set(
            self.path("pairs"), data.pairs, seed=self.config.seed, workers=data.workers, progress=self.progress
        )
        out = self.path("pair_embeddings")
        tokens = self.max_text_tokens()
        caches = _rebuild_if_stale(
            out,
            lambda: embed_pair_set(
                self.path("pairs"), self.embedder, out, progress=self.progress, max_text_tokens=tokens
            ),
        )
        for cache in caches.values():
            cache.compact()  # one shard: training memory-maps it

    def build_scene_captioner(self) -> None:
        """The world's trained captioner, on the pair set (training scenes only); before the triplets, which it captions."""
        from data_synth.shapes.captioner import build_scene_captioner

        steps = self.config.training.scene_captioner_steps
        build_scene_captioner(self.path("pairs"), self.path("captioner"), steps, self.config.seed, self.progress)

    def build_blip_captioner(self) -> None:
        """The world's BLIP on the pair set: a generative captioner with real-world errors, loaded like any BLIP."""
        from data_synth.shapes.blip import build_blip_captioner

        steps = self.config.training.blip_captioner_steps
        build_blip_captioner(
            self.path("pairs"), self.path("blip"), steps, self.config.seed, progress=self.progress,
            backbone=self.backbone_root(),
        )  # fmt: skip

    def build_caption_editor(self) -> None:
        """The world's caption editor, on the triplet set's captions and instructions (training scenes only)."""
        from data_synth.shapes.caption_editor import build_world_caption_editor

        training = self.config.training
        build_world_caption_editor(
            self.path("triplets"), self.path("caption_editor"), training.caption_editor_steps, self.config.seed,
            progress=self.progress, rows=training.caption_editor_rows,
        )  # fmt: skip

    def build_triplets(self) -> None:
        from data_synth.triplets.embed import embed_triplets
        from data_synth.triplets.shapes_builder import ShapesTripletConfig, build_shapes_triplets

        data = self.config.data
        build_shapes_triplets(
            self.path("triplets"),
            data.triplets,
            seed=self.config.seed,
            config=ShapesTripletConfig(negated_removals=data.negated_removals, open_probability=data.open_probability),
            workers=data.workers,
            progress=self.progress,
        )
        out = self.path("triplet_embeddings")
        captioner = self.make_captioner() if data.triplet_captions == "captioner" else None
        _rebuild_if_stale(
            out,
            lambda: embed_triplets(
                self.path("triplets"),
                self.embedder,
                out,
                progress=self.progress,
                captioner=captioner,
                max_text_tokens=self.max_text_tokens(),
                near_misses=self.near_misses(),
            ),
        )

    def max_text_tokens(self) -> int | None:
        """The stage-1 config's text condition (None: pooled); token-level text needs token caches embedded."""
        overrides = self.config.training.stage1_overrides
        return load_config(self.config_dir / self.config.training.stage1, overrides=overrides).model.max_text_tokens

    def near_misses(self) -> int:
        """The stage-2 config's near misses per triplet (``data.near_misses``): embedded with the triplets."""
        overrides = self.config.training.stage2_overrides
        return load_config(self.config_dir / self.config.training.stage2, overrides=overrides).data.near_misses

    def train_stage(
        self,
        name: str,
        paths: dict[str, Path],
        validation_fn: Callable[[Any], dict[str, float]] | None = None,
        out_name: str | None = None,
        variant: Sequence[str] = (),
    ) -> Path:
        """Train ``training.<name>`` with the loop (resuming an interrupted run); skipped when the same config finished.

        ``paths`` point the config at this demo's data (``data.pair_embeddings=...``); the demo
        config's ``<name>_overrides`` apply next, then ``variant`` (an ablation's changes, trained into
        ``out_name`` instead of ``<name>``).
        """
        from fusion_diff.training.loop import FINAL_CONFIG, MANIFEST, train

        out = self.path(out_name or name)
        demo_overrides = [f"output_dir={out}", f"seed={self.config.seed}"] + [f"{k}={v}" for k, v in paths.items()]
        overrides = demo_overrides + getattr(self.config.training, f"{name}_overrides") + list(variant)
        config = load_config(stage_config_path(self.config_dir, getattr(self.config.training, name)), overrides=overrides)
        inputs = _fingerprint(paths.values())
        if (out / MANIFEST).is_file():
            if load_config(out / FINAL_CONFIG) == config and _read_inputs(out) == inputs:
                print(f"    cached ({out})")
                return out
            print(f"    {out} was trained with another config or on other inputs: retraining")
            shutil.rmtree(out)
        result = train(config, resume="latest", validation_fn=validation_fn)
        for key, value in result.validation.items():
            print(f"    {key} = {value:.2f}")
        write_json_atomic(out / INPUTS_FILE, inputs)
        return out

    # ------------------------------------------------------------------ evaluation
    def make_captioner(self):
        from fusion_diff.captioning import create_captioner

        if self.captioner is None:
            self.captioner = create_captioner(self.captioner_spec(), self.embedder)
        return self.captioner

    def captioner_spec(self) -> dict[str, Any]:
        spec = dict(self.config.evaluation.captioner)
        if spec.get("type") == "retrieval":
            spec.setdefault("bank", str(self.path("pairs")))  # the pair set's captions (training scenes only)
        if spec.get("type") == "scene":
            spec.setdefault("model", str(self.path("captioner")))  # trained on the pair set by the demo
        return spec

    def evaluator(self, split: str, phrasing: str = "benchmark", benchmark: str = "shapes", captioner=None):
        """An evaluator on ``benchmark`` (``shapes``, or the open-edit ``shapes-open``) with the demo's captioner
        (or ``captioner``); embeddings and captions are cached under ``eval_cache``."""
        from fusion_diff.benchmarks import load_benchmark
        from fusion_diff.benchmarks.evaluate import Evaluator

        root = self.path("benchmark" if benchmark == "shapes" else OPEN_BENCHMARK_FOLDERS[split])
        units = load_benchmark(benchmark, root, split, phrasing=phrasing)
        return Evaluator(
            units,
            self.embedder,
            captioner=captioner or self.make_captioner(),
            cache_root=self.path("eval_cache"),
            progress=self.progress,
        )

    def fusion_diff_options(self) -> dict[str, Any]:
        return dict(self.config.evaluation.methods.get("fusion-diff", {}))

    def val_fn(self) -> Callable[[Any], dict[str, float]]:
        """Stage 2's validation hook: Fusion-Diff on the benchmark's val split (never test)."""
        from fusion_diff.baselines import create_method

        evaluator = None

        def validate(pipeline) -> dict[str, float]:
            nonlocal evaluator
            evaluator = evaluator or self.evaluator("val")
            method = create_method("fusion-diff", pipeline=pipeline, **self.fusion_diff_options())
            return evaluator.evaluate(method).metrics

        return validate

    def evaluate(self, stage1: Path, stage2: Path, fti4cir: Path | None) -> Path:
        """The main table (every method with the demo's captioner, and again with the world BLIP when it was
        trained, each row with its protocol line), R@1 per edit kind, and the open-edit benchmark's table."""
        from fusion_diff.baselines.registry import load_pipeline, method_factory
        from fusion_diff.benchmarks.report import markdown_table, write_results
        from fusion_diff.benchmarks.shapes import edit_kinds, kind_table

        checkpoints = {"emb2emb": stage1, "fusion-diff": stage2, "fti4cir": fti4cir}
        evaluator = self.evaluator("test")
        results = self.method_rows(evaluator, checkpoints)
        by_kind = kind_table(results, evaluator.units[0], edit_kinds(self.path("benchmark"), "test"))
        blip = self.blip_captioner()
        if blip is not None:  # the realistic captioner: same models and settings, its captions instead
            results += self.method_rows(self.evaluator("test", captioner=blip), checkpoints, BLIP_ROW_SUFFIX)
        if self.config.evaluation.training_phrasing:  # the phrasing gap: same edits, training generator's wording
            options = {**self.fusion_diff_options(), "name": "fusion-diff@training-phrasing"}
            method = method_factory("fusion-diff")(pipeline=load_pipeline(stage2), **options)
            results.append(self.evaluator("test", phrasing="training").evaluate(method))
        for result in results:  # the schedule the numbers come from: reference, or scaled to the time budget
            result.protocol.update(plan_as_record(self.plan))
        json_path, md_path = write_results(results, self.path("results"), "shapes-test")
        with atomic_path(self.path("results") / "shapes-test-by-edit.md") as tmp:
            tmp.write_text(by_kind, encoding="utf-8")
        print(markdown_table(results))
        print("R@1 per edit kind:\n" + by_kind)
        print(f"    wrote {md_path}, {json_path} and shapes-test-by-edit.md")
        if self.config.world.open_test_queries:
            self.evaluate_open(checkpoints, blip)
        return md_path

    def evaluate_open(self, checkpoints: dict[str, Path | None], blip) -> Path:
        """Every method on the open-edit benchmark (CIRCO format, mAP@k over all right answers)."""
        from fusion_diff.benchmarks.report import markdown_table, write_results

        results = self.method_rows(self.evaluator("test", benchmark="shapes-open"), checkpoints)
        if blip is not None:
            evaluator = self.evaluator("test", benchmark="shapes-open", captioner=blip)
            results += self.method_rows(evaluator, checkpoints, BLIP_ROW_SUFFIX)
        json_path, md_path = write_results(results, self.path("results"), "shapes-open-test")
        print("Open-edit benchmark (CIRCO format, several right answers per query):\n" + markdown_table(results))
        print(f"    wrote {md_path} and {json_path}")
        return md_path

    def method_rows(self, evaluator, checkpoints: dict[str, Path | None], suffix: str = "") -> list:
        """One result per ``evaluation.methods`` row on ``evaluator``'s benchmark (rows named ``<row><suffix>``);
        a row whose model was not trained is skipped, and said so."""
        from fusion_diff.baselines import create_method

        unit = evaluator.units[0]
        keys = {"emb2emb": "pipeline", "fusion-diff": "pipeline", "fti4cir": "checkpoint"}
        results = []
        for row, options in self.config.evaluation.methods.items():
            options = dict(options)
            name = options.pop("method", row)  # a row may run a method under another name (a variant)
            if name != row:
                options["name"] = row
            if name in keys:
                if checkpoints[name] is None:
                    print(f"    {row}: not trained, row skipped")
                    continue
                options[keys[name]] = str(checkpoints[name])
            if name.startswith("oracle"):
                options["data"] = unit
            result = evaluator.evaluate(create_method(name, **options))
            results.append(replace(result, method=result.method + suffix))
        if self.config.training.caption_editor_steps and checkpoints["fusion-diff"] is not None:
            editor = str(self.path("caption_editor"))
            weight = self.config.evaluation.edited_caption_weight
            rows = {
                "edited-caption": {"caption_editor": editor},
                "fusion-diff": {
                    **self.fusion_diff_options(),
                    "pipeline": str(checkpoints["fusion-diff"]),
                    "name": "fusion-diff + edited caption",
                    "caption_editor": editor,
                    "edited_caption_weight": weight,
                },
            }
            for name, options in rows.items():
                result = evaluator.evaluate(create_method(name, **options))
                results.append(replace(result, method=result.method + suffix))
        return results

    def blip_captioner(self):
        """The world's BLIP through the generative path (as a user loads any BLIP), or None when not trained."""
        from fusion_diff.captioning import create_captioner

        if not self.config.training.blip_captioner_steps:
            return None
        return create_captioner({"type": "generative", "model": str(self.path("blip"))})

    def plot(self, stage2: Path) -> None:
        """Reference / generated query / target / gallery and the sampling walk of the first test queries."""
        from fusion_diff.baselines.registry import load_pipeline
        from fusion_diff.viz import render_figures
        from fusion_diff.viz.inputs import VizInputs, save_viz_inputs

        evaluator = self.evaluator("test")
        unit = evaluator.units[0]
        queries = unit.queries[: self.config.evaluation.plot_queries]
        reference = evaluator.fused(unit, [q.reference for q in queries])
        target = evaluator.fused(unit, [q.positives[0] for q in queries])
        pipeline = load_pipeline(stage2)
        texts = [q.texts[0] for q in queries]
        text, mask = pipeline.text_condition(texts, self.embedder, evaluator.text_embeddings(texts))
        options = self.fusion_diff_options()
        sampling = {k: options[k] for k in ("num_inference_steps", "control_guidance", "text_guidance") if k in options}
        generator = torch.Generator().manual_seed(self.config.seed)
        output = pipeline.sample(
            text, reference, generator=generator, return_trajectory=True, text_attention_mask=mask, **sampling
        )
        inputs = VizInputs(
            reference, output.embeddings, target, evaluator.fused(unit, unit.gallery), output.trajectory,
            [q.query_id for q in queries],
        )  # fmt: skip
        save_viz_inputs(self.path("results"), inputs)  # `fusion-diff viz --inputs <out>/results` redraws them
        for path in render_figures(inputs, self.path("results") / "plots", seed=self.config.seed):
            print(f"    wrote {path}")

    def build_query_index(self, stage2: Path) -> None:
        """A saved retriever over the test gallery (Fusion-Diff with the demo's query settings) for
        ``fusion-diff query --index <out>/retriever``; kept when it already holds this gallery and method."""
        from fusion_diff.benchmarks import load_benchmark
        from fusion_diff.retrieval.retriever import INDEX_FOLDER, RETRIEVER_FILE, ComposedRetriever

        (unit,) = load_benchmark("shapes", self.path("benchmark"), "test")
        out = self.path("retriever")
        options = {**self.fusion_diff_options(), "pipeline": str(stage2)}
        saved = json.loads((out / RETRIEVER_FILE).read_text()) if (out / RETRIEVER_FILE).is_file() else None
        if saved and saved["method"]["options"] == options and (out / INDEX_FOLDER / "manifest.json").is_file():
            retriever = ComposedRetriever.from_pretrained(out, embedder=self.embedder)
            print(f"    cached ({out})")
        else:
            backbone = {"backend": "world", "cache": str(self.backbone_root()), "train_if_missing": False}
            retriever = ComposedRetriever(
                backbone, "fusion-diff", captioner=self.captioner_spec(), method_options=options, progress=self.progress
            )
            missing = set(unit.missing)
            gallery = [g for g in unit.gallery if g not in missing]
            retriever.index_gallery([unit.image_paths[g] for g in gallery], out / INDEX_FOLDER, ids=gallery)
            retriever.save_pretrained(out)
        query = unit.queries[0]
        exclude = [[query.reference]] if unit.exclude_reference else None
        hits = retriever.search(unit.image_paths[query.reference], query.texts[0], k=10, exclude=exclude)[0]
        rank = next((n for n, hit in enumerate(hits, start=1) if hit.id in query.positives), None)
        print(
            f"    fusion-diff query --index {out} --image {unit.image_paths[query.reference]} --text {query.texts[0]!r}\n"
            f"    test query {query.query_id}: target {'at rank ' + str(rank) if rank else 'not in the top 10'}"
        )


def pipeline_row_name(path: str | Path) -> str:
    """The table row of another stage-2 pipeline scored beside the demo's: ``runs/demo/ablation-regression/stage2``
    is "ablation: regression", ``runs/stage2-2880`` is "stage2-2880" (scripts' ``--also`` folders)."""
    path = Path(path)
    folder = path.parent if path.name == "stage2" else path
    return folder.name.replace("ablation-", "ablation: ", 1) if folder.name.startswith("ablation-") else folder.name


def run_demo(quick: bool = False, config_path: str | Path | None = None, overrides: list[str] | None = None,
             progress: bool = True) -> Path:  # fmt: skip
    """Load the demo config (strictly), check every option, run every step, and return the markdown table's path."""
    path = Path(config_path) if config_path else default_config_path(quick)
    config = load_dataclass(DemoConfig, path, overrides or [])
    check_demo_config(config, path)
    return Demo(config, path.parent, progress).run()


def check_demo_config(config: DemoConfig, path: Path) -> None:
    """Everything the later steps read, checked now rather than minutes in: each table row's method and options
    (unknown keys with the closest known one, types, finite numbers), the captioner spec, and each stage's training
    config (found, and loading strictly with the demo's overrides)."""
    from fusion_diff.baselines.registry import METHODS, check_method_options
    from fusion_diff.captioning.factory import check_captioner_spec

    for row, options in config.evaluation.methods.items():
        name = options.get("method", row)
        if name not in METHODS:
            raise ConfigError(
                f"{path}: unknown method {name!r} in 'evaluation.methods.{row}'{did_you_mean(name, METHODS)}; "
                f"choose one of {sorted(METHODS)} (see fusion-diff eval --help)."
            )
        check_method_options(name, {k: v for k, v in options.items() if k != "method"},
                             f"{path} ('evaluation.methods.{row}')")  # fmt: skip
    spec = config.evaluation.captioner
    if spec.get("type") not in (None, "none"):
        try:
            check_captioner_spec({"model": "<trained by the demo>", **spec} if spec.get("type") == "scene" else spec)
        except ConfigError as err:
            raise ConfigError(f"{path}: 'evaluation.captioner': {err}") from err
        if spec.get("type") == "retrieval" and spec.get("bank") and not Path(spec["bank"]).exists():
            raise MissingFileError(f"{path}: 'evaluation.captioner.bank' {spec['bank']} does not exist.")
    placeholders = {"output_dir": "<out>", "data.pair_embeddings": "<out>", "data.triplet_embeddings": "<out>",
                    "model.prior_path": "<out>", "data.pair_dir": "<out>", "model.backbone.cache": "<out>"}  # fmt: skip
    stages = {"stage1": "prior", "stage2": "adapter", "fti4cir": "fti4cir"}
    for stage, task in stages.items():
        name = getattr(config.training, stage)
        if name is None:
            continue
        defaults = [f"{key}={value}" for key, value in placeholders.items() if _config_has(task, key)]
        try:
            load_config(stage_config_path(path.parent, name), task=task,
                        overrides=defaults + getattr(config.training, f"{stage}_overrides"))  # fmt: skip
        except ConfigError as err:
            raise ConfigError(f"{path}: 'training.{stage}' ({name}): {err}") from err


def stage_config_path(config_dir: Path, name: str) -> Path:
    """A stage's training config: beside the demo config, else in the checkout's configs/ (so a demo config copied
    elsewhere still finds the shipped stage configs); neither is a clear error naming both places."""
    for folder in (config_dir, CONFIG_DIR):
        if (folder / name).is_file():
            return folder / name
    raise MissingFileError(
        f"Training config {name!r} is neither in {config_dir} (beside the demo config) nor in {CONFIG_DIR}. "
        "Copy it beside the demo config or give its path in 'training'."
    )


def _config_has(task: str, key: str) -> bool:
    """Whether dotted ``key`` (``data.pair_embeddings``) is a field of ``task``'s config (the demo sets it)."""
    import dataclasses

    from fusion_diff.training.config import TrainConfig
    from fusion_diff.training.task import get_task_spec

    spec = get_task_spec(task)
    section, _, rest = key.partition(".")
    hints = {"model": spec.model_config, "data": spec.data_config}
    if not rest:
        return key in {f.name for f in dataclasses.fields(TrainConfig)}
    field_name = rest.partition(".")[0]
    return section in hints and field_name in {f.name for f in dataclasses.fields(hints[section])}


def _rebuild_if_stale(out: Path, embed: Callable[[], T]) -> T:
    """Run an embedding step; if its caches were made by another backbone (e.g. a rebuilt one), redo them."""
    try:
        return embed()
    except CacheMismatchError as err:
        print(f"    {out} holds embeddings of another backbone or caption source: re-embedding ({err})")
        shutil.rmtree(out)
        return embed()


def _fingerprint(paths: Iterable[Path]) -> dict[str, str]:
    """Digests of the manifests of a step's inputs (without their write time): a retrained stage 1 makes stage 2
    retrain too, a re-run that changed nothing does not."""
    digests = {}
    for root in map(Path, paths):
        for manifest in sorted([*root.glob("*manifest.json"), *root.glob("*/manifest.json")]):
            content = {k: v for k, v in json.loads(manifest.read_text(encoding="utf-8")).items() if k != "created"}
            digests[str(manifest)] = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return digests


def _read_inputs(out: Path) -> dict[str, str] | None:
    path = out / INPUTS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _plain(config: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(config)))
