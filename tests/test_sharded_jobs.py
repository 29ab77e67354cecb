"""Heavy jobs sharded by process: 2 CPU processes give what 1 gives, a crashed rank's work is all that is redone,
tar shards read like folders, captioning saves as it goes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from fusion_diff.captioning import CaptionCache
from fusion_diff.captioning.job import caption_sharded, parts_dir
from fusion_diff.cli import main
from fusion_diff.embedding import EmbeddingCache
from fusion_diff.errors import DataError

REPO = Path(__file__).resolve().parents[1]
BANK = [f"a {c} square" for c in ("red", "green", "blue", "yellow", "purple", "white", "black", "grey")]
N_IMAGES = 10


def _colour(i: int) -> tuple[int, int, int]:
    return ((37 * i) % 256, (91 * i + 40) % 256, (53 * i + 200) % 256)


@pytest.fixture
def images(tmp_path):
    """A folder of N_IMAGES small images and the same images as two webdataset tar shards."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(N_IMAGES):
        Image.new("RGB", (36, 36), _colour(i)).save(folder / f"im{i:02d}.png")
    for shard, members in enumerate((range(6), range(6, N_IMAGES))):
        with tarfile.open(tmp_path / f"shard-{shard:03d}.tar", "w") as tar:
            for i in members:
                tar.add(folder / f"im{i:02d}.png", arcname=f"im{i:02d}.png")
                text = tmp_path / "caption.txt"
                text.write_text(f"image {i}")
                tar.add(text, arcname=f"im{i:02d}.txt")  # a webdataset sample has other members too
    return tmp_path


def _model_args(checkpoint_fixture) -> list[str]:
    name, checkpoint = checkpoint_fixture
    return ["--model", name, "--pretrained", str(checkpoint)]


def _launch(argv: list[str], checkpoint: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``accelerate launch`` 2 CPU processes of ``python -m fusion_diff.cli ARGV``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "adapters/accelerate/cpu_2proc.yaml"), "--main_process_port", str(port),
        "-m", "fusion_diff.cli", *argv,
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "FUSION_DIFF_MODEL_CONFIGS": str(checkpoint.parent / "model_configs"),
    }
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd, check=False)


