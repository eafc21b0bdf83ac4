"""Config and CLI: YAML + dotted overrides, unknown keys and wrong types refused with the key named."""

from __future__ import annotations

import functools
import importlib.util
import sys

import pytest

from framework.config import parse_config
from helpers import ROOT, launch


@functools.cache
def recipe_config_class():
    spec = importlib.util.spec_from_file_location("image_classification", ROOT / "recipes" / "image_classification.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # type hints resolve through sys.modules, as for a script run as __main__
    spec.loader.exec_module(module)
    return module.ImageClassificationConfig


YAML = str(ROOT / "recipes" / "configs" / "image_classification.yaml")


def parse_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(recipe_config_class(), list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_yaml_and_dotted_overrides():
    config = parse_config(recipe_config_class(), ["--config", YAML, "--epochs", "3", "--optimizer.lr", "0.5",
                                                  "--techniques.ema.decay", "0.9", "--techniques.gradient_clipping",
                                                  "null", "--data.batch_size", "32"])
    assert config.epochs == 3 and config.optimizer.lr == 0.5 and config.data.batch_size == 32
    assert config.techniques["ema"] == {"decay": 0.9, "warmup": True}  # merged into the YAML's entry
    assert config.techniques["gradient_clipping"] is None
    assert list(config.techniques) == ["label_smoothing", "cosine_lr", "gradient_clipping", "ema"]
    assert config.tracker == "wandb" and config.resume_from is None and config.max_steps is None


def test_unknown_key_is_refused_with_its_name(capsys, tmp_path):
    assert "--epoch" in parse_error(capsys, "--epoch", "3")  # no silent abbreviation either
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer:\n  lrr: 0.1\n")
    assert "lrr" in parse_error(capsys, "--config", str(bad))


def test_wrong_type_is_refused_with_its_name(capsys):
    error = parse_error(capsys, "--epochs", "many")
    assert '"epochs"' in error and "many" in error
    assert "tracker" in parse_error(capsys, "--tracker", "mlflow")


def test_technique_mistakes_are_refused_at_parse_time(capsys):
    assert "techniques.emma: unknown technique" in parse_error(capsys, "--techniques.emma.decay", "0.9")
    assert "techniques.ema.decy: unknown argument" in parse_error(capsys, "--techniques.ema.decy", "0.9")
    assert "ema.decay must be within (0, 1)" in parse_error(capsys, "--techniques.ema.decay", "2")


def test_print_config_round_trips(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(recipe_config_class(), ["--config", YAML, "--epochs", "7", "--techniques.ema.decay", "0.5",
                                             "--print_config"])
    assert exit_info.value.code == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    again = parse_config(recipe_config_class(), ["--config", str(printed)])
    expected = parse_config(recipe_config_class(), ["--config", YAML, "--epochs", "7", "--techniques.ema.decay", "0.5"])
    assert again == expected


def test_recipe_exits_nonzero_naming_the_key():
    result = launch(ROOT / "recipes" / "image_classification.py", "--optimizer.learning_rate", "0.1",
                    "--tracker", "none", timeout=120)
    assert result.returncode != 0
    assert "learning_rate" in result.stderr


def test_a_technique_listed_twice_in_a_yaml_file_is_refused(capsys, tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("techniques:\n  ema: {decay: 0.9}\n  cosine_lr: {}\n  ema:\n    decay: 0.99\n")
    for args in (["--config", str(twice)], [f"--config={twice}"]):
        error = parse_error(capsys, *args)
        assert f"error: {twice}: techniques.ema is listed twice; list each technique once." in error
        assert "Traceback" not in error and error.strip().splitlines()[-1].startswith("error: ")  # the usage, then it
    nested = tmp_path / "nested.yaml"
    nested.write_text("optimizer:\n  lr: 0.1\n  weight_decay: 0.0\n  lr: 0.2\n")
    assert f"{nested}: optimizer.lr is given twice; give each key once." in parse_error(capsys, "--config",
                                                                                           str(nested))
    top = tmp_path / "top.yaml"
    top.write_text("epochs: 2\nseed: 1\nepochs: 3\n")
    assert f"{top}: epochs is given twice" in parse_error(capsys, "--config", str(top))
    assert parse_config(recipe_config_class(), ["--config", YAML]).techniques  # a clean file still parses
