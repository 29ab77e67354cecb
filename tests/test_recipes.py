"""The paper-scale recipes load as strictly as every training config, and their embedder specs name real options."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from fusion_diff.embedding.factory import BACKENDS
from fusion_diff.training.config import load_config

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipes"
SPACES = sorted(p.name for p in RECIPES.iterdir() if p.is_dir())


def test_both_joint_spaces_have_a_recipe():
    assert SPACES == ["vit-l-14", "vlm-qwen2.5-vl-3b"]


@pytest.mark.parametrize("space", SPACES)
def test_recipe_configs_load_strictly_for_one_and_eight_gpus(space):
    prior = load_config(RECIPES / space / "stage1_prior.yaml", task="prior")
    adapter = load_config(RECIPES / space / "stage2_adapter.yaml", task="adapter")
    assert prior.model.hidden_dim % prior.model.num_heads == 0
    assert adapter.model.num_blocks <= prior.model.num_layers // 4  # within 25% of the prior
    eight = ["schedule.train_batch_size=256", "schedule.gradient_accumulation_steps=1"]  # the 8-GPU override
    on_eight = load_config(RECIPES / space / "stage1_prior.yaml", task="prior", overrides=eight)
    one_gpu = prior.schedule.train_batch_size * prior.schedule.gradient_accumulation_steps
    assert one_gpu == 8 * on_eight.schedule.train_batch_size  # the same global batch on 1 and on 8 GPUs

    spec = json.loads((RECIPES / space / "embedder.json").read_text())
    accepted = set(inspect.signature(BACKENDS.load(spec.pop("backend")).__init__).parameters)
    assert set(spec) <= accepted