def _one_thread_main(argv: list[str]) -> int:
    """The plain single-process command, with one thread like each launched process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def _as_dict(cache_dir: Path) -> dict[str, torch.Tensor]:
    ids, embeds = EmbeddingCache.read(cache_dir).load()
    return dict(zip(ids, embeds, strict=True))


def _assert_same_cache(a: Path, b: Path) -> None:
    da, db = _as_dict(a), _as_dict(b)
    assert sorted(da) == sorted(db)
    for key in da:
        assert torch.equal(da[key], db[key]), key


@pytest.mark.slow
def test_crashed_rank_is_redone_alone_and_two_processes_equal_one(images, tiny_openclip_checkpoint, capsys):
    model = _model_args(tiny_openclip_checkpoint)
    folder, out = images / "images", images / "two"
    good = (folder / "im06.png").read_bytes()
    (folder / "im06.png").write_bytes(good[:40])  # truncated: the second process's first unit fails on it
    argv = ["embed", "images", "--images", str(folder), "--out", str(out), "--chunk-size", "2", "--batch-size", "2"]
    crashed = _launch([*argv, *model], tiny_openclip_checkpoint[1], images)
    assert crashed.returncode != 0 and "im06.png is corrupt" in crashed.stderr
    kept = {p.name: p.stat().st_ino for p in out.glob("shard-*.safetensors")}
    kept_ids = {i for p in out.glob("shard-*.safetensors") for i in EmbeddingCache._read_ids(p)}
    assert kept_ids <= {f"im{i:02d}" for i in range(6)}  # only the first process's units (0-5) were written

    (folder / "im06.png").write_bytes(good)
    rerun = _launch([*argv, *model], tiny_openclip_checkpoint[1], images)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"({N_IMAGES - len(kept_ids)} new" in rerun.stdout  # the surviving shards were not recomputed
    assert all(out.joinpath(name).stat().st_ino == inode for name, inode in kept.items())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == N_IMAGES

    assert _one_thread_main([*argv[:4], "--out", str(images / "one"), *argv[6:], *model]) == 0
    _assert_same_cache(out, images / "one")


@pytest.mark.slow
def test_caption_two_processes_equal_one(images, tiny_openclip_checkpoint):
    (images / "bank.txt").write_text("\n".join(BANK))
    argv = ["caption", "--images", str(images / "images"), "--captioner", "retrieval", "--caption-bank",
            str(images / "bank.txt"), "--chunk-size", "3", "--batch-size", "2", *_model_args(tiny_openclip_checkpoint)]  # fmt: skip
    two = _launch([*argv, "--out", str(images / "two.json")], tiny_openclip_checkpoint[1], images)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _one_thread_main([*argv, "--out", str(images / "one.json")]) == 0
    one_captions = json.loads((images / "one.json").read_text())["captions"]
    two_captions = json.loads((images / "two.json").read_text())["captions"]
    assert len(one_captions) == N_IMAGES and one_captions == two_captions
    assert not parts_dir(images / "two.json").exists()  # merged, then removed


def test_tar_shards_read_like_the_folder(images, tiny_openclip_checkpoint):
    model = _model_args(tiny_openclip_checkpoint)
    common = ["--chunk-size", "4", "--batch-size", "3", *model]
    assert main(["embed", "images", "--images", str(images / "images"), "--out", str(images / "f"), *common]) == 0
    shards = str(images / "shard-{000..001}.tar")
    assert main(["embed", "images", "--images", shards, "--out", str(images / "t"), *common]) == 0
    _assert_same_cache(images / "f", images / "t")
    glob_out = images / "g"
    pattern = str(images / "shard-*.tar")
    assert main(["embed", "images", "--images", pattern, "--out", str(glob_out), "--num-workers", "1", *common]) == 0
    _assert_same_cache(images / "f", glob_out)

    (images / "bank.txt").write_text("\n".join(BANK))
    caption = ["caption", "--captioner", "retrieval", "--caption-bank", str(images / "bank.txt"), *model]
    assert main([*caption, "--images", str(images / "images"), "--out", str(images / "f.json")]) == 0
    assert main([*caption, "--images", shards, "--out", str(images / "t.json")]) == 0
    assert (
        json.loads((images / "f.json").read_text())["captions"]
        == json.loads((images / "t.json").read_text())["captions"]
    )


def test_listed_shard_that_is_corrupt_is_redone(images, tiny_openclip_checkpoint, capsys):
    argv = ["embed", "images", "--images", str(images / "images"), "--out", str(images / "c"), "--chunk-size", "4",
            *_model_args(tiny_openclip_checkpoint)]  # fmt: skip
    assert main(argv) == 0
    reference = _as_dict(images / "c")
    broken = sorted((images / "c").glob("shard-*.safetensors"))[1]
    broken.write_bytes(broken.read_bytes()[:50])
    with pytest.raises(DataError, match="corrupt"):
        EmbeddingCache.read(images / "c")  # readers are refused
    capsys.readouterr()
    assert main(argv) == 0
    assert "(4 new" in capsys.readouterr().out  # only the broken shard's ids
    assert _as_dict(images / "c").keys() == reference.keys()


class _FlakyCaptioner:
    """Captions from the first pixel; raises KeyboardInterrupt once ``fail_after`` images were seen."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after, self.seen = fail_after, 0

    @property
    def identity(self) -> dict:
        return {"type": "flaky"}

    def describe(self) -> str:
        return "flaky"

    def caption_candidates(self, images, batch_size=32, progress=False):
        if self.fail_after is not None and self.seen + len(images) > self.fail_after:
            raise KeyboardInterrupt("killed")
        self.seen += len(images)
        return [[f"pixel {image.getpixel((0, 0))}"] for image in images]


def test_issue20_caption_saves_and_resumes(images):
    """Item 7: a run killed after 7 of 10 images keeps them (saved by count inside a unit) and the rerun does 3."""
    paths = sorted((images / "images").glob("*.png"))
    ids = [p.stem for p in paths]
    out = images / "captions.json"
    with pytest.raises(KeyboardInterrupt):
        caption_sharded(_FlakyCaptioner(fail_after=7), ids, paths, out, batch_size=1, chunk_size=100, save_every=1)
    assert len(CaptionCache.open(parts_dir(out) / "part-00000.json", {"type": "flaky"}, create=False)) == 7
    resumed = _FlakyCaptioner()
    cache, new = caption_sharded(resumed, ids, paths, out, batch_size=1, chunk_size=100, save_every=1)
    assert resumed.seen == 3 and new == 3 and len(cache) == N_IMAGES
    assert cache.captions(ids) == [f"pixel {_colour(i)}" for i in range(N_IMAGES)]
    assert not parts_dir(out).exists()


