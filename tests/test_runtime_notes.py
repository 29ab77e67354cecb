"""Issue 19 item 7: bf16 on a CPU without AVX512_BF16 / AMX is warned about (naming the fix); every model
says where it runs and in what precision."""

from __future__ import annotations

import logging

import pytest

from fusion_diff.utils import runtime


@pytest.fixture
def slow_cpu(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_bf16_support", lambda: (False, "CPU capability AVX2, no AVX512_BF16 / AMX"))


def test_bf16_on_a_slow_cpu_is_warned_with_the_fix(slow_cpu, caplog):
    with caplog.at_level(logging.INFO, logger="fusion_diff.runtime"):
        runtime.announce("open_clip ViT-L-14 embedder", "cpu", "bf16")
    warning, note = caplog.records
    assert warning.levelno == logging.WARNING and "no AVX512_BF16 / AMX" in warning.message
    assert "Use fp32" in warning.message and "GPU" in warning.message
    assert note.message == "open_clip ViT-L-14 embedder on cpu, bf16"


def test_fp32_and_gpus_and_fast_cpus_pass_silently(slow_cpu, monkeypatch):
    assert runtime.slow_bf16_warning("cpu", "fp32", "x") is None
    assert runtime.slow_bf16_warning("cuda:0", "bfloat16", "x") is None
    monkeypatch.setattr(runtime, "cpu_bf16_support", lambda: (True, "flags amx_bf16"))
    assert runtime.slow_bf16_warning("cpu", "torch.bfloat16", "x") is None


def test_this_machine_is_detected():
    fast, what = runtime.cpu_bf16_support.__wrapped__()
    assert fast in (True, False, None) and "CPU capability" in what


def test_embedders_announce_their_device_and_precision(tiny_openclip_checkpoint, caplog):
    from fusion_diff.embedding import OpenCLIPEmbedder

    name, checkpoint = tiny_openclip_checkpoint
    with caplog.at_level(logging.INFO, logger="fusion_diff.runtime"):
        OpenCLIPEmbedder(name, pretrained=checkpoint)
    assert f"open_clip {name} embedder on cpu, fp32" in caplog.text


def test_demo_remaining_time_scales_reference_steps_by_measured_speed():
    from fusion_diff.demo import remaining_estimate
    from fusion_diff.demo_budget import Plan

    reference = Plan().reference_seconds()
    assert remaining_estimate({}, ["plots"], reference) is None  # nothing measured yet
    assert remaining_estimate({"world backbone": 0.01}, ["plots"], reference) is None  # a cached step says nothing
    done = {"world backbone": 3 * reference["world backbone"], "benchmark": 0.2}
    left = remaining_estimate(done, ["stage 1: prior", "stage 2: Control-Adapter"], reference)
    assert left == 3 * (reference["stage 1: prior"] + reference["stage 2: Control-Adapter"])
    scaled = Plan(scale=0.5).reference_seconds()  # a scaled schedule: its steps are expected shorter
    assert scaled["stage 2: Control-Adapter"] < reference["stage 2: Control-Adapter"]
    assert scaled["evaluation (test split)"] == reference["evaluation (test split)"]  # the table is never scaled
