"""The evaluation engine, baselines, oracle rows, method registry and ``fusion-diff eval`` on a tiny
CIRR-format benchmark (written here) with the tiny random open_clip backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fusion_diff.baselines import ImageOnly, SumFusion, TextOnly, create_method, registry
from fusion_diff.benchmarks import CompositionQuery, load_shapes
from fusion_diff.benchmarks.evaluate import Evaluator, modification_texts
from fusion_diff.benchmarks.fashioniq import load_fashioniq
from fusion_diff.benchmarks.report import markdown_table, write_results
from fusion_diff.captioning import RetrievalCaptioner
from fusion_diff.cli import main as cli_main
from fusion_diff.embedding.base import JointEmbedder
from fusion_diff.errors import ConfigError, DataError, MissingFileError
from test_pipeline_cli import saved_pipeline  # noqa: F401  (a pipeline whose prior records the tiny backbone)

COLOURS = ["red", "green", "blue", "yellow", "pink", "cyan", "orange", "purple"]
SHAPES = ["circle", "square", "star"]
N_IMAGES, N_QUERIES = 24, 8


def _name(i: int) -> str:
    return f"s{i:02d}"


def _caption(i: int) -> str:
    return f"a {COLOURS[i % 8]} {SHAPES[i % 3]}"


def write_tiny_benchmark(root: Path, split: str = "test1") -> Path:
    """A CIRR-format benchmark: 24 coloured images, 8 queries (reference i -> target i + 8), 6-image groups,
    plus the shapes world's oracle captions file."""
    gen = torch.Generator().manual_seed(0)
    for i in range(N_IMAGES):
        pixels = (torch.rand(32, 32, 3, generator=gen) * 255).byte().numpy()
        path = root / "imgs" / f"{_name(i)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    queries = []
    for q in range(N_QUERIES):
        ref, tgt = q, q + 8
        members = [_name(ref), _name(tgt)] + [_name(16 + (q + j) % 8) for j in range(4)]
        queries.append(
            {
                "pairid": 100 + q,
                "reference": _name(ref),
                "target_hard": _name(tgt),
                "target_soft": {_name(tgt): 1.0},
                "caption": f"make it {COLOURS[tgt % 8]}",
                "img_set": {"id": q, "members": members, "reference_rank": 0, "target_rank": 1},
            }
        )
    for sub, payload in (
        (f"captions/cap.rc2.{split}.json", queries),
        (f"image_splits/split.rc2.{split}.json", {_name(i): f"./imgs/{_name(i)}.png" for i in range(N_IMAGES)}),
        (f"oracle/captions.{split}.json", {_name(i): _caption(i) for i in range(N_IMAGES)}),
    ):
        (root / sub).parent.mkdir(parents=True, exist_ok=True)
        (root / sub).write_text(json.dumps(payload))
    return root


@pytest.fixture
def tiny_root(tmp_path) -> Path:
    return write_tiny_benchmark(tmp_path / "bench")


class CountingEmbedder(JointEmbedder):
    """Delegates to another embedder and counts what it had to embed (to see the caches work)."""

    def __init__(self, inner: JointEmbedder) -> None:
        self.inner, self.images, self.texts = inner, 0, 0

    @property
    def identity(self):
        return self.inner.identity

    def embed_images(self, images, batch_size=64, progress=False):
        self.images += len(images)
        return self.inner.embed_images(images, batch_size)

    def embed_texts(self, texts, batch_size=256, progress=False):
        self.texts += len(texts)
        return self.inner.embed_texts(texts, batch_size)

    def embed_pairs(self, images, texts, batch_size=64, progress=False):
        return self.inner.embed_pairs(images, texts, batch_size)

    @property
    def supports_late_fusion(self) -> bool:
        return True

    def fuse(self, image_embeds, text_embeds):
        return self.inner.fuse(image_embeds, text_embeds)


