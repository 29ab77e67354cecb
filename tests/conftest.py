"""Shared test set-up: offline hubs, a private cache, few threads, tiny models built on the fly."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own FUSION_DIFF_CACHE so that no test reads the user's real cache."""
    monkeypatch.setenv("FUSION_DIFF_CACHE", str(tmp_path_factory.mktemp("fusion_diff_cache")))
