"""FusionDiffPipeline: batched two-scale guidance, determinism, unit norm, emb2emb, save/load, methods."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from test_models import one_thread, randomize  # noqa: F401  (one_thread: autouse fixture)

import fusion_diff.pipelines.fusion_diff as pipeline_module
from fusion_diff.embedding.base import EmbedderIdentity, JointEmbedder
from fusion_diff.errors import ConfigError, DataError
from fusion_diff.models import (
    ControlAdapter,
    FusionPrior,
    noise_scheduler,
    predict,
    sampling_scheduler,
    training_target,
)
from fusion_diff.pipelines import Emb2EmbMethod, FusionDiffMethod, FusionDiffPipeline, GuidedDenoiser
from fusion_diff.retrieval.method import QueryContext, RetrievalMethod, mix_toward_reference

D = 16


def make_pipeline(adapter: bool = True, sampler: str = "ddim", **prior_kwargs) -> FusionDiffPipeline:
    """A tiny pipeline with 'trained' (random, non-zero) weights everywhere, adapter projections included."""
    torch.manual_seed(0)
    config = dict(embedding_dim=D, hidden_dim=32, num_layers=3, num_heads=2) | prior_kwargs
    prior = FusionPrior(**config).eval()
    randomize(prior, 1)
    prior.set_standardization(F.normalize(torch.randn(D), dim=0) * 0.3, torch.rand(D) * 0.2 + 0.1)
    control_adapter = None
    if adapter:
        control_adapter = ControlAdapter.from_prior(prior, num_blocks=2).eval()
        randomize(control_adapter, 2)
    pipe = FusionDiffPipeline(prior, sampling_scheduler(sampler, prior), control_adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unit(b: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(b, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
@pytest.mark.parametrize("negative", [False, True])
def test_batched_two_scale_guidance_equals_three_forwards(negative):
    pipe = make_pipeline()
    text, control, neg = unit(5, 1), unit(5, 2), unit(5, 3) if negative else None
    x, t, s_c, s_t = torch.randn(5, D), torch.full((5,), 421), 2.0, 1.5
    guided = GuidedDenoiser(pipe.prior, pipe.adapter, text, control, neg, s_c, s_t)(x, t)

    yes, no = torch.ones(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool)
    uncond_text, drop_uncond_text = (neg, no) if negative else (text, yes)
    u = predict(pipe.prior, pipe.adapter, x, t, uncond_text, control, drop_uncond_text, yes)
    c = predict(pipe.prior, pipe.adapter, x, t, uncond_text, control, drop_uncond_text, no)
    ct = predict(pipe.prior, pipe.adapter, x, t, text, control, no, no)
    torch.testing.assert_close(guided, u + s_c * (c - u) + s_t * (ct - c), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(u, c, atol=1e-3) and not torch.allclose(c, ct, atol=1e-3)  # branches really differ


def test_one_batched_forward_per_step_and_one_step_is_the_guided_z0(monkeypatch):
    pipe = make_pipeline()
    calls = []

    def counting_predict(*args, **kwargs):
        calls.append(args[2].shape[0])  # rows of the noisy sample
        return predict(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "predict", counting_predict)
    text, control = unit(4, 1), unit(4, 2)
    pipe.sample(text, control, num_inference_steps=6, control_guidance=2.0, text_guidance=1.5, generator=gen())
    assert calls == [3 * 4] * 6
    # Equal scales cancel the control-only branch: (1 - s) u + s ct.
    calls.clear()
    pipe.sample(text, control, num_inference_steps=2, control_guidance=1.5, text_guidance=1.5, generator=gen())
    assert calls == [2 * 4] * 2

    # One trailing step starts at t = 999 from pure noise and returns the guided z0 prediction.
    out = pipe.sample(text, control, num_inference_steps=1, control_guidance=2.0, text_guidance=1.5, generator=gen())
    noise = randn_tensor((4, D), generator=gen(), dtype=torch.float32)
    with torch.no_grad():
        z0 = GuidedDenoiser(pipe.prior, pipe.adapter, text, control, None, 2.0, 1.5)(noise, 999)
    torch.testing.assert_close(out.embeddings, F.normalize(pipe.prior.destandardize(z0), dim=-1), atol=1e-5, rtol=1e-5)
    # All scales 1: a single unguided branch.
    calls.clear()
    pipe.sample(text, control, num_inference_steps=2, control_guidance=1.0, text_guidance=1.0, generator=gen())
    assert calls == [4, 4]


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_same_seed_same_embeddings_whatever_the_batch_size(sampler):
    pipe = make_pipeline(sampler=sampler)
    text, control = unit(7, 1), unit(7, 2)
    a = pipe.sample(text, control, generator=gen(3)).embeddings
    assert torch.equal(a, pipe.sample(text, control, generator=gen(3)).embeddings)
    torch.testing.assert_close(a, pipe.sample(text, control, generator=gen(3), batch_size=3).embeddings)
    assert not torch.allclose(a, pipe.sample(text, control, generator=gen(4)).embeddings, atol=1e-4)


def test_outputs_are_unit_norm_and_trajectory_ends_at_the_output():
    pipe = make_pipeline()
    text, control = unit(5, 1), unit(5, 2)
    out = pipe.sample(text, control, num_inference_steps=4, return_trajectory=True, generator=gen())
    assert out.trajectory.shape == (4, 5, D)
    torch.testing.assert_close(out.trajectory[-1], out.embeddings)
    results = [
        out.embeddings,
        out.trajectory.flatten(0, 1),
        pipe.sample(text, control, num_samples=3, mix_reference=0.3, generator=gen()).embeddings,
        pipe.emb2emb(control, text, strength=0.6, generator=gen()).embeddings,
        make_pipeline(adapter=False).sample(text, generator=gen()).embeddings,
    ]
    for embeds in results:
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(len(embeds)))


def test_bf16_autocast_stays_close_to_fp32():
    pipe = make_pipeline()
    text, control = unit(6, 1), unit(6, 2)
    fp32 = pipe.sample(text, control, num_inference_steps=4, generator=gen()).embeddings
    bf16 = pipe.sample(text, control, num_inference_steps=4, generator=gen(), precision="bf16").embeddings
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert (fp32 * bf16).sum(-1).min() > 0.99
    with pytest.raises(ConfigError, match="precision"):
        pipe.sample(text, control, precision="fp8")


def test_num_samples_is_the_renormalised_mean_of_batched_samples():
    pipe = make_pipeline()
    text, control = unit(3, 1), unit(3, 2)
    averaged = pipe.sample(text, control, num_samples=4, generator=gen()).embeddings
    single = pipe.sample(text.repeat_interleave(4, 0), control.repeat_interleave(4, 0), generator=gen()).embeddings
    torch.testing.assert_close(averaged, F.normalize(single.view(3, 4, D).mean(1), dim=-1))
    mixed = pipe.sample(text, control, num_samples=4, mix_reference=0.25, generator=gen()).embeddings
    torch.testing.assert_close(mixed, F.normalize(0.75 * averaged + 0.25 * control, dim=-1))


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_emb2emb_strength(sampler):
    pipe = make_pipeline(adapter=False, sampler=sampler)
    reference, text = unit(4, 1), unit(4, 2)
    torch.testing.assert_close(pipe.emb2emb(reference, text, strength=0.0).embeddings, reference)
    weak = pipe.emb2emb(reference, text, strength=0.3, generator=gen()).embeddings
    strong = pipe.emb2emb(reference, text, strength=1.0, generator=gen()).embeddings
    assert (weak * reference).sum(-1).mean() > (strong * reference).sum(-1).mean()
    with pytest.raises(ConfigError, match="strength"):
        pipe.emb2emb(reference, text, strength=1.5)


@pytest.mark.parametrize("with_adapter", [True, False])
def test_pipeline_save_load_round_trip(tmp_path, with_adapter):
    pipe = make_pipeline(adapter=with_adapter)
    pipe.set_sampler("dpm++")
    pipe.save_pretrained(tmp_path / "pipe")
    assert {p.name for p in (tmp_path / "pipe").iterdir()} >= {
        "prior",
        "scheduler",
        "model_index.json",
        "manifest.json",
    }
    assert (tmp_path / "pipe" / "adapter").is_dir() == with_adapter
    loaded = FusionDiffPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.sampler == "dpm++" and (loaded.adapter is not None) == with_adapter
    text, control = unit(4, 1), unit(4, 2)
    kwargs = dict(control_embeds=control if with_adapter else None, num_inference_steps=3)
    assert torch.equal(
        loaded.sample(text, generator=gen(), **kwargs).embeddings,
        pipe.sample(text, generator=gen(), **kwargs).embeddings,
    )


class FakeEmbedder(JointEmbedder):
    """Deterministic pseudo-embeddings from the item's name: enough to test the wiring."""

    def __init__(self, dim: int = D, model: str = "fake"):
        self._identity = EmbedderIdentity("fake", model, None, dim)

    @property
    def identity(self) -> EmbedderIdentity:
        return self._identity

    def _vec(self, key: str) -> torch.Tensor:
        seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
        return F.normalize(torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)), dim=0)

    def embed_images(self, images, batch_size=64, progress=False):
        return torch.stack([self._vec(f"img:{i}") for i in images])

    def embed_texts(self, texts, batch_size=256, progress=False):
        return torch.stack([self._vec(f"txt:{t}") for t in texts])

    def embed_pairs(self, images, texts, batch_size=64, progress=False):
        return F.normalize(self.embed_images(images) + self.embed_texts(texts), dim=-1)


