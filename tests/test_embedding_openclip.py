"""OpenCLIP backend on a tiny random checkpoint: loading paths, unit norm, fusion, clear errors."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.factory import load_state_dict
from PIL import Image

from fusion_diff.embedding import (
    OpenCLIPEmbedder,
    create_embedder,
    list_model_configs,
    register_model_configs,
    save_checkpoint,
)
from fusion_diff.errors import ConfigError, DataError, MissingFileError


def _images(n: int) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(40, 36, 3, generator=gen) * 255).byte().numpy()) for _ in range(n)]


def test_outputs_are_unit_norm_float32(tiny_openclip):
    images, texts = _images(5), ["a red circle", "two blue stars", "x", "", "a big green square at the top"]
    for out in (
        tiny_openclip.embed_images(images),
        tiny_openclip.embed_texts(texts),
        tiny_openclip.embed_pairs(images, texts),
    ):
        assert out.shape == (5, tiny_openclip.dim) and out.dtype == torch.float32
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))


def test_pairs_are_late_fusion_and_batching_does_not_matter(tiny_openclip):
    images, texts = _images(5), [f"shape {i}" for i in range(5)]
    img, txt = tiny_openclip.embed_images(images, batch_size=2), tiny_openclip.embed_texts(texts, batch_size=3)
    torch.testing.assert_close(img, tiny_openclip.embed_images(images, batch_size=5))
    torch.testing.assert_close(tiny_openclip.embed_pairs(images, texts), F.normalize(0.5 * img + 0.5 * txt, dim=-1))
    assert tiny_openclip.supports_late_fusion


def test_image_paths_and_pil_give_the_same_embedding(tiny_openclip, tmp_path):
    image = _images(1)[0]
    image.save(tmp_path / "a.png")
    torch.testing.assert_close(tiny_openclip.embed_images([tmp_path / "a.png"]), tiny_openclip.embed_images([image]))


def test_checkpoint_formats_and_identity(tiny_openclip_checkpoint, tiny_openclip, tmp_path):
    name, safetensors_path = tiny_openclip_checkpoint
    pt_path = tmp_path / "copy.pt"
    torch.save(load_state(safetensors_path), pt_path)  # what a plain open_clip training script writes
    other = OpenCLIPEmbedder(name, pretrained=str(pt_path), fusion_weight=0.3)
    texts = ["a small yellow triangle"]
    torch.testing.assert_close(other.embed_texts(texts), tiny_openclip.embed_texts(texts))
    assert tiny_openclip.identity.pretrained.startswith("sha256:")
    assert other.identity.pretrained != tiny_openclip.identity.pretrained  # file bytes differ
    assert (other.identity.dim, other.identity.fusion_weight) == (32, 0.3)


def test_open_clip_local_dir_layout(tiny_openclip_checkpoint, tiny_openclip, tmp_path):
    name, checkpoint = tiny_openclip_checkpoint
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(name)}))
    (tmp_path / "open_clip_model.safetensors").write_bytes(checkpoint.read_bytes())
    embedder = OpenCLIPEmbedder(f"local-dir:{tmp_path}")
    torch.testing.assert_close(embedder.embed_texts(["a star"]), tiny_openclip.embed_texts(["a star"]))
    assert embedder.identity.pretrained == tiny_openclip.identity.pretrained  # the same bytes
    with pytest.raises(ConfigError, match="brings its own weights"):
        OpenCLIPEmbedder(f"local-dir:{tmp_path}", pretrained=checkpoint)


def load_state(path):
    return load_state_dict(str(path))


def test_checkpoint_of_another_architecture_is_refused(tiny_openclip_checkpoint, tmp_path):
    name, _ = tiny_openclip_checkpoint
    wide = open_clip.get_model_config(name)
    wide["vision_cfg"]["width"] = 64
    (tmp_path / "fd-test-wide.json").write_text(json.dumps(wide))
    register_model_configs(tmp_path / "fd-test-wide.json")
    checkpoint = save_checkpoint(open_clip.create_model("fd-test-wide"), tmp_path / "wide.safetensors")
    with pytest.raises(ConfigError, match="another architecture") as info:
        OpenCLIPEmbedder(name, pretrained=checkpoint)
    assert str(checkpoint) in str(info.value) and "shape mismatches" in str(info.value)


def test_bad_pretrained_values_fail_clearly(tiny_openclip_checkpoint, tmp_path):
    name, _ = tiny_openclip_checkpoint
    with pytest.raises(MissingFileError, match="nowhere.safetensors"):
        OpenCLIPEmbedder(name, pretrained=str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(ConfigError, match="neither a local checkpoint file nor a pretrained tag"):
        OpenCLIPEmbedder(name, pretrained="laion9000")
    with pytest.raises(ConfigError, match="Unknown open_clip architecture"):
        OpenCLIPEmbedder("fd-test-tny", pretrained=None)
    with pytest.raises(MissingFileError, match="Without network access"):  # tests run with HF_HUB_OFFLINE=1
        OpenCLIPEmbedder("ViT-B-32", pretrained="openai")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match="corrupt.safetensors"):
        OpenCLIPEmbedder(name, pretrained=corrupt)


def test_registry_and_factory(tiny_openclip_checkpoint, tmp_path):
    name, checkpoint = tiny_openclip_checkpoint
    assert name in list_model_configs()
    (tmp_path / "broken.json").write_text('{"embed_dim": 8}')
    with pytest.raises(ConfigError, match="broken.json"):
        register_model_configs(tmp_path)
    embedder = create_embedder({"backend": "openclip", "model_name": name, "pretrained": str(checkpoint)})
    assert embedder.identity.backend == "openclip"
    with pytest.raises(ConfigError, match="fusion_wieght"):
        create_embedder({"backend": "openclip", "model_name": name, "fusion_wieght": 0.2})
    with pytest.raises(ConfigError, match="Unknown embedder backend"):
        create_embedder({"backend": "blip"})


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_issue20_half_precision_embedding(tiny_openclip_checkpoint, tiny_openclip, tmp_path, precision):
    """open_clip keeps e.g. positional embeddings in float32 under fp16/bf16: inputs follow the first layer."""
    from fusion_diff.cli import main

    name, checkpoint = tiny_openclip_checkpoint
    half = OpenCLIPEmbedder(name, pretrained=checkpoint, precision=precision)
    assert half.model.visual.conv1.weight.dtype != torch.float32  # really in half precision
    images, texts = _images(3), ["a red circle", "two blue stars", ""]
    for out, full in (
        (half.embed_images(images), tiny_openclip.embed_images(images)),
        (half.embed_texts(texts), tiny_openclip.embed_texts(texts)),
        (half.embed_pairs(images, texts), tiny_openclip.embed_pairs(images, texts)),
    ):
        assert out.dtype == torch.float32
        assert F.cosine_similarity(out, full).min() > 0.98
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    argv = ["embed", "images", "--images", str(folder), "--out", str(tmp_path / "cache"), "--model", name,
            "--pretrained", str(checkpoint), "--precision", precision]  # fmt: skip
    assert main(argv) == 0


def test_issue20_checkpoint_identity_is_content(tiny_openclip_checkpoint, tiny_openclip, tmp_path):
    """The same weights under another file name are the same embedder; other weights under the same name are
    not; caches and priors written with the old ``name@sha256:`` ids still match the same weights."""
    from fusion_diff.embedding import EmbeddingCache
    from fusion_diff.errors import CacheMismatchError
    from fusion_diff.models import FusionPrior, sampling_scheduler
    from fusion_diff.pipelines.fusion_diff import FusionDiffPipeline

    name, checkpoint = tiny_openclip_checkpoint
    (tmp_path / "moved").mkdir()
    moved = tmp_path / "moved" / "renamed.safetensors"
    moved.write_bytes(checkpoint.read_bytes())
    assert OpenCLIPEmbedder(name, pretrained=moved).identity == tiny_openclip.identity
    impostor = tmp_path / checkpoint.name  # other weights under the original file name
    state = load_state(checkpoint)
    state["logit_scale"] = state["logit_scale"] + 1.0
    from safetensors.torch import save_file

    save_file(state, str(impostor))
    assert OpenCLIPEmbedder(name, pretrained=impostor).identity != tiny_openclip.identity

    digest = tiny_openclip.identity.pretrained  # "sha256:<hex>"
    legacy = {**tiny_openclip.identity.as_dict(), "pretrained": f"{checkpoint.name}@{digest}"}
    wrong = {**legacy, "pretrained": f"{checkpoint.name}@sha256:{'0' * 16}"}
    current = {**tiny_openclip.identity.as_dict(), "kind": "image"}
    for folder, old_identity in (("cache", legacy), ("other", wrong)):  # caches as an older version wrote them
        EmbeddingCache.open(tmp_path / folder, current).append(["a"], F.normalize(torch.randn(1, 32), dim=-1))
        manifest_path = tmp_path / folder / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest_path.write_text(json.dumps({**manifest, "identity": {**old_identity, "kind": "image"}}))
    assert len(EmbeddingCache.open(tmp_path / "cache", current)) == 1  # the same weights: reused
    with pytest.raises(CacheMismatchError, match="pretrained: cache has 'sha256:0000000000000000'"):
        EmbeddingCache.open(tmp_path / "other", current)

    def pipeline(trained_on):
        prior = FusionPrior(embedding_dim=32, hidden_dim=16, num_layers=1, num_heads=2, embedder_identity=trained_on)
        return FusionDiffPipeline(prior, sampling_scheduler("ddim", prior), embedder=tiny_openclip)

    pipeline(legacy)  # the same weights: accepted
    with pytest.raises(ConfigError, match=r"differing: \['pretrained'\]"):
        pipeline(wrong)



def test_issue18_token_states_end_in_the_pooled_embedding(tiny_openclip, caplog):
    """Token-level text: one forward, masked to the real length, the end-of-text state is the pooled text."""
    texts = ["remove the red circle", "a red circle", "add a small green square at the top left of the scene"]
    tokens = tiny_openclip.encode_text_tokens(texts, max_tokens=24, batch_size=2)
    lengths = tokens.mask.sum(1)
    assert tokens.states.shape == (3, 24, 32) and tokens.mask.dtype == torch.bool
    assert lengths.tolist() == [len(tiny_openclip.tokenizer.encode(t)) + 2 for t in texts]  # + start/end tokens
    assert not tokens.states[~tokens.mask].any()
    end = tokens.states[torch.arange(3), lengths - 1]
    torch.testing.assert_close(F.normalize(end, dim=-1), tiny_openclip.embed_texts(texts), atol=1e-5, rtol=1e-4)
    with caplog.at_level("WARNING"):
        short = tiny_openclip.encode_text_tokens(texts, max_tokens=6)
    assert short.mask.sum(1).tolist() == [6, 5, 6] and "1 of 3 texts" in caplog.text
    torch.testing.assert_close(short.states[:2], tokens.states[:2, :6])  # causal attention: short texts unchanged


def test_issue18_image_patch_states_are_the_towers_own_projected(tiny_openclip):
    """Per-patch image states: one per patch in raster order, equal to the tower's own ``ln_post`` states times
    its projection (the pooled embedding's path), independent of batching, and the tower left as it was."""
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "white")]
    images[2].paste((0, 128, 0), (0, 0, 8, 8))  # one patch differs
    states = tiny_openclip.encode_image_tokens(images, batch_size=2)
    assert states.shape == (3, 16, 32) and states.dtype == torch.float32
    torch.testing.assert_close(states, tiny_openclip.encode_image_tokens(images, batch_size=3), atol=1e-6, rtol=1e-5)
    visual = tiny_openclip.model.visual
    assert visual.output_tokens is False
    with torch.no_grad():
        pixels = torch.stack([tiny_openclip.preprocess(image) for image in images])
        hidden = visual.ln_post(visual.transformer(visual._embeds(pixels)))
        torch.testing.assert_close(states, hidden[:, 1:] @ visual.proj, atol=1e-5, rtol=1e-4)
        pooled = F.normalize(hidden[:, 0] @ visual.proj, dim=-1)  # CLS pooling: the same path, another token
    torch.testing.assert_close(pooled, tiny_openclip.embed_images(images), atol=1e-5, rtol=1e-4)
    assert tiny_openclip.encode_image_tokens([]).shape == (0, 16, 32)
