"""Small helpers shared by every part of the library (atomic files, manifests, paths)."""

from fusion_diff.utils.io import (
    artifact_manifest,
    atomic_path,
    read_json,
    write_json_atomic,
)
from fusion_diff.utils.paths import cache_dir

__all__ = ["artifact_manifest", "atomic_path", "cache_dir", "read_json", "write_json_atomic"]
