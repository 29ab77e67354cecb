"""Issue 21's silent wrong results, one test per item: each ran to exit code 0 with a wrong result before the fix.

Item 1 lost an image, 2 saved NaN weights, 3 stored and ranked NaN vectors, 4 returned empty or raw errors for
bad k, 5 accepted a submission with a repeated key, 6 left a cache that blocked the corrected command, 7
recorded negative counts, 8 recorded a learning rate that did not run, 9 let two writers share one folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from test_benchmarks import CIRR, write_blank_images
from test_pipeline_cli import saved_pipeline, write_queries  # noqa: F401  (saved_pipeline: fixture)

from fusion_diff.cli import main
from fusion_diff.embedding import EmbeddingCache
from fusion_diff.embedding.cache import embed_with_cache
from fusion_diff.errors import (
    CacheMismatchError,
    ConfigError,
    DataError,
    FolderInUseError,
    TrainingDivergedError,
)
from fusion_diff.pipelines import FusionDiffMethod, FusionDiffPipeline
from fusion_diff.retrieval import build_index
from fusion_diff.retrieval.index import GalleryIndex
from fusion_diff.retrieval.sources import gallery_items
from fusion_diff.retrieval.store import PersistentIndex
from fusion_diff.training.config import config_from_dict, load_config
from fusion_diff.training.data import PAIR_FIELDS, write_random_caches
from fusion_diff.training.loop import train
from fusion_diff.utils.locking import LOCK_FILE

REPO = Path(__file__).resolve().parents[1]
DIM = 16
QUIET = {"log_every_n_steps": 1, "report_to": "none", "progress_bar": False}
IDENTITY = {"backend": "random", "model": "gaussian", "pretrained": None, "dim": 4, "kind": "image"}


def tiny_model_args(checkpoint) -> list[str]:
    name, path = checkpoint
    return ["--model", name, "--pretrained", str(path)]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fault_pairs")
    write_random_caches(root, PAIR_FIELDS, 24, DIM, seed=0)
    return root


def prior_raw(pairs: Path, out: Path, learning_rate: float = 1e-3, **schedule) -> dict:
    return {
        "task": "prior",
        "output_dir": str(out),
        "seed": 0,
        "model": {"hidden_dim": 16, "num_layers": 1, "num_heads": 2},
        "data": {"pair_embeddings": str(pairs)},
        "optim": {"learning_rate": learning_rate},
        "schedule": {"train_batch_size": 4, "lr_warmup_steps": 0, "lr_scheduler": "constant", **schedule},
        "ema": {"use_ema": False},
        "checkpointing": {"every_n_steps": 1, "total_limit": None},
        "logging": QUIET,
    }


def log_lines(out: Path, name: str = "train_log.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / name).read_text().splitlines()]


class LockHolder:
    """Another process holding a folder's writer lock (as a running job would), until killed."""

    def __init__(self, folder: Path, job: str) -> None:
        code = (
            "import sys, time\n"
            "from fusion_diff.utils.locking import exclusive_folder\n"
            "with exclusive_folder(sys.argv[1], sys.argv[2]):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(120)\n"
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, str(folder), job], stdout=subprocess.PIPE, text=True, env=env
        )
        assert self.process.stdout.readline().strip() == "held"

    def kill(self) -> None:
        """``kill -9``: the kernel drops the flock with the process; the lock file stays behind."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


# --------------------------------------------------------------------------- item 1
def test_issue21_item1_same_stem_images_keep_both(tmp_path, tiny_openclip_checkpoint, tiny_openclip):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), "red").save(images / "x.png")
    Image.new("RGB", (32, 32), "blue").save(images / "x.jpg")
    Image.new("RGB", (32, 32), "green").save(images / "y.png")
    out = tmp_path / "cache"
    assert (
        main(
            ["embed", "images", "--images", str(images), "--out", str(out), *tiny_model_args(tiny_openclip_checkpoint)]
        )
        == 0
    )
    ids, embeds = EmbeddingCache.read(out).load()
    assert ids == ["x.jpg", "x.png", "y"]  # both x images kept; y keeps its suffix-free id
    expected = tiny_openclip.embed_images([images / "x.jpg", images / "x.png", images / "y.png"])
    torch.testing.assert_close(embeds, expected)
    assert gallery_items(images).ids == ids  # an index built from the folder names them the same way

    listing = tmp_path / "images.jsonl"
    listing.write_text("".join(json.dumps({"id": "a", "image": f"images/{n}"}) + "\n" for n in ("x.png", "y.png")))
    with pytest.raises(DataError, match=r"images\.jsonl: ids repeat .*'a'"):
        main(
            [
                "embed",
                "images",
                "--images",
                str(listing),
                "--out",
                str(tmp_path / "c2"),
                *tiny_model_args(tiny_openclip_checkpoint),
            ]
        )


# --------------------------------------------------------------------------- item 2
def test_issue21_item2_diverging_training_stops_without_saving_nan(pairs, tmp_path):
    config_file = tmp_path / "prior.yaml"
    config_file.write_text(yaml.safe_dump(prior_raw(pairs, tmp_path / "inf", max_train_steps=2)))
    with pytest.raises(ConfigError, match=r"'optim\.learning_rate' must be a finite number"):
        main(["train", "prior", "--config", str(config_file), "optim.learning_rate=.inf"])
    with pytest.raises(ConfigError, match=r"'optim\.learning_rate' must be a finite number"):
        load_config(config_file, overrides=["optim.learning_rate=nan"])
    assert not (tmp_path / "inf").exists()

    out = tmp_path / "diverged"
    with pytest.raises(TrainingDivergedError) as err:
        train(config_from_dict(prior_raw(pairs, out, learning_rate=1e6, max_train_steps=6)))
    message = str(err.value)
    assert "diverged by step" in message and "optim.learning_rate=1000000.0" in message
    assert not (out / "training_manifest.json").exists() and not (out / "prior").exists()  # no final weights
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for checkpoint in checkpoints:  # what was saved before it is finite
        weights = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), checkpoint
    assert (f"--resume {checkpoints[-1]}" if checkpoints else "No checkpoint was saved") in message


# --------------------------------------------------------------------------- item 3
def test_issue21_item3_nan_settings_and_vectors_are_refused(
    tmp_path,
    saved_pipeline,  # noqa: F811
    tiny_openclip_checkpoint,
    tiny_openclip,
):
    write_queries(tmp_path, [{"id": "q0", "reference": "images/red.png", "instruction": "make it blue"}])
    out = tmp_path / "queries"
    sample = ["sample", "--pipeline", str(saved_pipeline), "--queries", str(tmp_path / "queries.jsonl")]
    with pytest.raises(SystemExit):  # argparse: "argument --control-guidance: must be a finite number, got nan"
        main([*sample, "--out", str(out), "--control-guidance", "nan", *tiny_model_args(tiny_openclip_checkpoint)])
    assert not out.exists()

    pipe = FusionDiffPipeline.from_pretrained(saved_pipeline, embedder=tiny_openclip)
    with pytest.raises(ConfigError, match="control_guidance=nan"):
        FusionDiffMethod(pipe, control_guidance=float("nan"))
    text = torch.nn.functional.normalize(torch.randn(2, tiny_openclip.dim), dim=-1)
    with pytest.raises(ConfigError, match="text_guidance=inf"):
        pipe.sample(text, text, text_guidance=float("inf"), num_inference_steps=2)

    cache = EmbeddingCache.open(tmp_path / "cache", IDENTITY)
    bad = torch.tensor([[1.0, 0, 0, 0], [float("nan"), 0, 0, 0]])
    with pytest.raises(DataError, match=r"1 row\(s\) hold NaN or inf \(first rows: \[1\]\)"):
        cache.append(["a", "b"], bad)
    assert len(cache) == 0 and not list((tmp_path / "cache").glob("shard-*"))

    gallery = torch.eye(4)
    with pytest.raises(DataError, match="Gallery embeddings"):
        build_index(bad, ["a", "b"])
    with pytest.raises(DataError, match="Search queries"):
        GalleryIndex(gallery, list("abcd")).search(bad, k=2)
    with pytest.raises(DataError, match="gallery embeddings"):
        PersistentIndex.write(tmp_path / "index", IDENTITY, bad, [{"id": "a"}, {"id": "b"}])

    # A query cache with a NaN row from before the fix (written without the check): search refuses it.
    old = tmp_path / "old_queries"
    EmbeddingCache.open(old, IDENTITY)
    save_file({"embeddings": bad}, str(old / "shard-00000.safetensors"), metadata={"ids": json.dumps(["a", "b"])})
    EmbeddingCache.open(gallery_dir := tmp_path / "gallery", IDENTITY).append(list("abcd"), gallery)
    with pytest.raises(DataError, match="Search queries: 1 row"):
        main(["search", "--gallery", str(gallery_dir), "--queries", str(old), "--k", "2"])


# --------------------------------------------------------------------------- item 4
def test_issue21_item4_k_below_one_is_refused_and_k_above_gallery_says_so(tmp_path, capsys, caplog):
    gallery = tmp_path / "gallery"
    EmbeddingCache.open(gallery, IDENTITY).append(list("abc"), torch.eye(4)[:3])
    queries = tmp_path / "queries"
    EmbeddingCache.open(queries, IDENTITY).append(["q"], torch.eye(4)[1:2])
    for k in ("0", "-3"):
        with pytest.raises(SystemExit):
            main(["search", "--gallery", str(gallery), "--queries", str(queries), "--k", k])
        assert "--k: must be an integer >= 1" in capsys.readouterr().err
    index = GalleryIndex(torch.eye(4)[:3], list("abc"))
    for k in (0, -3):
        with pytest.raises(ConfigError, match=f"k={k}"):
            index.search(torch.eye(4)[:1], k=k)

    out = tmp_path / "hits.jsonl"
    assert main(["search", "--gallery", str(gallery), "--queries", str(queries), "--k", "10", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["ids"][0] == "b" and len(json.loads(out.read_text())["ids"]) == 3
    assert "has 3 items, fewer than --k 10" in caplog.text


# --------------------------------------------------------------------------- item 5
@pytest.fixture(scope="module")
def cirr_test(tmp_path_factory):
    from fusion_diff.benchmarks import load_cirr

    root = tmp_path_factory.mktemp("cirr_test_images")
    names = json.loads((CIRR / "image_splits" / "split.rc2.test1.json").read_text())
    write_blank_images(root / rel for rel in names.values())
    return load_cirr(CIRR, "test", image_root=root)


def test_issue21_item5_submission_with_repeated_key_or_list_is_refused(cirr_test, tmp_path):
    from fusion_diff.benchmarks import cirr_submission, validate_submission

    test = cirr_test
    ids = [q.query_id for q in test.queries]
    top3 = [[m for m in q.group if m != q.reference][:3] for q in test.queries]
    valid = json.dumps(cirr_submission("recall_subset", ids, top3))
    path = tmp_path / "subset.json"
    path.write_text(valid)
    validate_submission(path, test)  # the valid file passes

    # A bogus first entry for ids[0], hidden by the valid one later in the file.
    path.write_text('{"' + ids[0] + '": ["bogus"], ' + valid[1:])
    with pytest.raises(DataError, match=rf"subset\.json repeats the key '{ids[0]}'"):
        validate_submission(path, test)
    argv = ["validate-submission", str(path), "--benchmark", "cirr", "--split", "test", "--root", str(CIRR)]
    with pytest.raises(DataError, match="repeats the key"):
        main(argv)

    path.write_text(json.dumps([valid]))
    with pytest.raises(DataError, match=r"subset\.json is not a valid .*found a JSON list"):
        validate_submission(path, test)


# --------------------------------------------------------------------------- item 6
def test_issue21_item6_failed_sample_leaves_nothing_and_the_fix_runs(
    tmp_path,
    saved_pipeline,  # noqa: F811
    tiny_openclip_checkpoint,
    tiny_openclip,
):
    write_queries(tmp_path, [{"id": "q0", "reference": "images/red.png", "instruction": "make it blue"}])
    out = tmp_path / "queries"
    sample = ["sample", "--pipeline", str(saved_pipeline), "--queries", str(tmp_path / "queries.jsonl"), "--out"]
    model = tiny_model_args(tiny_openclip_checkpoint)
    with pytest.raises(SystemExit):
        main([*sample, str(out), "--steps", "0", *model])
    assert not out.exists()
    pipe = FusionDiffPipeline.from_pretrained(saved_pipeline, embedder=tiny_openclip)
    with pytest.raises(ConfigError, match="num_inference_steps=0"):
        FusionDiffMethod(pipe, num_inference_steps=0)  # refused when built, before any output

    # A failure during sampling (the queries have no captions for --control fused) leaves no folder behind ...
    with pytest.raises(DataError, match="control_mode='fused'"):
        main([*sample, str(out), "--control", "fused", "--steps", "2", *model])
    assert not out.exists()
    # ... so the corrected command (other settings, hence another cache identity) just runs.
    assert main([*sample, str(out), "--steps", "2", *model]) == 0
    assert EmbeddingCache.read(out).ids == ["q0"]
    with pytest.raises(CacheMismatchError):  # a real cache of other settings is still refused
        main([*sample, str(out), "--steps", "3", *model])


# --------------------------------------------------------------------------- item 7
def test_issue21_item7_negative_counts_are_refused(tmp_path, capsys):
    from data_synth.shapes.benchmark import BenchmarkConfig
    from data_synth.shapes.benchmark_open import OpenBenchmarkConfig
    from data_synth.shapes.pairs import write_pair_set

    cases = [
        (["world", "pairs", "--out", str(tmp_path / "pairs"), "--n", "-3"], "--n: must be an integer >= 1"),
        (["world", "benchmark", "--out", str(tmp_path / "bench"), "--val", "-2"], "--val: must be an integer >= 1"),
        (["world", "benchmark-open", "--out", str(tmp_path / "open"), "--max-targets", "0"], "--max-targets"),
        (["synth", "shapes", "--out", str(tmp_path / "synth"), "--n", "-1"], "--n: must be an integer >= 1"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and expected in capsys.readouterr().err, argv
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="val_queries=-2"):
        BenchmarkConfig(val_queries=-2)
    with pytest.raises(ConfigError, match="negatives=-1"):
        OpenBenchmarkConfig(negatives=-1)
    with pytest.raises(ConfigError, match="n=-3"):
        write_pair_set(tmp_path / "pairs", -3)
    assert not (tmp_path / "pairs").exists()


# --------------------------------------------------------------------------- item 8
def test_issue21_item8_resume_trains_with_and_records_the_new_learning_rate(pairs, tmp_path):
    out, same = tmp_path / "run", tmp_path / "same"
    train(config_from_dict(prior_raw(pairs, out, max_train_steps=4)), stop_at_step=2)
    shutil.copytree(out, same)  # the same stopped run, to be resumed with the old rate
    resumed = train(config_from_dict(prior_raw(pairs, out, learning_rate=1e-2, max_train_steps=4)), resume="latest")
    assert resumed.finished
    assert [r["lr"] for r in log_lines(out)] == pytest.approx([1e-3, 1e-3, 1e-2, 1e-2])  # steps 3-4 ran at 1e-2
    assert yaml.safe_load((out / "training_config.yaml").read_text())["optim"]["learning_rate"] == 1e-2
    (change,) = json.loads((out / "training_manifest.json").read_text())["config_changes"]
    assert change["step"] == 2 and change["changed"] == {"optim.learning_rate": {"before": 1e-3, "after": 1e-2}}

    # The optimiser itself took the new rate: the same checkpoint resumed with the old rate ends elsewhere.
    train(config_from_dict(prior_raw(pairs, same, max_train_steps=4)), resume="latest")
    assert json.loads((same / "training_manifest.json").read_text())["config_changes"] == []
    new, old = (load_file(d / "prior/diffusion_pytorch_model.safetensors") for d in (out, same))
    assert any(not torch.equal(new[k], old[k]) for k in new)

    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run"):  # a fresh run would mix them
        train(config_from_dict(prior_raw(pairs, out, max_train_steps=4)))


# --------------------------------------------------------------------------- item 9
def test_issue21_item9_second_training_writer_refused(pairs, tmp_path):
    out = tmp_path / "run"
    holder = LockHolder(out, "training run")
    try:
        with pytest.raises(FolderInUseError) as err:
            train(config_from_dict(prior_raw(pairs, out, max_train_steps=2)))
        message = str(err.value)
        assert f"pid {holder.process.pid}" in message and "training run" in message
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the refused run wrote nothing
    finally:
        holder.kill()
    # The lock of a killed holder is gone with it: the next run goes ahead, and its log has each step once.
    assert train(config_from_dict(prior_raw(pairs, out, max_train_steps=2))).finished
    assert [r["step"] for r in log_lines(out)] == [1, 2]


def test_issue21_item9_second_embedding_writer_refused(tmp_path, tiny_openclip_checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    for colour in ("red", "green"):
        Image.new("RGB", (32, 32), colour).save(images / f"{colour}.png")
    out = tmp_path / "cache"
    argv = ["embed", "images", "--images", str(images), "--out", str(out), *tiny_model_args(tiny_openclip_checkpoint)]
    holder = LockHolder(out, "embedding job")
    try:
        with pytest.raises(FolderInUseError, match=rf"another embedding job: embedding job \(pid {holder.process.pid}"):
            main(argv)
        cache = EmbeddingCache.open(tmp_path / "lib_cache", IDENTITY)
        other = LockHolder(cache.root, "embedding job")
        with pytest.raises(FolderInUseError):
            embed_with_cache(cache, ["a"], [0], lambda items: torch.eye(4)[: len(items)], progress=False)
        other.kill()
        assert embed_with_cache(cache, ["a"], [0], lambda items: torch.eye(4)[: len(items)], progress=False).shape == (
            1,
            4,
        )
    finally:
        holder.kill()
    assert main(argv) == 0
    assert EmbeddingCache.read(out).ids == ["green", "red"]


def test_issue21_item9_lock_helper_refuses_a_second_holder_and_cleans_up(tmp_path):
    """Two holders in one process conflict too (one lock per open file); a folder the lock made is removed if empty."""
    from fusion_diff.utils.locking import exclusive_folder

    folder = tmp_path / "job"
    with (
        exclusive_folder(folder, "job"),
        pytest.raises(FolderInUseError, match=f"pid {os.getpid()}"),
        exclusive_folder(folder, "job"),
    ):
        pass
    assert not folder.exists()  # nothing was written: the folder it created is gone again
    with exclusive_folder(folder, "job"):
        (folder / "result").write_text("done")
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE, "result"]
