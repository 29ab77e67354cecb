"""FusionPrior and ControlAdapter: zero-init identity, weight copies, save/load, standardisation, text handling."""

from __future__ import annotations

import pytest
import torch

from fusion_diff.errors import ConfigError, DataError
from fusion_diff.models import (
    ControlAdapter,
    FusionPrior,
    default_num_blocks,
    noise_scheduler,
    predict,
    predicted_sample,
    sampling_scheduler,
    training_target,
)
from fusion_diff.models.control_adapter import _adapter_num_parameters

D, TEXT_D = 16, 12


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second thread only adds synchronisation cost (and contention on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Perturb every parameter, as training would (zero-initialised layers included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def tiny_prior(seed: int = 0, **kwargs) -> FusionPrior:
    torch.manual_seed(seed)
    config = dict(embedding_dim=D, text_embed_dim=TEXT_D, hidden_dim=32, num_layers=4, num_heads=2) | kwargs
    prior = FusionPrior(**config).eval()
    randomize(prior, seed + 1)
    prior.set_standardization(torch.randn(D) * 0.1, torch.rand(D) + 0.5)
    return prior


def inputs(b: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(b, D, generator=gen),
        "timestep": torch.randint(0, 1000, (b,), generator=gen),
        "text_embeds": torch.randn(b, TEXT_D, generator=gen),
        "control_embeds": torch.randn(b, D, generator=gen),
        "drop_text": torch.arange(b) % 3 == 0,
        "drop_control": torch.arange(b) % 2 == 0,
    }


@torch.no_grad()
def test_fresh_adapter_leaves_prior_output_bit_identical():
    prior = tiny_prior()
    x = inputs()
    expected = prior(x["sample"], x["timestep"], x["text_embeds"], drop_text=x["drop_text"]).sample
    adapter = ControlAdapter.from_prior(prior, num_blocks=2)
    assert torch.equal(predict(prior, adapter, **x), expected)
    assert torch.equal(predict(prior, adapter, **x, conditioning_scale=3.0), expected)
    # The check can fail: once the zero-initialised residual projections train, the output moves.
    randomize(adapter.residual_projs, seed=7)
    assert not torch.allclose(predict(prior, adapter, **x), expected, atol=1e-4)


def test_from_prior_copies_the_first_blocks():
    prior = tiny_prior()
    adapter = ControlAdapter.from_prior(prior, num_blocks=3)
    assert len(adapter.blocks) == 3
    for copy, original in zip(adapter.blocks, prior.blocks):
        for (name, a), (_, b) in zip(copy.state_dict().items(), original.state_dict().items()):
            assert torch.equal(a, b), name
            assert a.data_ptr() != b.data_ptr()  # copies, not shared: training the adapter leaves the prior alone
    for proj in [adapter.control_proj, *adapter.residual_projs]:
        assert all(torch.count_nonzero(p) == 0 for p in proj.parameters())
    with pytest.raises(ConfigError, match="num_blocks"):
        ControlAdapter.from_prior(prior, num_blocks=5)


def test_default_num_blocks_is_the_largest_within_a_quarter_of_the_prior():
    prior = FusionPrior()  # the default config
    k = default_num_blocks(prior)
    adapter = ControlAdapter.from_prior(prior)
    assert adapter.config.num_blocks == k
    assert adapter.num_parameters() == _adapter_num_parameters(prior, k)
    assert adapter.num_parameters() <= 0.25 * prior.num_parameters()
    assert k == prior.config.num_layers or _adapter_num_parameters(prior, k + 1) > 0.25 * prior.num_parameters()


@torch.no_grad()
def test_prior_and_adapter_save_load_round_trip(tmp_path):
    prior = tiny_prior(embedder_identity={"backend": "openclip", "model": "tiny", "pretrained": None, "dim": D})
    adapter = ControlAdapter.from_prior(prior, num_blocks=2)
    randomize(adapter, seed=3)
    prior.save_pretrained(tmp_path / "prior")
    adapter.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "prior" / "diffusion_pytorch_model.safetensors").is_file()
    prior2 = FusionPrior.from_pretrained(tmp_path / "prior").eval()
    adapter2 = ControlAdapter.from_pretrained(tmp_path / "adapter").eval()
    assert prior2.config.embedder_identity == prior.config.embedder_identity
    assert torch.equal(prior2.embedding_std, prior.embedding_std)
    x = inputs()
    assert torch.equal(predict(prior2, adapter2, **x), predict(prior, adapter, **x))


def test_standardization_round_trip_and_errors():
    prior = FusionPrior(embedding_dim=4, hidden_dim=8, num_layers=1, num_heads=2)
    prior.set_standardization(torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.5, 1.0, 0.0, 2.0]))
    assert prior.embedding_std[2] > 0  # a constant dimension is floored, not divided by zero
    z = torch.randn(3, 4)
    torch.testing.assert_close(prior.destandardize(prior.standardize(z)), z)
    with pytest.raises(DataError, match="shape"):
        prior.set_standardization(torch.zeros(5), torch.ones(5))
    with pytest.raises(DataError, match="NaN"):
        prior.set_standardization(torch.full((4,), float("nan")), torch.ones(4))
    with pytest.raises(ConfigError, match="prediction_type"):
        FusionPrior(prediction_type="score")


