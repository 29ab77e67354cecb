"""Issue 21, "errors a person can read": every CLI command on a table of bad inputs.

Each case runs through the console wrapper (``run_cli``, in-process for speed) and must exit non-zero with one
paragraph on stderr that names the file or key (argparse's usage errors keep exit code 2), print no traceback,
and leave no output folder half-made (the ``--out`` path does not exist afterwards, or is unchanged). A few
cases run ``python -m fusion_diff.cli`` in a subprocess to prove the console path itself.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from fusion_diff.cli import build_parser, parse_args
from fusion_diff.cli.failures import run_cli
from fusion_diff.embedding import EmbeddingCache
from fusion_diff.models import ControlAdapter, FusionPrior, sampling_scheduler
from fusion_diff.pipelines import FusionDiffPipeline
from fusion_diff.training.data import PAIR_FIELDS, write_random_caches
from fusion_diff.training.loop import train

REPO = Path(__file__).resolve().parents[1]
TINY_PRIOR = {"hidden_dim": 16, "num_layers": 2, "num_heads": 2}


# --------------------------------------------------------------------------- the tiny world every case reads
@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_openclip, tiny_openclip_checkpoint) -> dict[str, str]:
    """Inputs, good and broken: images, JSONL files, a saved pipeline and broken copies, a gallery cache, a tiny
    trained prior with two checkpoints (the newest truncated), a training config and a demo config."""
    root = tmp_path_factory.mktemp("bad_input_world")
    (root / "imgs").mkdir()
    for colour in ("red", "green"):
        Image.new("RGB", (32, 32), colour).save(root / "imgs" / f"{colour}.png")
    (root / "afile").write_text("a file where a folder is expected\n")
    (root / "queries.jsonl").write_text(json.dumps({"id": "q0", "reference": "imgs/red.png", "instruction": "blue"}))
    (root / "bad.jsonl").write_text('{"id": "0", "text": "fine"}\n{"id": "1", "text": \n')
    (root / "pairs_nokey.jsonl").write_text(json.dumps({"id": "0", "image": "imgs/red.png"}) + "\n")

    torch.manual_seed(0)
    prior = FusionPrior(
        embedding_dim=tiny_openclip.dim, **TINY_PRIOR, embedder_identity=tiny_openclip.identity.as_dict()
    )
    pipeline = FusionDiffPipeline(prior, sampling_scheduler("ddim", prior), ControlAdapter.from_prior(prior, 1))
    pipeline.save_pretrained(root / "pipe")
    shutil.copytree(root / "pipe", root / "pipe_no_prior")
    shutil.rmtree(root / "pipe_no_prior" / "prior")
    shutil.copytree(root / "pipe", root / "pipe_truncated")
    weights = root / "pipe_truncated" / "adapter" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])

    gallery = EmbeddingCache.open(root / "gallery", {**tiny_openclip.identity.as_dict(), "kind": "image"})
    gallery.append(["red", "green"], tiny_openclip.embed_images(sorted((root / "imgs").iterdir())))

    # A tiny prior run with checkpoints at steps 3 and 6 (of 7); the newest one truncated (a crash while copying it).
    write_random_caches(root / "pairs", PAIR_FIELDS, 24, 16, seed=0)
    config = {
        "task": "prior",
        "output_dir": str(root / "prior_run"),
        "model": TINY_PRIOR,
        "data": {"pair_embeddings": str(root / "pairs")},
        "schedule": {"train_batch_size": 4, "lr_warmup_steps": 0, "max_train_steps": 7},
        "checkpointing": {"every_n_steps": 3, "total_limit": 3},
        "logging": {"report_to": "none", "progress_bar": False},
    }
    (root / "prior.yaml").write_text(yaml.safe_dump(config))
    from fusion_diff.training.config import load_config

    train(load_config(root / "prior.yaml"))
    damaged = root / "prior_run" / "checkpoints" / "checkpoint-6" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])

    name, checkpoint = tiny_openclip_checkpoint
    return {"w": str(root), "model": name, "pretrained": str(checkpoint), "configs": str(REPO / "configs")}


EMB = ["--model", "{model}", "--pretrained", "{pretrained}"]


# --------------------------------------------------------------------------- faults the OS would raise
def read_only_disk(monkeypatch) -> None:
    """mkdir on a read-only mount (EROFS names the folder)."""

    def mkdir(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", mkdir)


def full_disk(monkeypatch) -> None:
    """Every new file fails with ENOSPC, which names no file: the wrapper names the command's --out."""
    import tempfile

    def mkstemp(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def no_permission(monkeypatch) -> None:
    """mkdir in a folder this user may not write (tests run as root here, so chmod alone would not do)."""

    def mkdir(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", mkdir)


@dataclass
class Case:
    id: str
    argv: list[str]  # {w}: the world folder, {tmp}: this case's own folder, {model}/{pretrained}: the embedder
    expect: str  # a fragment the message must contain (the file, the key, the value)
    code: int = 1  # 2: an argparse usage error
    out: str | None = "{tmp}/out"  # must not exist afterwards, or be unchanged; None: not checked (see the case)
    fault: Callable | None = None  # an OS fault injected with monkeypatch
    extra: list[str] = field(default_factory=list)


CASES = [
    # ---- embed
    Case("embed-chunk-size-0", ["embed", "images", "--images", "{w}/imgs", "--out", "{tmp}/out", "--chunk-size", "0", *EMB],
         "argument --chunk-size: must be an integer >= 1, got 0", code=2),
    Case("embed-input-missing", ["embed", "images", "--images", "{w}/nope", "--out", "{tmp}/out", *EMB], "{w}/nope"),
    Case("embed-out-is-a-file", ["embed", "images", "--images", "{w}/imgs", "--out", "{w}/afile", *EMB],
         "{w}/afile is a file where a folder is expected", out="{w}/afile"),
    Case("embed-texts-bad-json", ["embed", "texts", "--texts", "{w}/bad.jsonl", "--out", "{tmp}/out", *EMB],
         "{w}/bad.jsonl:2 is not valid JSON"),
    Case("embed-pairs-missing-key", ["embed", "pairs", "--pairs", "{w}/pairs_nokey.jsonl", "--out", "{tmp}/out", *EMB],
         "{w}/pairs_nokey.jsonl:1 lacks ['text']"),
    Case("embed-read-only-disk", ["embed", "images", "--images", "{w}/imgs", "--out", "{tmp}/out", *EMB],
         "{tmp}/out is on a read-only file system", fault=read_only_disk),
    Case("embed-no-permission", ["embed", "images", "--images", "{w}/imgs", "--out", "{tmp}/out", *EMB],
         "permission denied for {tmp}/out", fault=no_permission),
    # A full disk mid-job leaves the resumable part of the cache (by design: the same command resumes), so the
    # output folder is not checked here.
    Case("embed-disk-full", ["embed", "images", "--images", "{w}/imgs", "--out", "{tmp}/out", *EMB],
         "no space left on the device while writing {tmp}/out", out=None, fault=full_disk),
    # ---- sample
    Case("sample-pipeline-missing", ["sample", "--pipeline", "{tmp}/nope", "--queries", "{w}/queries.jsonl",
                                     "--out", "{tmp}/out", *EMB], "Pipeline folder {tmp}/nope does not exist"),
    Case("sample-pipeline-is-a-file", ["sample", "--pipeline", "{w}/afile", "--queries", "{w}/queries.jsonl",
                                       "--out", "{tmp}/out", *EMB], "{w}/afile is a file, not a folder"),
    Case("sample-pipeline-lacks-prior", ["sample", "--pipeline", "{w}/pipe_no_prior", "--queries", "{w}/queries.jsonl",
                                         "--out", "{tmp}/out", *EMB], "lacks its 'prior' component"),
    Case("sample-pipeline-truncated", ["sample", "--pipeline", "{w}/pipe_truncated", "--queries", "{w}/queries.jsonl",
                                       "--out", "{tmp}/out", *EMB],
         "{w}/pipe_truncated/adapter/diffusion_pytorch_model.safetensors is damaged or incomplete"),
    Case("sample-queries-missing", ["sample", "--pipeline", "{w}/pipe", "--queries", "{tmp}/nope.jsonl",
                                    "--out", "{tmp}/out", *EMB], "{tmp}/nope.jsonl"),
    # ---- search
    Case("search-gallery-missing", ["search", "--gallery", "{tmp}/nope", "--queries", "{w}/gallery", "--out",
                                    "{tmp}/out"], "{tmp}/nope/manifest.json"),
    Case("search-out-under-a-file", ["search", "--gallery", "{w}/gallery", "--queries", "{w}/gallery", "--out",
                                     "{w}/afile/results.jsonl"], "{w}/afile is a file", out="{w}/afile"),
    # ---- index / query
    Case("index-set-wrong-type", ["index", "build", "--out", "{tmp}/out", "--images", "{w}/imgs", "--method",
                                  "fusion-diff", "--checkpoint", "{w}/pipe", "--set", "num_samples=abc", *EMB],
         "'num_samples' must be an integer, got 'abc'"),
    Case("index-set-nan", ["index", "build", "--out", "{tmp}/out", "--images", "{w}/imgs", "--method", "fusion-diff",
                           "--checkpoint", "{w}/pipe", "--set", "control_guidance=nan", *EMB],
         "'control_guidance' must be a finite number, got 'nan'"),
    Case("index-set-typo", ["index", "build", "--out", "{tmp}/out", "--images", "{w}/imgs", "--method", "fusion-diff",
                            "--checkpoint", "{w}/pipe", "--set", "num_sample=2", *EMB], "did you mean 'num_samples'"),
    Case("query-index-missing", ["query", "--index", "{tmp}/nope", "--image", "{w}/imgs/red.png", "--text", "blue"],
         "{tmp}/nope/retriever.json"),
    # ---- train
    Case("train-config-missing", ["train", "prior", "--config", "{tmp}/nope.yaml"], "Config not found: {tmp}/nope.yaml"),
    Case("train-seed-negative", ["train", "prior", "--config", "{w}/prior.yaml", "output_dir={tmp}/out", "seed=-1"],
         "{w}/prior.yaml: 'seed' must be in [0, 2**32)"),
    Case("train-override-typo", ["train", "prior", "--config", "{w}/prior.yaml", "output_dir={tmp}/out",
                                 "optim.learning_rat=1e-3"], "unknown key 'optim.learning_rat' (did you mean 'learning_rate'?)"),
    Case("train-override-nan", ["train", "prior", "--config", "{w}/prior.yaml", "output_dir={tmp}/out",
                                "optim.weight_decay=.nan"], "'optim.weight_decay' must be a finite number"),
    # overrides on both sides of --resume: all of them reach the config (the typo is named, not "unrecognized")
    Case("train-overrides-around-resume", ["train", "prior", "--config", "{w}/prior.yaml", "output_dir={tmp}/out",
                                           "--resume", "latest", "schedule.max_train_step=9"],
         "unknown key 'schedule.max_train_step' (did you mean 'max_train_steps'?)"),
    Case("train-adapter-prior-missing", ["train", "adapter", "--config", "{configs}/stage2_adapter_quick.yaml",
                                         "model.prior_path={tmp}/nope", "output_dir={tmp}/out"],
         "No trained prior at {tmp}/nope"),
    # The resume cases write into the run's folder by design (its logs record the attempt), so it is not checked.
    Case("train-resume-truncated-checkpoint", ["train", "prior", "--config", "{w}/prior.yaml", "--resume", "latest"],
         "checkpoint-6 is damaged or incomplete", out=None, extra=["--resume {w}/prior_run/checkpoints/checkpoint-3"]),
    Case("train-resume-other-architecture", ["train", "prior", "--config", "{w}/prior.yaml", "--resume",
                                             "{w}/prior_run/checkpoints/checkpoint-3", "model.hidden_dim=32"],
         "checkpoint-3 was saved by another model architecture", out=None),
    # ---- eval / validate-submission
    Case("eval-root-missing", ["eval", "--benchmark", "shapes", "--root", "{tmp}/nope", "--split", "val", "--method",
                               "image-only", "--out", "{tmp}/out", *EMB], "{tmp}/nope/captions/cap.rc2.val.json"),
    Case("eval-set-wrong-type", ["eval", "--benchmark", "shapes", "--root", "{tmp}/nope", "--split", "val", "--method",
                                 "fusion-diff", "--checkpoint", "{w}/pipe", "--set", "num_samples=abc", "--out",
                                 "{tmp}/out", *EMB], "'num_samples' must be an integer, got 'abc'"),
    Case("eval-set-nan", ["eval", "--benchmark", "shapes", "--root", "{tmp}/nope", "--split", "val", "--method",
                          "fusion-diff", "--set", "fusion-diff.control_guidance=nan", "--out", "{tmp}/out", *EMB],
         "'control_guidance' must be a finite number"),
    Case("validate-submission-root-missing", ["validate-submission", "{w}/queries.jsonl", "--benchmark", "shapes",
                                              "--split", "val", "--root", "{tmp}/nope"], "{tmp}/nope/captions"),
    # ---- world / synth / caption
    Case("world-pairs-out-is-a-file", ["world", "pairs", "--out", "{w}/afile", "--n", "2", "--workers", "1"],
         "{w}/afile is a file where a folder is expected", out="{w}/afile"),
    Case("world-benchmark-out-is-a-file", ["world", "benchmark", "--out", "{w}/afile", "--val", "1", "--test", "1"],
         "{w}/afile is a file where a folder is expected", out="{w}/afile"),
    Case("synth-seed-negative", ["synth", "shapes", "--out", "{tmp}/out", "--seed", "-1"],
         "argument --seed: must be in [0, 2**32)", code=2),
    Case("synth-shard-size-0", ["synth", "shapes", "--out", "{tmp}/out", "--shard-size", "0"],
         "argument --shard-size: must be an integer >= 1, got 0", code=2),
    Case("synth-corpus-missing", ["synth", "corpus", "--captions", "{tmp}/nope.txt", "--out", "{tmp}/out"],
         "{tmp}/nope.txt not found"),
    Case("caption-images-missing", ["caption", "--images", "{tmp}/nope", "--out", "{tmp}/out", "--captioner",
                                    "retrieval", "--caption-bank", "{w}/bad.jsonl", *EMB], "{tmp}/nope"),
    Case("caption-batch-size-0", ["caption", "--images", "{w}/imgs", "--out", "{tmp}/out", "--captioner", "scene",
                                  "--batch-size", "0"],
         "argument --batch-size: must be an integer >= 1, got 0", code=2),
    # ---- demo: its config is checked whole before the first step (out_dir must not appear)
    Case("demo-config-missing", ["demo", "--config", "{tmp}/nope.yaml"], "Config not found: {tmp}/nope.yaml"),
    Case("demo-method-option-typo", ["demo", "--config", "{configs}/demo_quick.yaml", "out_dir={tmp}/out",
                                     "evaluation.methods.fusion-diff.num_sample=8"],
         "'evaluation.methods.fusion-diff'): method 'fusion-diff' does not take option(s) ['num_sample'] (did you mean"),
    Case("demo-method-option-nan", ["demo", "--config", "{configs}/demo_quick.yaml", "out_dir={tmp}/out",
                                    "evaluation.methods.fusion-diff.control_guidance=.nan"],
         "'control_guidance' must be a finite number"),
    Case("demo-method-unknown", ["demo", "--config", "{configs}/demo_quick.yaml", "out_dir={tmp}/out",
                                 "evaluation.methods.fusion-dif={{}}"], "unknown method 'fusion-dif'"),
    Case("demo-stage-config-missing", ["demo", "--config", "{configs}/demo_quick.yaml", "out_dir={tmp}/out",
                                       "training.stage1=nope.yaml"], "Training config 'nope.yaml' is neither in"),
    Case("demo-stage-override-typo", ["demo", "--config", "{configs}/demo_quick.yaml", "out_dir={tmp}/out",
                                      "training.stage2_overrides=[optim.learning_rat=1]"],
         "'training.stage2'"),
    Case("demo-captioner-type", ["demo", "--config", "{configs}/demo_quick.yaml", "out_dir={tmp}/out",
                                 "evaluation.captioner.type=scen"], "Unknown captioner type 'scen'"),
    Case("demo-caption-bank-missing", ["demo", "--config", "{configs}/demo_quick.yaml", "out_dir={tmp}/out",
                                       "evaluation.captioner={{type: retrieval, bank: {tmp}/nope.txt}}"],
         "'evaluation.captioner.bank' {tmp}/nope.txt does not exist"),
    Case("demo-seed-negative", ["demo", "--config", "{configs}/demo_quick.yaml", "out_dir={tmp}/out", "seed=-1"],
         "'seed' must be in [0, 2**32)"),
    # ---- serve's argument checks
    Case("serve-port-0", ["serve", "--port", "0"], "argument --port: must be a port number in [1, 65535], got 0", code=2),
    Case("serve-max-batch-0", ["serve", "--max-batch-size", "0"], "argument --max-batch-size: must be an integer >= 1", code=2),
]  # fmt: skip


def _fill(text: str, paths: dict[str, str]) -> str:
    return text.format(**paths)


def _snapshot(path: Path):
    """What must not change: absent, a file's bytes, or a folder's files and sizes."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*"))


def assert_one_paragraph(stderr: str, expect: str, code: int) -> None:
    """The failure is the last non-empty line, said once (no traceback); progress and log lines may precede it."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert lines, "nothing on stderr"
    message = lines[-1]
    assert expect in message, f"{expect!r} not in {message!r}"
    if code == 2:  # argparse: its usage block, then "PROG: error: ..."
        assert ": error: argument " in message
    else:
        assert message.startswith("fusion-diff "), message
        assert sum(line.startswith("fusion-diff ") for line in lines) == 1, lines


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_named_in_one_paragraph(case: Case, world, tmp_path, capsys, monkeypatch):
    paths = {**world, "tmp": str(tmp_path)}
    argv = [_fill(arg, paths) for arg in case.argv]
    out = Path(_fill(case.out, paths)) if case.out else None
    before = _snapshot(out) if out else None
    if case.fault:
        case.fault(monkeypatch)
    code = run_cli(argv)
    monkeypatch.undo()
    captured = capsys.readouterr()
    assert code == case.code, captured.err[-2000:]
    assert "Traceback" not in captured.out
    assert_one_paragraph(captured.err, _fill(case.expect, paths), case.code)
    for fix in case.extra:
        assert _fill(fix, paths) in captured.err
    if out:
        assert _snapshot(out) == before, f"{out} was left changed or half-made"


# --------------------------------------------------------------------------- the wrapper itself
def _failing_command(exc: BaseException):
    """A `train prior` whose run raises ``exc`` (a stand-in for a bug or an interruption deep inside a job)."""

    def run(args):
        raise exc

    return run


def test_unexpected_error_is_reported_as_a_bug_and_debug_shows_the_traceback(monkeypatch, capsys):
    import fusion_diff.cli.train as train_cli

    monkeypatch.setattr(train_cli, "run", _failing_command(ZeroDivisionError("division by zero")))
    assert run_cli(["train", "prior", "--config", "x.yaml"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "unexpected ZeroDivisionError: division by zero. This is a bug in fusion-diff" in err
    assert "run again with --debug" in err

    assert run_cli(["train", "prior", "--debug", "--config", "x.yaml"]) == 1  # --debug anywhere
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("FUSION_DIFF_DEBUG", "1")
    assert run_cli(["train", "prior", "--config", "x.yaml"]) == 1
    assert "ZeroDivisionError" in capsys.readouterr().err.split("Traceback", 1)[1]


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    import fusion_diff.cli.train as train_cli

    monkeypatch.setattr(train_cli, "run", _failing_command(KeyboardInterrupt()))
    assert run_cli(["train", "prior", "--config", "x.yaml"]) == 130
    err = capsys.readouterr().err
    assert "fusion-diff train prior: interrupted" in err and "Traceback" not in err


def test_sys_exit_inside_a_command_keeps_its_meaning(monkeypatch, capsys):
    import fusion_diff.cli.train as train_cli

    monkeypatch.setattr(train_cli, "run", _failing_command(SystemExit(None)))
    assert run_cli(["train", "prior", "--config", "x.yaml"]) == 0
    monkeypatch.setattr(train_cli, "run", _failing_command(SystemExit("stopped: no work left")))
    assert run_cli(["train", "prior", "--config", "x.yaml"]) == 1
    assert capsys.readouterr().err.strip() == "fusion-diff train prior: stopped: no work left"


def test_main_still_raises_the_library_errors():
    """Callers of ``main`` (and the existing tests) keep catching the named errors themselves."""
    from fusion_diff.cli import main
    from fusion_diff.errors import MissingFileError

    with pytest.raises(MissingFileError, match="nope.yaml"):
        main(["train", "prior", "--config", "nope.yaml"])


def test_overrides_may_stand_anywhere():
    args = parse_args(build_parser(), ["train", "prior", "a.b=1", "--config", "c.yaml", "--resume", "latest", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.resume == "latest"
    args = parse_args(build_parser(), ["demo", "out_dir=x", "--quick", "seed=1"])
    assert args.overrides == ["out_dir=x", "seed=1"] and args.quick
    with pytest.raises(SystemExit):  # anything else stays an argparse error
        parse_args(build_parser(), ["train", "prior", "--config", "c.yaml", "a.b=1", "--bogus"])


def test_copied_demo_config_finds_the_shipped_stage_configs(tmp_path):
    """A demo config copied out of configs/ uses the stage configs beside it if there, else the shipped ones."""
    from fusion_diff.demo import DemoConfig, check_demo_config, stage_config_path
    from fusion_diff.training.config import load_dataclass

    copy = tmp_path / "my_demo.yaml"
    shutil.copy(REPO / "configs" / "demo_quick.yaml", copy)
    check_demo_config(load_dataclass(DemoConfig, copy), copy)
    assert stage_config_path(tmp_path, "stage1_prior_quick.yaml") == REPO / "configs" / "stage1_prior_quick.yaml"
    (tmp_path / "stage1_prior_quick.yaml").write_text("task: prior\n")
    assert stage_config_path(tmp_path, "stage1_prior_quick.yaml") == tmp_path / "stage1_prior_quick.yaml"


def _text_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fusion_diff.embedding.text_checks"]


def test_cut_texts_are_counted_in_the_first_batch_that_cuts(tiny_openclip, caplog, monkeypatch):
    """The tiny model's context is 32 tokens: longer texts are cut (warned with a count, not dropped), once per
    process (a training run would otherwise repeat it every step)."""
    from fusion_diff.embedding import text_checks

    monkeypatch.setattr(text_checks, "_warned_contexts", set())
    texts = ["make it " * 20, "a red square", "add a blue star " * 10]
    with caplog.at_level(logging.WARNING, logger="fusion_diff"):
        embeds = tiny_openclip.embed_texts(texts, batch_size=len(texts))
    assert embeds.shape[0] == 3 and torch.isfinite(embeds).all()
    (warning,) = _text_warnings(caplog)
    assert "2 of 3 texts in this batch are longer than the text encoder's 32-token context" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusion_diff"):
        tiny_openclip.embed_texts(["", "a red square", " ".join(["x"] * 30)])  # 30 + start + end = 32 tokens: fits
    assert _text_warnings(caplog) == []  # an empty text is fine in general (the null prompt is one on purpose)
    with caplog.at_level(logging.WARNING, logger="fusion_diff"):
        tiny_openclip.embed_texts(texts)
    assert _text_warnings(caplog) == []  # said once already
    fits = text_checks.fits_context(tiny_openclip.tokenizer, [" ".join(["x"] * 30), " ".join(["x"] * 31), "a red square"], 32)
    assert fits == [True, False, True]


def test_empty_instructions_are_counted_once_per_batch(tiny_openclip, caplog):
    from fusion_diff.retrieval.method import QueryContext

    texts = ["make it blue", "", "  "]
    embeds = torch.zeros(3, tiny_openclip.dim)
    with caplog.at_level(logging.WARNING, logger="fusion_diff"):
        QueryContext(tiny_openclip, ["a", "b", "c"], texts, embeds, embeds, [Path("x.png")] * 3)
    (warning,) = _text_warnings(caplog)
    assert warning.startswith("2 of 3 queries in this batch have an empty instruction")


# --------------------------------------------------------------------------- the console path, for real
def _console(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fusion_diff.cli", *args],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip


def test_console_prints_one_paragraph_and_exits_1(tmp_path):
    proc = _console("synth", "corpus", "--captions", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"fusion-diff synth corpus: caption corpus {tmp_path / 'nope.txt'} not found; pass a .txt, .jsonl or .csv file."
    )
    assert not (tmp_path / "out").exists()


def test_console_debug_shows_the_traceback(tmp_path):
    proc = _console(
        "--debug", "synth", "corpus", "--captions", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")
    )
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "MissingFileError" in proc.stderr


def test_console_usage_errors_keep_exit_code_2(tmp_path):
    proc = _console("synth", "shapes", "--out", str(tmp_path / "out"), "--seed", "-1")
    assert proc.returncode == 2
    assert "argument --seed: must be in [0, 2**32)" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "out").exists()
