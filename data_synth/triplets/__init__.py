"""Synthetic (reference, instruction, target) triplet sets for stage-2 training.

- ``format``: webdataset-style tar shards + manifest; parallel, deterministic, resumable builds; readers.
- ``stream``: a torch IterableDataset over a triplet set (split across ranks and loader workers).
- ``shapes_builder``: the shapes-world set from scene-graph edits (``fusion-diff synth shapes``).
- ``corpus_edits``: caption-edit triplets from a real caption corpus (``fusion-diff synth corpus``).
- ``realise``: their images through diffusers pipelines, with a CLIP filter (``fusion-diff synth realise``).
- ``embed``: the embedding caches training reads (``fusion-diff embed-triplets``).
"""
