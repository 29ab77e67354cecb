"""``fusion-diff serve``: input checks, the batched service, and the page's API through ``gradio_client``.

The served world: a tiny shapes-world benchmark (12 test queries, a 72-image gallery), the tiny random
open_clip of conftest, a random Fusion-Diff pipeline, a caption-bank captioner and an FTI4CIR mapper,
composed into a saved ``ComposedRetriever`` with a persisted index (what `make demo` leaves, in small).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("gradio", reason="the serve extra is not installed: pip install -e '.[serve]'")

from data_synth.shapes.benchmark import BenchmarkConfig, write_benchmark
from data_synth.shapes.captions import canonical_caption
from data_synth.shapes.scene import sample_scene
from fusion_diff.benchmarks import load_shapes
from fusion_diff.embedding import OpenCLIPEmbedder
from fusion_diff.errors import DataError, FusionDiffError, MissingFileError
from fusion_diff.models import ControlAdapter, FusionPrior, sampling_scheduler
from fusion_diff.pipelines import FusionDiffPipeline
from fusion_diff.retrieval import ComposedRetriever
from fusion_diff.serve import inputs
from fusion_diff.serve.inputs import check_text, read_reference
from fusion_diff.serve.service import (
    BenchmarkQuery,
    QuerySettings,
    SearchRequest,
    service_from_demo,
    service_from_folder,
)

K = 10


@dataclass
class ServeWorld:
    root: Path
    retriever: Path
    benchmark: Path
    fti4cir: Path
    model_configs: Path
    query: BenchmarkQuery  # a test query whose target the library's image-only ranking puts in the top K


def _caption_bank(path: Path, count: int = 40) -> Path:
    """Captions of random scenes (never the benchmark's own captions): the captioner's bank."""
    rng = random.Random(7)
    path.write_text("\n".join(canonical_caption(sample_scene(rng)) for _ in range(count)) + "\n", encoding="utf-8")
    return path


def build_serve_world(root: Path, model_name: str, checkpoint: Path) -> ServeWorld:
    from test_fti4cir import _mapper

    write_benchmark(root / "benchmark", BenchmarkConfig(val_queries=2, test_queries=12, seed=0), workers=1,
                    progress=False)  # fmt: skip
    unit = load_shapes(root / "benchmark", "test")
    embedder = OpenCLIPEmbedder(model_name, pretrained=checkpoint)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        prior = FusionPrior(embedding_dim=embedder.dim, hidden_dim=32, num_layers=2, num_heads=2,
                            prediction_type="sample", embedder_identity=embedder.identity.as_dict())  # fmt: skip
        adapter = ControlAdapter.from_prior(prior, num_blocks=1)
        for parameter in adapter.parameters():  # leave zero-init: the control then changes the query
            torch.nn.init.normal_(parameter, std=0.05)
    FusionDiffPipeline(prior, sampling_scheduler("ddim", prior), adapter).save_pretrained(root / "pipeline")
    _mapper(embedder).save_pretrained(root / "fti4cir")
    retriever = ComposedRetriever(
        {"backend": "openclip", "model_name": model_name, "pretrained": str(checkpoint)},
        method="fusion-diff",
        method_options={"pipeline": str(root / "pipeline"), "num_inference_steps": 1, "num_samples": 2},
        captioner={"type": "retrieval", "bank": str(_caption_bank(root / "bank.txt"))},
    )
    paths = [unit.image_paths[i] for i in unit.gallery]
    retriever.index_gallery(paths, root / "retriever" / "index", ids=unit.gallery)
    retriever.save_pretrained(root / "retriever")
    # The known query: the first whose target the library itself ranks in the top K with image-only, the
    # reference not excluded (as for an upload; excluding it only moves the target up). The random backbone is no
    # retriever: tests on it prove that the page shows the library's ranking, not that the ranking is good.
    for query in unit.queries:
        hits = retriever.search([unit.image_paths[query.reference]], [query.texts[0]], k=K, method="image-only",
                                gallery_mode="fused")[0]  # fmt: skip
        if query.positives[0] in [hit.id for hit in hits]:
            known = BenchmarkQuery(query.query_id, query.reference, unit.image_paths[query.reference], query.texts[0],
                              query.positives[0])  # fmt: skip
            break
    else:
        raise AssertionError("no test query of the tiny world has its target in the image-only top 10")
    configs = checkpoint.parent / "model_configs"  # where conftest registered the tiny architecture
    return ServeWorld(root, root / "retriever", root / "benchmark", root / "fti4cir", configs, known)


@pytest.fixture(scope="session")
def serve_world(tmp_path_factory, tiny_openclip_checkpoint) -> ServeWorld:
    name, checkpoint = tiny_openclip_checkpoint
    return build_serve_world(tmp_path_factory.mktemp("serve_world"), name, Path(checkpoint))


@pytest.fixture(scope="module")
def service(serve_world):
    return service_from_folder(serve_world.retriever, serve_world.benchmark, serve_world.fti4cir)


# --------------------------------------------------------------------------- input checks
def test_reference_checks_name_the_problem(tmp_path, monkeypatch):
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    with pytest.raises(DataError, match="notes.png is not an image"):
        read_reference(text_file)
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), "red").save(good)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match="cut.png is damaged"):
        read_reference(truncated)
    huge = tmp_path / "huge.png"
    Image.new("1", (10_000, 5_000)).save(huge)  # 50 MP, a few kB on disk: refused before decoding
    with pytest.raises(DataError, match="10000 x 5000 pixels"):
        read_reference(huge)
    with pytest.raises(DataError, match="No reference image"):
        read_reference(None)
    assert read_reference(good).size == (40, 30)
    with pytest.raises(DataError, match="modification text is empty"):
        check_text("   ")
    assert check_text("", "negative text", required=False) == ""
    with pytest.raises(DataError, match="characters"):
        check_text("x" * (inputs.MAX_TEXT_CHARS + 1))


# --------------------------------------------------------------------------- the service
def test_batch_runs_as_one_call_per_setting_and_bad_requests_get_messages(service, serve_world, tmp_path):
    query = serve_world.query
    settings = service.defaults
    good = [
        SearchRequest(str(query.reference_path), query.text, settings, reference_id=query.reference_id),
        SearchRequest(str(query.reference_path), "make everything green", settings),
    ]
    bad = tmp_path / "bad.txt"
    bad.write_text("hello")
    requests = [good[0], SearchRequest(str(bad), "x", settings), good[1], SearchRequest(str(query.reference_path), "")]
    responses = service.search(requests)
    assert [r.ok for r in responses] == [True, False, True, False]
    assert "bad.txt is not an image" in responses[1].message and "text is empty" in responses[3].message
    first, second = responses[0].rankings[0], responses[2].rankings[0]
    assert first.batch_size == second.batch_size == 2 and len(first.hits) == K  # one retriever call for both
    assert query.reference_id not in [hit.id for hit in first.hits]  # a gallery reference leaves its own ranking
    assert responses[0].reference_caption  # the captioner's caption of the reference
    alone = service.search([SearchRequest(str(query.reference_path), query.text, settings,
                                          reference_id=query.reference_id)])[0]  # fmt: skip
    assert [h.id for h in alone.rankings[0].hits] == [h.id for h in first.hits]  # batching changes nothing
    assert [h.score for h in alone.rankings[0].hits] == pytest.approx([h.score for h in first.hits], abs=1e-5)


def test_side_by_side_negative_text_and_the_joint_space_picture(service, serve_world):
    query = serve_world.query
    request = SearchRequest(str(query.reference_path), query.text, service.defaults, compare="fti4cir",
                            reference_id=query.reference_id, target_id=query.target_id)  # fmt: skip
    response = service.search([request])[0]
    assert [r.method for r in response.rankings] == ["fusion-diff", "fti4cir"]
    assert all(len(r.hits) == K for r in response.rankings)
    negative = SearchRequest(str(query.reference_path), query.text, service.defaults, negative_text="a red circle")
    plain = SearchRequest(str(query.reference_path), query.text, service.defaults)
    with_negative, without = service.search([negative, plain])
    assert with_negative.rankings[0].batch_size == 1  # another setting: its own call
    assert [h.score for h in with_negative.rankings[0].hits] != [h.score for h in without.rankings[0].hits]
    figure = service.joint_space_figure(response)
    assert figure.stat().st_size > 0 and Image.open(figure).size[0] > 300


def test_shared_noise_makes_a_query_independent_of_its_batch(serve_world):
    """The page samples every query from one noise block, so a query batched with others gets the answer it
    gets alone; with independent noise per query (the evaluation's default) it does not."""
    from fusion_diff.baselines.registry import load_pipeline

    pipeline = load_pipeline(serve_world.root / "pipeline")
    gen = torch.Generator().manual_seed(1)
    text, control = torch.randn(3, 32, generator=gen), torch.randn(3, 32, generator=gen)

    def sample(rows: slice, shared: bool) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        out = pipeline.sample(text[rows], control[rows], num_inference_steps=1, num_samples=4, shared_noise=shared,
                              generator=generator)  # fmt: skip
        return out.embeddings

    assert torch.allclose(sample(slice(0, 3), True)[2], sample(slice(2, 3), True)[0], atol=1e-6)
    assert not torch.allclose(sample(slice(0, 3), False)[2], sample(slice(2, 3), False)[0], atol=1e-3)


def test_page_identity_methods_and_test_queries(service, serve_world):
    text = service.describe()
    assert str(serve_world.retriever) in text and "72 items" in text and "fd-test-tiny" in text
    assert set(service.methods()) == {"fusion-diff", "fti4cir", "image-only", "sum"}
    assert service.defaults.num_samples == 2 and service.defaults.gallery_mode == "fused"  # the retriever's own
    assert serve_world.query.query_id in {q.query_id for q in service.test_queries}
    assert len(service.gallery_items()) == 72 and Path(service.gallery_items()[0].path).is_file()


def test_the_demo_folder_is_served_with_its_benchmark_and_fti4cir(serve_world, tmp_path):
    """`fusion-diff serve` with no arguments serves runs/demo: its retriever, test queries and FTI4CIR."""
    demo = tmp_path / "runs" / "demo"
    demo.mkdir(parents=True)
    for name in ("retriever", "benchmark", "fti4cir"):
        (demo / name).symlink_to(serve_world.root / name, target_is_directory=True)
    service = service_from_demo(demo)
    assert "fti4cir" in service.methods() and service.test_queries
    assert service.source == str(demo / "retriever")


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(MissingFileError, match="make demo"):
        service_from_demo(tmp_path / "runs" / "demo")
    with pytest.raises(MissingFileError, match="Retriever folder not found"):
        service_from_folder(tmp_path / "nowhere")


# --------------------------------------------------------------------------- the page's API (gradio_client)
@pytest.fixture(scope="module")
def page(service):
    from fusion_diff.serve import build_app, launch
    from fusion_diff.serve.testing import free_port

    app = build_app(service)
    port = free_port()
    launch(app, service, port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


def _arguments(reference, text, settings: QuerySettings, reference_id="", target_id="") -> list:
    """The /search endpoint's inputs, in the page's order."""
    from gradio_client import handle_file

    s = settings
    knobs = [s.num_inference_steps, s.control_guidance, s.text_guidance, s.num_samples, s.mix_reference]
    return [handle_file(str(reference)), reference_id, target_id, text, "", s.method, "(none)", s.k, *knobs,
            s.gallery_mode]  # fmt: skip


def _ask(client, reference, text, method="image-only", k=K, reference_id="", target_id=""):
    settings = QuerySettings.library(method=method, k=k)
    return client.predict(*_arguments(reference, text, settings, reference_id, target_id), api_name="/search")


def test_gradio_client_query_returns_k_results_and_bad_input_a_message(page, serve_world, tmp_path):
    from gradio_client import Client

    client = Client(page, verbose=False)
    query = serve_world.query
    status, caption, header, results, _, second = _ask(client, query.reference_path, query.text, k=7,
                                                       reference_id=query.reference_id)  # fmt: skip
    assert len(results) == 7 and not second and "image-only" in header and status.startswith("Answered in")
    assert all(item["caption"].startswith(f"#{n} · ") for n, item in enumerate(results, start=1))
    assert caption  # the reference's caption from the retriever's captioner
    bad = tmp_path / "report.pdf"
    bad.write_bytes(b"%PDF-1.4 not an image")
    status, _, _, results, _, _ = _ask(client, bad, query.text)
    assert "report.pdf is not an image" in status and results == []
    status, _, _, results, _, _ = _ask(client, query.reference_path, "  ", method="fusion-diff")
    assert "modification text is empty" in status and results == []
    huge = tmp_path / "huge.png"
    Image.new("1", (10_000, 5_000)).save(huge)
    assert "10000 x 5000 pixels" in _ask(client, huge, query.text)[0]
    # the server kept serving: the known query again, now marking its true target
    _, _, header, results, _, _ = _ask(client, query.reference_path, query.text, reference_id=query.reference_id,
                                       target_id=query.target_id)  # fmt: skip
    assert len(results) == K and any(item["caption"].startswith("★ TRUE TARGET") for item in results)
    assert f"true target `{query.target_id}` at rank" in header


def test_queries_sent_together_are_answered_as_one_batch(page, service):
    """Six visitors at once: the first query runs alone, the others queue and run as one batch (Gradio's
    batch=True), and each gets the answer it would have got alone."""
    from gradio_client import Client

    client = Client(page, verbose=False)
    d = service.defaults
    queries = service.test_queries[:6]
    jobs = [client.submit(*_arguments(q.reference_path, q.text, d, reference_id=q.reference_id), api_name="/search")
            for q in queries]  # fmt: skip
    answers = [job.result(timeout=120) for job in jobs]
    assert any("(batch of" in header for _, _, header, *_ in answers)
    for q, (_, _, _, results, _, _) in zip(queries, answers, strict=True):
        alone = service.search([SearchRequest(str(q.reference_path), q.text, d, reference_id=q.reference_id)])[0]
        assert [item["caption"].rsplit(" · ", 1)[-1] for item in results] == [h.id for h in alone.rankings[0].hits]


def test_a_retriever_of_another_embedder_is_refused_on_the_page(page, service, serve_world, tmp_path):
    """A retriever folder whose embedder is not the one its index was built with, loaded through the page: a
    message naming the mismatch, and the old retriever serves on."""
    from gradio_client import Client

    from fusion_diff.captioning import create_captioner
    from fusion_diff.embedding.factory import create_embedder

    config = json.loads((serve_world.retriever / "retriever.json").read_text())
    config["index"]["path"] = str((serve_world.retriever / config["index"]["path"]).resolve())
    spec = {**config["embedder"]["spec"], "fusion_weight": 0.25}  # another joint space than the index's
    embedder = create_embedder(spec)
    config["embedder"] = {"spec": spec, "identity": embedder.identity.as_dict()}
    config["captioner"]["identity"] = create_captioner(config["captioner"]["spec"], embedder).identity
    other = tmp_path / "other"
    other.mkdir()
    (other / "retriever.json").write_text(json.dumps(config))
    with pytest.raises(FusionDiffError, match="fusion_weight"):  # the prior or the index refuses it, naming both
        service_from_folder(other)
    client = Client(page, verbose=False)
    _, _, status = client.predict(str(other), api_name="/load_retriever")
    assert "Could not load" in status and "fusion_weight" in status and "Still serving" in status
    assert service.source == str(serve_world.retriever)
    assert len(_ask(client, serve_world.query.reference_path, serve_world.query.text)[3]) == K
