"""Retrieval captioner, caption cache, embedding modes and the captioner factory (tiny random open_clip)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fusion_diff.captioning import (
    CaptionCache,
    Captioner,
    RetrievalCaptioner,
    caption_with_cache,
    create_captioner,
    default_caption_cache_path,
    embed_in_mode,
    fuse_with_captions,
    load_caption_bank,
    mode_protocol,
    require_captioner,
)
from fusion_diff.embedding import EmbeddingCache, JointEmbedder
from fusion_diff.errors import CacheMismatchError, ConfigError, DataError, MissingFileError
from fusion_diff.utils.paths import cache_dir

BANK = [
    f"a {size} {colour} {shape}"
    for size in ("small", "large")
    for colour in ("red", "blue", "green", "pink")
    for shape in ("circle", "star", "heart")
]


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(40, 36, 3, generator=gen) * 255).byte().numpy()) for _ in range(n)]


class FakeCaptioner(Captioner):
    """Deterministic captions from pixel statistics; counts the images it saw; can fail after ``fail_after``."""

    def __init__(self, name: str = "fake", fail_after: int | None = None) -> None:
        self.name, self.fail_after, self.seen = name, fail_after, 0

    @property
    def identity(self):
        return {"type": "fake", "name": self.name, "sizes": (1, 2)}  # a tuple: reads back from JSON as a list

    def describe(self) -> str:
        return f"fake({self.name})"

    def caption_candidates(self, images, batch_size=32, progress=False):
        if self.fail_after is not None and self.seen + len(images) > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.seen += len(images)
        return [[f"mean {sum(image.getpixel((0, 0)))}"] for image in images]


# ----------------------------------------------------------------------------------------- retrieval captioner
def _flat_colours(n: int) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(0)
    return [Image.new("RGB", (32, 32), tuple((torch.rand(3, generator=gen) * 255).int().tolist())) for _ in range(n)]


def test_retrieval_captioner_returns_the_nearest_bank_caption(tiny_openclip):
    images = _flat_colours(8)
    captioner = RetrievalCaptioner(tiny_openclip, BANK, top_k=3)
    # brute force: every image against every caption
    scores = tiny_openclip.embed_images(images) @ tiny_openclip.embed_texts(BANK).T
    expected_top = scores.topk(3, dim=1).indices.tolist()
    assert len({row[0] for row in expected_top}) > 1  # the random model ranks differently per image
    candidates = captioner.caption_candidates(images, batch_size=3)
    assert candidates == [[BANK[i] for i in row] for row in expected_top]
    assert captioner.caption(images) == [BANK[row[0]] for row in expected_top]
    # precomputed image embeddings give the same ranking
    assert captioner.rank(tiny_openclip.embed_images(images)) == candidates


def test_bank_embeddings_are_cached_and_reused(tiny_openclip, tmp_path, monkeypatch):
    first = RetrievalCaptioner(tiny_openclip, BANK, cache_dir=tmp_path / "bank")
    embeds = first.bank_embeddings()
    torch.testing.assert_close(embeds, tiny_openclip.embed_texts(BANK))
    assert len(EmbeddingCache.open(tmp_path / "bank", {**tiny_openclip.identity.as_dict(), "kind": "text"})) == len(
        BANK
    )

    def no_text_encoding(*args, **kwargs):
        raise AssertionError("bank embeddings should come from the cache")

    monkeypatch.setattr(tiny_openclip, "embed_texts", no_text_encoding)
    second = RetrievalCaptioner(tiny_openclip, list(reversed(BANK)), cache_dir=tmp_path / "bank")
    torch.testing.assert_close(second.bank_embeddings(), embeds.flip(0))
    assert RetrievalCaptioner(tiny_openclip, BANK, cache_dir="auto").cache_dir.parent == cache_dir("text_embeddings")


def test_caption_bank_sources(tmp_path):
    text = tmp_path / "bank.txt"
    text.write_text("a red circle\n\n  a blue star \na red circle\n", encoding="utf-8")
    assert load_caption_bank(text) == (["a red circle", "a blue star"], "bank")
    pairs = tmp_path / "pairs_set"
    pairs.mkdir()
    (pairs / "pairs.jsonl").write_text(
        "".join(json.dumps({"id": str(i), "caption": c}) + "\n" for i, c in enumerate(BANK))
    )
    assert load_caption_bank(pairs) == (BANK, "pairs_set")
    with pytest.raises(MissingFileError, match="nowhere.txt"):
        load_caption_bank(tmp_path / "nowhere.txt")
    (tmp_path / "bad.jsonl").write_text('{"caption": "ok"}\n{"text": "no caption"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2"):
        load_caption_bank(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="no captions"):
        load_caption_bank(["", "  "])


def test_retrieval_identity_names_bank_and_backbone(tiny_openclip):
    one = RetrievalCaptioner(tiny_openclip, BANK, bank_name="shapes")
    other_bank = RetrievalCaptioner(tiny_openclip, BANK[:-1], bank_name="shapes")
    assert one.identity["embedder"] == tiny_openclip.identity.as_dict()
    assert one.identity["bank_sha1"] != other_bank.identity["bank_sha1"]
    assert "shapes[24]" in one.describe()
    with pytest.raises(ConfigError, match="top_k"):
        RetrievalCaptioner(tiny_openclip, BANK[:2], top_k=3)


# ----------------------------------------------------------------------------------------------- caption cache
def test_caption_cache_resumes_after_interruption(tmp_path):
    ids, images = [f"img{i}" for i in range(10)], _images(10)
    path = tmp_path / "captions.json"
    with pytest.raises(KeyboardInterrupt):
        caption_with_cache(FakeCaptioner(fail_after=8), ids, images, path, chunk_size=4)
    assert len(CaptionCache.open(path, FakeCaptioner().identity)) == 8  # two complete chunks were flushed
    assert not list(tmp_path.glob(".*.tmp"))  # no torn temp file left behind

    resumed = FakeCaptioner()
    captions = caption_with_cache(resumed, ids, images, path, chunk_size=4)
    assert resumed.seen == 2  # only the missing ones
    assert captions == caption_with_cache(FakeCaptioner(), ids, images, None)  # same as one uninterrupted run
    stored = json.loads(path.read_text())
    assert stored["count"] == 10 and stored["captions"] == dict(zip(ids, captions, strict=True))


def test_caption_cache_refuses_a_foreign_captioner(tmp_path):
    path = tmp_path / "captions.json"
    caption_with_cache(FakeCaptioner("a"), ["x"], _images(1), path)
    with pytest.raises(CacheMismatchError, match=r"captions\.json.*another captioner.*name.*delete the file"):
        caption_with_cache(FakeCaptioner("b"), ["x"], _images(1), path)
    (tmp_path / "other.json").write_text('{"some": "json"}')
    with pytest.raises(DataError, match="other.json is not a fusion-diff caption cache"):
        CaptionCache.open(tmp_path / "other.json", FakeCaptioner().identity)
    with pytest.raises(MissingFileError, match="fusion-diff caption"):
        CaptionCache.open(tmp_path / "absent.json", FakeCaptioner().identity, create=False)


def test_caption_cache_keeps_candidates_and_duplicate_ids(tiny_openclip, tmp_path):
    captioner = RetrievalCaptioner(tiny_openclip, BANK, top_k=2)
    ids, images = ["a", "b", "a"], _flat_colours(3)
    path = tmp_path / "c.json"
    captions = caption_with_cache(captioner, ids, images, path)
    assert captions[0] == captions[2] == captioner.caption(images[:1])[0]  # an id's first image is the one captioned
    assert captioner.caption(images[2:])[0] != captions[0]
    cache = CaptionCache.open(path, captioner.identity)
    assert [len(c) for c in cache.candidates(["a", "b"])] == [2, 2] and cache.as_dict()["b"] == captions[1]
    assert default_caption_cache_path("cirr/val", captioner) != default_caption_cache_path("cirr/val", FakeCaptioner())


# ----------------------------------------------------------------------------------------------- embedding modes
def test_fused_mode_without_a_captioner_fails_clearly(tiny_openclip):
    with pytest.raises(ConfigError, match="'fused' embeds f\\(I, caption\\) and needs a captioner.*--captioner"):
        embed_in_mode(tiny_openclip, "fused", ["x"], _images(1), captioner=None, role="reference")
    with pytest.raises(ConfigError, match="Unknown gallery embedding mode 'text'"):
        require_captioner("text", None)
    require_captioner("image", None)


def test_fused_mode_is_f_of_image_and_caption(tiny_openclip, tmp_path):
    images, ids = _images(5), [f"g{i}" for i in range(5)]
    captioner = RetrievalCaptioner(tiny_openclip, BANK)
    out = embed_in_mode(tiny_openclip, "fused", ids, images, captioner=captioner, caption_cache=tmp_path / "c.json")
    assert out.captions == captioner.caption(images)
    torch.testing.assert_close(out.embeddings, tiny_openclip.embed_pairs(images, out.captions))
    image_only = embed_in_mode(tiny_openclip, "image", ids, images, captioner=captioner)
    assert image_only.captions is None
    torch.testing.assert_close(image_only.embeddings, tiny_openclip.embed_images(images))
    assert mode_protocol("fused", captioner)["captioner_identity"] == captioner.identity
    assert mode_protocol("image", captioner)["captioner"] is None


def test_fused_top_k_averages_the_candidate_text_embeddings(tiny_openclip):
    images = _images(4)
    captioner = RetrievalCaptioner(tiny_openclip, BANK, top_k=3)
    out = embed_in_mode(tiny_openclip, "fused", list("abcd"), images, captioner=captioner)
    candidates = captioner.caption_candidates(images)
    texts = torch.stack([F.normalize(tiny_openclip.embed_texts(c).mean(0), dim=0) for c in candidates])
    torch.testing.assert_close(out.embeddings, tiny_openclip.fuse(tiny_openclip.embed_images(images), texts))


class InModelFusion(JointEmbedder):
    """The tiny open_clip seen as a backend that fuses inside the model (no late fusion), like the VLM."""

    def __init__(self, inner):
        self.inner = inner

    identity = property(lambda self: self.inner.identity)

    def embed_images(self, images, batch_size=64, progress=False):
        return self.inner.embed_images(images, batch_size)

    def embed_texts(self, texts, batch_size=256, progress=False):
        return self.inner.embed_texts(texts, batch_size)

    def embed_pairs(self, images, texts, batch_size=64, progress=False):
        return self.inner.embed_pairs(images, texts, batch_size)


def test_in_model_fusion_averages_fused_embeddings(tiny_openclip):
    images, candidates = _images(3), [["a red circle", "a blue star"]] * 3
    expected = F.normalize(
        tiny_openclip.embed_pairs(images, ["a red circle"] * 3)
        + tiny_openclip.embed_pairs(images, ["a blue star"] * 3),
        dim=-1,
    )
    torch.testing.assert_close(fuse_with_captions(InModelFusion(tiny_openclip), candidates, images), expected)


# ----------------------------------------------------------------------------------------------------- factory
def test_create_captioner(tiny_openclip, tmp_path):
    captioner = create_captioner({"type": "retrieval", "bank": BANK, "top_k": 2, "bank_name": "toy"}, tiny_openclip)
    assert isinstance(captioner, RetrievalCaptioner) and captioner.identity["top_k"] == 2
    assert create_captioner(None) is None and create_captioner({"type": "none"}) is None
    with pytest.raises(ConfigError, match=r"Unknown key\(s\) \['topk'\]"):
        create_captioner({"type": "retrieval", "bank": BANK, "topk": 2}, tiny_openclip)
    with pytest.raises(ConfigError, match="pass embedder="):
        create_captioner({"type": "retrieval", "bank": BANK})
    with pytest.raises(ConfigError, match=r"lacks required key\(s\) \['model'\]"):
        create_captioner({"type": "generative", "prompt": "a photo of"})
    with pytest.raises(ConfigError, match="Unknown captioner type 'llm'"):
        create_captioner({"type": "llm"})


# --------------------------------------------------------------------------------------------------------- CLI
def test_caption_cli_writes_and_resumes(tiny_openclip_checkpoint, tiny_openclip, tmp_path, capsys):
    from fusion_diff.cli import main

    name, checkpoint = tiny_openclip_checkpoint
    folder = tmp_path / "images" / "sub"
    folder.mkdir(parents=True)
    for i, image in enumerate(_flat_colours(3)):
        image.save(folder / f"im{i}.png")
    (tmp_path / "bank.txt").write_text("\n".join(BANK))
    out = tmp_path / "captions.json"
    argv = ["caption", "--images", str(tmp_path / "images"), "--captioner", "retrieval", "--out", str(out),
            "--caption-bank", str(tmp_path / "bank.txt"), "--model", name, "--pretrained", str(checkpoint)]  # fmt: skip
    assert main(argv) == 0
    stored = json.loads(out.read_text())
    expected = RetrievalCaptioner(tiny_openclip, BANK).caption(_flat_colours(3))
    assert stored["captions"] == {f"im{i}": c for i, c in enumerate(expected)}
    assert main(argv) == 0 and "(0 new)" in capsys.readouterr().out
    with pytest.raises(CacheMismatchError, match="top_k"):
        main([*argv, "--caption-top-k", "2"])
