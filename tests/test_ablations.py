"""Issue 18's ablations and multi-sample scoring: the direct-regression prior + adapter trains and loads through the
pipeline interface, stage 2 trains on a random prior (no stage 1), and max / log-sum-exp scoring over N samples is
the plain score at N = 1 and can rank a second mode's target above what averaging does."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from test_demo import toy_demo_config
from test_eval import N_IMAGES, _caption, write_tiny_benchmark
from test_training_loop import QUIET, TINY_PRIOR

import fusion_diff.retrieval.index as index_module
from fusion_diff import ComposedRetriever
from fusion_diff.baselines import create_method
from fusion_diff.benchmarks import load_shapes
from fusion_diff.benchmarks.evaluate import Evaluator
from fusion_diff.captioning import RetrievalCaptioner
from fusion_diff.errors import ConfigError
from fusion_diff.models import ControlAdapter, FusionPrior, sampling_scheduler
from fusion_diff.models.denoise import predict, regression_input
from fusion_diff.pipelines import FusionDiffMethod, FusionDiffPipeline
from fusion_diff.retrieval.index import FaissGalleryIndex, GalleryIndex
from fusion_diff.retrieval.method import SampleScoring
from fusion_diff.retrieval.store import PersistentIndex
from fusion_diff.training.config import config_from_dict
from fusion_diff.training.data import PAIR_FIELDS, TRIPLET_FIELDS, TripletEmbeddingDataset, write_random_caches
from fusion_diff.training.loop import train

DIM = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation_data")
    write_random_caches(root / "pairs", PAIR_FIELDS, 40, DIM, seed=0)
    write_random_caches(root / "triplets", TRIPLET_FIELDS, 40, DIM, seed=1)
    return root


def stage1_raw(data, out, **model) -> dict:
    return {
        "task": "prior", "output_dir": str(out), "seed": 3, "model": {**TINY_PRIOR, **model},
        "data": {"pair_embeddings": str(data / "pairs")}, "optim": {"learning_rate": 1e-2},
        "schedule": {"max_train_steps": 12, "train_batch_size": 8, "lr_warmup_steps": 0, "lr_scheduler": "constant"},
        "ema": {"use_ema": False}, "checkpointing": {"every_n_steps": 0}, "logging": QUIET,
    }  # fmt: skip


def stage2_raw(stage1, data, out, **model) -> dict:
    return {
        "task": "adapter", "output_dir": str(out), "seed": 0,
        "model": {"prior_path": str(stage1), "num_blocks": 1, **model},
        "data": {"triplet_embeddings": str(data / "triplets")}, "optim": {"learning_rate": 1e-2},
        "schedule": {"max_train_steps": 12, "train_batch_size": 8, "lr_warmup_steps": 0, "lr_scheduler": "constant"},
        "ema": {"use_ema": False}, "checkpointing": {"every_n_steps": 0}, "logging": QUIET,
    }  # fmt: skip


def losses(out) -> list[float]:
    return [yaml.safe_load(line)["loss"] for line in (out / "logs/train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("diffusion_stage1")
    train(config_from_dict(stage1_raw(data, out)))
    return out


def test_regression_ablation_trains_and_loads_through_the_pipeline(data, tmp_path):
    train(config_from_dict(stage1_raw(data, tmp_path / "s1", objective="regression", regression_loss="cosine")))
    train(config_from_dict(stage2_raw(tmp_path / "s1", data, tmp_path / "s2", regression_loss="cosine")))
    first, last = losses(tmp_path / "s1"), losses(tmp_path / "s2")
    assert first[-1] < first[0], first  # the regressor learns (cosine loss on the fixed training set)

    pipe = FusionDiffPipeline.from_pretrained(str(tmp_path / "s2"))
    assert pipe.prior.config.objective == "regression" and pipe.adapter is not None
    assert (
        yaml.safe_load((tmp_path / "s2" / "manifest.json").read_text())["config"]["prior"]["objective"] == "regression"
    )
    assert all(loss < 2 for loss in last)  # 1 - cos is in [0, 2]
    text, control = F.normalize(torch.randn(3, DIM), dim=-1), F.normalize(torch.randn(3, DIM), dim=-1)
    a = pipe.sample(text, control, num_inference_steps=10, generator=torch.Generator().manual_seed(0))
    b = pipe.sample(text, control, num_inference_steps=1, num_samples=3, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(a.embeddings, b.embeddings)  # one forward on a fixed input: no noise, no steps
    a = pipe.sample(text, control, control_guidance=1.0, text_guidance=1.0)  # unguided: the network's output
    with torch.no_grad():
        sample, t = regression_input(pipe.prior, 3)
        direct = predict(pipe.prior, pipe.adapter, sample, t, text, control)
    torch.testing.assert_close(a.embeddings, F.normalize(pipe.prior.destandardize(direct), dim=-1))

    method = create_method("fusion-diff", pipeline=str(tmp_path / "s2"))
    assert method.protocol()["objective"] == "regression"
    with pytest.raises(ConfigError, match="regress"):
        pipe.emb2emb(control, text)
    with pytest.raises(ConfigError, match="prediction_type"):
        config_from_dict(stage1_raw(data, tmp_path / "x", objective="regression", prediction_type="epsilon"))


def test_no_stage1_trains_the_adapter_on_a_random_prior(data, stage1, tmp_path):
    out = tmp_path / "s2"
    train(config_from_dict(stage2_raw(stage1, data, out, prior_init="random")))
    saved = load_file(out / "prior/diffusion_pytorch_model.safetensors")
    pretrained = load_file(stage1 / "prior/diffusion_pytorch_model.safetensors")
    assert not torch.equal(saved["proj_out.weight"], pretrained["proj_out.weight"])  # not the stage-1 weights
    targets = TripletEmbeddingDataset(data / "triplets").tensors["target"]
    torch.testing.assert_close(saved["embedding_mean"], targets.mean(0))  # statistics of the triplet targets
    assert yaml.safe_load((out / "training_config.yaml").read_text())["model"]["prior_init"] == "random"
    pipe = FusionDiffPipeline.from_pretrained(str(out))
    assert (
        pipe.prior.config.embedder_identity
        == FusionPrior.from_pretrained(str(stage1), subfolder="prior").config.embedder_identity
    )
    adapter_changed = load_file(out / "adapter/diffusion_pytorch_model.safetensors")["residual_projs.0.weight"]
    assert adapter_changed.abs().sum() > 0  # the zero-initialised residual learned something


# --------------------------------------------------------------------------- multi-sample scoring
def _gallery(n: int = 40, d: int = DIM, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    g = F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return g, [f"g{i}" for i in range(n)]


@pytest.mark.parametrize("reduction", ["max", "lse"])
@pytest.mark.parametrize("backend", [GalleryIndex, FaissGalleryIndex])
def test_one_sample_scores_are_the_plain_scores(reduction, backend):
    gallery, ids = _gallery()
    index = backend(gallery, ids)
    queries = F.normalize(torch.randn(6, DIM, generator=torch.Generator().manual_seed(1)), dim=-1)
    exclude = [[f"g{i}"] for i in range(6)]
    plain = index.search(queries, k=10, exclude=exclude)
    multi = index.search(queries[:, None], k=10, exclude=exclude, scoring=SampleScoring(reduction))
    assert multi.ids == plain.ids
    torch.testing.assert_close(multi.scores, plain.scores)
    candidates = [ids[:5]] * 6
    torch.testing.assert_close(
        index.scores_for(queries[:, None], candidates, SampleScoring(reduction)), index.scores_for(queries, candidates)
    )
    with pytest.raises(ConfigError, match="scoring"):
        index.search(queries[:, None], k=3)


def test_max_ranks_a_second_modes_target_above_where_mean_does():
    e1, e2 = torch.eye(DIM)[0], torch.eye(DIM)[1]
    gallery = torch.stack([e1, e2, F.normalize(3 * e1 + e2, dim=0), F.normalize(e1 + 0.5 * e2, dim=0)])
    ids = ["mode1", "mode2", "between", "near-mode1"]
    samples = torch.stack([e1, e1, e1, e2])[None]  # three samples in the first mode, one in the second
    index = GalleryIndex(gallery, ids)
    mean = index.search(F.normalize(samples.mean(1), dim=-1), k=4).ids[0]
    assert mean.index("mode2") == 3  # averaging ranks the second mode's target last
    for scoring in (SampleScoring("max"), SampleScoring("lse", temperature=0.02)):
        ranked = index.search(samples, k=4, scoring=scoring).ids[0]
        assert ranked.index("mode2") <= 1, (scoring, ranked)
        assert FaissGalleryIndex(gallery, ids).search(samples, k=4, scoring=scoring).ids[0][:2] == ranked[:2]
    averaged = index.search(samples, k=4, scoring=SampleScoring("mean")).ids[0]
    assert averaged == mean  # the mean of the similarities ranks like the averaged query


def test_approximate_union_is_exact_under_max(monkeypatch):
    monkeypatch.setattr(index_module, "RESCORE_ROWS", 120)  # rescoring in blocks of two queries
    gallery, ids = _gallery(300, seed=2)
    samples = F.normalize(torch.randn(20, 5, DIM, generator=torch.Generator().manual_seed(3)), dim=-1)
    exact = GalleryIndex(gallery, ids, chunk_size=64, query_block=7)  # several blocks and chunks
    union = FaissGalleryIndex(gallery, ids)  # per-sample top-k, merged, rescored
    scoring = SampleScoring("max")
    a, b = exact.search(samples, k=10, scoring=scoring), union.search(samples, k=10, scoring=scoring)
    assert a.ids == b.ids
    torch.testing.assert_close(a.scores, b.scores)
    full = (samples @ gallery.T).amax(1).topk(10, dim=1)
    torch.testing.assert_close(a.scores, full.values)


def test_fusion_diff_max_scoring_with_one_sample_equals_averaging_in_the_evaluator(tmp_path, tiny_openclip):
    torch.manual_seed(0)
    prior = FusionPrior(embedding_dim=tiny_openclip.dim, hidden_dim=32, num_layers=2, num_heads=2)
    pipeline = FusionDiffPipeline(prior, sampling_scheduler("ddim", prior), ControlAdapter.from_prior(prior, 1))
    pipeline.set_progress_bar_config(disable=True)
    data = load_shapes(write_tiny_benchmark(tmp_path / "bench"), "test")
    captioner = RetrievalCaptioner(tiny_openclip, [_caption(i) for i in range(N_IMAGES)])
    evaluator = Evaluator(data, tiny_openclip, captioner=captioner, cache_root=tmp_path / "cache", progress=False)
    plain = evaluator.evaluate(FusionDiffMethod(pipeline, num_inference_steps=2, mix_reference=0.2))
    for reduction in ("max", "lse"):
        method = FusionDiffMethod(pipeline, num_inference_steps=2, sample_reduction=reduction, mix_reference=0.2)
        multi = evaluator.evaluate(method)
        assert multi.rankings == plain.rankings and multi.subset_rankings == plain.subset_rankings
        assert multi.metrics == plain.metrics
        assert multi.protocol["method"]["sample_reduction"] == reduction
    assert "sample_temperature" not in plain.protocol["method"]
    four = evaluator.evaluate(FusionDiffMethod(pipeline, num_inference_steps=2, num_samples=4, sample_reduction="max"))
    assert set(four.metrics) == set(plain.metrics)

    # the retriever over a persisted index: the same one-sample equality, and N > 1 searches
    images = [data.image_paths[g] for g in data.gallery]
    queries = data.queries[:4]
    refs, texts = [data.image_paths[q.reference] for q in queries], [q.texts[0] for q in queries]
    hits = {}
    for reduction, n in (("mean", 1), ("max", 1), ("lse", 3)):
        method = FusionDiffMethod(pipeline, num_samples=n, sample_reduction=reduction, gallery_mode="image")
        retriever = ComposedRetriever(tiny_openclip, method)
        if reduction == "mean":
            retriever.index_gallery(images, tmp_path / "index", ids=data.gallery)
        else:
            retriever.attach(PersistentIndex.load(tmp_path / "index"))
        hits[reduction] = [[h.id for h in row] for row in retriever.search(refs, texts, k=5)]
    assert hits["max"] == hits["mean"] and all(len(row) == 5 for row in hits["lse"])


@pytest.mark.slow
def test_ablation_script_trains_and_tables_the_ablations_at_toy_sizes(tmp_path, monkeypatch, capsys):
    _, config = toy_demo_config(tmp_path)  # its open-edit benchmark gets a table of its own
    script = Path(__file__).resolve().parents[1] / "scripts" / "ablations.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--config", str(config)])
    runpy.run_path(str(script), run_name="__main__")
    results = tmp_path / "demo" / "results"
    test_rows = {r["method"]: r for r in json.loads((results / "ablations-test.json").read_text())}
    assert set(test_rows) == {
        "fusion-diff", "ablation: regression", "ablation: no-stage-1", "fusion-diff[max]", "fusion-diff[lse]",
        "fusion-diff[rerank]",
    }  # fmt: skip
    assert test_rows["fusion-diff[rerank]"]["protocol"]["method"]["rerank"].startswith("top 20 by z(score)")
    assert test_rows["ablation: regression"]["protocol"]["method"]["objective"] == "regression"
    assert test_rows["fusion-diff[max]"]["protocol"]["method"]["sample_reduction"] == "max"
    assert {r["protocol"]["schedule"] for r in test_rows.values()} == {"reference schedule (configs/demo.yaml)"}
    no_stage1 = yaml.safe_load((tmp_path / "demo/ablation-no-stage1/stage2/training_config.yaml").read_text())
    assert no_stage1["model"]["prior_init"] == "random"
    sweep = json.loads((results / "ablations-val-sampling.json").read_text())
    assert {r["protocol"]["split"] for r in sweep} == {"val"} and len(sweep) == 10
    assert {r["protocol"]["method"]["sampler"] for r in sweep} == {"ddim", "dpm++"}
    open_rows = json.loads((results / "ablations-open-test.json").read_text())
    assert [r["method"] for r in open_rows] == list(test_rows) and "mAP@5" in open_rows[0]["metrics"]
    assert {r["protocol"]["benchmark"] for r in open_rows} == {"shapes-open"}
    out = capsys.readouterr().out
    assert "Sampling ablation" in out and "- **ablation: regression**: shapes/test" in out

    # the multi-sample sweep on a val split of the open-edit benchmark (a folder of its own), then test once
    sweep_script = script.with_name("sweep_sampling.py")
    regression = tmp_path / "demo" / "ablation-regression" / "stage2"
    argv = [str(sweep_script), "--demo-dir", str(tmp_path / "demo"), "--config", str(config), "--grid", "multi-sample",
            "--benchmark", "shapes-open", "--open-val-queries", "8", "--test-best", "--also", str(regression)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    grid = runpy.run_path(str(sweep_script), run_name="__main__")["MULTI_SAMPLE_GRID"]
    val_rows = json.loads((results / "shapes-open-val-multi-sample-sweep.json").read_text())
    assert {r["protocol"]["split"] for r in val_rows} == {"val"} and len(val_rows) == 2 + len(grid)
    assert json.loads((tmp_path / "demo/benchmark_open_val/manifest.json").read_text())["splits"]["test"]["queries"] == 0
    best = json.loads((results / "shapes-open-test-multi-sample-sweep-best.json").read_text())
    assert [r["method"] for r in best][:2] == ["image-only", "fusion-diff (demo settings)"]
    assert best[2]["method"].endswith("(val-selected)") and best[3]["method"] == "ablation: regression"
    assert {r["protocol"]["split"] for r in best} == {"test"} and {r["protocol"]["benchmark"] for r in best} == {"shapes-open"}

    # the re-ranking grid on the single-answer val split, then test once
    argv = [str(sweep_script), "--demo-dir", str(tmp_path / "demo"), "--config", str(config), "--grid", "rerank",
            "--test-best"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    grid = runpy.run_path(str(sweep_script), run_name="__main__")["RERANK_GRID"]
    val_rows = json.loads((results / "shapes-val-rerank-sweep.json").read_text())
    assert len(val_rows) == 1 + len(grid) and sum("rerank" in r["protocol"]["method"] for r in val_rows) == 5
    best = json.loads((results / "shapes-test-rerank-sweep-best.json").read_text())
    assert best[2]["method"].endswith("(val-selected)") and {r["protocol"]["split"] for r in best} == {"test1"}
