"""What a visitor sends the page, checked before any model runs: the reference image and the texts.

Every refusal is a ``DataError`` whose message is shown on the page as it is, so it says what was
wrong and what to do; nothing here may raise anything else for a bad file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from fusion_diff.errors import DataError

MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to ~120 MB; larger uploads are refused before decoding
MAX_TEXT_CHARS = 500


def read_reference(path: str | os.PathLike | None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The uploaded or chosen reference as an RGB image; refuses a missing, non-image, broken or huge file."""
    if path is None or str(path) == "":
        raise DataError("No reference image: upload one, click a gallery image, or press 'Random test query'.")
    name = Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # our limit speaks first
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise DataError(
                        f"The reference {name} is {width} x {height} pixels ({width * height / 1e6:.0f} MP); "
                        f"the page takes up to {max_pixels / 1e6:.0f} MP. Downscale it and upload it again."
                    )
                image.load()
                return image.convert("RGB")
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(
            f"The reference {name} is too large to decode safely ({err}). Downscale it and upload it again."
        ) from err
    except UnidentifiedImageError as err:
        raise DataError(
            f"The file {name} is not an image this page can read (PNG, JPEG, WebP, GIF, BMP, ...). "
            "Upload an image file."
        ) from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt image data
        raise DataError(
            f"The image {name} is damaged and cannot be decoded ({type(err).__name__}). Upload it again."
        ) from err


def check_text(text: str | None, what: str = "modification text", required: bool = True) -> str:
    """The stripped text; refuses an empty required text or an overlong one."""
    text = (text or "").strip()
    if required and not text:
        raise DataError(f"The {what} is empty: type what should change, e.g. 'make the star blue'.")
    if len(text) > MAX_TEXT_CHARS:
        raise DataError(f"The {what} has {len(text)} characters; keep it under {MAX_TEXT_CHARS}.")
    return text
