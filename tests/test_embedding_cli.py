"""``fusion-diff embed`` and ``fusion-diff search`` end to end on the tiny open_clip checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from fusion_diff.cli import main
from fusion_diff.embedding import EmbeddingCache
from fusion_diff.errors import CacheMismatchError


@pytest.fixture
def inputs(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    colours = {"red": (220, 20, 20), "green": (20, 200, 20), "sub/blue": (20, 20, 220)}
    for name, colour in colours.items():
        Image.new("RGB", (40, 40), colour).save(images / f"{name}.png")
    (tmp_path / "texts.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(["red", "blue"]))
    )
    pairs = [{"id": "p0", "image": "images/red.png", "text": "a red square"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return tmp_path


def test_embed_resume_and_search(inputs, tiny_openclip_checkpoint, tiny_openclip, capsys):
    name, checkpoint = tiny_openclip_checkpoint
    model = ["--model", name, "--pretrained", str(checkpoint)]
    gallery, queries, pairs = inputs / "gallery", inputs / "queries", inputs / "pairs_cache"
    assert (
        main(
            ["embed", "images", "--images", str(inputs / "images"), "--out", str(gallery), "--chunk-size", "2", *model]
        )
        == 0
    )
    assert main(["embed", "images", "--images", str(inputs / "images"), "--out", str(gallery), *model]) == 0
    assert "3 image embeddings (0 new" in capsys.readouterr().out
    ids, embeds = EmbeddingCache.read(gallery).load()
    assert ids == ["green", "red", "sub/blue"]
    torch.testing.assert_close(embeds, tiny_openclip.embed_images(sorted((inputs / "images").rglob("*.png"))))

    assert main(["embed", "texts", "--texts", str(inputs / "texts.jsonl"), "--out", str(queries), *model]) == 0
    assert main(["embed", "pairs", "--pairs", str(inputs / "pairs.jsonl"), "--out", str(pairs), *model]) == 0
    assert EmbeddingCache.read(pairs).identity["kind"] == "fused"

    out = inputs / "results.jsonl"
    assert main(["search", "--gallery", str(gallery), "--queries", str(queries), "--k", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = (tiny_openclip.embed_texts(["red", "blue"]) @ embeds.T).topk(2, dim=1).indices.tolist()
    assert [r["ids"] for r in rows] == [[ids[j] for j in row] for row in expected]
    assert main(["search", "--gallery", str(gallery), "--text", "red", "--index", "faiss", "--k", "1", *model]) == 0
    assert "red:" in capsys.readouterr().out


def test_search_refuses_queries_of_another_embedder(inputs, tiny_openclip_checkpoint):
    name, checkpoint = tiny_openclip_checkpoint
    gallery = inputs / "gallery"
    main(
        [
            "embed",
            "images",
            "--images",
            str(inputs / "images"),
            "--out",
            str(gallery),
            "--model",
            name,
            "--pretrained",
            str(checkpoint),
        ]
    )
    with pytest.raises(CacheMismatchError, match="pretrained"):
        main(["search", "--gallery", str(gallery), "--text", "red", "--model", name])  # random weights: another space


def test_issue18_embed_texts_token_level(inputs, tiny_openclip_checkpoint, tiny_openclip):
    name, checkpoint = tiny_openclip_checkpoint
    out = inputs / "tokens"
    args = ["embed", "texts", "--texts", str(inputs / "texts.jsonl"), "--out", str(out), "--model", name]
    assert main([*args, "--pretrained", str(checkpoint), "--max-text-tokens", "8", "--chunk-size", "1"]) == 0
    ids, tokens = EmbeddingCache.read(out).load_tokens()
    expected = tiny_openclip.encode_text_tokens(["red", "blue"], 8)
    assert ids == ["q0", "q1"] and torch.equal(tokens.mask, expected.mask) and tokens.mask.sum(1).tolist() == [3, 3]
    torch.testing.assert_close(tokens.states, expected.states)
    with pytest.raises(CacheMismatchError, match="max_text_tokens: cache has 8, requested None"):
        main([*args, "--pretrained", str(checkpoint)])  # the same folder as a pooled text cache
