"""torchvision's classification models in the image recipe: built by name, fine-tuned from local weights, rebuilt by
`framework.predict`."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from framework.errors import ConfigError
from framework.models import build_model, model_description
from framework.models.resnet import ResNet
from framework.models.vision import ImageModelConfig, build_torchvision_model, freeze, load_weights
from framework.predict import load_run
from helpers import ROOT, launch

RECIPE = ROOT / "recipes" / "image_classification.py"
# The command, made quick: 16×16 digits, 32 per batch, no loader workers.
QUICK = ("--config", "recipes/configs/image_classification.yaml", "--model.name", "resnet18", "--model.small_input",
         "true", "--tracker", "none", "--data.num_workers", "0", "--data.image_size", "16", "--data.batch_size", "32",
         "--log_every", "5")


def test_resnet18_for_small_grayscale_images():
    model = build_torchvision_model("resnet18", in_channels=1, num_classes=10, small_input=True)
    assert (model.conv1.in_channels, model.conv1.kernel_size, model.conv1.stride) == (1, (3, 3), (1, 1))
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_other_families_get_their_first_rgb_conv_adapted():
    model = build_torchvision_model("mobilenet_v3_small", in_channels=1, num_classes=4)
    assert model.features[0][0].in_channels == 1
    assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 4)


def test_a_bad_name_lists_close_matches_and_small_input_is_refused_where_not_implemented():
    with pytest.raises(ConfigError, match=r"'resnet181' is not a torchvision.*resnet18, ") as error:
        build_torchvision_model("resnet181", 1, 10)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="small_input.*convnext_tiny"):
        build_torchvision_model("convnext_tiny", 1, 10, small_input=True)


def test_model_json_rebuilds_the_torchvision_model():
    config = ImageModelConfig(name="resnet18", in_channels=1, num_classes=7, small_input=True)
    model = build_torchvision_model("resnet18", 1, 7, small_input=True)
    description = json.loads(json.dumps(model_description(model, config)))  # as model.json holds it
    rebuilt = build_model(description)
    assert type(rebuilt) is type(model) and rebuilt.conv1.kernel_size == (3, 3)
    rebuilt.load_state_dict(model.state_dict())  # strict: the same tensors, the same shapes
    reference = build_model(model_description(ResNet(ImageModelConfig()), ImageModelConfig()))
    assert type(reference) is ResNet  # name null: model.json still describes the reference ResNet


def test_fine_tuning_loads_the_backbone_exactly_and_keeps_a_new_head(tmp_path):
    saved = build_torchvision_model("resnet18", 1, 10, small_input=True)
    save_file(saved.state_dict(), tmp_path / "resnet18.safetensors")
    torch.manual_seed(1)
    model = build_torchvision_model("resnet18", 1, 5, small_input=True)
    fresh = load_weights(model, tmp_path / "resnet18.safetensors")
    assert fresh == ["fc.weight", "fc.bias"]
    state, before = model.state_dict(), saved.state_dict()
    for name in state:
        if name not in fresh:
            assert torch.equal(state[name], before[name]), name
    assert state["fc.weight"].shape == (5, 512) and not torch.equal(state["fc.weight"][:5], before["fc.weight"][:5])


def test_a_pth_state_dict_loads_weights_only_and_a_pickled_model_is_refused(tmp_path):
    saved = build_torchvision_model("resnet18", 3, 10)
    torch.save(saved.state_dict(), tmp_path / "resnet18.pth")
    model = build_torchvision_model("resnet18", 3, 10)
    assert load_weights(model, tmp_path / "resnet18.pth") == []
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))

    class Payload:  # what weights_only refuses to build: any object beyond tensors and containers
        def __reduce__(self):
            return (print, ("unpickled!",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"fc.weight": Payload()}, protocol=2))
    with pytest.raises(ConfigError, match="weights-only"):
        load_weights(model, tmp_path / "evil.pth")


def test_a_mismatch_outside_the_head_names_the_tensor(tmp_path):
    save_file(build_torchvision_model("resnet18", 3, 10).state_dict(), tmp_path / "rgb.safetensors")
    with pytest.raises(ConfigError, match="'conv1.weight' has shape"):
        load_weights(build_torchvision_model("resnet18", 1, 10), tmp_path / "rgb.safetensors")
    with pytest.raises(ConfigError, match="missing"):
        load_weights(build_torchvision_model("resnet34", 3, 10), tmp_path / "rgb.safetensors")


def test_freeze_by_pattern_and_unknown_patterns_are_refused():
    model = build_torchvision_model("resnet18", 3, 10)
    frozen = set(freeze(model, ["conv1.*", "layer1.*"]))
    assert frozen == {name for name, p in model.named_parameters() if not p.requires_grad}
    assert "conv1.weight" in frozen and "layer1.0.bn1.bias" in frozen and "layer2.0.conv1.weight" not in frozen
    with pytest.raises(ConfigError, match="layer9"):
        freeze(model, ["layer9.*"])


@pytest.mark.slow
def test_the_recipe_trains_a_torchvision_resnet18_and_predict_rebuilds_it(tmp_path):
    result = launch(RECIPE, *QUICK, "--max_steps", "20", "--output_dir", str(tmp_path))
    assert result.returncode == 0
    losses = [row["train/loss"] for row in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in row]
    assert len(losses) == 4 and losses[-1] < losses[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"]["class"] == "ResNet" and 11_000_000 < summary["model"]["parameters"] < 11_300_000
    model, _ = load_run(tmp_path)  # framework.predict's rebuild: torchvision's ResNet with the run's weights
    assert type(model).__module__.startswith("torchvision.") and model.fc.out_features == 10


@pytest.mark.slow
def test_the_recipe_fine_tunes_from_local_weights_with_a_frozen_stem(tmp_path):
    saved = build_torchvision_model("resnet18", 1, 5, small_input=True)
    save_file(saved.state_dict(), tmp_path / "five_classes.safetensors")
    run = tmp_path / "run"
    result = launch(RECIPE, *QUICK, "--max_steps", "6", "--output_dir", str(run), "--techniques.ema", "null",
                    "--model.weights", str(tmp_path / "five_classes.safetensors"),
                    "--model.freeze", '["conv1.*", "layer1.*"]')
    assert result.returncode == 0
    assert result.stdout.count("fc.weight, fc.bias keep their fresh initialisation") == 1
    summary = json.loads((run / "summary.json").read_text())["model"]
    assert summary["trainable_parameters"] < summary["parameters"]
    final, start = load_file(run / "model.safetensors"), saved.state_dict()
    assert torch.equal(final["conv1.weight"], start["conv1.weight"])  # frozen: exactly the saved weights
    assert torch.equal(final["layer1.0.conv1.weight"], start["layer1.0.conv1.weight"])
    assert not torch.equal(final["layer4.0.conv1.weight"], start["layer4.0.conv1.weight"])  # trained
    assert final["fc.weight"].shape == (10, 512)


@pytest.mark.slow
@pytest.mark.parametrize("launch_config", ["multi_cpu.yaml", "deepspeed_zero2.yaml"])
def test_the_torchvision_resnet_trains_on_two_ranks(tmp_path, launch_config):
    result = launch(RECIPE, *QUICK, "--max_steps", "10", "--output_dir", str(tmp_path), launch_config=launch_config)
    assert result.returncode == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"]["class"] == "ResNet" and summary["model"]["parameters"] > 11_000_000
    losses = [row["train/loss"] for row in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in row]
    assert losses[-1] < losses[0]