def test_baselines_rows_protocol_and_cache_reuse(tiny_root, tiny_openclip, tmp_path):
    data = load_shapes(tiny_root, "test")
    embedder = CountingEmbedder(tiny_openclip)
    evaluator = Evaluator(data, embedder, cache_root=tmp_path / "cache", progress=False)
    results = [evaluator.evaluate(m) for m in (ImageOnly(), TextOnly(), SumFusion())]
    for result in results:
        assert set(result.metrics) == {"R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3", "avg"}
        assert result.metrics["R@50"] == 100.0  # 23 candidates once the reference is removed
        p = result.protocol
        assert (p["benchmark"], p["split"], p["gallery_mode"], p["captioner"], p["missing_images"]) == (
            "shapes",
            "test1",
            "image",
            None,
            0,
        )
        assert p["backbone"]["model"] == tiny_openclip.identity.model and p["reference_inputs"] == ["image"]
        assert p["method"]["method"] == result.method and p["units"][0]["phrasing"] == "benchmark"
        assert all(q.reference not in result.rankings["shapes/test1"][q.query_id] for q in data.queries)
    assert embedder.images == N_IMAGES  # every image embedded once, shared by the three methods
    # A second evaluator on the same cache embeds nothing again.
    again = CountingEmbedder(tiny_openclip)
    assert (
        Evaluator(data, again, cache_root=tmp_path / "cache", progress=False).evaluate(SumFusion()).metrics
        == results[2].metrics
    )
    assert (again.images, again.texts) == (0, 0)
    table = markdown_table(results)
    assert "| image-only |" in table and "gallery image; captioner none" in table
    json_path, md_path = write_results(results, tmp_path / "out", "shapes-test1")
    assert [r["method"] for r in json.loads(json_path.read_text())] == ["image-only", "text-only", "sum"]
    assert md_path.read_text() == table


def test_oracles_read_target_captions_and_are_named_oracle(tiny_root, tiny_openclip, tmp_path):
    data = load_shapes(tiny_root, "test")
    captioner = RetrievalCaptioner(tiny_openclip, [_caption(i) for i in range(N_IMAGES)])
    evaluator = Evaluator(data, tiny_openclip, captioner=captioner, cache_root=tmp_path / "cache", progress=False)
    text_oracle = create_method("oracle-target-text", data=data)
    fused_oracle = create_method("oracle-target-fused", data=data)
    assert all("oracle" in m.name and m.protocol()["oracle"] for m in (text_oracle, fused_oracle))
    assert (text_oracle.gallery_mode, fused_oracle.gallery_mode) == ("image", "fused")
    queries = data.queries
    expected = tiny_openclip.embed_texts([_caption(int(q.positives[0][1:])) for q in queries])
    assert torch.allclose(evaluator.query_embeddings(text_oracle, data, queries), expected, atol=1e-5)
    targets = [data.image_paths[q.positives[0]] for q in queries]
    expected = tiny_openclip.embed_pairs(targets, [_caption(int(q.positives[0][1:])) for q in queries])
    assert torch.allclose(evaluator.query_embeddings(fused_oracle, data, queries), expected, atol=1e-5)
    result = evaluator.evaluate(fused_oracle)
    assert result.protocol["gallery_mode"] == "fused" and result.protocol["captioner"] == captioner.describe()
    assert result.protocol["reference_inputs"] == ["image", "fused"]


def test_fused_gallery_without_captioner_fails_clearly(tiny_root, tiny_openclip, tmp_path):
    data = load_shapes(tiny_root, "test")
    with pytest.raises(ConfigError, match="needs a captioner"):
        Evaluator(data, tiny_openclip, cache_root=tmp_path, progress=False).evaluate(ImageOnly(gallery_mode="fused"))

    class NeedsFusedControl(ImageOnly):
        control_mode = "fused"

    with pytest.raises(ConfigError, match="reference embedding mode 'fused'"):
        Evaluator(data, tiny_openclip, cache_root=tmp_path, progress=False).evaluate(NeedsFusedControl())


def test_missing_images_are_counted_and_queries_dropped(tiny_root, tiny_openclip, tmp_path):
    (tiny_root / "imgs" / "s20.png").unlink()  # a gallery distractor
    (tiny_root / "imgs" / "s03.png").unlink()  # the reference of query 103
    data = load_shapes(tiny_root, "test", allow_missing=True)
    assert sorted(data.missing) == ["s03", "s20"]
    result = Evaluator(data, tiny_openclip, cache_root=tmp_path, progress=False).evaluate(ImageOnly())
    assert (
        result.protocol["missing_images"],
        result.protocol["queries_dropped"],
        result.protocol["queries_evaluated"],
    ) == (2, 1, 7)
    assert "103" not in result.rankings["shapes/test1"]
    assert all("s20" not in ids for ids in result.rankings["shapes/test1"].values())
    assert "missing images 2" in result.protocol_line()


