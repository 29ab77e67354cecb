"""Re-ranking the first hits by the diffusion loss (issue 18): the pipeline's denoising error as a likelihood, the
shared re-ordering of a search result, and the evaluator and the retriever ranking the same way with it."""

from __future__ import annotations

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from test_eval import tiny_root, write_tiny_benchmark  # noqa: F401  (tiny_root: a fixture)
from test_models import one_thread  # noqa: F401  (autouse fixture)
from test_pipeline import D, gen, make_pipeline, train_toy_prior, unit

from fusion_diff import ComposedRetriever
from fusion_diff.benchmarks import load_shapes
from fusion_diff.benchmarks.evaluate import Evaluator
from fusion_diff.errors import ConfigError
from fusion_diff.models import ControlAdapter, FusionPrior, noise_scheduler, sampling_scheduler
from fusion_diff.pipelines import FusionDiffMethod, FusionDiffPipeline, GuidedDenoiser
from fusion_diff.retrieval.index import SearchResult
from fusion_diff.retrieval.rerank import rerank_hits


def test_denoising_error_is_the_training_loss_with_noise_shared_by_a_querys_candidates():
    pipe = make_pipeline()
    text, control = unit(3, 1), unit(3, 2)
    candidates = unit(12, 3).view(3, 4, D)
    candidates[:, 3] = candidates[:, 1]  # the same candidate twice
    error = pipe.denoising_error(candidates, text, control, timesteps=(100, 700), num_draws=2, generator=gen())
    assert error.shape == (3, 4) and (error > 0).all()
    assert torch.equal(error[:, 3], error[:, 1])  # same draws for every candidate of a query
    chunked = pipe.denoising_error(candidates, text, control, (100, 700), 2, generator=gen(), batch_size=5)
    assert torch.allclose(chunked, error, atol=1e-6)  # the noise is drawn up front: chunks do not change it
    alone = pipe.denoising_error(candidates[:2], text[:2], control[:2], (100, 700), 2, generator=gen())
    assert torch.allclose(alone, error[:2], atol=1e-6)  # drawn query by query: the other queries do not matter
    negative = pipe.denoising_error(candidates, text, control, (100, 700), 2, generator=gen(),
                                    negative_text_embeds=unit(3, 4))  # fmt: skip
    assert not torch.allclose(negative, error)  # the negative text replaces the null text, as in sampling

    one = pipe.denoising_error(candidates[:1, :1], text[:1], control[:1], (500,), 1, 1.0, 1.0, generator=gen())
    noise = randn_tensor((1, 1, D), generator=gen())[0]
    clean, step = pipe.prior.standardize(candidates[0, :1]), torch.tensor([500])
    noisy = noise_scheduler(pipe.prior).add_noise(clean, noise, step)
    with torch.no_grad():
        out = GuidedDenoiser(pipe.prior, pipe.adapter, text[:1], control[:1], None, 1.0, 1.0)(noisy, step)
    assert torch.allclose(one, (out - clean).pow(2).mean(-1, keepdim=True), atol=1e-6)  # a sample-predicting prior


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_the_denoising_error_prefers_the_target_the_condition_asks_for(prediction_type):
    """A prior fitted to two points, each picked by its own text: under text i, point i is the likelier candidate."""
    prior, points, texts = train_toy_prior(prediction_type)
    adapter = ControlAdapter.from_prior(prior, num_blocks=1).eval()  # zero-initialised: the prior's own output
    pipe = FusionDiffPipeline(prior, sampling_scheduler("ddim", prior), adapter)
    candidates = points.unsqueeze(0).expand(2, 2, -1)
    error = pipe.denoising_error(candidates, texts, points.flip(0), (200, 500, 800), 4, 1.0, 1.0, generator=gen())
    assert error.argmin(1).tolist() == [0, 1]


def test_what_the_denoising_error_cannot_score_is_refused():
    with pytest.raises(ConfigError, match="direct regressor"):
        make_pipeline(objective="regression").check_denoising_settings((300,), 1)
    with pytest.raises(ConfigError, match="Control-Adapter"):
        make_pipeline(adapter=False).check_denoising_settings((300,), 1)
    pipe = make_pipeline()
    for timesteps in [(), (1000,), (-1,), (2.5,)]:
        with pytest.raises(ConfigError, match="timesteps"):
            pipe.check_denoising_settings(timesteps, 1)
    with pytest.raises(ConfigError, match="num_draws"):
        pipe.check_denoising_settings((300,), 0)
    with pytest.raises(ConfigError, match="rerank_top_k"):
        FusionDiffMethod(pipe, rerank_top_k=1)
    with pytest.raises(ConfigError, match="direct regressor"):
        FusionDiffMethod(make_pipeline(objective="regression"), rerank_top_k=10)


