"""``fusion-diff sample`` on a tiny open_clip backbone, and ``fusion-diff bench`` on tiny sizes."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from test_models import one_thread, randomize  # noqa: F401  (one_thread: autouse fixture)

from fusion_diff.cli import main
from fusion_diff.embedding import EmbeddingCache
from fusion_diff.errors import DataError
from fusion_diff.models import ControlAdapter, FusionPrior, sampling_scheduler
from fusion_diff.pipelines import FusionDiffPipeline

QUERIES = [
    {"id": "q0", "reference": "images/red.png", "instruction": "make it blue", "caption": "a red square"},
    {"id": "q1", "reference": "images/green.png", "instruction": "add a star", "caption": "a green circle"},
]


@pytest.fixture
def saved_pipeline(tmp_path, tiny_openclip):
    torch.manual_seed(0)
    prior = FusionPrior(
        embedding_dim=tiny_openclip.dim,
        hidden_dim=32,
        num_layers=2,
        num_heads=2,
        embedder_identity=tiny_openclip.identity.as_dict(),
    )
    randomize(prior, 1)
    adapter = ControlAdapter.from_prior(prior, num_blocks=1)
    randomize(adapter, 2)
    FusionDiffPipeline(prior, sampling_scheduler("ddim", prior), adapter).save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def write_queries(root, queries) -> None:
    (root / "images").mkdir(exist_ok=True)
    for colour in ("red", "green", "blue"):
        Image.new("RGB", (32, 32), colour).save(root / "images" / f"{colour}.png")
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")


def test_sample_cli_writes_a_resumable_query_cache(
    tmp_path, saved_pipeline, tiny_openclip_checkpoint, tiny_openclip, capsys
):
    name, checkpoint = tiny_openclip_checkpoint
    write_queries(tmp_path, QUERIES)
    out = tmp_path / "queries_cache"
    argv = [
        "sample",
        "--pipeline",
        str(saved_pipeline),
        "--queries",
        str(tmp_path / "queries.jsonl"),
        "--out",
        str(out),
        "--steps",
        "3",
        "--control-guidance",
        "2",
        "--seed",
        "7",
        "--model",
        name,
        "--pretrained",
        str(checkpoint),
    ]
    assert main(argv) == 0
    ids, embeds = EmbeddingCache.read(out).load()
    assert ids == ["q0", "q1"]

    pipe = FusionDiffPipeline.from_pretrained(saved_pipeline, embedder=tiny_openclip)
    pipe.set_progress_bar_config(disable=True)
    images = [tmp_path / q["reference"] for q in QUERIES]
    expected = pipe(
        images,
        [q["instruction"] for q in QUERIES],
        reference_captions=[q["caption"] for q in QUERIES],
        num_inference_steps=3,
        control_guidance=2.0,
        generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(embeds, expected.embeddings, atol=1e-5, rtol=1e-5)

    # A second run samples only the new query; a mix of captioned and uncaptioned references is refused.
    extra = {"id": "q2", "reference": "images/blue.png", "instruction": "smaller", "caption": "a blue star"}
    write_queries(tmp_path, [*QUERIES, extra])
    assert main(argv) == 0
    assert "sampled 1 query" in capsys.readouterr().out
    assert EmbeddingCache.read(out).ids == ["q0", "q1", "q2"]
    write_queries(tmp_path, [*QUERIES, {k: v for k, v in extra.items() if k != "caption"} | {"id": "q3"}])
    with pytest.raises(DataError, match="caption"):
        main(argv)


def test_bench_cli_prints_sampling_and_search_figures(capsys):
    argv = [
        "bench",
        "--queries",
        "8",
        "--steps",
        "2",
        "--dim",
        "16",
        "--gallery",
        "300",
        "--repeats",
        "1",
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "queries/s" in out and "2 steps" in out
    assert "exact" in out and "faiss" in out
