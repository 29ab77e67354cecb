"""Build an embedder from a plain spec dict (configs, CLI flags): ``{"backend": "openclip" | "vlm", ...}``."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from fusion_diff.embedding.base import JointEmbedder
from fusion_diff.errors import ConfigError

# backend name -> (module, class); imported on use so that one backend's dependencies never block another
BACKENDS = {
    "openclip": ("fusion_diff.embedding.openclip", "OpenCLIPEmbedder"),
    "vlm": ("fusion_diff.embedding.vlm", "VLMEmbedder"),
    "world": ("data_synth.shapes.backbone", "load_world_embedder"),  # the shapes world's trained backbone
}


def create_embedder(spec: dict[str, Any]) -> JointEmbedder:
    """``create_embedder({"backend": "openclip", "model_name": "ViT-L-14", "pretrained": "/ckpt.pt"})``.

    The remaining keys are the backend's constructor arguments; unknown keys fail here, naming them.
    """
    spec = dict(spec)
    backend = spec.pop("backend", "openclip")
    if backend not in BACKENDS:
        raise ConfigError(f"Unknown embedder backend {backend!r}; choose one of {sorted(BACKENDS)}.")
    module, name = BACKENDS[backend]
    cls = getattr(importlib.import_module(module), name)
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(spec) - accepted)
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} for the {backend!r} embedder; accepted: {sorted(accepted)}.")
    return cls(**spec)
