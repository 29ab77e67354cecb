"""The tensors a joint-space figure needs, and their file: one safetensors file (or a results folder holding it).

Tensors (``VIZ_FILE`` inside a results folder, or any ``.safetensors`` path):

* ``reference`` ``[Q, d]``: control / reference embeddings (f(I_ref) or f(I_ref, caption));
* ``query`` ``[Q, d]``: the generated query embeddings;
* ``target`` ``[Q, d]``: the targets' gallery embeddings;
* ``gallery`` ``[N, d]`` (optional): the gallery, for the nearest items of each query;
* ``trajectory`` ``[S, Q, d]`` (optional): z through the sampling steps (``return_trajectory=True``).

Query ids (optional) travel in the file's metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fusion_diff.errors import DataError, MissingFileError
from fusion_diff.utils.io import atomic_path

VIZ_FILE = "viz_embeddings.safetensors"
REQUIRED = ("reference", "query", "target")
OPTIONAL = ("gallery", "trajectory")


@dataclass
class VizInputs:
    """Aligned embeddings of ``Q`` queries for the joint-space figures (see the module docstring)."""

    reference: torch.Tensor
    query: torch.Tensor
    target: torch.Tensor
    gallery: torch.Tensor | None = None
    trajectory: torch.Tensor | None = None
    query_ids: list[str] | None = None

    def __post_init__(self) -> None:
        q, d = self.query.shape
        for name in ("reference", "target"):
            if tuple(getattr(self, name).shape) != (q, d):
                raise DataError(
                    f"viz input {name!r} has shape {tuple(getattr(self, name).shape)}; expected {(q, d)} like 'query'."
                )
        if self.gallery is not None and (self.gallery.ndim != 2 or self.gallery.shape[1] != d):
            raise DataError(f"viz input 'gallery' has shape {tuple(self.gallery.shape)}; expected [N, {d}].")
        if self.trajectory is not None and (self.trajectory.ndim != 3 or tuple(self.trajectory.shape[1:]) != (q, d)):
            raise DataError(
                f"viz input 'trajectory' has shape {tuple(self.trajectory.shape)}; expected [steps, {q}, {d}]."
            )
        if self.query_ids is not None and len(self.query_ids) != q:
            raise DataError(f"{len(self.query_ids)} query ids for {q} queries.")

    def select(self, count: int) -> VizInputs:
        """The first ``count`` queries (the gallery is kept whole)."""
        return VizInputs(
            self.reference[:count],
            self.query[:count],
            self.target[:count],
            self.gallery,
            self.trajectory[:, :count] if self.trajectory is not None else None,
            self.query_ids[:count] if self.query_ids is not None else None,
        )


def save_viz_inputs(path: str | os.PathLike, inputs: VizInputs) -> Path:
    """Write ``inputs`` atomically; a folder path gets ``VIZ_FILE`` inside it. Returns the file written."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / VIZ_FILE
    tensors = {
        name: getattr(inputs, name).detach().to("cpu", torch.float32).contiguous()
        for name in REQUIRED + OPTIONAL
        if getattr(inputs, name) is not None
    }
    metadata = {"kind": "fusion_diff.viz"} | ({"query_ids": json.dumps(inputs.query_ids)} if inputs.query_ids else {})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_viz_inputs(path: str | os.PathLike) -> VizInputs:
    """Read a viz file (or ``VIZ_FILE`` in a results folder), naming the file and what is missing."""
    path = Path(path)
    if path.is_dir():
        path = path / VIZ_FILE
    if not path.is_file():
        raise MissingFileError(
            f"Viz inputs not found: {path}. Give a .safetensors file with tensors {list(REQUIRED)} (optional "
            f"{list(OPTIONAL)}), or a results folder holding {VIZ_FILE} (written by fusion_diff.viz.save_viz_inputs)."
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            tensors = {name: handle.get_tensor(name).float() for name in names}
            metadata = handle.metadata() or {}
    except Exception as err:  # safetensors raises several types for a bad header
        raise DataError(f"{path} is not a readable safetensors file ({err}). Rewrite it with save_viz_inputs.") from err
    missing = [name for name in REQUIRED if name not in names]
    if missing:
        raise DataError(
            f"{path} lacks the tensor(s) {missing}; a viz file needs {list(REQUIRED)} (optional {list(OPTIONAL)})."
        )
    query_ids = json.loads(metadata["query_ids"]) if "query_ids" in metadata else None
    return VizInputs(**{name: tensors.get(name) for name in REQUIRED + OPTIONAL}, query_ids=query_ids)
