"""The one registry pattern: lazy targets, clear errors, deprecated aliases; the shapes backbone's one spelling."""

from __future__ import annotations

import argparse

import pytest

from fusion_diff.errors import ConfigError
from fusion_diff.utils.registry import Registry


def test_registry_loads_lazily_names_choices_and_maps_old_names():
    reg = Registry("widget", {"json": ("json:dumps", "a JSON writer"), "obj": (len, "an object")}, {"old": "json"})
    assert sorted(reg) == ["json", "obj"] and "old" in reg and len(reg) == 2
    import json

    assert reg.load("json") is json.dumps and reg.load("obj") is len
    assert [(name, description) for name, (_, description) in reg.items()] == [("json", "a JSON writer"),
                                                                                ("obj", "an object")]  # fmt: skip
    with pytest.warns(FutureWarning, match="'old' is now called 'json'"):
        assert reg.load("old") is json.dumps
    with pytest.raises(ConfigError, match=r"Unknown widget 'nope'; choose one of \['json', 'obj'\]"):
        reg.load("nope")
    reg["later"] = ("fusion_diff.not_built_yet:Thing", "a part not built yet")
    with pytest.raises(ConfigError, match="widget 'later' lives in fusion_diff.not_built_yet"):
        reg.load("later")
    reg["missing"] = "json:no_such_function"
    with pytest.raises(ConfigError, match="json:no_such_function does not exist"):
        reg.load("missing")


def _flags(*argv: str) -> argparse.Namespace:
    from fusion_diff.cli.embed import add_embedder_args

    parser = argparse.ArgumentParser()
    add_embedder_args(parser, required=False)
    return parser.parse_args(list(argv))


def test_the_shapes_backbone_is_spelt_world_everywhere(capsys):
    from fusion_diff.cli.embed import EMBEDDER_BACKENDS, embedder_spec
    from fusion_diff.embedding.factory import BACKENDS

    assert tuple(BACKENDS) == EMBEDDER_BACKENDS  # the CLI's choices are the registry's names
    world = {"backend": "world", "train_if_missing": False, "fusion_weight": 0.5}
    assert embedder_spec(_flags()) == world and embedder_spec(_flags("--embedder", "world")) == world
    assert "note" not in capsys.readouterr().err
    assert embedder_spec(_flags("--model", "world")) == world  # the old spelling still works, with a note
    assert "--model world is now spelt --embedder world" in capsys.readouterr().err
    assert embedder_spec(_flags("--model", "ViT-B-32"))["backend"] == "openclip"
    with pytest.raises(ConfigError, match="takes no --model"):
        embedder_spec(_flags("--embedder", "world", "--model", "ViT-B-32"))
    with pytest.raises(ConfigError, match="--embedder vlm needs --model"):
        embedder_spec(_flags("--embedder", "vlm"))
    with pytest.warns(FutureWarning, match="'shapes-world' is now called 'world'"):
        assert BACKENDS.resolve("shapes-world") == "world"  # the FTI4CIR configs' old backend name


def test_a_benchmark_is_a_spec():
    """Loader, metrics, text rows, protocol options and server format come from each benchmark's spec."""
    import torch

    from fusion_diff.benchmarks.spec import BENCHMARK_SPECS, benchmark_spec
    from fusion_diff.benchmarks.types import BENCHMARKS, CompositionQuery
    from fusion_diff.cli.eval import BENCHMARK_NAMES

    assert tuple(BENCHMARK_SPECS) == BENCHMARKS == BENCHMARK_NAMES
    formats = {name: (benchmark_spec(name).submission, benchmark_spec(name).average is not None) for name in BENCHMARKS}
    assert formats == {"cirr": ("cirr", False), "fashioniq": (None, True), "circo": ("circo", False),
                       "shapes": ("cirr", False), "shapes-open": (None, False)}  # fmt: skip
    query = CompositionQuery("q", "r", ("is red", "has a star"), ("t",), shared_concept="a box")
    assert benchmark_spec("fashioniq").texts([query], fiq_order="both") == (["is red and has a star",
                                                                            "has a star and is red"], [0, 0])  # fmt: skip
    assert benchmark_spec("circo").texts([query], circo_shared_concept=True)[0] == ["a box that is red"]
    assert benchmark_spec("cirr").texts([query], circo_shared_concept=True)[0] == ["is red"]
    assert benchmark_spec("circo").protocol(circo_shared_concept=False) == {"circo_shared_concept": False}
    relevant = torch.tensor([[False, True, False]])
    metrics = benchmark_spec("shapes").metrics(relevant, None, [query])
    assert metrics["R@1"] == 0.0 and metrics["R@5"] == 100.0
