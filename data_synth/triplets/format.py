"""The triplet dataset format: webdataset-style tar shards plus a JSON manifest.

Layout of a dataset directory::

    manifest.json                 generator, version, seed, config, counts, per-shard checksums
    shards/shard-000000.tar       samples "<key>.json", "<key>.ref.png", "<key>.tgt.png"
    shards/shard-000000.json      the shard's record (count, sha256, counts per edit type): its "done" mark

Why tar shards: a 200K-triplet set is 400K small images; a few hundred tar files keep the file
system sane, stream sequentially (local disk or object store), are read by ``webdataset`` and plain
``tarfile`` alike, and a shard is the natural unit of atomic writing, checksumming, resuming and
splitting across training processes. Tar headers are written with fixed metadata so that a shard's
bytes depend only on its content.

Each shard's content depends only on (seed, shard index), never on which worker wrote it or when,
so any worker count gives the same bytes, and a resumed build regenerates exactly the missing
shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from fusion_diff.errors import CacheMismatchError, DataError, MissingFileError
from fusion_diff.utils.io import artifact_manifest, atomic_path, read_json, write_json_atomic
from fusion_diff.utils.sharding import Processes

FORMAT = "webdataset-tar"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
REFERENCE_IMAGE = "ref.png"
TARGET_IMAGE = "tgt.png"
RECORD = "json"
# Manifest keys that identify a build: a directory holding another build is refused, not mixed.
IDENTITY_KEYS = ("generator", "generator_version", "seed", "config", "num_requested", "shard_size", "format")


@dataclass(frozen=True)
class Sample:
    """One dataset item as stored: a key, its members (extension -> bytes) and its edit-type label."""

    key: str
    files: dict[str, bytes]
    kind: str = "unknown"


@dataclass
class ShardResult:
    """What ``make_shard`` returns: the samples, and counts of items it dropped (by reason)."""

    samples: list[Sample]
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Triplet:
    """A decoded triplet ``(I_ref, T_ref, instruction, I_tgt, T_tgt)`` plus its full record."""

    id: str
    reference_caption: str
    instruction: str
    target_caption: str
    reference_image: Image.Image | None
    target_image: Image.Image | None
    record: dict[str, Any]

    @property
    def edit(self) -> dict[str, Any] | None:
        return self.record.get("edit")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_record(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------- writing


def write_shard(path: Path, samples: Sequence[Sample]) -> dict[str, Any]:
    """Write one tar shard atomically with fixed headers; return its record (name, count, sha256)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext in sorted(sample.files):
                data = sample.files[ext]
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    payload = buffer.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return {
        "name": path.name,
        "count": len(samples),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "bytes": len(payload),
        "counts_per_label": dict(sorted(Counter(s.kind for s in samples).items())),
    }


def shard_ranges(num_samples: int, shard_size: int) -> list[range]:
    """Item indices of each shard: consecutive blocks of ``shard_size`` (the last may be shorter)."""
    return [range(start, min(start + shard_size, num_samples)) for start in range(0, num_samples, shard_size)]


def _build_one(job: tuple[Callable[[range], ShardResult], Path, int, range]) -> dict[str, Any]:
    make_shard, shard_dir, index, items = job
    result = make_shard(items)
    record = write_shard(shard_dir / shard_name(index), result.samples)
    record.update(index=index, first_item=items.start, num_items=len(items), dropped=dict(sorted(result.dropped.items())))
    write_json_atomic(shard_dir / Path(shard_name(index)).with_suffix(".json"), record)
    return record


