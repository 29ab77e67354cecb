"""Issue 18: the token-level text condition, from the embedding cache through training to one-forward sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_models import one_thread, randomize  # noqa: F401  (one_thread: autouse fixture)
from test_training_loop import QUIET, TINY_PRIOR, adapter_raw

import fusion_diff.pipelines.fusion_diff as pipeline_module
from fusion_diff.embedding.cache import EmbeddingCache
from fusion_diff.errors import CacheMismatchError, DataError, MissingFileError
from fusion_diff.models import ControlAdapter, FusionPrior, predict, sampling_scheduler
from fusion_diff.pipelines import FusionDiffMethod, FusionDiffPipeline, GuidedDenoiser
from fusion_diff.retrieval.method import QueryContext
from fusion_diff.training.config import config_from_dict
from fusion_diff.training.data import PAIR_FIELDS, TRIPLET_FIELDS, write_random_caches
from fusion_diff.training.loop import train

DIM, TOKENS = 16, 6
IDENTITY = {"backend": "random", "model": "gaussian", "pretrained": None, "dim": DIM, "kind": "text"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("token_data")
    write_random_caches(root / "pairs", PAIR_FIELDS, 24, DIM, seed=0, max_text_tokens=TOKENS)
    write_random_caches(root / "triplets", TRIPLET_FIELDS, 24, DIM, seed=1, max_text_tokens=TOKENS)
    return root


def stage1_raw(data: Path, out: Path, max_text_tokens: int | None) -> dict:
    return {
        "task": "prior",
        "output_dir": str(out),
        "model": {**TINY_PRIOR, "max_text_tokens": max_text_tokens},
        "data": {"pair_embeddings": str(data / "pairs")},
        "schedule": {"train_batch_size": 4, "lr_warmup_steps": 0, "max_train_steps": 2},
        "checkpointing": {"every_n_steps": 0},
        "logging": QUIET,
    }


@pytest.fixture(scope="module")
def priors(data, tmp_path_factory) -> dict[str, Path]:
    """Tiny stage-1 outputs: one on token-level captions, one on pooled captions (same caches folder)."""
    out = {}
    for name, tokens in (("tokens", TOKENS), ("pooled", None)):
        out[name] = tmp_path_factory.mktemp(f"stage1_{name}")
        train(config_from_dict(stage1_raw(data, out[name], tokens)))
    return out


def test_token_cache_round_trip_and_refuses_the_other_kind(tmp_path):
    ids = [f"t{i}" for i in range(5)]
    mask = torch.arange(TOKENS)[None] < torch.tensor([[2], [6], [3], [4], [1]])
    states = torch.randn(5, TOKENS, DIM) * mask[..., None]
    cache = EmbeddingCache.open(tmp_path / "tok", {**IDENTITY, "max_text_tokens": TOKENS})
    cache.append(ids[:3], states[:3], mask[:3])
    cache.append(ids[3:], states[3:], mask[3:])
    cache.compact()
    read = EmbeddingCache.read(tmp_path / "tok")
    got_ids, tokens = read.load_tokens(["t4", "t0"])
    assert (
        got_ids == ["t4", "t0"]
        and torch.equal(tokens.mask, mask[[4, 0]])
        and torch.equal(tokens.states, states[[4, 0]])
    )
    assert read.dim == DIM and read.max_text_tokens == TOKENS
    with pytest.raises(CacheMismatchError, match=r"holds token-level text \(max_text_tokens=6\)"):
        read.append(["t9"], torch.randn(1, DIM))  # a pooled vector into a token cache
    with pytest.raises(CacheMismatchError, match="max_text_tokens: cache has 6, requested None"):
        EmbeddingCache.open(tmp_path / "tok", IDENTITY)  # opened as a pooled text cache
    pooled = EmbeddingCache.open(tmp_path / "pooled", IDENTITY)
    with pytest.raises(CacheMismatchError, match="holds one vector per id"):
        pooled.append(ids[:1], states[:1], mask[:1])
    with pytest.raises(CacheMismatchError, match="not token-level text"):
        pooled.load_tokens()


def test_tiny_token_level_stage_1_and_2_train_and_sample(data, priors, tmp_path):
    prior = FusionPrior.from_pretrained(str(priors["tokens"]), subfolder="prior")
    assert (
        prior.text_tokens == TOKENS
        and FusionPrior.from_pretrained(str(priors["pooled"]), subfolder="prior").text_tokens is None
    )
    result = train(config_from_dict(adapter_raw(priors["tokens"], data, tmp_path / "s2", max_train_steps=2)))
    assert result.finished
    pipe = FusionDiffPipeline.from_pretrained(str(tmp_path / "s2"))
    pipe.set_progress_bar_config(disable=True)
    _, tokens = EmbeddingCache.read(data / "triplets/instruction_tokens").load_tokens()
    control = F.normalize(torch.randn(3, DIM), dim=-1)
    kwargs = {"text_attention_mask": tokens.mask[:3], "num_inference_steps": 2}
    out = pipe.sample(tokens.states[:3], control, generator=torch.Generator().manual_seed(0), **kwargs)
    assert out.embeddings.shape == (3, DIM) and torch.isfinite(out.embeddings).all()
    # the masked-out padding is not read: other values there give the same queries
    noisy = tokens.states[:3] + torch.randn(3, TOKENS, DIM) * ~tokens.mask[:3, :, None]
    again = pipe.sample(noisy, control, generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(again.embeddings, out.embeddings, atol=1e-5, rtol=1e-5)
    with pytest.raises(DataError, match=r"is pooled text .* trained on token-level text \(max_text_tokens=6\)"):
        pipe.sample(F.normalize(torch.randn(3, DIM), dim=-1), control)


def test_token_caches_refuse_pooled_pipelines_and_vice_versa(data, priors, tmp_path):
    raw = adapter_raw(priors["pooled"], data, tmp_path / "a", max_train_steps=1)
    raw["model"]["max_text_tokens"] = TOKENS
    with pytest.raises(
        CacheMismatchError,
        match=rf"asks for token-level text .* prior at {priors['pooled']} was trained on pooled text",
    ):
        train(config_from_dict(raw))
    raw = adapter_raw(priors["tokens"], data, tmp_path / "b", max_train_steps=1)
    raw["model"]["max_text_tokens"] = 0
    with pytest.raises(
        CacheMismatchError, match=r"asks for pooled text .* trained on token-level text \(max_text_tokens=6\)"
    ):
        train(config_from_dict(raw))
    # A token cache of another length than the prior's, for stage 2 and for stage 1.
    short = tmp_path / "short"
    write_random_caches(short, TRIPLET_FIELDS, 8, DIM, seed=1, max_text_tokens=4)
    raw = adapter_raw(priors["tokens"], data, tmp_path / "c", max_train_steps=1)
    raw["data"]["triplet_embeddings"] = str(short)
    with pytest.raises(
        CacheMismatchError,
        match=rf"prior at {priors['tokens']} conditions on token-level text \(max_text_tokens=6\) but the text cache "
        rf"{short / 'instruction_tokens'} holds token-level text \(max_text_tokens=4\)",
    ):
        train(config_from_dict(raw))
    with pytest.raises(
        CacheMismatchError,
        match=r"conditions on token-level text \(max_text_tokens=8\) .* holds token-level text \(max_text_tokens=6\)",
    ):
        train(config_from_dict(stage1_raw(data, tmp_path / "d", 8)))
    pooled_only = tmp_path / "pooled_only"
    write_random_caches(pooled_only, PAIR_FIELDS, 8, DIM)
    with pytest.raises(MissingFileError, match=r"No token-level text cache at .*text_tokens"):
        train(config_from_dict(stage1_raw(pooled_only, tmp_path / "e", TOKENS)))


def token_pipeline(dim: int = DIM, max_text_tokens: int = TOKENS) -> FusionDiffPipeline:
    torch.manual_seed(0)
    prior = FusionPrior(embedding_dim=dim, hidden_dim=32, num_layers=3, num_heads=2, max_text_tokens=max_text_tokens)
    randomize(prior.eval(), 1)
    adapter = ControlAdapter.from_prior(prior, num_blocks=2).eval()
    randomize(adapter, 2)
    pipe = FusionDiffPipeline(prior, sampling_scheduler("ddim", prior), adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_token_level_guidance_is_one_forward_and_equals_the_three_branches(monkeypatch):
    pipe = token_pipeline()
    text, mask = torch.randn(4, 5, DIM), torch.arange(5)[None] < torch.tensor([[2], [5], [3], [1]])
    neg, neg_mask = torch.randn(4, 3, DIM), torch.arange(3)[None] < torch.tensor([[1], [3], [2], [2]])
    control, x, t, s_c, s_t = (
        F.normalize(torch.randn(4, DIM), dim=-1),
        torch.randn(4, DIM),
        torch.full((4,), 300),
        2.0,
        1.5,
    )
    guided = GuidedDenoiser(pipe.prior, pipe.adapter, text, control, neg, s_c, s_t, 1.0, mask, neg_mask)(x, t)
    yes, no = torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    u = predict(pipe.prior, pipe.adapter, x, t, neg, control, no, yes, text_attention_mask=neg_mask)
    c = predict(pipe.prior, pipe.adapter, x, t, neg, control, no, no, text_attention_mask=neg_mask)
    ct = predict(pipe.prior, pipe.adapter, x, t, text, control, no, no, text_attention_mask=mask)
    torch.testing.assert_close(guided, u + s_c * (c - u) + s_t * (ct - c), atol=1e-5, rtol=1e-5)

    calls = []

    def counting_predict(*args, **kwargs):
        calls.append((args[2].shape[0], kwargs["text_attention_mask"].shape))
        return predict(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "predict", counting_predict)
    pipe.sample(text, control, text_attention_mask=mask, num_inference_steps=3, control_guidance=2.0, text_guidance=1.5)
    assert calls == [(3 * 4, (3 * 4, 5))] * 3  # one forward per step, the three branches stacked


def test_method_encodes_instructions_at_token_level_in_one_forward(tiny_openclip, monkeypatch):
    pipe = token_pipeline(dim=tiny_openclip.dim, max_text_tokens=12)
    texts = ["remove the red circle", "add a small green square at the top"]
    context = QueryContext(
        embedder=tiny_openclip,
        query_ids=["q0", "q1"],
        modification_texts=texts,
        modification_text_embeds=tiny_openclip.embed_texts(texts),
        reference_image_embeds=F.normalize(torch.randn(2, tiny_openclip.dim), dim=-1),
        reference_image_paths=[Path("a.png"), Path("b.png")],
    )
    forwards = []
    encode = tiny_openclip._encode_text_tokens
    monkeypatch.setattr(
        tiny_openclip, "_encode_text_tokens", lambda batch, n: forwards.append(len(batch)) or encode(batch, n)
    )
    method = FusionDiffMethod(pipe, num_inference_steps=2, negative_text="a scene")
    queries = method.query_embeddings(context)
    assert forwards == [2, 1] and method.protocol()["text_condition"] == "tokens<=12"
    tokens = tiny_openclip.encode_text_tokens(texts, 12)
    assert tokens.mask.sum(1).tolist() == [6, 10]
    expected = pipe.sample(
        tokens.states[:, :10],
        context.reference_image_embeds,
        negative_text_embeds=pipe.encode_text(["a scene"], tiny_openclip).states.expand(2, -1, -1),
        negative_text_attention_mask=pipe.encode_text(["a scene"], tiny_openclip).mask.expand(2, -1),
        text_attention_mask=tokens.mask[:, :10],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).embeddings
    torch.testing.assert_close(queries, expected)


@pytest.mark.slow
def test_text_condition_script_compares_both_variants_at_toy_sizes(tmp_path, monkeypatch, capsys):
    """scripts/text_condition_compare.py: both variants through the demo's own steps, on shared data."""
    import json
    import runpy
    import sys

    from test_demo import toy_demo_config

    _, config = toy_demo_config(tmp_path)
    script = Path(__file__).resolve().parents[1] / "scripts" / "text_condition_compare.py"
    out = tmp_path / "compare"
    argv = [str(script), "--config", str(config), "--out", str(out), "--max-text-tokens", "8", "--val-queries", "12"]
    monkeypatch.setattr(sys, "argv", [*argv, "--captioner", "scene"])
    runpy.run_path(str(script), run_name="__main__")
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"tokens<=8", "pooled"}
    assert results["tokens<=8"]["protocol"]["method"]["text_condition"] == "tokens<=8"
    assert results["pooled"]["protocol"]["method"]["text_condition"] == "pooled"
    for shared in ("pair_embeddings", "captioner"):
        assert (out / "tokens" / shared).resolve() == (out / "pooled" / shared).resolve()
    assert "| tokens<=8 |" in capsys.readouterr().out