def context(embedder: JointEmbedder, fused: bool) -> QueryContext:
    images, texts, captions = ["a.png", "b.png"], ["make it red", "remove the star"], ["a square", "a star"]
    return QueryContext(
        embedder=embedder,
        query_ids=["q0", "q1"],
        modification_texts=texts,
        modification_text_embeds=embedder.embed_texts(texts),
        reference_image_embeds=embedder.embed_images(images),
        reference_image_paths=images,
        reference_captions=captions if fused else None,
        reference_fused_embeds=embedder.embed_pairs(images, captions) if fused else None,
    )


def test_call_embeds_with_the_embedder_then_samples():
    pipe = make_pipeline()
    pipe.embedder = FakeEmbedder()
    images, texts, captions = ["a.png", "b.png"], ["make it red", "bigger"], ["a square", "a star"]
    out = pipe(images, texts, reference_captions=captions, generator=gen()).embeddings
    expected = pipe.sample(
        pipe.embedder.embed_texts(texts), pipe.embedder.embed_pairs(images, captions), generator=gen()
    )
    assert torch.equal(out, expected.embeddings)
    with pytest.raises(DataError, match="instructions"):
        pipe(images, texts[:1])


def test_methods_choose_the_control_and_name_their_protocol():
    pipe = make_pipeline()
    pipe.embedder = FakeEmbedder()
    method = FusionDiffMethod(pipe, num_inference_steps=3, control_guidance=2.0, seed=5)
    assert isinstance(method, RetrievalMethod)
    ctx = context(pipe.embedder, fused=True)
    out = method.query_embeddings(ctx)
    expected = pipe.sample(
        ctx.modification_text_embeds,
        ctx.reference_fused_embeds,
        num_inference_steps=3,
        control_guidance=2.0,
        generator=gen(5),
    )
    assert torch.equal(out, expected.embeddings)
    protocol = method.protocol()
    assert protocol["control_used"] == "fused"
    for key in (
        "sampler",
        "steps",
        "control_guidance",
        "text_guidance",
        "num_samples",
        "mix_reference",
        "seed",
        "control_mode",
    ):
        assert key in protocol, key
    method.query_embeddings(context(pipe.embedder, fused=False))
    assert method.protocol()["control_used"] == "image"
    with pytest.raises(DataError, match="captioner"):
        FusionDiffMethod(pipe, control_mode="fused").query_embeddings(context(pipe.embedder, fused=False))

    prior_only = make_pipeline(adapter=False)
    with pytest.raises(ConfigError, match="Emb2EmbMethod"):
        FusionDiffMethod(prior_only)
    emb2emb = Emb2EmbMethod(prior_only, strength=0.4, num_inference_steps=5, seed=1)
    ctx = context(pipe.embedder, fused=True)
    expected = prior_only.emb2emb(
        ctx.reference_fused_embeds, ctx.modification_text_embeds, strength=0.4, num_inference_steps=5, generator=gen(1)
    )
    assert torch.equal(emb2emb.query_embeddings(ctx), expected.embeddings)
    assert emb2emb.protocol()["strength"] == 0.4