def test_method_output_is_checked(tiny_root, tiny_openclip, tmp_path):
    class Broken(ImageOnly):
        name = "broken"

        def query_embeddings(self, context):
            return torch.full((len(context.query_ids), 3), float("nan"))

    data = load_shapes(tiny_root, "test")
    with pytest.raises(DataError, match="method 'broken' returned"):
        Evaluator(data, tiny_openclip, cache_root=tmp_path, progress=False).evaluate(Broken())


def test_fashioniq_both_orders_are_averaged(tmp_path, tiny_openclip):
    root = tmp_path / "fiq"
    ids = [f"B{i:03d}" for i in range(6)]
    entries = [
        {"candidate": ids[i], "target": ids[i + 3], "captions": [f"is {COLOURS[i]}.", f"has {SHAPES[i % 3]}s"]}
        for i in range(3)
    ]
    for sub, payload in (("captions/cap.dress.val.json", entries), ("image_splits/split.dress.val.json", ids)):
        (root / sub).parent.mkdir(parents=True, exist_ok=True)
        (root / sub).write_text(json.dumps(payload))
    gen = torch.Generator().manual_seed(1)
    for i in ids:
        (root / "images").mkdir(exist_ok=True)
        Image.fromarray((torch.rand(32, 32, 3, generator=gen) * 255).byte().numpy()).save(root / "images" / f"{i}.png")
    (unit,) = load_fashioniq(root, "val", categories=["dress"])
    texts, rows = modification_texts(unit.queries, "fashioniq", "both")
    assert texts[0] == "is red and has circles" and texts[3] == "has circles and is red" and rows == [0, 1, 2, 0, 1, 2]

    both = Evaluator(unit, tiny_openclip, cache_root=tmp_path / "c", progress=False)
    forward = Evaluator(
        unit, tiny_openclip, cache_root=tmp_path / "c", fashioniq_caption_order="forward", progress=False
    )
    expected = F.normalize(tiny_openclip.embed_texts(texts[:3]) + tiny_openclip.embed_texts(texts[3:]), dim=-1)
    assert torch.allclose(both.query_embeddings(TextOnly(), unit, unit.queries), expected, atol=1e-5)
    assert torch.allclose(
        forward.query_embeddings(TextOnly(), unit, unit.queries), tiny_openclip.embed_texts(texts[:3]), atol=1e-5
    )
    result = both.evaluate(TextOnly())
    assert set(result.metrics) == {"dress/R@10", "dress/R@50", "avg/R@10", "avg/R@50", "avg"}
    assert result.metrics["dress/R@10"] == 100.0  # 6 gallery images: every target is in the top 10
    assert (
        "both orders" in result.protocol["fashioniq_captions"] and not result.protocol["ranking"]["reference_removed"]
    )
    assert "single order" in forward.evaluate(TextOnly()).protocol["fashioniq_captions"]

    class Reranking(TextOnly):  # re-ranks with one text per query: both orders give two
        rerank_top_k = 3

    with pytest.raises(ConfigError, match="--fiq-caption-order forward"):
        both.evaluate(Reranking())


def test_circo_shared_concept_is_an_option():
    query = CompositionQuery("0", "1", ("is held by a girl",), ("2",), shared_concept="a teddy bear")
    assert modification_texts([query], "circo")[0] == ["is held by a girl"]
    assert modification_texts([query], "circo", circo_shared_concept=True)[0] == ["a teddy bear that is held by a girl"]


def test_registry_errors_are_clear(monkeypatch):
    with pytest.raises(ConfigError, match="Unknown method 'nope'"):
        create_method("nope")
    with pytest.raises(ConfigError, match=r"does not take option\(s\) \['steps'\]"):
        create_method("image-only", steps=3)
    monkeypatch.setitem(registry.METHODS, "later", ("fusion_diff.not_built_yet:Method", "a part not built yet"))
    with pytest.raises(ConfigError, match="cannot be imported .* the other methods still work"):
        create_method("later")
    assert create_method("sum", image_weight=0.25).protocol() == {
        "method": "sum",
        "gallery_mode": "image",
        "image_weight": 0.25,
    }


