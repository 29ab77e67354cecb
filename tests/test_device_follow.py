"""Issue 20 item 8: every model of a job follows its --device / --dtype (eval's sampling and gallery search,
embed-triplets' embedder and captioner, synth realise's CLIP filter). No GPU here: the tests record where
each model was sent, or use the ``meta`` device, which no code path picks by itself."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from test_eval import write_tiny_benchmark

from fusion_diff.benchmarks import load_shapes
from fusion_diff.benchmarks.evaluate import Evaluator
from fusion_diff.cli import main
from fusion_diff.embedding import factory
from fusion_diff.embedding.factory import with_runtime


class _Stop(Exception):
    """Raised by a recording double once it has seen what the test needs."""


def test_issue20_models_follow_device_in_eval(tmp_path, tiny_openclip, tiny_openclip_checkpoint, monkeypatch):
    from fusion_diff.baselines import ImageOnly
    from fusion_diff.benchmarks import evaluate
    from fusion_diff.models import ControlAdapter, FusionPrior, sampling_scheduler
    from fusion_diff.pipelines.fusion_diff import FusionDiffPipeline

    root = write_tiny_benchmark(tmp_path / "bench")
    seen = {}

    def recording_index(embeddings, ids, backend="exact", **kwargs):
        seen["gallery"] = embeddings.device
        raise _Stop

    monkeypatch.setattr(evaluate, "build_index", recording_index)
    data = load_shapes(root, "test")
    evaluator = Evaluator(data, tiny_openclip, cache_root=tmp_path / "c", progress=False, device="meta")
    with pytest.raises(_Stop):
        evaluator.evaluate(ImageOnly())
    assert seen["gallery"].type == "meta"  # the gallery search runs where the job runs

    torch.manual_seed(0)
    prior = FusionPrior(embedding_dim=tiny_openclip.dim, hidden_dim=32, num_layers=1, num_heads=2)
    FusionDiffPipeline(prior, sampling_scheduler("ddim", prior), ControlAdapter.from_prior(prior, 1)).save_pretrained(
        tmp_path / "pipe"
    )
    real_to = FusionDiffPipeline.to

    def recording_to(self, *args, **kwargs):
        seen.setdefault("pipeline", []).append(args or kwargs)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(FusionDiffPipeline, "to", recording_to)
    name, checkpoint = tiny_openclip_checkpoint
    with pytest.raises(_Stop):
        main(["eval", "--benchmark", "shapes", "--split", "test", "--root", str(root), "--model", name, "--pretrained",
              str(checkpoint), "--method", "fusion-diff", "--checkpoint", str(tmp_path / "pipe"), "--device", "cpu",
              "--gallery-mode", "image",
              "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c2")])  # fmt: skip
    assert ("cpu",) in seen["pipeline"]  # the Fusion-Diff pipeline was sent to --device


def test_issue20_models_follow_device_in_embed_triplets(tmp_path, monkeypatch):
    specs = []

    def recording_embedder(spec):
        specs.append(spec)
        raise _Stop

    monkeypatch.setattr(factory, "create_embedder", recording_embedder)
    spec = {"backend": "openclip", "model_name": "ViT-L-14", "pretrained": "weights.safetensors"}
    with pytest.raises(_Stop):
        main(["embed-triplets", "--triplets", str(tmp_path), "--out", str(tmp_path / "o"), "--embedder",
              json.dumps(spec), "--device", "meta", "--dtype", "bf16"])  # fmt: skip
    assert specs == [{**spec, "device": "meta", "precision": "bf16"}]

    import fusion_diff.captioning
    from fusion_diff.cli import caption as caption_cli

    captured = []
    monkeypatch.setattr(fusion_diff.captioning, "create_captioner", lambda spec, *a: captured.append(spec) or None)
    args = caption_cli.argparse.Namespace(
        captioner="generative", captioner_model="blip", device="meta", dtype="bf16", caption_dtype=None,
        caption_prompt=None, caption_top_k=1, caption_max_new_tokens=5, caption_num_beams=1,
    )  # fmt: skip
    caption_cli.captioner_from_args(args, None)
    assert (captured[0]["device"], captured[0]["dtype"]) == ("meta", "bf16")  # the captioner follows the job


def test_issue20_models_follow_device_in_realise_filter(tmp_path, monkeypatch):
    from data_synth.triplets import realise

    class FakePipe:
        def __call__(self, prompt, image=None, **kwargs):
            return type("Out", (), {"images": [Image.new("RGB", (8, 8)) for _ in prompt]})()

    seen = {}

    def recording_filter(spec_json):
        seen["spec"] = json.loads(spec_json)
        raise _Stop

    monkeypatch.setattr(realise, "_pipeline", lambda model, device, dtype: FakePipe())
    monkeypatch.setattr(realise, "_filter_embedder", recording_filter)
    monkeypatch.setattr(realise, "_generators", lambda device, seed, indices: None)
    config = realise.RealiseConfig(
        filter_embedder={"backend": "openclip", "model_name": "ViT-L-14", "pretrained": "openai"},
        device="meta",
        dtype="bfloat16",
        image_size=8,
    )
    record = {"reference_caption": "a car", "instruction": "make it red", "target_caption": "a red car"}
    with pytest.raises(_Stop):
        realise.realise_batch([record], [0], 0, config)
    assert (seen["spec"]["device"], seen["spec"]["precision"]) == ("meta", "bf16")


def test_with_runtime_fills_only_what_the_spec_leaves_open():
    assert with_runtime({"backend": "vlm", "model_id_or_path": "m"}, "cuda:1", "fp16") == {
        "backend": "vlm", "model_id_or_path": "m", "device": "cuda:1", "dtype": "float16"
    }  # fmt: skip
    fixed = {"device": "cpu", "precision": "fp32"}
    assert with_runtime(fixed, "cuda", "bf16") == fixed
    with pytest.raises(Exception, match="Unknown precision"):
        with_runtime({}, None, "int3")