def _done_record(shard_dir: Path, index: int) -> dict[str, Any] | None:
    """The shard's record if the shard is complete and intact, else None (it is rebuilt)."""
    tar_path = shard_dir / shard_name(index)
    record_path = tar_path.with_suffix(".json")
    if not (tar_path.is_file() and record_path.is_file()):
        return None
    try:
        record = read_json(record_path, "shard record")
    except DataError:
        return None
    return record if record.get("sha256") == _sha256(tar_path) else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_dataset(
    out_dir: str | os.PathLike,
    make_shard: Callable[[range], ShardResult],
    *,
    num_samples: int,
    shard_size: int,
    generator: str,
    generator_version: str,
    seed: int,
    config: dict[str, Any],
    source: str,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    unit: str = "triplet",
    processes: Processes | None = None,
) -> dict[str, Any]:
    """Build (or resume) a sharded dataset and return its manifest.

    ``make_shard(items)`` must be a picklable callable whose output depends only on ``items`` and its
    own bound arguments (seed, config): that is what makes the result independent of ``workers``
    and lets an interrupted build resume by regenerating only the shards that are not done.
    ``items`` are ``range`` blocks of ``shard_size`` consecutive item indices (``unit`` names them for
    the progress bar). A directory holding a different build is refused (``overwrite=True`` replaces it).
    ``processes`` (a launched job, e.g. ``synth realise`` under ``accelerate launch``): each process builds
    its own run of the missing shards and the main process writes the manifest.
    """
    processes = processes or Processes.single()
    out = Path(out_dir)
    shard_dir = out / SHARD_DIR
    identity = {
        "generator": generator,
        "generator_version": generator_version,
        "seed": seed,
        "config": config,
        "num_requested": num_samples,
        "shard_size": shard_size,
        "format": {"name": FORMAT, "version": FORMAT_VERSION},
    }
    ranges = shard_ranges(num_samples, shard_size)
    extra = {k: v for k, v in identity.items() if k not in ("config", "seed")}
    base = artifact_manifest("triplets", config=config, seed=seed, **extra, source=source, complete=False)
    def done() -> dict[int, dict[str, Any]]:
        return {i: r for i in range(len(ranges)) if (r := _done_record(shard_dir, i)) is not None}

    records: dict[int, dict[str, Any]] = {}
    with processes.main_first():  # the main process claims the folder; the others then read what it decided
        if processes.is_main:
            previous = _claim_directory(out, identity, overwrite)
            shard_dir.mkdir(parents=True, exist_ok=True)
            for stale in shard_dir.glob(".*.tmp"):  # temp files of an interrupted run
                stale.unlink()
            records = done()
            if not (previous is not None and previous.get("complete") and len(records) == len(ranges)):
                write_json_atomic(out / MANIFEST, base)  # else: built and intact, leave it (and its timestamp) alone
    if not processes.is_main:
        records = done()
    current = read_json(out / MANIFEST, "triplet dataset manifest")
    if current.get("complete") and len(records) == len(ranges):
        return current
    todo = processes.take([(make_shard, shard_dir, i, items) for i, items in enumerate(ranges) if i not in records])
    done_items = sum(len(ranges[i]) for i in records)
    total = done_items + sum(len(items) for *_, items in todo)
    desc = f"synth {out.name}" + (f" ({processes.describe()})" if processes.world_size > 1 else "")
    with tqdm(total=total, initial=done_items, unit=unit, desc=desc, disable=not progress) as bar:
        for record in _run_jobs(_build_one, todo, workers):
            records[record["index"]] = record
            bar.update(record["num_items"])
    processes.wait()
    if processes.is_main:
        shards = [records.get(i) or _done_record(shard_dir, i) for i in range(len(ranges))]  # and the others' shards
        write_json_atomic(out / MANIFEST, {**base, **summarise(shards), "complete": True})
    processes.wait()
    return read_json(out / MANIFEST, "triplet dataset manifest")


