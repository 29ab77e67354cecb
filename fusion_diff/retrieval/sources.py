"""Where gallery images come from: a folder, a list of paths, or webdataset-style tar shards.

Every source becomes ``GalleryItems``: ids, a path string per item (recorded in the index
metadata) and a lazy sequence of images, so that a resumable build opens only the images it still
has to embed or caption.
"""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from PIL import Image

from fusion_diff.embedding.base import ImageInput
from fusion_diff.errors import DataError, MissingFileError
from fusion_diff.utils.image_sources import IMAGE_SUFFIXES, folder_images

TAR_MEMBER = "::"  # path of an image inside a shard: "shard.tar::member.jpg"


class _TarImages(Sequence[ImageInput]):
    """Images inside tar shards, decoded on access; each shard's member table is read once."""

    def __init__(self, members: list[tuple[Path, str]]) -> None:
        self.members = members
        self._open: dict[Path, tarfile.TarFile] = {}

    def __len__(self) -> int:
        return len(self.members)

    @overload
    def __getitem__(self, row: int) -> ImageInput: ...
    @overload
    def __getitem__(self, row: slice) -> list[ImageInput]: ...
    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        shard, member = self.members[row]
        if shard not in self._open:
            self._open[shard] = tarfile.open(shard)  # noqa: SIM115 (kept open across reads: one member table per shard)
        try:
            with Image.open(io.BytesIO(self._open[shard].extractfile(member).read())) as image:
                image.load()  # decode now: a broken member fails here, naming the shard
                return image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{shard}{TAR_MEMBER}{member} is not a readable image ({err}).") from err


@dataclass
class GalleryItems:
    """Gallery images to index: ``ids[i]`` names ``images[i]`` (lazy), stored with ``paths[i]``."""

    ids: list[str]
    paths: list[str]
    images: Sequence[ImageInput]

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.paths) == len(self.images)):
            raise DataError(f"{len(self.ids)} ids for {len(self.images)} images.")
        seen: set[str] = set()
        repeated = [i for i in self.ids if i in seen or seen.add(i)]
        if repeated:
            raise DataError(f"Gallery ids must be unique; repeated: {repeated[:5]}. Rename the files or pass ids.")

    def select(self, ids: Sequence[str]) -> GalleryItems:
        rows = {item: n for n, item in enumerate(self.ids)}
        keep = [rows[i] for i in ids]
        return GalleryItems(list(ids), [self.paths[r] for r in keep], _Rows(self.images, keep))


class _Rows(Sequence[ImageInput]):
    """A row subset of a lazy image sequence (still lazy)."""

    def __init__(self, images: Sequence[ImageInput], rows: list[int]) -> None:
        self.images, self.rows = images, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, row):  # type: ignore[override]
        if isinstance(row, slice):
            return [self.images[r] for r in self.rows[row]]
        return self.images[self.rows[row]]


def expand_shards(pattern: str) -> list[Path]:
    """Shard files of a webdataset-style spec: ``shards-{0000..0099}.tar``, a glob, or one file."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match:
        first, last = match.groups()
        names = [
            pattern[: match.start()] + str(n).zfill(len(first)) + pattern[match.end() :]
            for n in range(int(first), int(last) + 1)
        ]
    else:
        names = sorted(glob.glob(pattern)) or [pattern]
    missing = [n for n in names if not Path(n).is_file()]
    if missing:
        raise MissingFileError(f"Tar shard(s) not found: {missing[:5]} (from {pattern!r}).")
    return [Path(n) for n in names]


def tar_items(pattern: str) -> GalleryItems:
    """Images in webdataset-style tar shards; id = the member's key (its name up to the first dot)."""
    members = []
    for shard in expand_shards(pattern):
        with tarfile.open(shard) as handle:
            names = [m.name for m in handle.getmembers() if m.isfile()]
        members += [(shard, name) for name in names if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES]
    if not members:
        raise DataError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in the tar shards {pattern!r}.")
    ids = [_sample_key(name) for _, name in members]
    return GalleryItems(ids, [f"{shard}{TAR_MEMBER}{name}" for shard, name in members], _TarImages(members))


def _sample_key(member: str) -> str:
    """webdataset's sample key: the member path with everything from the first dot of its file name cut."""
    folder, _, name = member.rpartition("/")
    return f"{folder}/{name.split('.')[0]}" if folder else name.split(".")[0]


def gallery_items(
    source: str | os.PathLike | Sequence[str | os.PathLike], ids: Sequence[str] | None = None
) -> GalleryItems:
    """``GalleryItems`` of an image folder, a ``.tar`` shard spec, or a list of image paths (ids: file stems
    unless given)."""
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if ".tar" in Path(text).name:
            items = tar_items(text)
        elif Path(text).is_dir():
            found, paths = folder_images(Path(text))
            items = GalleryItems(found, [str(p) for p in paths], paths)
        else:
            raise MissingFileError(f"Gallery source {text} is neither an image folder nor .tar shards.")
    else:
        paths = [Path(p) for p in source]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise MissingFileError(f"{len(missing)} gallery image(s) not found, e.g. {missing[:3]}.")
        items = GalleryItems([p.stem for p in paths], [str(p) for p in paths], paths)
    if ids is not None:
        if len(ids) != len(items.ids):
            raise DataError(f"{len(ids)} ids for {len(items.ids)} gallery images from {source}.")
        items = GalleryItems([str(i) for i in ids], items.paths, items.images)
    return items
