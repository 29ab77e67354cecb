"""FTI4CIR: pseudo-word injection, variable attribute counts, the training losses, save/load, retrieval."""

from __future__ import annotations

import copy
import dataclasses
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fusion_diff.embedding.base import EmbedderIdentity
from fusion_diff.errors import CacheMismatchError, ConfigError, MissingFileError
from fusion_diff.models.fti4cir import FTI4CIRMapper
from fusion_diff.pipelines.fti4cir import (
    FTI4CIRMethod,
    FTI4CIRPipeline,
    PseudoWordPrompter,
    PseudoWordTextEncoder,
    backbone_dims,
    encode_images,
    inject_pseudo_words,
    load_fti4cir,
    pseudo_word_batch,
)
from fusion_diff.retrieval.method import QueryContext, RetrievalMethod
from fusion_diff.training import fti4cir_task
from fusion_diff.training.config import config_from_dict, load_config
from fusion_diff.training.fti4cir_task import (
    FTI4CIRModelConfig,
    FTI4CIRTask,
    TrainingImages,
    nt_xent_loss,
    orthogonality_loss,
    split_caption,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SUBJECTS = ["a circle", "a square", "a star and a heart", "a cross"]
ATTRIBUTES = ["large red at the top", "small blue at the center", "large green at the left, small pink", "yellow"]


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    """Distinct little pictures: a coloured rectangle on a coloured background."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        image = Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))
        x, y = rng.randrange(20), rng.randrange(20)
        image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 12, y + 12))
        out.append(image)
    return out


def _mapper(embedder, **overrides) -> FTI4CIRMapper:
    dims = backbone_dims(embedder.model)
    kwargs = {"num_queries": 6, "max_attributes": 4, "num_layers": 1, "mapper_hidden_mult": 2, "mapper_dropout": 0.0}
    kwargs.update(overrides)
    torch.manual_seed(0)
    return FTI4CIRMapper(
        embed_dim=dims["embed_dim"], patch_dim=dims["patch_dim"], token_dim=dims["token_dim"],
        embedder_identity={k: v for k, v in embedder.identity.as_dict().items() if k != "fusion_weight"}, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def prompter(tiny_openclip) -> PseudoWordPrompter:
    return PseudoWordPrompter(tiny_openclip.tokenizer)


@pytest.fixture(scope="module")
def text_encoder(tiny_openclip, prompter) -> PseudoWordTextEncoder:
    return PseudoWordTextEncoder(tiny_openclip.model, prompter.placeholder_id, prompter.eot_id)


def test_injection_puts_each_pseudo_word_at_its_placeholder_only(tiny_openclip, prompter):
    counts = torch.tensor([1, 3, 5])  # S* plus 0, 2, 4 attribute words
    ids = prompter.pseudo_prompts(counts - 1, ["make it * red", "add a star", "remove " + "everything " * 40])
    embeds = tiny_openclip.model.token_embedding(ids)
    words = torch.randn(3, 5, embeds.shape[-1])
    injected = inject_pseudo_words(ids, embeds, prompter.placeholder_id, words, counts)
    is_placeholder = ids == prompter.placeholder_id
    assert is_placeholder.sum(1).tolist() == counts.tolist()  # the user's "*" did not become a placeholder
    for b in range(3):
        positions = is_placeholder[b].nonzero().squeeze(1)
        assert torch.equal(injected[b, positions], words[b, : counts[b]])
    assert torch.equal(injected[~is_placeholder], embeds[~is_placeholder])
    assert (ids[:, -1] == prompter.eot_id).sum() == 1  # the long modification is cut and still ends with EOT
    with pytest.raises(ValueError, match="placeholder count"):
        inject_pseudo_words(ids, embeds, prompter.placeholder_id, words, counts + 1)


def test_text_encoder_matches_open_clip_and_identity_injection(tiny_openclip, prompter, text_encoder):
    model = tiny_openclip.model
    with torch.no_grad():
        plain = prompter.caption_prompts(SUBJECTS, ATTRIBUTES)
        assert torch.allclose(text_encoder(plain), model.encode_text(plain), atol=1e-5)  # trimming is exact
        # Injecting the placeholder token's own embedding must give the plain encoding of the prompt.
        counts = torch.tensor([2, 4, 1, 3])
        ids = prompter.pseudo_prompts(counts - 1, ["bigger"] * 4)
        own = model.token_embedding.weight[prompter.placeholder_id].expand(4, 4, -1)
        assert torch.allclose(text_encoder(ids, own, counts), model.encode_text(ids), atol=1e-5)


def test_attribute_count_varies_per_image_within_one_batch(tiny_openclip, prompter, text_encoder):
    mapper = _mapper(tiny_openclip, score_temperature=0.01, threshold=0.05)
    d = mapper.config.embed_dim
    global_feats = F.normalize(torch.randn(2, d), dim=-1)
    noise = F.normalize(torch.randn(2, 6, d), dim=-1)
    local = noise - (noise @ global_feats.unsqueeze(-1)) * global_feats.unsqueeze(1)  # orthogonal to the global
    local[0, 4] = global_feats[0]  # image 0: one salient query (4)
    local[1, [1, 3, 5]] = global_feats[1]  # image 1: three salient queries, kept in query order
    selected, num_attributes, _ = mapper.select_attributes(global_feats, F.normalize(local, dim=-1))
    assert num_attributes.tolist() == [1, 3]
    assert torch.allclose(selected[0, 0], global_feats[0], atol=1e-6)
    assert torch.allclose(selected[1, :3], global_feats[1].expand(3, -1), atol=1e-6)

    # A real forward: counts differ in the batch and each row encodes as it would alone.
    with torch.no_grad():
        image_embeds, patches = encode_images(tiny_openclip.model, tiny_openclip.preprocess, _images(8))
        output = mapper(image_embeds, patches)
        output.num_attributes[:4] = torch.tensor([1, 2, 3, 4])  # force variety regardless of the random init
        words, counts = pseudo_word_batch(output, "both")
        ids = prompter.pseudo_prompts(output.num_attributes, ["x"] * 8)
        batched = text_encoder(ids, words, counts)
        alone = torch.cat([text_encoder(ids[i : i + 1], words[i : i + 1], counts[i : i + 1]) for i in range(8)])
    assert len(set(output.num_attributes.tolist())) > 1
    assert (ids == prompter.placeholder_id).sum(1).tolist() == (output.num_attributes + 1).tolist()
    assert torch.allclose(batched, alone, atol=1e-5)


def _task(embedder, n: int = 16, val_fraction: float = 0.0, feature_mode: str = "cached", **model) -> FTI4CIRTask:
    config = FTI4CIRModelConfig(
        backbone={}, num_queries=6, max_attributes=4, num_layers=1, mapper_hidden_mult=2, mapper_dropout=0.0, **model
    )
    images = TrainingImages(
        [f"img{i:03d}" for i in range(n)], _images(n), [SUBJECTS[i % 4] for i in range(n)],
        [ATTRIBUTES[(i // 4) % 4] for i in range(n)], {"test": "tiny"},
    )  # fmt: skip
    torch.manual_seed(0)
    return FTI4CIRTask(
        config, embedder, images, val_fraction=val_fraction, feature_batch_size=8, feature_mode=feature_mode
    )


def test_a_few_training_steps_reduce_each_loss_term(tiny_openclip):
    """Each term (and the weighted total) falls under a few Adam steps on one fixed batch: every term
    has a working gradient path into the mapper, through the frozen text tower."""
    task = _task(tiny_openclip)
    batch = task.dataset.__getitems__(list(range(16)))
    assert batch["patch_tokens"].shape == (16, 16, 32) and batch["subject_prompt_ids"].dtype == torch.long
    initial = copy.deepcopy(task.trainable_module().state_dict())
    for objective in ("contrastive", "orthogonality", "regularisation", "loss"):
        mapper = task.trainable_module()
        mapper.load_state_dict(initial)
        optimizer = torch.optim.Adam(mapper.parameters(), lr=3e-3)
        values = []
        for step in range(7):
            if objective == "loss":
                loss, _ = task.compute_loss(mapper, batch, torch.Generator().manual_seed(step))
            else:
                loss = task.losses(mapper(batch["image_embeds"], batch["patch_tokens"]), batch)[objective]
            values.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert values[-1] < values[0], (objective, values)
    assert all(p.grad is None for p in tiny_openclip.model.parameters())  # the backbone stays frozen


def test_losses_on_known_inputs():
    a = F.normalize(torch.randn(4, 8), dim=-1)
    assert nt_xent_loss(a, a, 0.2) < nt_xent_loss(a, a.roll(1, 0), 0.2)
    eye = torch.eye(6).expand(2, 6, 6)
    assert orthogonality_loss(eye) == 0
    assert orthogonality_loss(torch.ones(2, 6, 6) / 6**0.5) > 0


def test_features_are_cached_and_validation_split_is_stable(tiny_openclip, tmp_path, monkeypatch):
    first = _task(tiny_openclip, n=40, val_fraction=0.25)
    assert first.val_dataset is not None and len(first.dataset) + len(first.val_dataset) == 40
    calls = []
    monkeypatch.setattr(fti4cir_task, "encode_images", lambda *a, **k: calls.append(1))
    second = _task(tiny_openclip, n=40, val_fraction=0.25)  # every feature comes from the cache
    assert not calls and second.dataset.ids == first.dataset.ids
    assert torch.equal(second.dataset.tensors["patch_tokens"], first.dataset.tensors["patch_tokens"])
    metrics = second.validate(second.trainable_module().eval())
    assert 0 <= metrics["pseudo_sentence_image_r1"] <= 1 and metrics["contrastive"] > 0


def test_on_the_fly_mode_caches_no_patch_tokens_and_matches_the_cached_mode(tiny_openclip, monkeypatch):
    """Issue 19: ``feature_mode="on_the_fly"`` runs the frozen image tower per batch instead of caching ~1 MB
    of patch tokens per image; the loss of a batch (and validation) is the cached mode's."""
    cached = _task(tiny_openclip, n=40, val_fraction=0.25)
    calls = []
    real_encode = fti4cir_task.encode_images
    monkeypatch.setattr(fti4cir_task, "encode_images", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    live = _task(tiny_openclip, n=40, val_fraction=0.25, feature_mode="on_the_fly")
    assert not calls and "patch_tokens" not in live.dataset.tensors  # nothing of the image tower is stored
    rows = list(range(8))
    batch = live.dataset.__getitems__(rows)
    assert batch["pixels"].shape[0] == 8 and "patch_tokens" not in batch
    assert live.dataset[0]["pixels"].shape == batch["pixels"].shape[1:]
    mapper = cached.trainable_module()
    live.mapper.load_state_dict(mapper.state_dict())
    loss, _ = cached.compute_loss(mapper.eval(), cached.dataset.__getitems__(rows), torch.Generator().manual_seed(0))
    live_loss, _ = live.compute_loss(live.mapper.eval(), batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(live_loss, loss, atol=1e-5, rtol=1e-5)
    expected = cached.validate(mapper)
    for name, value in live.validate(live.mapper).items():
        assert abs(value - expected[name]) < 1e-4, name


def test_save_load_round_trip_is_exact_and_checks_the_backbone(tiny_openclip, tmp_path):
    mapper = _mapper(tiny_openclip, mapper_dropout=0.5).eval()
    mapper.save_pretrained(tmp_path / "ckpt")
    loaded = load_fti4cir(tmp_path / "ckpt", tiny_openclip)
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in mapper.config.items() if not k.startswith("_")
    }
    for (name, a), (_, b) in zip(mapper.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    image_embeds, patches = torch.randn(3, 32), torch.randn(3, 16, 32)
    out_a, out_b = mapper(image_embeds, patches), loaded(image_embeds, patches)
    assert torch.equal(out_a.attribute_embeds, out_b.attribute_embeds) and torch.equal(
        out_a.subject_embeds, out_b.subject_embeds
    )

    class Other:
        identity = EmbedderIdentity("openclip", "ViT-B-32", "openai", 32)

    with pytest.raises(CacheMismatchError, match="trained on"):
        load_fti4cir(tmp_path / "ckpt", Other())
    with pytest.raises(MissingFileError, match="No FTI4CIR mapper"):
        load_fti4cir(tmp_path / "nothing")


def test_retrieval_method_returns_unit_norm_queries(tiny_openclip, tmp_path):
    _mapper(tiny_openclip).save_pretrained(tmp_path / "ckpt")
    paths = []
    for i, image in enumerate(_images(5, seed=3)):
        paths.append(tmp_path / f"ref{i}.png")
        image.save(paths[-1])
    texts = ["make it blue", "add a star", "remove the circle", "bigger", "move it left"]
    context = QueryContext(
        embedder=tiny_openclip,
        query_ids=[str(i) for i in range(5)],
        modification_texts=texts,
        modification_text_embeds=tiny_openclip.embed_texts(texts),
        reference_image_embeds=tiny_openclip.embed_images(paths),
        reference_image_paths=paths,
    )
    method = FTI4CIRMethod(tmp_path / "ckpt", batch_size=2)
    assert isinstance(method, RetrievalMethod) and method.gallery_mode == "image"
    queries = method.query_embeddings(context)
    assert queries.shape == (5, 32) and queries.dtype == torch.float32
    assert torch.allclose(queries.norm(dim=-1), torch.ones(5), atol=1e-5)
    protocol = method.protocol()
    assert protocol["max_attributes"] == 4 and "but {modification}" in protocol["prompt"]
    assert protocol["backbone"]["model"] == tiny_openclip.identity.model
    # The same queries as the pipeline computes for PIL inputs (paths vs images, batching).
    pipeline = FTI4CIRPipeline.from_pretrained(tmp_path / "ckpt", tiny_openclip)
    assert torch.allclose(pipeline(_images(5, seed=3), texts), queries, atol=1e-5)
    # The val-selected variant: the pseudo-sentence query pulled toward the reference image embedding.
    mixed = FTI4CIRMethod(tmp_path / "ckpt", batch_size=2, mix_reference=0.4, name="fti4cir+mix")
    expected = torch.nn.functional.normalize(
        0.6 * queries + 0.4 * torch.nn.functional.normalize(context.reference_image_embeds, dim=-1), dim=-1
    )
    assert torch.allclose(mixed.query_embeddings(context), expected, atol=1e-5)
    assert mixed.name == "fti4cir+mix" and mixed.protocol()["mix_reference"] == 0.4
    # A fused gallery: the same pseudo-sentence, mixed toward the fused reference (the gallery's space).
    fused = FTI4CIRMethod(tmp_path / "ckpt", batch_size=2, mix_reference=0.4, gallery_mode="fused")
    with pytest.raises(ConfigError, match="captioner"):
        fused.query_embeddings(context)  # no fused references without a captioner
    reference_fused = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    expected = torch.nn.functional.normalize(0.6 * queries + 0.4 * reference_fused, dim=-1)
    with_captions = dataclasses.replace(context, reference_fused_embeds=reference_fused)
    assert torch.allclose(fused.query_embeddings(with_captions), expected, atol=1e-5)
    assert fused.gallery_mode == "fused" and fused.protocol()["mix_anchor"] == "f(I_ref, caption)"
    with pytest.raises(ConfigError, match="gallery_mode"):
        FTI4CIRMethod(tmp_path / "ckpt", gallery_mode="text")


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a man riding a horse on a beach", ("a man", "riding a horse on a beach")),
        ("arafed dog sitting on a couch with a blanket", ("dog", "sitting on a couch with a blanket")),
        ("a red car parked next to a building building building", ("a red car parked", "next to a building")),
        ("the striped cat is sleeping", ("the striped cat", "is sleeping")),
        ("a dog", None),
        ("a very large wooden table", None),
    ],
)
def test_split_caption_heuristic(caption, expected):
    assert split_caption(caption) == expected


def test_training_configs_load_strictly(tmp_path):
    for name in ("fti4cir.yaml", "fti4cir_quick.yaml"):
        config = load_config(CONFIGS / name)
        assert config.task == "fti4cir" and config.model.temperature == 0.2
    raw = {"task": "fti4cir", "output_dir": str(tmp_path), "model": {"max_atributes": 3}, "data": {"pair_dir": "x"}}
    with pytest.raises(ConfigError, match="max_atributes"):
        config_from_dict(raw)
    raw["model"] = {"max_attributes": 30}
    with pytest.raises(ConfigError, match="max_attributes"):
        config_from_dict(raw)
    raw["model"], raw["data"] = {}, {"pair_dir": "x", "image_dir": "y"}
    with pytest.raises(ConfigError, match="exactly one"):
        config_from_dict(raw)


@pytest.mark.parametrize("feature_mode", ["cached", "on_the_fly"])
def test_training_through_the_shared_loop_on_a_pair_set(tiny_openclip_checkpoint, tmp_path, feature_mode):
    """``fusion-diff train fti4cir`` end to end on a tiny shapes pair set: weights load as a retrieval method."""
    from data_synth.shapes.pairs import write_pair_set
    from fusion_diff.training.loop import TRAIN_LOG, train

    name, checkpoint = tiny_openclip_checkpoint
    pair_dir = write_pair_set(tmp_path / "pairs", n=24, seed=0, workers=1, image_size=32, progress=False)
    raw = {
        "task": "fti4cir",
        "output_dir": str(tmp_path / "run"),
        "model": {
            "backbone": {"backend": "openclip", "model_name": name, "pretrained": str(checkpoint)},
            "num_queries": 6,
            "max_attributes": 4,
            "num_layers": 1,
            "mapper_hidden_mult": 1,
        },
        "data": {"pair_dir": str(pair_dir), "val_fraction": 0.25, "feature_batch_size": 8, "feature_mode": feature_mode},
        "schedule": {"max_train_steps": 3, "train_batch_size": 8, "lr_warmup_steps": 0},
        "ema": {"use_ema": False},
        "checkpointing": {"every_n_steps": 0},
        "logging": {"log_every_n_steps": 1, "report_to": "none", "progress_bar": False},
    }
    result = train(config_from_dict(raw))
    assert result.finished and result.global_step == 3
    assert {"val/pseudo_sentence_image_r1", "val/contrastive"} <= result.validation.keys()
    log = (tmp_path / "run" / "logs" / TRAIN_LOG).read_text().splitlines()
    assert "orthogonality" in log[0] and "regularisation" in log[0]
    method = FTI4CIRMethod(tmp_path / "run")
    assert method.protocol()["backbone"]["model"] == name
