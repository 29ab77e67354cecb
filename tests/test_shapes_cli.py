"""``fusion-diff world``: benchmark and pair-set commands (the backbone command is the long job: not run here)."""

from __future__ import annotations

import argparse

from data_synth.shapes.pairs import read_pair_set
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


def test_cli_writes_a_pair_set(tmp_path, capsys):
    assert run_world_cli(["pairs", "--out", str(tmp_path), "--n", "6", "--workers", "1"]) == 0
    assert len(read_pair_set(tmp_path)) == 6
    assert str(tmp_path) in capsys.readouterr().out


def test_backbone_command_is_registered_with_library_defaults():
    parser = argparse.ArgumentParser()
    world.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["world", "backbone", "--steps", "5"])
    assert args.steps == 5 and args.lr is None and args.func.__name__ == "_backbone"
