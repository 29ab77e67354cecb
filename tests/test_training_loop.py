"""The shared Accelerate loop on tiny random embedding caches: stage 2 trains only the adapter, a stopped and
resumed run equals an uninterrupted one, two CPU processes see different shards, validation is hooked in."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import set_seed
from safetensors.torch import load_file

from fusion_diff.embedding.cache import EmbeddingCache
from fusion_diff.errors import CacheMismatchError, ConfigError, DataError, MissingFileError
from fusion_diff.models.denoise import predicted_sample
from fusion_diff.pipelines.fusion_diff import FusionDiffPipeline
from fusion_diff.training.adapter_task import AdapterTask
from fusion_diff.training.config import config_from_dict
from fusion_diff.training.data import (
    NEAR_MISS_CACHE,
    PAIR_FIELDS,
    TRIPLET_FIELDS,
    PairEmbeddingDataset,
    near_miss_ids,
    write_random_caches,
)
from fusion_diff.training.prior_task import DenoisedBatch
from fusion_diff.training.loop import train

REPO = Path(__file__).resolve().parents[1]
DIM = 16
TINY_PRIOR = {"hidden_dim": 16, "num_layers": 2, "num_heads": 2}
QUIET = {"log_every_n_steps": 1, "report_to": "none", "progress_bar": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("training_data")
    write_random_caches(root / "pairs", PAIR_FIELDS, 40, DIM, seed=0)
    write_random_caches(root / "triplets", TRIPLET_FIELDS, 40, DIM, seed=1)
    return root


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory) -> Path:
    """A tiny trained prior (stage-1 output folder) for the stage-2 tests."""
    out = tmp_path_factory.mktemp("stage1")
    train(prior_config(data, out, max_train_steps=2))
    return out


def prior_config(data: Path, out: Path, **schedule):
    return config_from_dict(
        {
            "task": "prior",
            "output_dir": str(out),
            "seed": 3,
            "model": {**TINY_PRIOR, "dropout": 0.1},  # dropout: global-RNG use that resume must reproduce too
            "data": {"pair_embeddings": str(data / "pairs")},
            "schedule": {"train_batch_size": 4, "lr_warmup_steps": 2, **schedule},
            "checkpointing": {"every_n_steps": 3, "total_limit": 2},
            "logging": QUIET,
        }
    )


def adapter_raw(stage1: Path, data: Path, out: Path, **schedule) -> dict:
    return {
        "task": "adapter",
        "output_dir": str(out),
        "seed": 0,
        "model": {"prior_path": str(stage1), "num_blocks": 1},
        "data": {"triplet_embeddings": str(data / "triplets")},
        "optim": {"learning_rate": 1e-2},
        "schedule": {"train_batch_size": 4, "lr_warmup_steps": 0, "lr_scheduler": "constant", **schedule},
        "checkpointing": {"every_n_steps": 0},
        "logging": QUIET,
    }


def test_prior_stores_data_statistics(data, stage1):
    pipe = FusionDiffPipeline.from_pretrained(str(stage1))
    target = PairEmbeddingDataset(data / "pairs").tensors["target"]
    torch.testing.assert_close(pipe.prior.embedding_mean, target.mean(0))
    torch.testing.assert_close(pipe.prior.embedding_std, target.std(0))
    assert pipe.prior.config.embedder_identity["backend"] == "random"
    log = [json.loads(line) for line in (stage1 / "logs/train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)
    assert yaml.safe_load((stage1 / "training_config.yaml").read_text())["task"] == "prior"


def test_stage2_steps_change_only_the_adapter(data, stage1, tmp_path):
    config = config_from_dict(
        {**adapter_raw(stage1, data, tmp_path / "s2", max_train_steps=3), "ema": {"use_ema": False}}
    )
    set_seed(config.seed)
    task = AdapterTask(config)
    prior_before = {k: v.clone() for k, v in task.prior.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in task.adapter.state_dict().items()}
    train(config, task=task)

    for key, value in task.prior.state_dict().items():
        assert torch.equal(value, prior_before[key]), f"frozen prior weight {key} changed"
    assert not any(p.requires_grad for p in task.prior.parameters())
    changed = [k for k, v in task.adapter.state_dict().items() if not torch.equal(v, adapter_before[k])]
    assert any(k.startswith("residual_projs") for k in changed), changed
    saved_prior = load_file(tmp_path / "s2/prior/diffusion_pytorch_model.safetensors")
    original = load_file(stage1 / "prior/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved_prior[k], original[k]) for k in original)
    saved = FusionDiffPipeline.from_pretrained(str(tmp_path / "s2"))
    for key, value in saved.adapter.state_dict().items():
        assert torch.equal(value, task.adapter.state_dict()[key])


@pytest.mark.slow
def test_stopped_and_resumed_run_equals_uninterrupted(data, tmp_path):
    schedule = {"max_train_steps": 12, "gradient_accumulation_steps": 2}  # 5 optimiser steps per epoch
    full = train(prior_config(data, tmp_path / "full", **schedule))
    assert full.finished and full.global_step == 12

    cut = tmp_path / "cut"
    stopped = train(prior_config(data, cut, **schedule), stop_at_step=8)
    assert not stopped.finished and not (cut / "training_manifest.json").exists()
    # A kill between checkpoints: the run's last save (step 8) is lost, resume replays from step 6 (mid-epoch).
    shutil.rmtree(cut / "checkpoints/checkpoint-8")
    resumed = train(prior_config(data, cut, **schedule), resume="latest")
    assert resumed.finished and resumed.global_step == 12

    a = load_file(tmp_path / "full/prior/diffusion_pytorch_model.safetensors")
    b = load_file(cut / "prior/diffusion_pytorch_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    logs = [
        [json.loads(x)["loss"] for x in (d / "logs/train_log.jsonl").read_text().splitlines()]
        for d in (tmp_path / "full", cut)
    ]
    assert logs[0] == pytest.approx(logs[1], abs=1e-6)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["checkpoint-6", "checkpoint-9"]  # total_limit 2


def test_validation_hook_gets_the_pipeline_on_schedule(data, stage1, tmp_path):
    calls = []

    def validate(pipe) -> dict[str, float]:
        calls.append((type(pipe), pipe.adapter.training))
        return {"score": float(len(calls))}

    raw = adapter_raw(stage1, data, tmp_path / "s2", max_train_steps=4)
    raw["validation"] = {"every_n_steps": 2}
    result = train(config_from_dict(raw), validation_fn=validate)
    assert calls == [(FusionDiffPipeline, False)] * 2  # step 2, then the end (step 4)
    assert result.validation == {"val/score": 2.0}
    log = [json.loads(line) for line in (tmp_path / "s2/logs/train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val/score" in r] == [2, 4]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_see_different_shards(data, stage1, tmp_path):
    out = tmp_path / "ddp"
    raw = adapter_raw(stage1, data, out, max_train_steps=3)
    raw["logging"] = {**QUIET, "log_sample_ids": True}
    config = tmp_path / "adapter.yaml"
    config.write_text(yaml.safe_dump(raw))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "adapters/accelerate/cpu_2proc.yaml"), "--main_process_port", str(_free_port()),
        str(REPO / "adapters/train_adapter.py"), "--config", str(config),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["num_processes"] == 2 and manifest["global_step"] == 3
    seen = {}
    for rank in (0, 1):
        lines = [json.loads(x) for x in (out / f"logs/sample_ids/rank{rank}.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == [0, 1, 2]
        seen[rank] = [i for x in lines for i in x["indices"]]
    assert len(seen[0]) == len(set(seen[0])) == 12 and len(seen[1]) == 12
    assert not set(seen[0]) & set(seen[1])  # one epoch, disjoint shards
    FusionDiffPipeline.from_pretrained(str(out))  # the final weights load


def test_datasets_refuse_incomplete_or_foreign_caches(data, tmp_path):
    pairs = tmp_path / "pairs"
    shutil.copytree(data / "pairs", pairs)
    ids, embeds = EmbeddingCache.read(pairs / "text").load()
    shutil.rmtree(pairs / "text")
    text = EmbeddingCache.open(
        pairs / "text", {"backend": "random", "model": "gaussian", "pretrained": None, "dim": DIM}
    )
    text.append(ids[:-1], embeds[:-1])  # one caption embedding short
    with pytest.raises(DataError, match=rf"{pairs / 'fused'} and {pairs / 'text'} do not hold the same ids"):
        PairEmbeddingDataset(pairs)
    shutil.rmtree(pairs / "text")
    EmbeddingCache.open(pairs / "text", {"backend": "other", "model": "gaussian", "dim": DIM}).append(ids, embeds)
    with pytest.raises(CacheMismatchError, match="different backbones"):
        PairEmbeddingDataset(pairs)
    with pytest.raises(MissingFileError, match=r"'target' not found at .*nowhere/fused"):
        PairEmbeddingDataset(tmp_path / "nowhere")


def test_contrastive_term_is_logged_and_learns(data, stage1, tmp_path):
    """With ``contrastive_weight`` the loss logs both terms, and steps on one fixed batch lower the contrastive one."""
    raw = adapter_raw(stage1, data, tmp_path / "s2", max_train_steps=1)
    raw["model"].update(contrastive_weight=1.0, contrastive_temperature=0.1)
    raw["data"].update(text_dropout=0.0, control_dropout=0.0)
    task = AdapterTask(config_from_dict(raw))
    batch = task.dataset.__getitems__(list(range(16)))
    optimizer = torch.optim.Adam(task.adapter.parameters(), lr=1e-2)
    history = []
    for _ in range(30):
        loss, terms = task.compute_loss(task.adapter, batch, torch.Generator().manual_seed(0))  # same noise each step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(terms)
    assert set(history[0]) == {"mse", "contrastive"}
    assert history[-1]["contrastive"] < 0.5 * history[0]["contrastive"]


def test_near_misses_join_the_contrastive_term_as_each_rows_own_negatives(data, stage1, tmp_path):
    """``data.near_misses``: read from ``near_miss_fused/`` aligned with the triplets; refused without the
    contrastive term or without the cache; the loss is InfoNCE over the batch's targets plus the row's own misses."""
    triplets = tmp_path / "triplets"
    shutil.copytree(data / "triplets", triplets)
    raw = adapter_raw(stage1, data, tmp_path / "s2", max_train_steps=1)
    raw["data"].update(triplet_embeddings=str(triplets), near_misses=2, text_dropout=0.0, control_dropout=0.0)
    with pytest.raises(ConfigError, match="contrastive_weight"):
        AdapterTask(config_from_dict(raw))
    raw["model"].update(contrastive_weight=1.0, contrastive_temperature=0.1)
    with pytest.raises(MissingFileError, match="--near-misses 2"):
        AdapterTask(config_from_dict(raw))
    target_cache = EmbeddingCache.read(triplets / "target_fused")
    identity = {**target_cache.identity, "role": NEAR_MISS_CACHE, "near_misses": 2}
    misses = torch.nn.functional.normalize(torch.randn(2 * len(target_cache), DIM), dim=-1)
    EmbeddingCache.open(triplets / NEAR_MISS_CACHE, identity).append(near_miss_ids(target_cache.ids, 2), misses)
    task = AdapterTask(config_from_dict(raw))
    batch = task.dataset.__getitems__([3, 0, 7, 5])
    assert batch["near_miss"].shape == (4, 2, DIM)
    torch.testing.assert_close(batch["near_miss"][0], misses[6:8])  # triplet 3's two rows
    noisy, output = torch.randn(4, DIM), torch.randn(4, DIM)
    denoised = DenoisedBatch(output=output, target=output, noisy=noisy, timesteps=torch.tensor([5, 50, 500, 900]))
    rows = torch.tensor([True, False, True, True])
    z0 = predicted_sample(task.scheduler, noisy, output, denoised.timesteps)
    queries = torch.nn.functional.normalize(task.prior.destandardize(z0[rows]), dim=-1)
    targets = torch.nn.functional.normalize(batch["target"], dim=-1)
    own = torch.stack([queries[k] @ batch["near_miss"][r].T for k, r in enumerate([0, 2, 3])])
    logits = torch.cat([queries @ targets.T, own], 1) / 0.1
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2, 3]))
    loss = task.contrastive_loss(denoised, batch["target"], rows, batch["near_miss"])
    torch.testing.assert_close(loss, expected)
    raw["data"]["near_misses"] = 3
    with pytest.raises(CacheMismatchError, match="holds 2 per triplet"):
        AdapterTask(config_from_dict(raw))
