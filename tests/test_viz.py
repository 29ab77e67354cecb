"""Joint-space figures: projections, the viz file, PNG plots and the ``fusion-diff viz`` command."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fusion_diff.errors import ConfigError, DataError, MissingFileError
from fusion_diff.viz import (
    VIZ_FILE,
    VizInputs,
    load_viz_inputs,
    project_2d,
    projection,
    render_figures,
    save_viz_inputs,
)


def _inputs(q: int = 6, d: int = 16, steps: int = 8, gallery: int = 40) -> VizInputs:
    gen = torch.Generator().manual_seed(0)
    reference = F.normalize(torch.randn(q, d, generator=gen), dim=-1)
    target = F.normalize(reference + 0.8 * torch.randn(q, d, generator=gen), dim=-1)
    noise = torch.randn(q, d, generator=gen)
    mix = torch.linspace(0, 1, steps).view(steps, 1, 1)
    trajectory = (1 - mix) * noise + mix * target  # a walk from noise to the target
    query = F.normalize(trajectory[-1] + 0.1 * torch.randn(q, d, generator=gen), dim=-1)
    extra = F.normalize(torch.randn(gallery, d, generator=gen), dim=-1)
    return VizInputs(reference, query, target, torch.cat([target, extra]), trajectory, [f"q{i}" for i in range(q)])


def _assert_png_with_content(path) -> None:
    assert path.is_file() and path.stat().st_size > 5_000
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 200
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20  # drawn, not a blank canvas


def test_render_figures_writes_pngs(tmp_path):
    written = render_figures(_inputs(), tmp_path / "figs", method="tsne", num_neighbors=3)
    assert [p.name for p in written] == ["query_space.png", "trajectory.png"]
    for path in written:
        _assert_png_with_content(path)
    assert not list((tmp_path / "figs").glob(".*.tmp"))


def test_projection_is_deterministic_and_checks_its_method(monkeypatch):
    points = torch.randn(30, 8)
    a, b = project_2d(points, "tsne", seed=1), project_2d(points, "tsne", seed=1)
    assert a.shape == (30, 2) and np.allclose(a, b)
    assert project_2d(points[:3], "tsne").shape == (3, 2)  # too few points for t-SNE: PCA
    monkeypatch.setattr(projection, "umap_available", lambda: False)
    assert projection.resolve_projection("auto") == "tsne"
    with pytest.raises(ConfigError, match="umap-learn"):
        project_2d(points, "umap")
    with pytest.raises(ConfigError, match="Unknown projection 'mds'"):
        project_2d(points, "mds")


def test_viz_file_round_trip_and_errors(tmp_path):
    inputs = _inputs()
    path = save_viz_inputs(tmp_path / "results", inputs)
    assert path == tmp_path / "results" / VIZ_FILE
    loaded = load_viz_inputs(tmp_path / "results")
    for name in ("reference", "query", "target", "gallery", "trajectory"):
        torch.testing.assert_close(getattr(loaded, name), getattr(inputs, name))
    assert loaded.query_ids == inputs.query_ids
    with pytest.raises(MissingFileError, match=VIZ_FILE):
        load_viz_inputs(tmp_path / "nothing")
    save_viz_inputs(tmp_path / "partial.safetensors", VizInputs(inputs.reference, inputs.query, inputs.target))
    from safetensors.torch import save_file

    save_file({"reference": inputs.reference, "query": inputs.query}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(DataError, match=r"bad.safetensors lacks the tensor\(s\) \['target'\]"):
        load_viz_inputs(tmp_path / "bad.safetensors")
    with pytest.raises(DataError, match="'trajectory' has shape"):
        VizInputs(inputs.reference, inputs.query, inputs.target, trajectory=inputs.trajectory[:, :2])


def test_viz_cli(tmp_path, capsys):
    from fusion_diff.cli import main

    inputs = _inputs()
    save_viz_inputs(
        tmp_path / "in.safetensors", VizInputs(inputs.reference, inputs.query, inputs.target, inputs.gallery)
    )
    assert (
        main(["viz", "--inputs", str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "out"), "--method", "pca"])
        == 0
    )
    assert capsys.readouterr().out.strip() == str(
        tmp_path / "out" / "query_space.png"
    )  # no trajectory, no trajectory plot
    _assert_png_with_content(tmp_path / "out" / "query_space.png")
