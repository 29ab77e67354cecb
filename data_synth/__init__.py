"""Synthetic data for fusion-diff: the shapes world and the synthetic triplet sets."""
