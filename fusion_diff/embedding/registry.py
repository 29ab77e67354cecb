"""The model-config registry: open_clip architecture JSONs shipped with (or added to) fusion-diff.

open_clip keeps a registry of architecture configs (``open_clip.add_model_config``); we register
our own folder with that same mechanism, so ``open_clip.create_model("shapes-vit-tiny")`` and
``OpenCLIPEmbedder("shapes-vit-tiny", ...)`` both work. Extra folders or files can be added with
``register_model_configs(path)`` or the ``FUSION_DIFF_MODEL_CONFIGS`` environment variable
(``os.pathsep``-separated).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import open_clip

from fusion_diff.errors import ConfigError
from fusion_diff.utils.io import read_json, write_json_atomic

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
MODEL_CONFIGS_ENV = "FUSION_DIFF_MODEL_CONFIGS"
_REQUIRED_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
_registered: set[Path] = set()


def register_model_configs(path: str | os.PathLike = MODEL_CONFIG_DIR) -> list[str]:
    """Add a config folder (or one ``.json`` file) to open_clip's registry, once; return its model names."""
    path = Path(path).resolve()
    if not path.exists():
        raise ConfigError(
            f"Model config path {path} does not exist. Pass a folder of open_clip JSON configs or one file."
        )
    files = [path] if path.is_file() else sorted(path.glob("*.json"))
    for file in files:
        cfg = read_json(file, "open_clip model config")
        missing = [key for key in _REQUIRED_KEYS if key not in cfg]
        if missing:
            raise ConfigError(
                f"open_clip model config {file} lacks {missing}; every config needs {list(_REQUIRED_KEYS)}."
            )
    if path not in _registered:
        open_clip.add_model_config(path)
        _registered.add(path)
    return [file.stem for file in files]


def ensure_registered() -> None:
    """Register the built-in folder and any folders named in ``$FUSION_DIFF_MODEL_CONFIGS``."""
    register_model_configs(MODEL_CONFIG_DIR)
    for extra in filter(None, os.environ.get(MODEL_CONFIGS_ENV, "").split(os.pathsep)):
        register_model_configs(extra)


def write_model_config(name: str, config: dict[str, Any], folder: str | os.PathLike = MODEL_CONFIG_DIR) -> Path:
    """Write ``folder/name.json`` atomically and register it, so the name resolves immediately."""
    path = Path(folder) / f"{name}.json"
    write_json_atomic(path, config)
    register_model_configs(path)
    return path


def list_model_configs() -> list[str]:
    """Every architecture name open_clip can build now (its own plus ours)."""
    ensure_registered()
    return open_clip.list_models()