def test_mismatched_parts_and_inputs_fail_clearly():
    pipe = make_pipeline()
    with pytest.raises(ConfigError, match="prediction_type"):
        FusionDiffPipeline(pipe.prior, sampling_scheduler("ddim", make_pipeline(prediction_type="epsilon").prior))
    with pytest.raises(ConfigError, match="embedder"):
        FusionDiffPipeline(pipe.prior, pipe.scheduler, pipe.adapter, embedder=FakeEmbedder(dim=D + 1))
    pipe.prior.register_to_config(embedder_identity=FakeEmbedder(model="other").identity.as_dict())
    with pytest.raises(ConfigError, match="model"):
        FusionDiffPipeline(pipe.prior, pipe.scheduler, pipe.adapter, embedder=FakeEmbedder())
    with pytest.raises(DataError, match=r"text_embeds has shape \(3, 8\)"):
        pipe.sample(torch.randn(3, 8), unit(3, 1))
    with pytest.raises(ValueError, match="control_embeds"):
        pipe.sample(unit(3, 1))
    with pytest.raises(ConfigError, match="One-step"):
        make_pipeline(adapter=False, prediction_type="epsilon").sample(unit(3, 1), num_inference_steps=1)


def train_toy_prior(prediction_type: str, steps: int = 300) -> tuple[FusionPrior, torch.Tensor, torch.Tensor]:
    """A tiny prior fitted to two points, each selected by its own text embedding."""
    torch.manual_seed(0)
    d = 8
    points, texts = F.normalize(torch.randn(2, d), dim=-1), F.normalize(torch.randn(2, d), dim=-1)
    prior = FusionPrior(embedding_dim=d, hidden_dim=32, num_layers=2, num_heads=2, prediction_type=prediction_type)
    prior.set_standardization(points.mean(0), points.std(0))
    scheduler = noise_scheduler(prior)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, 2, (128,))
        z0, noise, t = prior.standardize(points[idx]), torch.randn(128, d), torch.randint(0, 1000, (128,))
        out = predict(prior, None, scheduler.add_noise(z0, noise, t), t, texts[idx], drop_text=torch.rand(128) < 0.1)
        loss = F.mse_loss(out, training_target(scheduler, z0, noise, t))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return prior.eval(), points, texts


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_every_prediction_type_samples_the_toy_distribution(prediction_type):
    prior, points, texts = train_toy_prior(prediction_type)
    which = torch.arange(100) % 2
    for sampler in ("ddim", "dpm++"):
        pipe = FusionDiffPipeline(prior, sampling_scheduler(sampler, prior))
        pipe.set_progress_bar_config(disable=True)
        out = pipe.sample(texts[which], num_inference_steps=10, text_guidance=1.0, generator=gen()).embeddings
        cos = out @ points.T
        assert (cos.argmax(-1) == which).float().mean() >= 0.9, sampler
        assert cos.max(-1).values.median() >= 0.95, sampler


