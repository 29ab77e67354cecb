"""Image loading: a missing or corrupt image raises an error that names the file."""

from __future__ import annotations

import pytest
from PIL import Image

from fusion_diff.embedding import load_image
from fusion_diff.errors import DataError, MissingFileError


def test_load_image_converts_to_rgb(tmp_path):
    Image.new("L", (8, 6), 128).save(tmp_path / "grey.png")
    image = load_image(tmp_path / "grey.png")
    assert image.mode == "RGB" and image.size == (8, 6)


def test_missing_image_names_the_file(tmp_path, tiny_openclip):
    path = tmp_path / "imgs" / "absent.png"
    with pytest.raises(MissingFileError, match="absent.png"):
        load_image(path)
    with pytest.raises(MissingFileError, match="absent.png"):
        tiny_openclip.embed_images([path])


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_image_names_the_file(tmp_path, kind, tiny_openclip):
    path = tmp_path / f"{kind}.png"
    if kind == "garbage":
        path.write_bytes(b"this is not a png")
    else:
        Image.effect_noise((64, 64), 50).convert("RGB").save(path)
        path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=f"{kind}.png"):
        load_image(path)
    with pytest.raises(DataError, match=f"{kind}.png"):
        tiny_openclip.embed_images([path])
