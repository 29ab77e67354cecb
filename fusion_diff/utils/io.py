"""Atomic writes and JSON manifests: an interrupted job never leaves a half-written file."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from fusion_diff.errors import ConfigError, DataError, MissingFileError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON so that readers see the old file or the new one, never a torn one."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=False) + "\n", encoding="utf-8")


class _RepeatedKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _RepeatedKeyError(next(key for n, key in enumerate(keys) if key in keys[:n]))
    return dict(pairs)


def read_json(path: str | os.PathLike, what: str = "JSON file", unique_keys: bool = False) -> Any:
    """Read JSON, naming the file and the problem when it is missing or not valid JSON.

    ``unique_keys``: refuse an object that repeats a key (JSON readers silently keep its last value,
    so a repeated entry hides the earlier one), for files people write by hand or by script.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}. Check the path (or rebuild the artifact that writes it).")
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys if unique_keys else None)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{what} {path} is not valid JSON ({err}). Delete it and rebuild, or fix the file.") from err
    except _RepeatedKeyError as err:
        raise DataError(
            f"{what} {path} repeats the key {err.key!r} in one object; a JSON reader would keep only its last value. "
            "Keep one entry per key."
        ) from err


def check_safetensors(path: str | os.PathLike, fix: str) -> None:
    """Refuse a missing or truncated ``.safetensors`` file (its header must cover the whole file) before loading,
    naming the file; ``fix`` says what to do instead."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Weights file {path} is missing. {fix}")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as err:
        raise DataError(f"Weights file {path} is damaged or incomplete ({err}). {fix}") from err


def library_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour changes results, for manifests."""
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("fusion-diff", "torch", "open_clip_torch", "diffusers", "transformers", "accelerate"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return versions


def artifact_manifest(kind: str, config: dict[str, Any] | None = None, seed: int | None = None, **extra: Any) -> dict[str, Any]:
    """The small JSON record every artifact directory carries: what made it, with what, when."""
    return {
        "kind": kind,
        "config": config or {},
        "seed": seed,
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def build_cached_folder(
    out_dir: str | os.PathLike, kind: str, config: dict[str, Any], seed: int, write: Callable[[Path], dict[str, Any]]
) -> Path:
    """A folder made by ``write(folder)``, cached by ``config``: a folder whose manifest holds the same ``config``
    is reused, one of another config replaced; any other non-empty folder is refused (never deleted). ``write``
    fills a temporary folder (renamed into place only when it returns, so an interrupted run leaves nothing
    half-written) and returns extra manifest fields (counts)."""
    out = Path(out_dir)
    manifest = out / "manifest.json"
    earlier = read_json(manifest, f"{kind} manifest") if manifest.is_file() else None
    if earlier is not None and earlier.get("kind") == kind and earlier.get("config") == config:
        return out
    if out.is_dir() and any(out.iterdir()) and (earlier is None or earlier.get("kind") != kind):
        raise ConfigError(
            f"{out} is not empty and was not written as a {kind} folder; it would be replaced. Choose another output "
            "folder (or remove this one yourself)."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        extra = write(tmp)
        write_json_atomic(tmp / "manifest.json", artifact_manifest(kind, config, seed, **extra))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def drop_when_off(record: dict[str, Any], off: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` without the keys whose value is their off value in ``off``: settings added after artifacts were
    first made (caches, plans, data sets) leave those artifacts' identity unchanged while they are off."""
    return {key: value for key, value in record.items() if not (key in off and value == off[key])}