def test_mix_toward_reference_is_anchored_in_the_gallerys_space():
    queries = F.normalize(torch.randn(3, D), dim=-1)
    reference = torch.randn(3, D) * 5.0  # any scale: the reference is normalised first
    assert torch.equal(mix_toward_reference(queries, reference, 0.0), queries)
    torch.testing.assert_close(mix_toward_reference(queries, reference, 1.0), F.normalize(reference, dim=-1))
    expected = F.normalize(0.7 * queries + 0.3 * F.normalize(reference, dim=-1), dim=-1)
    torch.testing.assert_close(mix_toward_reference(queries, reference, 0.3), expected)
    with pytest.raises(ConfigError, match="mix_reference"):
        mix_toward_reference(queries, reference, 1.5)

    pipe = make_pipeline()
    pipe.embedder = FakeEmbedder()
    ctx = context(pipe.embedder, fused=True)
    plain = FusionDiffMethod(pipe, num_inference_steps=2, seed=3).query_embeddings(ctx)
    for gallery, anchor in (("fused", ctx.reference_fused_embeds), ("image", ctx.reference_image_embeds)):
        method = FusionDiffMethod(pipe, num_inference_steps=2, seed=3, mix_reference=0.4, gallery_mode=gallery)
        torch.testing.assert_close(method.query_embeddings(ctx), mix_toward_reference(plain, anchor, 0.4))
        assert method.protocol()["mix_anchor"] == ("f(I_ref)" if gallery == "image" else "control")
    with pytest.raises(ConfigError, match="mix_reference"):
        FusionDiffMethod(pipe, mix_reference=-0.1)


def test_issue18_embedders_without_patch_or_token_states_say_so():
    """A backend that keeps its per-patch image or per-token text states to itself refuses, naming the way out."""
    with pytest.raises(ConfigError, match="per-patch image states; use pooled image embeddings"):
        FakeEmbedder().encode_image_tokens(["a.png"])
    with pytest.raises(ConfigError, match="token-level text states; use pooled text"):
        FakeEmbedder().encode_text_tokens(["remove the red circle"], 8)
