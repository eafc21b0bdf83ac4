"""The techniques on torchvision's models (issue 19, item 3), on torchvision's own classes built small (the zoo's
sizes are too slow on CPU) or torchvision's ResNet-18 for 16×16 digits:

- gradient_checkpointing finds their blocks from the structure (BasicBlock, CNBlock, MBConv / FusedMBConv,
  EncoderBlock, SwinTransformerBlock, InvertedResidual) and is bit-identical in loss, gradients and BatchNorm
  statistics, with stochastic depth on; the peak of live tensors drops;
- stochastic_depth drives torchvision's own StochasticDepth modules keeping the model's depth rule, refuses a
  torchvision ResNet naming it;
- layerwise_lr counts depth over all stages (ResNet layer1-4, ConvNeXt features stages, ViT encoder layers);
- model.freeze with model.unfreeze_epoch: until the epoch exactly the run with requires_grad=False, training after;
  under DDP (a real 2-process launch) the frozen parameters stay put; DeepSpeed refused;
- EMA (against a hand EMA), SAM, Mixup, CutMix, progressive resizing (the sizes the model sees) and channels_last
  (the conv weights' memory format) train a torchvision ConvNeXt inside the loop.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.efficientnet import FusedMBConvConfig, MBConvConfig
from torchvision.ops import StochasticDepth as TorchvisionStochasticDepth

from framework.backend import Backend
from framework.config import TrainerConfig
from framework.data import ImageDataConfig, image_data
from framework.errors import ConfigError, IncompatibleError
from framework.loop import Trainer
from framework.models.resnet import ResNet
from framework.models.vision import (ImageModelConfig, _adapt_input_channels, build_torchvision_model, freeze,
                                    frozen_names)
from framework.nn.blocks import find_blocks
from framework.state import TrainState
from framework.task import ClassificationTask
from framework.technique import Technique
from framework.techniques import (EMA, SAM, CutMix, GradientCheckpointing, GradientClipping, LayerwiseLR, Mixup,
                                  ProgressiveResizing, StochasticDepth)
from framework.techniques.freeze import FreezeUntil
from framework.techniques.grad_checkpointing import default_targets
from helpers import ROOT, PeakTensorBytes, launch, tiny_state


# --- small torchvision models ----------------------------------------------------------------------------------------
def small_convnext(in_channels: int = 3, num_classes: int = 3, stochastic_depth_prob: float = 0.3) -> torch.nn.Module:
    torch.manual_seed(0)
    # layer_scale 1: the blocks' branches count from the start (torchvision's 1e-6 would hide a wrong recomputation)
    model = torchvision.models.ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 2)],
                                        stochastic_depth_prob=stochastic_depth_prob, layer_scale=1.0,
                                        num_classes=num_classes)
    if in_channels != 3:
        _adapt_input_channels(model, in_channels)
    return model


def small_efficientnet(stochastic_depth_prob: float = 0.3) -> torch.nn.Module:
    torch.manual_seed(0)
    setting = [FusedMBConvConfig(2, 3, 1, 8, 8, 2), MBConvConfig(4, 3, 2, 8, 16, 2)]
    return torchvision.models.EfficientNet(setting, dropout=0.1, stochastic_depth_prob=stochastic_depth_prob,
                                           num_classes=3, last_channel=32)


def small_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=3, num_heads=2, hidden_dim=16,
                                                mlp_dim=32, dropout=0.1, num_classes=3)


def small_swin() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[2, 2], num_heads=[1, 2],
                                              window_size=[4, 4], stochastic_depth_prob=0.3, num_classes=3)


def small_mobilenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_small(num_classes=3, width_mult=0.25)


def resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_torchvision_model("resnet18", in_channels=3, num_classes=3, small_input=True)


# (factory, input (B, C, H, W), the block classes found, how many blocks)
MODELS = {
    "resnet18": (resnet18, (4, 3, 8, 8), ["BasicBlock"], 8),
    "convnext": (small_convnext, (4, 3, 16, 16), ["CNBlock"], 4),
    "efficientnet": (small_efficientnet, (4, 3, 16, 16), ["FusedMBConv", "MBConv"], 4),
    "vit": (small_vit, (4, 3, 16, 16), ["EncoderBlock"], 3),
    "swin": (small_swin, (4, 3, 16, 16), ["SwinTransformerBlock"], 4),
    "mobilenet_v3": (small_mobilenet, (4, 3, 16, 16), ["InvertedResidual"], 11),
}


def train_step(model: torch.nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, dict, dict, int]:
    """One training forward + backward from a fixed RNG state (stochastic depth and dropout draw the same masks):
    loss, gradients, buffers, and the peak bytes of live tensors meanwhile."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    labels = torch.arange(inputs.shape[0]) % 3
    with PeakTensorBytes() as memory:
        loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {name: b.clone() for name, b in model.named_buffers()}, memory.peak


