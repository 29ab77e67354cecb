"""Issue 19: ``fusion-diff --help`` and every subcommand's ``--help`` import no heavy library (torch, open_clip,
transformers, diffusers, accelerate, matplotlib): those load only where a command runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "transformers", "diffusers", "accelerate", "matplotlib")

# Builds the parser, asks every (sub)command for its help, and reports which heavy modules got imported.
PROBE = """
import argparse, contextlib, io, json, sys
import fusion_diff.cli as cli

def commands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from commands(sub, prefix + (name,))

parser = cli.build_parser()
after_parser = [m for m in HEAVY if m in sys.modules]
helped = []
for command in [(), *commands(parser)]:
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        cli.build_parser().parse_args([*command, "--help"])
    helped.append([" ".join(command), "usage:" in out.getvalue()])
print(json.dumps({"after_parser": after_parser, "after_help": [m for m in HEAVY if m in sys.modules], "helped": helped}))
"""


def test_parser_and_every_help_import_no_heavy_library():
    code = f"HEAVY = {HEAVY!r}\n" + PROBE
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["after_parser"] == []
    assert report["after_help"] == []
    helped = dict(report["helped"])
    assert len(helped) > 20 and all(helped.values()), [c for c, ok in helped.items() if not ok]
    assert {"embed images", "caption", "embed-triplets", "synth realise", "smoke", "eval"} <= helped.keys()