def test_issue20_caption_saves_by_time(images):
    """Item 7: with a huge count, the time limit alone saves (here after every batch)."""
    paths = sorted((images / "images").glob("*.png"))
    out = images / "captions.json"
    with pytest.raises(KeyboardInterrupt):
        caption_sharded(
            _FlakyCaptioner(fail_after=4), [p.stem for p in paths], paths, out, batch_size=2, save_every=10**6,
            save_seconds=1e-9,
        )  # fmt: skip
    assert len(CaptionCache.open(parts_dir(out) / "part-00000.json", {"type": "flaky"}, create=False)) == 4


@pytest.mark.slow
def test_embed_triplets_two_processes_equal_one(tmp_path, tiny_openclip_checkpoint):
    from data_synth.triplets.embed import CACHE_KINDS
    from data_synth.triplets.shapes_builder import build_shapes_triplets

    build_shapes_triplets(tmp_path / "triplets", 12, seed=0, shard_size=5, progress=False)  # 3 triplet shards
    name, checkpoint = tiny_openclip_checkpoint
    spec = json.dumps({"backend": "openclip", "model_name": name, "pretrained": str(checkpoint)})
    argv = ["embed-triplets", "--triplets", str(tmp_path / "triplets"), "--embedder", spec, "--batch-size", "4"]
    two = _launch([*argv, "--out", str(tmp_path / "two")], checkpoint, tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _one_thread_main([*argv, "--out", str(tmp_path / "one")]) == 0
    for cache in CACHE_KINDS:
        _assert_same_cache(tmp_path / "one" / cache, tmp_path / "two" / cache)
        assert EmbeddingCache.read(tmp_path / "two" / cache).ids == EmbeddingCache.read(tmp_path / "one" / cache).ids


def _embedding_caches(root: Path) -> dict[str, Path]:
    return {str(m.parent.relative_to(root)): m.parent for m in root.rglob("manifest.json")}


@pytest.mark.slow
def test_eval_two_processes_equal_one(tmp_path, tiny_openclip_checkpoint):
    """`eval` under 2 processes: the same caches (images, captions, fused, texts) and the same table, scored once."""
    from test_eval import _caption, write_tiny_benchmark

    root = write_tiny_benchmark(tmp_path / "bench")
    (tmp_path / "bank.txt").write_text("\n".join(_caption(i) for i in range(16)))
    argv = ["eval", "--benchmark", "shapes", "--split", "test", "--root", str(root), "--method", "image-only",
            "--method", "sum", "--set", "sum.gallery_mode=fused", "--captioner", "retrieval", "--caption-bank",
            str(tmp_path / "bank.txt"), "--chunk-size", "5", "--batch-size", "2", "--no-submission",
            *_model_args(tiny_openclip_checkpoint)]  # fmt: skip
    out2 = ["--out", str(tmp_path / "out2"), "--cache-dir", str(tmp_path / "c2")]
    two = _launch([*argv, *out2], tiny_openclip_checkpoint[1], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("| sum |") == 1  # the main process alone scores and prints
    assert "(process 2/2)" in two.stderr  # the second process embedded units of its own
    assert _one_thread_main([*argv, "--out", str(tmp_path / "out1"), "--cache-dir", str(tmp_path / "c1")]) == 0

    one_caches, two_caches = _embedding_caches(tmp_path / "c1"), _embedding_caches(tmp_path / "c2")
    assert sorted(one_caches) == sorted(two_caches) and len(one_caches) == 3  # image, fused, text
    for name in one_caches:
        _assert_same_cache(one_caches[name], two_caches[name])
    (captions_one,), (captions_two,) = (sorted((tmp_path / c).rglob("captions-*.json")) for c in ("c1", "c2"))
    assert json.loads(captions_one.read_text())["captions"] == json.loads(captions_two.read_text())["captions"]
    one, two_records = (json.loads((tmp_path / o / "shapes-test1.json").read_text()) for o in ("out1", "out2"))
    assert [r["method"] for r in two_records] == ["image-only", "sum"]
    assert [r["metrics"] for r in one] == [r["metrics"] for r in two_records]
    rankings = [(tmp_path / o / "shapes-test1.rankings.json").read_text() for o in ("out1", "out2")]
    assert rankings[0] == rankings[1]