@torch.no_grad()
def test_dropped_text_uses_the_null_embedding():
    prior = tiny_prior()
    x = inputs()
    drop = torch.ones(6, dtype=torch.bool)
    a = prior(x["sample"], x["timestep"], x["text_embeds"], drop_text=drop).sample
    b = prior(x["sample"], x["timestep"], torch.randn(6, TEXT_D), drop_text=drop).sample
    null = prior.null_text_embedding.expand(6, -1)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, prior(x["sample"], x["timestep"], null).sample)


@torch.no_grad()
def test_token_level_text_with_padding_mask():
    prior = tiny_prior(max_text_tokens=4)
    x = inputs(b=2)
    tokens = torch.randn(2, 3, TEXT_D)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = prior(x["sample"], x["timestep"], tokens, text_attention_mask=mask).sample
    changed = tokens.clone()
    changed[0, 2] += 5.0  # a padded token: must not matter
    assert torch.equal(out[0], prior(x["sample"], x["timestep"], changed, text_attention_mask=mask).sample[0])
    changed[1, 2] += 5.0  # a real token: must matter
    assert not torch.allclose(out[1], prior(x["sample"], x["timestep"], changed, text_attention_mask=mask).sample[1])
    # Pooled text still works on a token-level prior; more tokens than it was built for is refused.
    assert prior(x["sample"], x["timestep"], x["text_embeds"]).sample.shape == (2, D)
    with pytest.raises(ConfigError, match="max_text_tokens"):
        prior(x["sample"], x["timestep"], torch.randn(2, 5, TEXT_D))


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_training_target_is_what_the_samplers_decode(prediction_type, sampler):
    """A model that outputs the exact training target lets every sampler recover z0 at any step."""
    prior = FusionPrior(embedding_dim=D, hidden_dim=8, num_layers=1, num_heads=2, prediction_type=prediction_type)
    train = noise_scheduler(prior)
    scheduler = sampling_scheduler(sampler, prior)
    scheduler.set_timesteps(10)
    z0, noise = torch.randn(4, D), torch.randn(4, D)
    latents = None
    for t in scheduler.timesteps:
        ts = t.repeat(4)
        latents = train.add_noise(z0, noise, ts) if latents is None else latents
        target = training_target(train, z0, noise, ts)
        latents = scheduler.step(target, t, latents).prev_sample
    torch.testing.assert_close(latents, z0, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_predicted_sample_inverts_the_training_target(prediction_type):
    """The z0 estimate behind stage 2's contrastive term: exact when the output is the training target."""
    prior = FusionPrior(embedding_dim=D, hidden_dim=8, num_layers=1, num_heads=2, prediction_type=prediction_type)
    scheduler = noise_scheduler(prior)
    z0, noise = torch.randn(6, D), torch.randn(6, D)
    timesteps = torch.tensor([0, 10, 200, 500, 800, 990])  # not the last step: epsilon divides by sqrt(a_T) ~ 0
    noisy = scheduler.add_noise(z0, noise, timesteps)
    output = training_target(scheduler, z0, noise, timesteps)
    torch.testing.assert_close(predicted_sample(scheduler, noisy, output, timesteps), z0, atol=1e-3, rtol=1e-3)
