"""Build an embedder from a plain spec dict (configs, CLI flags): ``{"backend": "openclip" | "vlm", ...}``."""

from __future__ import annotations

import inspect
from typing import Any

from fusion_diff.embedding.base import JointEmbedder
from fusion_diff.errors import ConfigError
from fusion_diff.utils.registry import Registry

# imported on use, so that one backend's dependencies never block another
BACKENDS = Registry(
    "embedder backend",
    {
        "openclip": ("fusion_diff.embedding.openclip:OpenCLIPEmbedder", "open_clip CLIP-style models"),
        "vlm": ("fusion_diff.embedding.vlm:VLMEmbedder", "a vision-language model's hidden states"),
        "world": ("data_synth.shapes.backbone:load_world_embedder", "the shapes world's trained backbone"),
    },
    aliases={"shapes-world": "world"},  # the FTI4CIR configs' old spelling
)


def create_embedder(spec: dict[str, Any]) -> JointEmbedder:
    """``create_embedder({"backend": "openclip", "model_name": "ViT-L-14", "pretrained": "/ckpt.pt"})``.

    The remaining keys are the backend's constructor arguments; unknown keys fail here, naming them.
    """
    spec = dict(spec)
    backend = BACKENDS.resolve(spec.pop("backend", "openclip"))
    cls = BACKENDS.load(backend)
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(spec) - accepted)
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} for the {backend!r} embedder; accepted: {sorted(accepted)}.")
    return cls(**spec)


# precision spellings -> (open_clip ``precision``, torch dtype name used by the VLM backend)
_PRECISIONS = {
    "fp32": ("fp32", "float32"),
    "float32": ("fp32", "float32"),
    "fp16": ("fp16", "float16"),
    "float16": ("fp16", "float16"),
    "bf16": ("bf16", "bfloat16"),
    "bfloat16": ("bf16", "bfloat16"),
}


def with_runtime(spec: dict[str, Any], device: str | None, dtype: str | None) -> dict[str, Any]:
    """``spec`` with the job's device and precision filled in where the spec does not set them itself,
    so that every model of a job follows its ``--device`` / ``--dtype``."""
    spec = dict(spec)
    if device is not None:
        spec.setdefault("device", device)
    if dtype is not None:
        if dtype not in _PRECISIONS:
            raise ConfigError(f"Unknown precision {dtype!r}; use one of {sorted(_PRECISIONS)}.")
        openclip_name, torch_name = _PRECISIONS[dtype]
        if spec.get("backend", "openclip") == "openclip":
            spec.setdefault("precision", openclip_name)
        else:
            spec.setdefault("dtype", torch_name)
    return spec