def _claim_directory(out: Path, identity: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The manifest of the same build already in ``out`` (to resume), or None for a fresh start."""
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise DataError(f"{out} exists and is not an empty triplet dataset directory; choose another --out.")
        return None
    previous = read_json(manifest_path, "triplet dataset manifest")
    differing = sorted(k for k in IDENTITY_KEYS if previous.get(k) != identity[k])
    if not differing:
        return previous
    if not overwrite:
        raise CacheMismatchError(
            f"{out} holds another triplet build (differs in: {', '.join(differing)}). "
            "Use another --out, or --overwrite to replace it."
        )
    for path in (out / SHARD_DIR).glob("shard-*"):
        path.unlink()
    manifest_path.unlink()
    return None


def _run_jobs(fn: Callable, jobs: list, workers: int) -> Iterator[Any]:
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    # spawn: the parent may hold torch threads; a forked child of a threaded parent can deadlock.
    with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(fn, jobs)


def summarise(shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals for the manifest: sample counts per label and per edit type, drops, bytes."""
    labels: Counter = Counter()
    dropped: Counter = Counter()
    for shard in shards:
        labels.update(shard["counts_per_label"])
        dropped.update(shard.get("dropped", {}))
    per_type: Counter = Counter()
    for label, count in labels.items():
        per_type[label.split(":", 1)[0]] += count
    return {
        "num_samples": sum(s["count"] for s in shards),
        "counts_per_edit_type": dict(sorted(per_type.items())),
        "counts_per_label": dict(sorted(labels.items())),
        "dropped": dict(sorted(dropped.items())),
        "bytes": sum(s["bytes"] for s in shards),
        "shards": [
            {k: s[k] for k in ("name", "count", "sha256", "bytes", "first_item", "num_items", "counts_per_label", "dropped")}
            for s in shards
        ],
    }


# --------------------------------------------------------------------------- reading


def load_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete dataset (an incomplete build is refused with the fix)."""
    manifest = read_json(Path(root) / MANIFEST, "triplet dataset manifest")
    if not manifest.get("complete"):
        raise DataError(f"{Path(root) / MANIFEST}: the build is incomplete; re-run the same synth command to resume it.")
    return manifest


def verify_dataset(root: str | os.PathLike) -> None:
    """Check every shard against the manifest's checksum; DataError naming every bad shard."""
    root = Path(root)
    bad = []
    for shard in load_manifest(root)["shards"]:
        path = root / SHARD_DIR / shard["name"]
        if not path.is_file():
            bad.append(f"{path} (missing)")
        elif _sha256(path) != shard["sha256"]:
            bad.append(f"{path} (checksum mismatch)")
    if bad:
        raise DataError(f"corrupt triplet shards in {root}: {'; '.join(bad)}. Delete them and re-run the synth command to rebuild.")


def iter_samples(
    root: str | os.PathLike, rank: int = 0, world_size: int = 1, verify: bool = True, shard_order: Sequence[int] | None = None
) -> Iterator[Sample]:
    """Stream the raw samples of this rank's shards (shard i goes to rank i % world_size).

    With ``verify`` each shard's checksum is checked before it is read; a corrupt or truncated
    shard raises DataError naming it.
    """
    root = Path(root)
    shards = load_manifest(root)["shards"]
    order = list(shard_order) if shard_order is not None else list(range(len(shards)))
    for i in order[rank::world_size]:
        yield from read_shard(root / SHARD_DIR / shards[i]["name"], shards[i]["sha256"] if verify else None)


def read_shard(path: Path, sha256: str | None = None) -> Iterator[Sample]:
    """The samples of one tar shard, members grouped by key in file order."""
    if not path.is_file():
        raise MissingFileError(f"triplet shard {path} is missing; re-run the synth command to rebuild it.")
    if sha256 is not None and _sha256(path) != sha256:
        raise DataError(f"triplet shard {path} is corrupt (checksum mismatch); delete it and re-run the synth command.")
    try:
        with tarfile.open(path, mode="r") as tar:
            key, files = None, {}
            for member in tar:
                name_key, _, ext = member.name.partition(".")
                if key is not None and name_key != key:
                    yield _sample(key, files)
                    files = {}
                key = name_key
                files[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
            if key is not None:
                yield _sample(key, files)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"triplet shard {path} is corrupt ({err}); delete it and re-run the synth command.") from err


def _sample(key: str, files: dict[str, bytes]) -> Sample:
    record = json.loads(files[RECORD]) if RECORD in files else {}
    return Sample(key, files, record.get("edit_label", "unknown"))


def decode(sample: Sample, images: bool = True) -> Triplet:
    record = json.loads(sample.files[RECORD])

    def image(ext: str) -> Image.Image | None:
        if not images or ext not in sample.files:
            return None
        return Image.open(io.BytesIO(sample.files[ext])).convert("RGB")

    return Triplet(
        id=record["id"],
        reference_caption=record["reference_caption"],
        instruction=record["instruction"],
        target_caption=record["target_caption"],
        reference_image=image(REFERENCE_IMAGE),
        target_image=image(TARGET_IMAGE),
        record=record,
    )


def iter_triplets(root: str | os.PathLike, images: bool = True, **kwargs: Any) -> Iterator[Triplet]:
    """Stream decoded triplets (see :func:`iter_samples` for ``rank`` / ``world_size`` / ``verify``)."""
    for sample in iter_samples(root, **kwargs):
        yield decode(sample, images)


