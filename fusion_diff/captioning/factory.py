"""Build a captioner from a plain dict (a YAML config section or CLI options)."""

from __future__ import annotations

import inspect
from typing import Any

from fusion_diff.captioning.base import Captioner
from fusion_diff.captioning.generative import GenerativeCaptioner
from fusion_diff.captioning.retrieval import RetrievalCaptioner
from fusion_diff.embedding.base import JointEmbedder
from fusion_diff.errors import ConfigError
from fusion_diff.utils.registry import Registry

# ``scene`` (the shapes world's trained captioner) lives with the world, in ``data_synth``: imported when asked for
CAPTIONER_TYPES = Registry(
    "captioner type",
    {
        "retrieval": (RetrievalCaptioner, "ranks a caption bank with the retrieval backbone"),
        "generative": (GenerativeCaptioner, "a Hugging Face image-to-text model"),
        "scene": ("data_synth.shapes.captioner:SceneCaptioner", "the shapes world's trained scene parser"),
    },
)
# Spec keys that differ from the constructor's argument names.
_ALIASES = {"generative": {"model": "model_id_or_path"}, "scene": {"model": "checkpoint"}}

CAPTIONER_NAMES: tuple[str, ...] = tuple(CAPTIONER_TYPES)


def create_captioner(spec: dict[str, Any] | None, embedder: JointEmbedder | None = None) -> Captioner | None:
    """``{"type": "retrieval", "bank": ..., "top_k": 1, ...}``, ``{"type": "generative", "model": ..., ...}`` or
    ``{"type": "scene", "model": <SceneParser folder>}`` (the shapes world's trained captioner).

    Keys other than ``type`` are the constructor's arguments (``model`` stands for ``model_id_or_path``,
    or the scene captioner's ``checkpoint``).
    A retrieval captioner ranks with ``embedder`` (the retrieval backbone). ``None`` or
    ``{"type": "none"}`` means no captioner. Unknown types and keys raise ``ConfigError`` naming them.
    """
    if spec is None or spec.get("type") in (None, "none"):
        return None
    kind = spec["type"]
    cls, kwargs = check_captioner_spec(spec)
    if kind == "retrieval":
        if embedder is None:
            raise ConfigError(
                "A retrieval captioner ranks its bank with the backbone: pass embedder= to create_captioner."
            )
        return cls(embedder, **kwargs)
    return cls(**kwargs)


def check_captioner_spec(spec: dict[str, Any]) -> tuple[type[Captioner], dict[str, Any]]:
    """The class and constructor arguments of a (non-empty) captioner spec; an unknown type or key, or a missing
    required key, raises ``ConfigError`` before any model is loaded."""
    kind = spec.get("type")
    if kind not in CAPTIONER_TYPES:
        raise ConfigError(f"Unknown captioner type {kind!r} in {spec}; choose one of {sorted(CAPTIONER_NAMES)} or 'none'.")
    cls: type[Captioner] = CAPTIONER_TYPES.load(kind)
    aliases = _ALIASES.get(kind, {})
    spec_name = {arg: key for key, arg in aliases.items()}  # constructor argument -> spec key
    kwargs = {aliases.get(k, k): v for k, v in spec.items() if k != "type"}
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if n not in ("self", "embedder")}
    unknown = sorted(spec_name.get(k, k) for k in kwargs if k not in params)
    if unknown:
        allowed = sorted(spec_name.get(n, n) for n in params)
        raise ConfigError(f"Unknown key(s) {unknown} in the {kind} captioner spec; allowed: {allowed}.")
    absent = [
        spec_name.get(n, n) for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs
    ]
    if absent:
        raise ConfigError(f"The {kind} captioner spec lacks required key(s) {absent}.")
    return cls, kwargs
