"""``fusion-diff world``: benchmark, pair-set and captioner commands (the backbone command is the long job: not run here)."""

from __future__ import annotations

import argparse
import json

from data_synth.shapes.captions import parse_caption
from data_synth.shapes.pairs import read_pair_set
from fusion_diff.captioning import create_captioner
from fusion_diff.cli import world


def run_world_cli(argv: list[str]) -> int:
    """``fusion-diff world ...`` through the command's own ``register`` (without importing every other command)."""
    parser = argparse.ArgumentParser(prog="fusion-diff")
    world.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["world", *argv])
    return args.func(args)


def test_cli_writes_a_benchmark(tmp_path, capsys):
    assert run_world_cli(["benchmark", "--out", str(tmp_path), "--val", "7", "--test", "7", "--workers", "1"]) == 0
    assert (tmp_path / "captions" / "cap.rc2.test1.json").is_file()
    assert "7 queries" in capsys.readouterr().out


def test_cli_writes_a_pair_set_and_trains_the_scene_captioner_on_it(tmp_path, capsys):
    pairs = tmp_path / "pairs"
    assert run_world_cli(["pairs", "--out", str(pairs), "--n", "6", "--workers", "1"]) == 0
    assert len(read_pair_set(pairs)) == 6
    assert str(pairs) in capsys.readouterr().out
    assert run_world_cli(["captioner", "--pairs", str(pairs), "--out", str(tmp_path / "captioner"), "--steps", "2"]) == 0
    captioner = create_captioner({"type": "scene", "model": str(tmp_path / "captioner")})
    (caption,) = captioner.caption([read_pair_set(pairs)[0].image])
    assert parse_caption(caption).objects  # a caption of the world's grammar, whatever two steps learned


def test_backbone_command_is_registered_with_library_defaults():
    parser = argparse.ArgumentParser()
    world.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["world", "backbone", "--steps", "5"])
    assert args.steps == 5 and args.lr is None and args.func.__name__ == "_backbone"


def test_cli_trains_the_caption_editor_on_a_triplet_set(tmp_path, capsys):
    from data_synth.triplets.shapes_builder import build_shapes_triplets
    from fusion_diff.captioning.editor import CaptionEditor

    triplets, out = tmp_path / "triplets", tmp_path / "editor"
    build_shapes_triplets(triplets, 4, seed=0, shard_size=4, progress=False)
    assert run_world_cli(["caption-editor", "--triplets", str(triplets), "--out", str(out), "--steps", "2", "--rows", "6"]) == 0
    assert f"edited-caption.caption_editor={out}" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["rows"] == 6  # 4 of the set's own, 2 of its generator's
    (edited,) = CaptionEditor.from_pretrained(out).edit(["a large red star at the center on a white background"], ["remove the star"])
    assert isinstance(edited, str)  # two steps learn no edit; the folder loads and generates