# --- gradient checkpointing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_checkpointing_finds_the_blocks_and_is_bit_identical(name):
    factory, shape, classes, count = MODELS[name]
    model = factory()
    inputs = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    reference = train_step(copy.deepcopy(model), inputs)

    assert default_targets(model) == classes
    state = TrainState(None, model, None, None)
    GradientCheckpointing().before_prepare(state)
    assert len(state.summary["gradient_checkpointing"]["modules"]) == count
    loss, grads, buffers, _ = train_step(model, inputs)
    assert torch.isfinite(loss) and torch.equal(loss, reference[0])
    assert grads.keys() == reference[1].keys() and len(grads) == len(list(model.parameters()))
    for key, grad in grads.items():
        assert torch.equal(grad, reference[1][key]), f"{name}: gradient of {key} differs"
    for key, buffer in buffers.items():  # BatchNorm statistics moved once, as without checkpointing
        assert torch.equal(buffer, reference[2][key]), f"{name}: buffer {key} differs"


@pytest.mark.parametrize("name, classes, count", [
    ("resnet50", ["Bottleneck"], 16), ("convnext_tiny", ["CNBlock"], 18), ("efficientnet_b0", ["MBConv"], 16),
    ("efficientnet_v2_s", ["FusedMBConv", "MBConv"], 40), ("mobilenet_v3_large", ["InvertedResidual"], 15),
    ("shufflenet_v2_x1_0", ["InvertedResidual"], 16), ("swin_v2_t", ["SwinTransformerBlockV2"], 12),
    ("vit_b_16", ["EncoderBlock"], 12), ("densenet121", ["_DenseBlock"], 4),
])
def test_the_block_rule_on_the_zoo_sizes(name, classes, count):
    with torch.device("meta"):  # the structure only: no memory, no init time
        model = torchvision.models.get_model(name, weights=None)
    assert default_targets(model) == classes
    assert len(find_blocks(model)) == count


def test_checkpointing_lowers_the_peak_of_live_tensors():
    model = small_convnext(stochastic_depth_prob=0.0)
    inputs = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    plain = train_step(model, inputs)[3]
    GradientCheckpointing().before_prepare(TrainState(None, model, None, None))
    checkpointed = train_step(model, inputs)[3]
    print(f"ConvNeXt (2 stages, 4 CNBlocks), 32×3×64×64: peak {plain / 2**20:.1f} MiB plain, "
          f"{checkpointed / 2**20:.1f} MiB checkpointed")
    assert checkpointed < 0.6 * plain


def test_models_without_repeated_blocks_find_none():
    # VGG: a plain stack of convolutions, no container of repeated blocks: the technique asks for `modules`.
    with torch.device("meta"):
        vgg = torchvision.models.vgg11()
    assert default_targets(vgg) == [] and find_blocks(vgg) == []
    with pytest.raises(ConfigError, match="VGG declares no `_no_split_modules` and repeats no block"):
        GradientCheckpointing().before_prepare(TrainState(None, vgg, None, None))


# --- stochastic depth -----------------------------------------------------------------------------------------------
def torchvision_rates(model: torch.nn.Module) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, TorchvisionStochasticDepth)]


