"""Per-item metadata of an index folder, stored by column and decoded only for the rows asked for.

A million gallery items held as Python dicts (id, path, caption) cost about a gigabyte of RAM and
seconds to parse before the first search; a search only ever needs the metadata of its hits. So an
index generation keeps, beside its vectors::

    items.jsonl          one JSON object per row ({"id", "path", "caption", ...}), human-readable
    items.offsets.npy    int64 [N + 1]: where each row starts in items.jsonl (memory-mapped)
    ids.npy              the ids as UTF-8 bytes, row order (a numpy ``S`` array, memory-mapped)
    ids.order.npy        int64 [N]: the rows sorted by id, so id -> row is a binary search on the map

Nothing is read into memory when a folder opens; a hit's row is decoded from its byte range, an id
is found in O(log N) page touches. Folders written before the columns existed (``items.jsonl`` only)
still open: their columns are built in memory once, as arrays, never as dicts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from fusion_diff.errors import DataError, MissingFileError
from fusion_diff.utils.io import atomic_path

ITEMS, OFFSETS, IDS, ID_ORDER = "items.jsonl", "items.offsets.npy", "ids.npy", "ids.order.npy"


class IdColumn(Sequence[str]):
    """Gallery ids by row (``column[row]``) and rows by id (``rows(ids)``, ``positions()``), on arrays."""

    def __init__(self, ids: np.ndarray, order: np.ndarray) -> None:
        self._ids = ids
        self._order = order

    @classmethod
    def from_list(cls, ids: Sequence[str], where: str = "gallery") -> IdColumn:
        """An in-memory column; repeated ids are refused (``where`` names the gallery in the message)."""
        data = np.array(
            [i.encode("utf-8") for i in ids], dtype=f"S{max((len(i.encode()) for i in ids), default=1) or 1}"
        )
        column = cls(data, np.argsort(data, kind="stable"))
        column.check_unique(where)
        return column

    def check_unique(self, where: str) -> None:
        ordered = self._ids[self._order]
        repeated = np.flatnonzero(ordered[1:] == ordered[:-1])
        if repeated.size:
            examples = sorted({ordered[r].decode() for r in repeated[:5]})
            raise DataError(f"{where}: gallery ids must be unique; {repeated.size} are repeated (e.g. {examples}).")

    def __len__(self) -> int:
        return len(self._ids)

    @overload
    def __getitem__(self, row: int) -> str: ...
    @overload
    def __getitem__(self, row: slice) -> list[str]: ...
    def __getitem__(self, row: int | slice) -> str | list[str]:
        if isinstance(row, slice):
            return [value.decode("utf-8") for value in self._ids[row]]
        return self._ids[row].decode("utf-8")

    def __eq__(self, other: object) -> bool:  # compares as the list of ids it stands for
        if isinstance(other, IdColumn):
            return np.array_equal(self._ids, other._ids)
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def take(self, rows: np.ndarray) -> list[str]:
        """The ids of ``rows`` (one gather from the column, then one decode per id)."""
        return [value.decode("utf-8") for value in self._ids[rows].tolist()]

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """The row of each id, ``-1`` for ids not in the column (binary search through the sorted order)."""
        encoded = [i.encode("utf-8") for i in ids]
        width = self._ids.dtype.itemsize
        fits = np.array([len(e) <= width for e in encoded], dtype=bool)
        # keys in the column's own dtype: a wider key dtype would make numpy convert the whole memory map
        keys = np.array([e if ok else b"" for e, ok in zip(encoded, fits)], dtype=self._ids.dtype)
        if not len(self._ids) or not len(keys):
            return np.full(len(keys), -1, dtype=np.int64)
        place = np.searchsorted(self._ids, keys, sorter=self._order).clip(max=len(self._ids) - 1)
        rows = np.asarray(self._order[place], dtype=np.int64)
        return np.where(fits & (self._ids[rows] == keys), rows, -1)

    def positions(self) -> IdPositions:
        return IdPositions(self)

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self._ids, self._order


class IdPositions(Mapping[str, int]):
    """``id -> row`` as a mapping, answered from the column (no dict of a million ids is built)."""

    def __init__(self, column: IdColumn) -> None:
        self.column = column

    def __getitem__(self, item: str) -> int:
        row = int(self.column.rows([item])[0])
        if row < 0:
            raise KeyError(item)
        return row

    def __contains__(self, item: object) -> bool:
        return isinstance(item, str) and int(self.column.rows([item])[0]) >= 0

    def __iter__(self) -> Iterator[str]:
        return iter(self.column)

    def __len__(self) -> int:
        return len(self.column)


class ItemTable(Sequence[dict[str, Any]]):
    """The rows of ``items.jsonl`` by position, each decoded when asked for; ``ids`` is their id column."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray, ids: IdColumn, source: Path) -> None:
        self._data = data
        self._offsets = offsets
        self.ids = ids
        self.source = source

    @classmethod
    def open(cls, folder: Path) -> ItemTable:
        """Memory-map the metadata files of ``folder`` (a legacy ``items.jsonl``-only folder is indexed in memory)."""
        path = folder / ITEMS
        if not path.is_file():
            raise MissingFileError(f"Index items file {path} is missing. Rebuild the index (fusion-diff index build).")
        # plain ndarray views of the maps (still file-backed): numpy's memmap subclass costs microseconds per slice
        data = np.asarray(np.memmap(path, dtype=np.uint8, mode="r")) if path.stat().st_size else np.zeros(0, np.uint8)
        if (folder / OFFSETS).is_file() and (folder / IDS).is_file() and (folder / ID_ORDER).is_file():
            offsets, ids, order = (
                np.asarray(np.load(folder / name, mmap_mode="r")) for name in (OFFSETS, IDS, ID_ORDER)
            )
            ids = IdColumn(ids, order)
            if len(offsets) != len(ids) + 1 or (len(offsets) and int(offsets[-1]) != len(data)):
                raise DataError(f"Index items of {folder} disagree ({OFFSETS} vs {ITEMS}). Rebuild the index.")
            return cls(data, offsets, ids, path)
        ends = np.flatnonzero(np.asarray(data) == ord("\n")) + 1
        offsets = np.concatenate([[0], ends]).astype(np.int64)
        table = cls(data, offsets, IdColumn(np.zeros(0, "S1"), np.zeros(0, np.int64)), path)
        table.ids = IdColumn.from_list([row["id"] for row in table], str(path))
        return table

    @staticmethod
    def write(folder: Path, items: Iterable[dict[str, Any]], previous: ItemTable | None = None) -> None:
        """Write the metadata files of ``items`` (after ``previous``'s rows, copied byte for byte) into ``folder``."""
        items = list(items)
        lines = [(json.dumps(item) + "\n").encode("utf-8") for item in items]
        new_ids = [item["id"] for item in items]
        head = np.asarray(previous._data) if previous is not None else np.zeros(0, np.uint8)
        with atomic_path(folder / ITEMS) as tmp, open(tmp, "wb") as handle:
            handle.write(head.tobytes())
            handle.writelines(lines)
        sizes = np.fromiter((len(line) for line in lines), dtype=np.int64, count=len(lines))
        start = np.asarray(previous._offsets[:-1]) if previous is not None else np.zeros(0, np.int64)
        offsets = np.concatenate([start, len(head) + np.concatenate([[0], np.cumsum(sizes)])]).astype(np.int64)
        added = IdColumn.from_list(new_ids, str(folder / ITEMS)).arrays[0] if new_ids else np.zeros(0, "S1")
        old = previous.ids.arrays[0] if previous is not None else np.zeros(0, "S1")
        ids = np.concatenate([np.asarray(old), added]) if len(old) else added
        column = IdColumn(ids, np.argsort(ids, kind="stable"))
        column.check_unique(f"Index {folder.parent}")
        for name, array in ((OFFSETS, offsets), (IDS, ids), (ID_ORDER, column.arrays[1])):
            with atomic_path(folder / name) as tmp, open(tmp, "wb") as handle:
                np.save(handle, array)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, row: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, row: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, row: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(row, slice):
            return self.rows(range(*row.indices(len(self))))
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} of {len(self)} gallery items")
        return self.rows([row % len(self)])[0]

    def rows(self, rows: Iterable[int]) -> list[dict[str, Any]]:
        """The metadata of ``rows`` (a search's hits), decoded now: their byte ranges, parsed as one JSON array."""
        rows = np.fromiter(rows, dtype=np.int64)
        if not rows.size:
            return []
        starts, ends = self._offsets[rows], self._offsets[rows + 1]
        lengths = ends - starts
        # every row's bytes in one gather: positions start[r] .. end[r] for each row, concatenated
        positions = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
        # rows end in "\n" (json.dumps escapes newlines inside strings), which become the array's commas
        text = self._data[positions].tobytes().replace(b"\n", b",").rstrip(b",")
        try:
            return json.loads(b"[" + text + b"]")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"Index items file {self.source} is corrupt ({err}). Rebuild the index.") from err
