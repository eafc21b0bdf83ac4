"""The recipes' configs: a bare run is the documented run, the saved config rebuilds the run, `--help` explains."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

import framework.config
from framework.config import parse_config
from helpers import ROOT, launch_environment, load_recipe

RECIPES = ("image_classification", "language_model", "wgan_gp")  # each with its default recipes/configs/NAME.yaml


recipe = load_recipe


def config_class(name: str) -> type:
    """The recipe's run config: its TrainerConfig subclass (a recipe may define part configs too, e.g. its model's)."""
    return next(value for value in vars(recipe(name)).values()
                if isinstance(value, type) and issubclass(value, framework.config.TrainerConfig)
                and value.__module__ == name)


def yaml_of(name: str) -> str:
    return str(ROOT / "recipes" / "configs" / f"{name}.yaml")


def print_config(name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "recipes" / f"{name}.py"), *args, "--print_config"],
                            cwd=ROOT, env=launch_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.parametrize("name", RECIPES)
def test_a_bare_recipe_is_its_documented_run(name):
    """`python recipes/X.py` runs exactly `--config recipes/configs/X.yaml` (what the README and design card show)."""
    bare, documented = print_config(name), print_config(name, "--config", yaml_of(name))
    (bare_out, bare_err), (documented_out, documented_err) = bare.communicate(120), documented.communicate(120)
    assert bare.returncode == 0 and documented.returncode == 0, bare_err + documented_err
    assert bare_out == documented_out
    assert yaml.safe_load(bare_out)["techniques"]  # every recipe's documented run uses techniques


def test_a_config_file_replaces_the_default_techniques():
    config_cls = config_class("image_classification")
    variant = ROOT / "recipes" / "configs" / "digits_regularized.yaml"
    config = parse_config(config_cls, ["--config", str(variant)])
    assert config.techniques == yaml.safe_load(variant.read_text())["techniques"]
    assert list(config.techniques) == list(yaml.safe_load(variant.read_text())["techniques"])  # hook order too
    without_ema = parse_config(config_cls, ["--techniques.ema", "null"])
    assert without_ema.techniques["ema"] is None and without_ema.techniques["cosine_lr"] == {"warmup_epochs": 1}
    assert parse_config(config_cls, ["--techniques", "{}"]).techniques == {}


def test_lr_schedules_takes_output_dir(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "lr_schedules.py"), "--output_dir",
                             str(tmp_path / "pictures"), "--epochs", "4", "--warmup_epochs", "1"],
                            cwd=ROOT, env=launch_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pictures" / "lr_schedules.png").is_file()


@pytest.mark.parametrize("name", RECIPES)
def test_config_to_yaml_round_trips_through_config(name, tmp_path):
    args = ["--config", yaml_of(name), "--epochs", "3", "--tags", "[a, b]", "--techniques.gradient_clipping.max_norm",
            "0.5", "--run_name", "null"]
    config = parse_config(config_class(name), args)
    saved = tmp_path / "config.yaml"
    saved.write_text(framework.config.config_to_yaml(config))
    text = saved.read_text()
    assert "model:\n" in text and "'[" not in text  # nested, lists as lists (no flattened `model.widths: (16,...)`)
    again = parse_config(config_class(name), ["--config", str(saved)])
    assert again == config
    assert parse_config(config_class(name), []) == parse_config(config_class(name), ["--config", yaml_of(name)])


def write_rgb_imagefolder(root, classes=("cat", "dog", "fox"), per_class: int = 10) -> None:
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            pixels[..., label] = 200
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_the_saved_config_holds_the_values_derived_from_the_data(tmp_path, monkeypatch):
    """A 3-class RGB folder: the config the run keeps (and saves) says 3 channels and 3 classes, like its model."""
    monkeypatch.setenv("FRAMEWORK_CACHE", str(tmp_path / "cache"))
    write_rgb_imagefolder(tmp_path / "pets")
    trainer = recipe("image_classification").main([
        "--data.name", str(tmp_path / "pets"), "--output_dir", str(tmp_path / "run"), "--tracker", "none",
        "--max_steps", "2", "--data.image_size", "8", "--data.batch_size", "8", "--data.num_workers", "0",
        "--model.widths", "[4]", "--techniques", "{}", "--doctor", "false"])
    assert trainer.config.model.in_channels == 3 and trainer.config.model.num_classes == 3
    model = trainer.accelerator.unwrap_model(trainer.state.model)
    rebuilt = recipe("image_classification").ResNet(trainer.config.model)
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]
    saved = tmp_path / "saved.yaml"
    saved.write_text(framework.config.config_to_yaml(trainer.config))
    again = parse_config(config_class("image_classification"), ["--config", str(saved)])
    assert again == trainer.config


def test_output_dir_config_yaml_is_the_resolved_config(tmp_path, monkeypatch):
    """output_dir/config.yaml (written by the loop) is what `--config` reads back: the same config."""
    monkeypatch.setenv("FRAMEWORK_CACHE", str(tmp_path / "cache"))
    write_rgb_imagefolder(tmp_path / "pets")
    args = ["--data.name", str(tmp_path / "pets"), "--output_dir", str(tmp_path / "run"), "--tracker", "none",
            "--max_steps", "2", "--data.image_size", "8", "--data.batch_size", "8", "--data.num_workers", "0",
            "--model.widths", "[4]", "--techniques", "{}", "--doctor", "false"]
    trainer = recipe("image_classification").main(args)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["in_channels"] == 3 and saved["model"]["num_classes"] == 3
    again = parse_config(config_class("image_classification"), ["--config", str(tmp_path / "run" / "config.yaml")])
    assert again == trainer.config


def help_text(name: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(config_class(name), ["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_explains_every_option(capsys):
    import framework.techniques  # noqa: F401  (registers the built-in techniques)
    from framework.technique import TECHNIQUES

    text = help_text("image_classification", capsys)
    words = " ".join(text.split())  # the help wraps lines
    assert "Train an image classifier" in words  # the recipe's group title
    assert "Optimizer steps between log lines" in words
    assert "A checkpoint directory, or `latest`" in words
    assert "Peak learning rate." in words  # a nested dataclass's field
    assert "ImageDataConfig(name:" not in text and "OptimizerConfig(name:" not in text  # no raw signatures as titles
    for name, technique in TECHNIQUES.items():
        assert f"  {name}: " in text, name
    assert "Keep an exponential moving average of the model's weights" in words
