"""Strict training configs: unknown keys and wrong types stop the run before training, naming key and file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fusion_diff.cli import main as cli_main
from fusion_diff.errors import ConfigError
from fusion_diff.training.adapter_task import AdapterModelConfig
from fusion_diff.training.config import load_config, save_config
from fusion_diff.training.prior_task import PriorDataConfig

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, raw: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def prior_raw(tmp_path: Path) -> dict:
    return {
        "task": "prior",
        "output_dir": str(tmp_path / "out"),
        "model": {"hidden_dim": 32, "num_layers": 2, "num_heads": 2},
        "data": {"pair_embeddings": str(tmp_path / "pairs")},
        "schedule": {"max_train_steps": 5, "train_batch_size": 4},
    }


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda r: r["schedule"].update(max_train_step=5), "schedule.max_train_step"),  # typo in a nested section
        (lambda r: r["model"].update(hiden_dim=3), "model.hiden_dim"),  # typo in the task's own section
        (lambda r: r.update(optimiser={"learning_rate": 1.0}), "optimiser"),  # unknown section
    ],
)
def test_unknown_key_is_named_with_the_file(tmp_path, edit, key):
    raw = prior_raw(tmp_path)
    edit(raw)
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"'{key}'" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("schedule", "max_train_steps", "many"),
        ("schedule", "train_batch_size", 4.5),
        ("ema", "use_ema", "yes"),
        ("model", "prediction_type", "noise"),  # not one of the allowed values
        ("data", "text_dropout", [0.1]),
        ("optim", "learning_rate", True),
    ],
)
def test_wrong_type_is_named(tmp_path, section, key, value):
    raw = prior_raw(tmp_path)
    raw.setdefault(section, {})[key] = value
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError, match=rf"{path}: '{section}\.{key}'"):
        load_config(path)


def test_impossible_value_and_missing_required_key(tmp_path):
    raw = prior_raw(tmp_path)
    raw["data"]["text_dropout"] = 1.5
    with pytest.raises(ConfigError, match=r"'data\.text_dropout' must be in \[0, 1\)"):
        load_config(write(tmp_path, raw))
    raw = prior_raw(tmp_path)
    del raw["data"]["pair_embeddings"]
    with pytest.raises(ConfigError, match=r"missing required key 'data\.pair_embeddings'"):
        load_config(write(tmp_path, raw))


def test_overrides_are_checked_like_the_file(tmp_path):
    path = write(tmp_path, prior_raw(tmp_path))
    config = load_config(path, overrides=["optim.learning_rate=1e-3", "schedule.max_train_steps=7"])
    assert config.optim.learning_rate == pytest.approx(1e-3)  # YAML reads 1e-3 as a string; floats accept it
    assert config.schedule.max_train_steps == 7
    with pytest.raises(ConfigError, match=r"'optim\.learnig_rate'"):
        load_config(path, overrides=["optim.learnig_rate=1e-3"])
    with pytest.raises(ConfigError, match="'task' is 'prior' but the command asks for 'adapter'"):
        load_config(path, task="adapter")


def test_effective_config_round_trips(tmp_path):
    config = load_config(write(tmp_path, prior_raw(tmp_path)), overrides=["ema.decay=0.99"])
    assert isinstance(config.data, PriorDataConfig)
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("stage*.yaml")):
        config = load_config(path)
        assert config.task in ("prior", "adapter"), path
    assert isinstance(load_config(REPO / "configs/stage2_adapter.yaml").model, AdapterModelConfig)


def test_cli_refuses_a_bad_config_before_training(tmp_path):
    raw = prior_raw(tmp_path)
    raw["logging"] = {"log_every_n_step": 5}
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError, match=r"'logging\.log_every_n_step'"):
        cli_main(["train", "prior", "--config", str(path)])
    assert not (tmp_path / "out").exists()  # nothing was started


def test_demo_configs_and_their_training_configs_load():
    from fusion_diff.demo import DemoConfig, default_config_path
    from fusion_diff.training.config import load_dataclass

    for quick in (False, True):
        path = default_config_path(quick)
        demo = load_dataclass(DemoConfig, path)
        for name in ("stage1", "stage2"):
            assert load_config(
                path.parent / getattr(demo.training, name), overrides=getattr(demo.training, f"{name}_overrides")
            )
    with pytest.raises(ConfigError, match=r"'data\.triplet'"):
        load_dataclass(DemoConfig, default_config_path(True), overrides=["data.triplet=5"])