@pytest.mark.parametrize("factory, model_rule", [
    (small_convnext, [0, 1 / 3, 2 / 3, 1]),  # ConvNeXt: block i of n at i / (n - 1)
    (small_efficientnet, [0, 1 / 3, 2 / 3, 1]),  # EfficientNet: i / n, scaled here so the deepest is `rate`
    (small_swin, [0, 1 / 3, 2 / 3, 1]),
])
def test_stochastic_depth_drives_torchvision_modules_keeping_their_depth_rule(tmp_path, factory, model_rule):
    model = factory()
    state = tiny_state(tmp_path, model)
    technique = StochasticDepth(rate=0.4, schedule="linear")
    state.max_steps, state.steps_per_epoch = 30, 10  # 3 epochs: 0, 0.2, 0.4 for the deepest block
    technique.fit_start(state)
    for epoch, deepest in [(0, 0.0), (1, 0.2), (2, 0.4)]:
        state.epoch = epoch
        technique.epoch_start(state)
        assert torchvision_rates(model) == pytest.approx([deepest * r for r in model_rule]), epoch
    model.train()
    inputs = torch.randn(8, 3, 16, 16)
    torch.manual_seed(0)
    dropped = model(inputs)
    for module in model.modules():
        if isinstance(module, TorchvisionStochasticDepth):
            module.p = 0.0
    torch.manual_seed(0)
    assert not torch.allclose(dropped, model(inputs))  # the rates set are the ones the forward pass uses


def test_a_model_built_without_rates_gets_the_linear_rule(tmp_path):
    model = small_convnext(stochastic_depth_prob=0.0)
    state = tiny_state(tmp_path, model)
    technique = StochasticDepth(rate=0.2)
    technique.fit_start(state)
    technique.epoch_start(state)
    assert torchvision_rates(model) == pytest.approx([0.05, 0.1, 0.15, 0.2])  # rate · l / L


def test_stochastic_depth_refuses_a_torchvision_resnet_naming_it(tmp_path):
    state = tiny_state(tmp_path, resnet18())
    with pytest.raises(ConfigError) as error:
        StochasticDepth(rate=0.1).fit_start(state)
    message = str(error.value)
    assert "\n" not in message and message.startswith("stochastic_depth: ResNet has no DropPath modules")
    assert "remove stochastic_depth" in message


# --- layer-wise learning rates --------------------------------------------------------------------------------------
def layerwise_lrs(model: torch.nn.Module, decay: float = 0.5) -> dict[str, float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.0)
    LayerwiseLR(layer_decay=decay).before_prepare(TrainState(None, model, optimizer, None))
    lrs = {name: group["lr"] for group in optimizer.param_groups for name in group["names"]}
    assert lrs.keys() == {name for name, _ in model.named_parameters()}
    return lrs


def expected_depth_resnet(name: str) -> int:
    if name.startswith("layer"):  # layer1.0 .. layer4.1: blocks 1..8 (downsample is inside its block)
        stage, block = name.split(".")[:2]
        return 2 * (int(stage[-1]) - 1) + int(block) + 1
    return 9 if name.startswith("fc.") else 0


def expected_depth_convnext(name: str) -> int:
    # features.0 stem; features.1.{0,1} blocks 1-2; features.2 (the downsample) feeds block 3: features.3.{0,1} 3-4
    if name.startswith(("features.1.", "features.3.")):
        return {"1": 0, "3": 2}[name.split(".")[1]] + int(name.split(".")[2]) + 1
    return {"features.0": 0, "features.2": 3}.get(".".join(name.split(".")[:2]), 5)


def expected_depth_vit(name: str) -> int:
    if name.startswith("encoder.layers.encoder_layer_"):
        return int(name.split(".")[2].rsplit("_", 1)[1]) + 1
    return 4 if name.startswith(("encoder.ln.", "heads.")) else 0  # class token, patch conv, positions: 0


@pytest.mark.parametrize("factory, depth, top", [
    (resnet18, expected_depth_resnet, 9),
    (small_convnext, expected_depth_convnext, 5),
    (small_vit, expected_depth_vit, 4),
])
def test_layerwise_lr_counts_depth_over_all_stages(factory, depth, top):
    model = factory()
    lrs = layerwise_lrs(model)
    for name, lr in lrs.items():
        assert lr == pytest.approx(0.5 ** (top - depth(name)), rel=1e-12), name
    assert len(set(lrs.values())) == top + 1  # every depth is there


