"""The smoke run at toy sizes on the CPU, so that the GPU smoke script cannot rot."""

from __future__ import annotations

import pytest
from test_benchmarks import CIRR

from fusion_diff import smoke
from fusion_diff.cli import main


def test_smoke_run_passes_on_cpu_at_toy_sizes(tmp_path, capsys):
    argv = ["smoke", "--device", "cpu", "--out", str(tmp_path / "smoke"), "--cirr-annotations", str(CIRR)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for step in ("embed images", "caption images", "stage 1: 2 steps", "stage 2: 2 steps", "sample queries",
                 "evaluate on the fake CIRR val tree"):  # fmt: skip
        assert f"| {step}" in out
    assert "images/s" in out and "samples/s" in out and "queries/s" in out and "peak RSS" in out
    assert (tmp_path / "smoke" / "cirr" / "cirr" / "captions" / "cap.rc2.val.json").is_file()


def test_smoke_run_failure_is_loud(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(smoke, "run_smoke", broken)
    with pytest.raises(RuntimeError):
        main(["smoke", "--out", str(tmp_path)])
    assert "SMOKE RUN FAILED: RuntimeError: CUDA error: out of memory" in capsys.readouterr().out