def test_cli_eval_writes_json_and_markdown(tiny_root, tiny_openclip_checkpoint, tmp_path, capsys):
    name, checkpoint = tiny_openclip_checkpoint
    out = tmp_path / "out"
    argv = ["eval", "--benchmark", "shapes", "--split", "test", "--root", str(tiny_root), "--model", name,
            "--pretrained", str(checkpoint), "--method", "image-only", "--method", "sum", "--set", "image_weight=0.7",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert cli_main(argv) == 0
    records = json.loads((out / "shapes-test1.json").read_text())
    assert [r["method"] for r in records] == ["image-only", "sum"]
    assert records[1]["protocol"]["method"]["image_weight"] == 0.7  # the option went to the method taking it
    backbone = records[1]["protocol"]["backbone"]
    assert backbone["model"] == name and backbone["pretrained"].startswith("sha256:")
    assert "| sum |" in (out / "shapes-test1.md").read_text() and "| sum |" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="needs a captioner"):
        cli_main(argv + ["--gallery-mode", "fused"])


def test_sampling_methods_from_a_saved_pipeline(tiny_root, tiny_openclip, tmp_path):
    """Fusion-Diff and emb2emb load from a pipeline folder through the registry; their protocol reaches the result."""
    from fusion_diff.models import ControlAdapter, FusionPrior, sampling_scheduler
    from fusion_diff.pipelines.fusion_diff import FusionDiffPipeline

    torch.manual_seed(0)
    prior = FusionPrior(embedding_dim=tiny_openclip.dim, hidden_dim=32, num_layers=2, num_heads=2)
    pipeline = FusionDiffPipeline(prior, sampling_scheduler("ddim", prior), ControlAdapter.from_prior(prior, 1))
    pipeline.save_pretrained(tmp_path / "pipeline")
    data = load_shapes(tiny_root, "test")
    captioner = RetrievalCaptioner(tiny_openclip, [_caption(i) for i in range(N_IMAGES)])
    evaluator = Evaluator(data, tiny_openclip, captioner=captioner, cache_root=tmp_path / "cache", progress=False)
    method = create_method("fusion-diff", pipeline=str(tmp_path / "pipeline"), sampler="dpm++", num_inference_steps=2)
    result = evaluator.evaluate(method)
    p = result.protocol["method"]
    assert (p["steps"], p["seed"], p["control_used"], p["sampler"]) == (2, 0, "fused", "dpm++")
    assert {"control_guidance", "text_guidance"} <= set(p) and result.protocol["gallery_mode"] == "fused"
    assert set(result.metrics) >= {"R@1", "Rsubset@1"}
    emb2emb = create_method("emb2emb", pipeline=str(tmp_path / "pipeline"), strength=0.3, gallery_mode="image")
    assert evaluator.evaluate(emb2emb).protocol["method"]["strength"] == 0.3
    with pytest.raises(MissingFileError, match="pipeline folder not found"):
        create_method("fusion-diff", pipeline=str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------- issue 20
def _eval_argv(root: Path, checkpoint: tuple[str, Path], tmp_path: Path, *extra: str) -> list[str]:
    name, path = checkpoint
    return ["eval", "--benchmark", "shapes", "--split", "test", "--root", str(root), "--model", name,
            "--pretrained", str(path), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
            *extra]  # fmt: skip


def test_issue20_eval_refuses_pipeline_of_another_backbone(
    tiny_root, tiny_openclip_checkpoint, tiny_openclip, saved_pipeline, tmp_path
):
    """A prior trained at fusion weight 0.5 is not scored against a 0.6 backbone, neither by the CLI nor the API."""
    from fusion_diff.embedding import OpenCLIPEmbedder

    argv = _eval_argv(tiny_root, tiny_openclip_checkpoint, tmp_path, "--method", "fusion-diff",
                      "--checkpoint", str(saved_pipeline), "--set", "gallery_mode=image",
                      "--set", "num_inference_steps=2")  # fmt: skip
    with pytest.raises(ConfigError, match=r"prior was trained on .*\(differing: \['fusion_weight'\]\)"):
        cli_main(argv + ["--fusion-weight", "0.6"])
    assert not (tmp_path / "cache").exists()  # refused before anything was embedded
    assert cli_main(argv) == 0
    (record,) = json.loads((tmp_path / "out" / "shapes-test1.json").read_text())
    assert record["protocol"]["method"]["embedder"] == tiny_openclip.identity.as_dict()

    other = OpenCLIPEmbedder(tiny_openclip_checkpoint[0], pretrained=tiny_openclip_checkpoint[1], fusion_weight=0.6)
    method = create_method("fusion-diff", pipeline=str(saved_pipeline), gallery_mode="image", num_inference_steps=2)
    evaluator = Evaluator(load_shapes(tiny_root, "test"), other, cache_root=tmp_path / "api", progress=False)
    with pytest.raises(ConfigError, match=r"differing: \['fusion_weight'\]"):
        evaluator.evaluate(method)


def test_issue20_per_method_options(tiny_root, tiny_openclip_checkpoint, saved_pipeline, tmp_path):
    """One command compares baselines and Fusion-Diff: options go to the methods that take them."""
    base = _eval_argv(tiny_root, tiny_openclip_checkpoint, tmp_path, "--method", "image-only", "--method", "sum",
                      "--method", "fusion-diff", "--set", "seed=3", "--set", "sum.image_weight=0.7",
                      "--set", "fusion-diff.num_inference_steps=2",
                      "--set", "fusion-diff.gallery_mode=image")  # fmt: skip
    for weights in (["--checkpoint", str(saved_pipeline)], ["--set", f"fusion-diff.pipeline={saved_pipeline}"]):
        assert cli_main(base + weights) == 0
        written = json.loads((tmp_path / "out" / "shapes-test1.json").read_text())
        records = {r["method"]: r["protocol"]["method"] for r in written}
        assert list(records) == ["image-only", "sum", "fusion-diff"]
        assert records["sum"]["image_weight"] == 0.7 and "seed" not in records["sum"]
        assert (records["fusion-diff"]["steps"], records["fusion-diff"]["seed"]) == (2, 3)
    for bad, message in (
        (["--set", "nope=1"], "none of the methods .* takes 'nope'"),
        (["--set", "image-only.seed=1"], "method 'image-only' does not take 'seed'"),
        (["--set", "fti4cir.checkpoint=x"], "'fti4cir' is not one of the evaluated methods"),
        (["--set", "=1"], "expects KEY=VALUE or METHOD.KEY=VALUE"),
    ):
        with pytest.raises(ConfigError, match=message):
            cli_main(base + ["--checkpoint", str(saved_pipeline)] + bad)
    baselines_only = _eval_argv(tiny_root, tiny_openclip_checkpoint, tmp_path, "--method", "sum")
    with pytest.raises(ConfigError, match="none of .* takes trained weights"):
        cli_main(baselines_only + ["--checkpoint", str(saved_pipeline)])
    with pytest.raises(ConfigError, match="--checkpoint is ambiguous"):
        cli_main(base + ["--method", "fti4cir", "--checkpoint", str(saved_pipeline)])


def test_issue20_missing_targets_cap_recall(tiny_root, tiny_openclip, tmp_path, caplog):
    """Queries whose target image is missing are certain misses: said at load time and in the protocol line."""
    from fusion_diff.benchmarks import load_benchmark
    from fusion_diff.benchmarks.types import BenchmarkData

    (tiny_root / "imgs" / "s09.png").unlink()  # the target of query 101
    (tiny_root / "imgs" / "s02.png").unlink()  # the reference of query 102
    with caplog.at_level("WARNING"):
        (data,) = load_benchmark("shapes", tiny_root, "test", allow_missing=True)
    assert "1 of the 7 evaluated queries have a missing ground truth" in caplog.text and "recall 85.7%" in caplog.text
    result = Evaluator(data, tiny_openclip, cache_root=tmp_path, progress=False).evaluate(ImageOnly())
    p = result.protocol
    assert (p["queries_evaluated"], p["queries_missing_targets"]) == (7, 1)
    assert p["best_possible"]["recall"] == pytest.approx(600 / 7)
    assert all(value <= 600 / 7 + 1e-4 for name, value in result.metrics.items() if name.startswith("R@"))
    assert "queries with a missing target 1 (best possible: recall 85.7%)" in result.protocol_line()

    # CIRCO: several ground truths, AP@K of a query at most min(K, #present) / min(K, #gt).
    query = CompositionQuery("0", "r", ("is blue",), positives=("a", "b", "c", "d"))
    circo = BenchmarkData("circo", "val", [query], ["a", "b", "c", "d"], {}, (), False, missing=["c", "d"])
    assert circo.target_coverage()["best_possible"] == {"mAP@5": 50.0, "mAP@10": 50.0, "mAP@25": 50.0, "mAP@50": 50.0}


def write_tiny_cirr_test(root: Path, n_images: int = 60, n_queries: int = 6) -> Path:
    """A CIRR test1 tree in the official layout (names test1-*, no targets), with generated images."""
    gen = torch.Generator().manual_seed(0)
    names = [f"test1-{i}-0-img0" for i in range(n_images)]
    for name in names:
        path = root / "test1" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((torch.rand(32, 32, 3, generator=gen) * 255).byte().numpy()).save(path)
    queries = [
        {"pairid": 500 + q, "reference": names[q], "caption": f"make it {COLOURS[q]}",
         "img_set": {"id": q, "members": [names[q]] + names[10 + 5 * q : 15 + 5 * q], "reference_rank": 0}}
        for q in range(n_queries)
    ]  # fmt: skip
    for sub, payload in (
        ("cirr/captions/cap.rc2.test1.json", queries),
        ("cirr/image_splits/split.rc2.test1.json", {n: f"./test1/{n}.png" for n in names}),
    ):
        (root / sub).parent.mkdir(parents=True, exist_ok=True)
        (root / sub).write_text(json.dumps(payload))
    return root


def test_issue20_partial_test_submission(tiny_openclip_checkpoint, tmp_path, capsys):
    """A test split with missing images still gives its rankings and a server file for the answerable queries."""
    root = write_tiny_cirr_test(tmp_path / "cirr")
    (root / "test1" / "test1-1-0-img0.png").unlink()  # the reference of query 501
    for member in (20, 21, 22):  # 3 of query 502's 5 candidates: its top-3 cannot be complete
        (root / "test1" / f"test1-{member}-0-img0.png").unlink()
    argv = _eval_argv(root, tiny_openclip_checkpoint, tmp_path, "--method", "image-only", "--allow-missing")
    argv[argv.index("shapes")] = "cirr"
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    (rankings,) = json.loads((out / "cirr-test1.rankings.json").read_text())
    assert sorted(rankings["rankings"]["cirr/test1"]) == ["500", "502", "503", "504", "505"]
    recall = json.loads((out / "image-only.cirr.test1.recall.json").read_text())
    subset = json.loads((out / "image-only.cirr.test1.recall_subset.json").read_text())
    assert sorted(set(recall) - {"version", "metric"}) == ["500", "502", "503", "504", "505"]
    assert sorted(set(subset) - {"version", "metric"}) == ["500", "503", "504", "505"]
    assert "PARTIAL test-server file" in printed and "5 of 6 queries; the other 1 have missing images" in printed
    assert "server will score them as misses" in printed and "cirr/test1 has no ground truth here" in printed
    assert "| method |\n|---|\n| image-only |\n" in printed  # no metric columns on a test split
    validate = ["validate-submission", str(out / "image-only.cirr.test1.recall_subset.json"), "--benchmark", "cirr",
                "--split", "test", "--root", str(root)]  # fmt: skip
    with pytest.raises(DataError, match="2 queries have no entry"):
        cli_main(validate)
    assert cli_main(validate + ["--partial"]) == 0
    assert "valid PARTIAL cirr/test1 submission: 4 of 6 queries" in capsys.readouterr().out
    (out / "cirr-test1.rankings.json").unlink()
    assert cli_main(argv + ["--no-submission"]) == 0
    assert (out / "cirr-test1.rankings.json").is_file()