# --- freeze with an unfreeze epoch ------------------------------------------------------------------------------------
def image_batches(n: int = 16, batch_size: int = 4, size: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(2)
    samples = [{"pixel_values": torch.randn(3, size, size, generator=generator), "label": i % 3} for i in range(n)]
    return DataLoader(samples, batch_size=batch_size)


class WeightsAtEpochEnd(Technique):
    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []

    def epoch_end(self, state):
        model = state.accelerator.unwrap_model(state.model)
        self.weights.append({k: v.detach().clone() for k, v in model.named_parameters()})


FROZEN = ["features.0.*", "features.1.*"]  # a ConvNeXt's stem and first stage


def fit_frozen(tmp_path, epochs: int, until: int | None) -> list[dict[str, torch.Tensor]]:
    """A small ConvNeXt, AdamW with weight decay and clipping (both would move or rescale a parameter that is merely
    given zero gradients), FROZEN frozen for good (until None) or until an epoch."""
    model = small_convnext()
    recorder = WeightsAtEpochEnd()
    techniques = [GradientClipping(max_norm=0.5), recorder]
    if until is None:
        freeze(model, FROZEN)
    else:
        techniques.insert(0, FreezeUntil(frozen_names(model, FROZEN), until))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    config = TrainerConfig(output_dir=str(tmp_path), epochs=epochs, tracker="none", log_every=1)
    Trainer(config, model, optimizer, ClassificationTask(num_classes=3), image_batches(),
            techniques=techniques).fit()
    return recorder.weights


def test_unfreeze_epoch_trains_exactly_as_frozen_until_then(tmp_path):
    start = {k: v.detach().clone() for k, v in small_convnext().named_parameters()}
    [frozen_for_good] = fit_frozen(tmp_path / "frozen", epochs=1, until=None)
    first, second = fit_frozen(tmp_path / "until", epochs=2, until=1)
    for name, weight in first.items():  # epoch 0: bitwise the requires_grad=False run, frozen ones untouched
        assert torch.equal(weight, frozen_for_good[name]), name
    frozen = [name for name in start if name.startswith(("features.0.", "features.1."))]
    assert all(torch.equal(first[name], start[name]) for name in frozen)
    assert not torch.equal(first["features.3.0.block.0.weight"], start["features.3.0.block.0.weight"])
    # epoch 1: they train
    assert all(not torch.equal(second[name], start[name]) for name in frozen)


def test_unfreeze_epoch_bad_input_and_deepspeed_are_refused():
    with pytest.raises(ConfigError, match="unfreeze_epoch 2 needs model.freeze"):
        ImageModelConfig(unfreeze_epoch=2)
    with pytest.raises(ConfigError, match="epoch ≥ 1"):
        ImageModelConfig(freeze=["conv1.*"], unfreeze_epoch=0)
    with pytest.raises(ConfigError, match="≥ 1"):
        FreezeUntil(["conv1.weight"], 0)
    FreezeUntil(["conv1.weight"], 1).check(Backend(distributed_type="MULTI_CPU", num_processes=2), [])
    with pytest.raises(IncompatibleError, match="DeepSpeed keeps.*drop model.unfreeze_epoch") as error:
        FreezeUntil(["conv1.weight"], 1).check(Backend(distributed_type="DEEPSPEED", deepspeed_stage=2), [])
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_unfreeze_epoch_under_ddp_keeps_the_frozen_weights_until_the_epoch(tmp_path):
    # The reference ResNet (fast) from known weights; one epoch, unfreezing at 1: the stem is in DDP's reducer
    # (requires_grad stays True) and must come out exactly as saved while the blocks train.
    saved = ResNet(ImageModelConfig(in_channels=1, num_classes=10, widths=(8, 16)))
    save_file(saved.state_dict(), tmp_path / "start.safetensors")
    run = tmp_path / "run"
    result = launch(ROOT / "recipes" / "image_classification.py", "--tracker", "none", "--data.num_workers", "0",
                    "--data.image_size", "16", "--data.batch_size", "32", "--epochs", "1", "--max_steps", "6",
                    "--model.widths", "[8, 16]", "--model.weights", str(tmp_path / "start.safetensors"),
                    "--model.freeze", '["stem.*"]', "--model.unfreeze_epoch", "1", "--techniques.ema", "null",
                    "--output_dir", str(run), launch_config="multi_cpu.yaml")
    assert result.returncode == 0
    assert "32 per process × 2 process(es)" in result.stdout  # DDP on 2 gloo ranks
    final, start = load_file(run / "model.safetensors"), saved.state_dict()
    stem = [k for k in final if k.startswith("stem.") and k.endswith("weight")]
    assert stem and all(torch.equal(final[k], start[k]) for k in stem)
    assert not torch.equal(final["blocks.0.branch.0.weight"], start["blocks.0.branch.0.weight"])


# --- EMA, SAM, Mixup, CutMix, progressive resizing, channels_last in the loop ---------------------------------------
class Seen(Technique):
    """Records the image size the model is given in training and the weights after each step."""

    def __init__(self):
        self.sizes, self.weights = [], []

    def fit_start(self, state):
        model = state.accelerator.unwrap_model(state.model)

        def record(module, args):
            if module.training:
                self.sizes.append(args[0].shape[-1])
        model.register_forward_pre_hook(record)

    def after_optimizer_step(self, state):
        model = state.accelerator.unwrap_model(state.model)
        self.weights.append({k: v.detach().clone() for k, v in model.named_parameters()})


TECHNIQUES = {
    "ema": lambda: [EMA(decay=0.5)],
    "sam": lambda: [SAM(rho=0.05)],
    "mixup": lambda: [Mixup(alpha=0.4)],
    "cutmix": lambda: [CutMix(cutmix_alpha=1.0)],
    "progressive_resizing": lambda: [ProgressiveResizing(start_fraction=0.5, ramp_fraction=0.5)],
    "channels_last": lambda: [],
}


# On a small ConvNeXt (torchvision's ResNet-18 took ~25 s a case here, most of it its 11M parameters on 2 cores;
# tests/test_vision_models.py trains it through the recipe, with EMA and clipping).
@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_techniques_train_a_torchvision_convnext_in_the_loop(tmp_path, technique):
    # ~72 training digits, 16 per batch: 5 steps an epoch, 2 epochs.
    size = 16
    data = image_data(ImageDataConfig(num_workers=0, image_size=size, batch_size=16, val_fraction=0.48,
                                      test_fraction=0.48))
    model = small_convnext(in_channels=1, num_classes=10, stochastic_depth_prob=0.1)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    seen = Seen()
    techniques = [*TECHNIQUES[technique](), seen]
    config = TrainerConfig(output_dir=str(tmp_path), epochs=2, tracker="none", log_every=1, doctor=False,
                           channels_last=technique == "channels_last")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.003)
    trainer = Trainer(config, model, optimizer, ClassificationTask(num_classes=10), data.loaders["train"],
                      techniques=techniques)
    trainer.fit()
    steps = len(seen.weights)
    assert steps == trainer.state.step and steps >= 8
    losses = [row["train/loss"] for row in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in row]
    assert all(torch.isfinite(torch.tensor(losses))) and len(losses) == steps
    if technique != "progressive_resizing":  # (a new image size in epoch 1 raises the loss for a while)
        assert sum(losses[-3:]) < sum(losses[:3]), losses  # it learns

    if technique == "ema":  # the shadow weights are a hand EMA of the weights after each step, not the weights
        [ema] = [t for t in techniques if isinstance(t, EMA)]
        hand = {k: v.clone() for k, v in start.items()}
        for weights in seen.weights:
            hand = {k: 0.5 * hand[k] + 0.5 * weights[k] for k in hand}
        names = [name for name, _ in model.named_parameters()]
        for name, shadow in zip(names, ema.ema_params):
            assert torch.allclose(shadow, hand[name], rtol=1e-5, atol=1e-6), name
        assert not torch.allclose(ema.ema_params[0], seen.weights[-1][names[0]])
    if technique == "progressive_resizing":  # epoch 0 at half size, epoch 1 at full size; evaluation not seen here
        per_epoch = steps // 2
        assert seen.sizes == [size // 2] * per_epoch + [size] * (steps - per_epoch)
    else:
        assert set(seen.sizes) == {size}
    # Conv weights with several input channels and a kernel above 1×1: their two memory formats differ.
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
             and m.weight.shape[1] > 1]
    in_channels_last = [w.is_contiguous(memory_format=torch.channels_last) for w in convs]
    assert convs and in_channels_last == [technique == "channels_last"] * len(convs)
