"""Where a job's images come from: image folders or webdataset-style tar shards, decoded by DataLoader workers.

A tar shard holds samples as members that share a key (``000123.jpg``, ``000123.txt``, ...: the key
is the member path up to the first dot of its file name, as in webdataset). Shards are named by a
path, a glob (``shards/*.tar``), a brace range (``shards/{000..099}.tar``) or any fsspec URL
(``s3://bucket/{000..099}.tar``, ``https://...``). Each image member is indexed once (its byte range
in the tar), so the loader reads exactly those bytes: random access, any order, any worker.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion_diff.errors import DataError, MissingFileError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


@dataclass(frozen=True)
class TarMember:
    """One image inside a tar shard: its byte range, so it can be read without the rest of the tar."""

    url: str
    name: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.url}:{self.name}"


def folder_images(root: str | os.PathLike) -> tuple[list[str], list[Path]]:
    """(ids, paths) of every image under ``root``, sorted; id = path relative to ``root`` without its suffix.

    Files that differ only in their suffix (``x.png`` and ``x.jpg``) would share an id, and one of them
    would be lost; those keep their suffix in the id (``x.png``, ``x.jpg``), with a warning. Every other
    id stays suffix-free, so ids are unique and do not depend on which other files are in the folder
    unless they collide.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"Image folder not found: {root}. Pass the folder that holds the images.")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DataError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under {root}.")
    relative = [p.relative_to(root) for p in paths]
    ids = [r.with_suffix("").as_posix() for r in relative]
    shared = {item for item, n in Counter(ids).items() if n > 1}
    if shared:
        ids = [r.as_posix() if item in shared else item for r, item in zip(relative, ids, strict=True)]
        logger.warning(
            "%s: %d image ids are shared by files that differ only in their suffix (e.g. %s); those files keep "
            "their suffix in the id, so none is lost.",
            root,
            len(shared),
            sorted(shared)[:3],
        )
    repeated = sorted(item for item, n in Counter(ids).items() if n > 1)
    if repeated:
        raise DataError(f"Image ids repeat under {root} even with suffixes, e.g. {repeated[:3]}; rename those files.")
    return ids, paths


def is_tar_source(source: str) -> bool:
    """True when ``source`` names tar shards (a .tar path, glob, brace range or URL)."""
    return source.rstrip("/").endswith(".tar")


def expand_shards(source: str) -> list[str]:
    """The shard paths/URLs named by ``source``: brace ranges expanded, local globs resolved, sorted."""
    from braceexpand import braceexpand

    urls: list[str] = []
    for name in braceexpand(source):
        if "://" not in name and any(c in name for c in "*?["):
            urls.extend(sorted(glob.glob(name)))
        else:
            urls.append(name)
    if not urls:
        raise MissingFileError(f"No tar shards match {source!r}. Check the path or pattern.")
    return urls


def tar_images(source: str) -> tuple[list[str], list[TarMember]]:
    """(keys, members) of every image in the tar shards named by ``source``, in shard order."""
    import fsspec

    keys: list[str] = []
    members: list[TarMember] = []
    for url in expand_shards(source):
        try:
            with fsspec.open(url, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
                for member in tar:
                    name = member.name
                    if member.isfile() and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                        directory, _, base = name.rpartition("/")
                        key = (directory + "/" if directory else "") + base.split(".", 1)[0]
                        keys.append(key)
                        members.append(TarMember(url, name, member.offset_data, member.size))
        except FileNotFoundError as err:
            raise MissingFileError(f"Tar shard not found: {url}. Check the path or URL.") from err
        except tarfile.TarError as err:
            raise DataError(
                f"Tar shard {url} is corrupt or not a tar file ({err}). Re-download or rebuild it."
            ) from err
    if not keys:
        raise DataError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in the tar shards {source!r}.")
    repeated = sorted(key for key, n in Counter(keys).items() if n > 1)
    if repeated:
        raise DataError(
            f"Sample keys repeat across the tar shards {source!r}, e.g. {repeated[:3]}; keys must be unique."
        )
    return keys, members


class _Reader:
    """Opens each shard once per worker and reads members by byte range."""

    def __init__(self) -> None:
        self._files: dict[str, Any] = {}

    def read(self, member: TarMember) -> bytes:
        import fsspec

        handle = self._files.get(member.url)
        if handle is None:
            handle = self._files[member.url] = fsspec.open(member.url, "rb").open()
        handle.seek(member.offset)
        return handle.read(member.size)


def load_any(item: Any, reader: _Reader) -> Any:
    """Decode the images inside ``item``: a ``Path`` or ``TarMember`` is an image; a ``str`` is a text, kept;
    a tuple has its parts decoded."""
    from PIL import Image

    from fusion_diff.embedding.images import load_image

    if isinstance(item, tuple):
        return tuple(load_any(part, reader) for part in item)
    if isinstance(item, TarMember):
        try:
            with Image.open(io.BytesIO(reader.read(item))) as image:
                image.load()
                return image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(
                f"Image {item} is corrupt or not an image ({err}). Re-download or rebuild the shard."
            ) from err
    if isinstance(item, Path):
        return load_image(item)
    return item  # already decoded, or a text


class _Items:
    """A map-style dataset of job inputs, decoded on access (in a DataLoader worker)."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = items
        self.reader = _Reader()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return load_any(self.items[index], self.reader)


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def loaded_batches(items: Sequence[Any], batches: Sequence[Sequence[int]], num_workers: int = 0) -> Iterator[list[Any]]:
    """Yield ``[decoded items[i] for i in batch]`` for each batch, decoded by ``num_workers`` DataLoader workers.

    Images decode in the workers while the model runs on the previous batch, so decoding does not
    starve an accelerator; batches arrive in order.
    """
    from torch.utils.data import DataLoader

    if not batches:
        return
    loader = DataLoader(
        _Items(items),
        batch_sampler=[list(b) for b in batches],
        num_workers=num_workers,
        collate_fn=_as_list,
        prefetch_factor=2 if num_workers else None,
        persistent_workers=False,
    )
    yield from loader


def batches_of(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """``indices`` cut into consecutive batches of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]
