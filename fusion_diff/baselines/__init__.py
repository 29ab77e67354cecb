"""Baseline and oracle retrieval methods, and the registry of every method ``fusion-diff eval`` runs."""

from typing import Any

from fusion_diff.baselines.registry import METHODS, create_method, method_factory


def __getattr__(name: str) -> Any:
    """The baselines import torch: load them on first use, so that listing the method names stays light."""
    if name in ("ImageOnly", "SumFusion", "TextOnly"):
        from fusion_diff.baselines import simple

        return getattr(simple, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "ImageOnly", "SumFusion", "TextOnly", "create_method", "method_factory"]
