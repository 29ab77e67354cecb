"""Oracle rows: queries built from the *target's* ground-truth caption, an upper reference point.

They are the only code that reads ground-truth captions (the shapes world's
``oracle/captions.{split}.json``); their names contain "oracle" so that no table can mistake them
for a method. ``oracle-target-text`` embeds the target caption ``f(T_tgt)``;
``oracle-target-fused`` embeds the target itself with it, ``f(I_tgt, T_tgt)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fusion_diff.baselines.simple import Baseline
from fusion_diff.benchmarks.evaluate import IMAGE_TABLE
from fusion_diff.benchmarks.shapes import load_oracle_captions, oracle_captions_path
from fusion_diff.benchmarks.types import BenchmarkData
from fusion_diff.captioning.modes import fuse_with_captions
from fusion_diff.errors import DataError
from fusion_diff.retrieval.method import GalleryMode, QueryContext


class OracleTargetText(Baseline):
    """Query = ``f(T_tgt)``, the text embedding of the target's ground-truth caption."""

    name = "oracle-target-text"

    def __init__(
        self,
        targets: Mapping[str, tuple[str, Path, str]],
        captions_file: str | Path,
        gallery_mode: GalleryMode = "image",
    ) -> None:
        super().__init__(gallery_mode)
        self.targets = dict(targets)  # query id -> (target id, target image path, ground-truth caption)
        self.captions_file = Path(captions_file)

    @classmethod
    def from_benchmark(
        cls, data: BenchmarkData, captions_file: str | Path | None = None, gallery_mode: GalleryMode | None = None
    ) -> OracleTargetText:
        """Pair each query of ``data`` with its target's caption (default file: ``oracle_captions_path``)."""
        if not data.has_ground_truth:
            raise DataError(f"{cls.name} needs ground-truth targets, and {data.name} has none.")
        if captions_file is None:
            captions_file = oracle_captions_path(data.annotation_files[0].parents[1], data.split)
        captions = load_oracle_captions(captions_file)
        absent = sorted({q.positives[0] for q in data.queries} - captions.keys())
        if absent:
            raise DataError(
                f"{captions_file} has no caption for {len(absent)} targets of {data.name} (first: {absent[:3]})."
            )
        targets = {
            q.query_id: (q.positives[0], data.image_paths[q.positives[0]], captions[q.positives[0]])
            for q in data.queries
        }
        return cls(targets, captions_file, **({"gallery_mode": gallery_mode} if gallery_mode else {}))

    def settings(self) -> dict[str, Any]:
        return {"oracle": True, "captions_file": str(self.captions_file)}

    def _targets(self, context: QueryContext) -> list[tuple[str, Path, str]]:
        try:
            return [self.targets[q] for q in context.query_ids]
        except KeyError as err:
            raise DataError(f"{self.name} was built for another benchmark split: no target for query {err}.") from None

    def query_embeddings(self, context: QueryContext) -> torch.Tensor:
        captions = [caption for _, _, caption in self._targets(context)]
        return context.embedder.embed_texts(captions)


class OracleTargetFused(OracleTargetText):
    """Query = ``f(I_tgt, T_tgt)``, the target image fused with its ground-truth caption."""

    name = "oracle-target-fused"

    def __init__(
        self,
        targets: Mapping[str, tuple[str, Path, str]],
        captions_file: str | Path,
        gallery_mode: GalleryMode = "fused",
    ) -> None:
        super().__init__(targets, captions_file, gallery_mode)

    def query_embeddings(self, context: QueryContext) -> torch.Tensor:
        targets = self._targets(context)
        table = context.extra.get(IMAGE_TABLE)
        image_embeds = table.lookup([t for t, _, _ in targets]) if table is not None else None
        return fuse_with_captions(
            context.embedder, [c for _, _, c in targets], images=[p for _, p, _ in targets], image_embeds=image_embeds
        )
