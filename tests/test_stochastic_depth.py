"""Stochastic depth: `drop_path` against its definition, `depth_rates` against a hand computation, the technique's
hooks on a tiny state with the reference ResNet, then one short run inside the loop."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from framework.config import TrainerConfig, build_techniques
from framework.errors import ConfigError
from framework.loop import Trainer
from framework.models.resnet import ResNet, ResNetConfig
from framework.nn.drop_path import DropPath, drop_path
from framework.state import TrainState
from framework.task import ClassificationTask
from framework.techniques import StochasticDepth, depth_rates


def dropped_samples(out: torch.Tensor) -> torch.Tensor:
    """(B,) True where a whole sample was zeroed."""
    return (out == 0).flatten(1).all(dim=1)


# --- drop_path -----------------------------------------------------------------------------------------------------
def test_drop_path_drops_a_fraction_p_of_samples_and_scales_survivors():
    n, p = 20_000, 0.3
    x = torch.randn(n, 3, 2) + 10.0  # no element is 0 by chance, so zeros mean "dropped"
    out = drop_path(x, p, generator=torch.Generator().manual_seed(0))
    dropped = dropped_samples(out)
    # The dropped count is Binomial(n, p): the fraction's std is sqrt(p (1 - p) / n) ≈ 0.0032; 3 std ≈ 0.0097
    # (a wrong p, e.g. the keep probability 0.7, or one coin per batch, lands far outside it).
    tolerance = 3 * math.sqrt(p * (1 - p) / n)
    assert abs(dropped.float().mean().item() - p) < tolerance
    # Survivors are x / (1 - p), exactly up to float32 rounding; a dropped sample is zero in every element.
    torch.testing.assert_close(out[~dropped], x[~dropped] / (1 - p), rtol=1e-6, atol=0)
    assert torch.equal(out[dropped], torch.zeros_like(x[dropped]))


def test_drop_path_is_one_coin_per_sample_not_per_batch():
    x = torch.randn(64, 4, 5, 5) + 10.0
    out = drop_path(x, 0.5, generator=torch.Generator().manual_seed(1))
    dropped = dropped_samples(out)
    assert 0 < dropped.sum() < 64  # both outcomes in one batch (all the same: probability 2^-63)
    kept = out[~dropped]
    assert (kept != 0).all()  # a kept sample is kept whole: the mask broadcasts over non-batch dims


def test_drop_path_identity_cases_zeros_and_validation():
    x = torch.randn(8, 3)
    assert drop_path(x, 0.0) is x
    assert drop_path(x, 0.7, training=False) is x
    x.requires_grad_(True)
    zeros = drop_path(x, 1.0)
    assert torch.equal(zeros, torch.zeros_like(x))  # no 0/0 NaNs
    zeros.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))  # still in the graph (DDP needs every parameter used)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="p must be within"):
            drop_path(x, bad)


def test_drop_path_gradient_flows_only_through_kept_samples():
    p = 0.5
    x = (torch.randn(32, 6) + 10.0).requires_grad_(True)
    out = drop_path(x, p, generator=torch.Generator().manual_seed(2))
    out.sum().backward()
    dropped = dropped_samples(out.detach())
    assert 0 < dropped.sum() < 32
    assert torch.equal(x.grad[dropped], torch.zeros_like(x.grad[dropped]))
    torch.testing.assert_close(x.grad[~dropped], torch.full_like(x.grad[~dropped], 1 / (1 - p)))


def test_drop_path_module_uses_training_flag_and_shows_p():
    layer = DropPath(0.5)
    assert "p=0.5" in repr(layer)
    x = torch.randn(64, 3) + 10.0
    torch.manual_seed(0)
    assert dropped_samples(layer(x)).any()  # training mode by default: drops
    layer.eval()
    assert torch.equal(layer(x), x)


# --- depth_rates -----------------------------------------------------------------------------------------------------
def test_depth_rates_rise_linearly_to_the_rate():
    assert depth_rates(0.5, 4) == [0.125, 0.25, 0.375, 0.5]  # 0.5 · l / 4 for l = 1..4
    assert depth_rates(0.3, 3) == pytest.approx([0.1, 0.2, 0.3])
    assert depth_rates(0.2, 1) == [0.2]


# --- the technique on a tiny state ------------------------------------------------------------------------------------
def resnet_state(tmp_path, model: torch.nn.Module | None = None, steps_per_epoch: int = 10,
                 max_steps: int = 50) -> TrainState:
    model = model if model is not None else ResNet(ResNetConfig())
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return TrainState(accelerator, model, optimizer, tmp_path, steps_per_epoch=steps_per_epoch, max_steps=max_steps)


def drop_rates(model: torch.nn.Module) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, DropPath)]


def test_technique_sets_rates_linear_in_depth_and_logs_the_rate(tmp_path):
    state = resnet_state(tmp_path)
    assert drop_rates(state.model) == [0.0, 0.0, 0.0]  # the ResNet's DropPaths start as the identity
    technique = StochasticDepth(rate=0.3)
    technique.fit_start(state)
    technique.epoch_start(state)
    assert drop_rates(state.model) == pytest.approx([0.1, 0.2, 0.3])  # 3 blocks, in module (input-to-output) order
    assert state.logs["stochastic_depth/rate"] == pytest.approx(0.3)


def test_linear_schedule_goes_from_zero_to_full(tmp_path):
    state = resnet_state(tmp_path, steps_per_epoch=10, max_steps=45)  # ceil(45 / 10) = 5 epochs: 0..4
    technique = StochasticDepth(rate=0.4, schedule="linear")
    technique.fit_start(state)
    expected_last = {0: 0.0, 2: 0.2, 4: 0.4}  # rate · epoch / (epochs - 1)
    for epoch, last in expected_last.items():
        state.epoch = epoch
        technique.epoch_start(state)
        assert drop_rates(state.model) == pytest.approx(depth_rates(last, 3))
        assert state.logs["stochastic_depth/rate"] == pytest.approx(last)


def test_model_without_drop_path_and_bad_arguments_are_refused(tmp_path):
    state = resnet_state(tmp_path, model=torch.nn.Linear(3, 2))
    with pytest.raises(ConfigError, match=r"no DropPath modules.*framework\.nn\.drop_path\.DropPath"):
        StochasticDepth().fit_start(state)
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="stochastic_depth.rate"):
            StochasticDepth(rate=bad)
    with pytest.raises(ConfigError, match="schedule"):
        build_techniques({"stochastic_depth": {"schedule": "cosine"}})
    [built] = build_techniques({"stochastic_depth": {"rate": 0.2, "schedule": "linear"}})
    assert isinstance(built, StochasticDepth) and (built.rate, built.schedule) == (0.2, "linear")


def test_resnet_eval_is_unchanged_by_the_rates_and_training_is_not(tmp_path):
    torch.manual_seed(0)
    plain = ResNet(ResNetConfig(zero_init_residual=False))  # branches contribute from the start, so drops would show
    state = resnet_state(tmp_path, model=copy.deepcopy(plain))
    technique = StochasticDepth(rate=0.5)
    technique.fit_start(state)
    technique.epoch_start(state)
    images = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        plain.eval(), state.model.eval()
        assert torch.equal(state.model(images), plain(images))
        plain.train(), state.model.train()
        torch.manual_seed(1)
        plain_train = plain(images)
        torch.manual_seed(1)
        dropped_train = state.model(images)
    assert not torch.allclose(dropped_train, plain_train)  # the rates do act in training


# --- inside the loop ---------------------------------------------------------------------------------------------------
def test_stochastic_depth_trains_in_the_loop_and_logs_its_schedule(tmp_path):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    data = [{"pixel_values": x, "label": y}
            for x, y in zip(torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator))]
    model = ResNet(ResNetConfig(num_classes=3, widths=(4, 8)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    config = TrainerConfig(output_dir=str(tmp_path), epochs=3, tracker="none", log_every=1)
    trainer = Trainer(config, model, optimizer, ClassificationTask(num_classes=3), DataLoader(data, batch_size=4),
                      techniques=[StochasticDepth(rate=0.5, schedule="linear")])
    trainer.fit()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in train] == list(range(1, 13))  # 4 steps per epoch, 3 epochs
    assert all(math.isfinite(line["train/loss"]) for line in train)
    # Epochs 0, 1, 2 of 3: the last block's rate is 0, 0.25, 0.5, on the first log line of each epoch.
    logged = {line["step"]: line["stochastic_depth/rate"] for line in train if "stochastic_depth/rate" in line}
    assert logged == pytest.approx({1: 0.0, 5: 0.25, 9: 0.5})
    assert drop_rates(trainer.state.model) == pytest.approx([0.25, 0.5])  # 2 blocks, last epoch's rates