class ByFirstCoordinate:
    """A re-ranking method whose new score is the candidate's first coordinate."""

    name, rerank_top_k = "fake", 3

    def rerank_scores(self, context, candidates, scores):
        return candidates[..., 0]


def test_rerank_moves_only_the_first_hits_and_keeps_each_positions_score():
    inf = float("inf")
    found = SearchResult(
        scores=torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, -inf, -inf]]),
        indices=torch.tensor([[0, 1, 2, 3], [4, 5, -1, -1]]),
        ids=[["a", "b", "c", "d"], ["e", "f"]],
        items=[[{"id": x} for x in "abcd"], [{"id": x} for x in "ef"]],
    )
    embeddings = torch.tensor([[0.1, 0], [0.3, 0], [0.2, 0], [0.9, 0], [0.0, 0], [1.0, 0]])
    out = rerank_hits(ByFirstCoordinate(), None, found, embeddings, position_scores=True)
    assert out.ids == [["b", "c", "a", "d"], ["f", "e"]]  # "d" is past the first 3: it stays 4th
    assert out.indices.tolist() == [[1, 2, 0, 3], [5, 4, -1, -1]]
    assert [[i["id"] for i in row] for row in out.items] == out.ids
    assert torch.equal(out.scores, found.scores)  # for metrics: each position keeps its score
    assert out.top(1).ids == [["b"], ["f"]]
    served = rerank_hits(ByFirstCoordinate(), None, found, embeddings)  # each hit keeps its own score
    assert served.ids == out.ids
    assert torch.equal(served.scores, torch.tensor([[0.8, 0.7, 0.9, 0.6], [0.4, 0.5, -inf, -inf]]))
    with pytest.raises(ConfigError, match="Qdrant"):
        rerank_hits(ByFirstCoordinate(), None, found, None)


def _saved_pipeline(embedder, tmp_path):
    torch.manual_seed(0)
    prior = FusionPrior(embedding_dim=embedder.dim, hidden_dim=32, num_layers=2, num_heads=2)
    pipeline = FusionDiffPipeline(prior, sampling_scheduler("ddim", prior), ControlAdapter.from_prior(prior, 1))
    pipeline.save_pretrained(tmp_path / "pipeline")
    return FusionDiffPipeline.from_pretrained(tmp_path / "pipeline")


def test_evaluator_and_retriever_rerank_the_same_first_hits(tiny_root, tiny_openclip, tmp_path):  # noqa: F811
    data = load_shapes(tiny_root, "test")
    evaluator = Evaluator(data, tiny_openclip, cache_root=tmp_path / "cache", progress=False)
    pipeline = _saved_pipeline(tiny_openclip, tmp_path)
    options = dict(num_inference_steps=1, control_mode="image", gallery_mode="image")
    plain = evaluator.evaluate(FusionDiffMethod(pipeline, **options)).rankings[data.name]
    weightless = FusionDiffMethod(pipeline, rerank_top_k=5, rerank_weight=0.0, **options)
    assert evaluator.evaluate(weightless).rankings[data.name] == plain  # weight 0: the first stage's order
    method = FusionDiffMethod(pipeline, rerank_top_k=5, rerank_weight=4.0, **options)
    result = evaluator.evaluate(method)
    reranked = result.rankings[data.name]
    assert "top 5 by z(score) - 4.0 z(diffusion loss" in result.protocol["method"]["rerank"]
    assert reranked != plain
    for query, ids in plain.items():  # only the first 5 move
        assert set(reranked[query][:5]) == set(ids[:5]) and reranked[query][5:] == ids[5:]

    retriever = ComposedRetriever(tiny_openclip, method)
    retriever.index_gallery([data.image_paths[g] for g in data.gallery], tmp_path / "index", ids=data.gallery)
    queries = data.queries
    hits = retriever.search(
        [data.image_paths[q.reference] for q in queries], [q.texts[0] for q in queries], k=3,
        exclude=[[q.reference] for q in queries],
    )  # fmt: skip
    assert {q.query_id: [h.id for h in row] for q, row in zip(queries, hits)} == {
        q: ids[:3] for q, ids in reranked.items()
    }
