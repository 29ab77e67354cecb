"""Baseline and oracle retrieval methods, and the registry of every method ``fusion-diff eval`` runs."""

from fusion_diff.baselines.registry import METHODS, create_method, method_factory
from fusion_diff.baselines.simple import ImageOnly, SumFusion, TextOnly

__all__ = ["METHODS", "ImageOnly", "SumFusion", "TextOnly", "create_method", "method_factory"]
