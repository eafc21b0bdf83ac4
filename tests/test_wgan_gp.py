"""WGAN-GP: the gradient penalty against closed forms, the critic/generator alternation counted, and the recipe on
one process and on two DDP processes (double backward through the wrapped critic), with checkpoint and resume."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from framework.backend import Backend
from framework.errors import ConfigError, IncompatibleError
from framework.task import WGANTask
from framework.techniques.gradient_penalty import GradientPenalty, gradient_penalty
from helpers import ROOT, launch, reset_accelerate

CONFIG = ("--config", str(ROOT / "recipes" / "configs" / "wgan_gp.yaml"))
DUMP = ROOT / "tests" / "scripts" / "recipe_then_dump_params.py"
SHAPE = (6, 2, 5, 5)  # image-shaped: (batch, channels, height, width)


def linear_critic(w: torch.Tensor):
    return lambda x: (x * w).flatten(1).sum(1)  # f(x) = w·x: ∇f = w at every interpolate


@pytest.mark.parametrize("norm", [0.4, 1.0, 2.5])
def test_penalty_on_a_linear_critic_is_the_closed_form_and_reaches_the_weights(norm):
    torch.manual_seed(0)
    w = torch.randn(SHAPE[1:])
    w = (w * norm / w.norm()).requires_grad_(True)
    real, fake = torch.randn(SHAPE), torch.randn(SHAPE)
    penalty, norms = gradient_penalty(linear_critic(w), real, fake, weight=10.0)
    assert torch.allclose(norms, torch.full((SHAPE[0],), norm), atol=1e-5)
    assert penalty.item() == pytest.approx(10.0 * (norm - 1) ** 2, abs=1e-5)
    penalty.backward()  # d/dw λ(‖w‖ − 1)² = 2λ(‖w‖ − 1)·w/‖w‖: the gradient reaches the critic through the penalty
    expected = 2 * 10.0 * (norm - 1) * w.detach() / norm
    assert torch.allclose(w.grad, expected, atol=1e-4)

    one_sided, _ = gradient_penalty(linear_critic(w), real, fake, weight=10.0, one_sided=True)
    assert one_sided.item() == pytest.approx(10.0 * max(norm - 1, 0) ** 2, abs=1e-5)


def test_interpolates_use_one_epsilon_per_sample():
    """f(x) = ½‖x‖²: ∇f(x̂) = x̂ = ε·real + (1 − ε)·fake, so the norms show which ε each sample got."""
    torch.manual_seed(1)
    real, fake = torch.randn(SHAPE), torch.randn(SHAPE)
    epsilon = torch.tensor([0.0, 0.2, 0.5, 0.7, 0.9, 1.0])
    _, norms = gradient_penalty(lambda x: 0.5 * x.pow(2).flatten(1).sum(1), real, fake, epsilon=epsilon)
    by_hand = (epsilon.reshape(-1, 1, 1, 1) * real + (1 - epsilon.reshape(-1, 1, 1, 1)) * fake).flatten(1).norm(dim=1)
    assert torch.allclose(norms, by_hand, atol=1e-5)
    # Random ε: the penalty is a mean over samples, each at its own point between real and fake.
    penalty, norms = gradient_penalty(lambda x: 0.5 * x.pow(2).flatten(1).sum(1), real, fake, weight=1.0)
    assert penalty.item() == pytest.approx(((norms - 1) ** 2).mean().item(), rel=1e-5)


def test_penalty_under_a_loss_scale_equals_the_unscaled_one():
    torch.manual_seed(2)
    w = torch.randn(SHAPE[1:], requires_grad=True)
    real, fake, epsilon = torch.randn(SHAPE), torch.randn(SHAPE), torch.rand(SHAPE[0])
    plain, _ = gradient_penalty(linear_critic(w), real, fake, epsilon=epsilon)
    scaled, _ = gradient_penalty(linear_critic(w), real, fake, epsilon=epsilon, scale=65536.0)
    assert scaled.item() == pytest.approx(plain.item(), rel=1e-5)


def test_gan_refusals_name_the_fix():
    with pytest.raises(IncompatibleError, match="DDP launch config"):
        GradientPenalty().check(Backend(distributed_type="DEEPSPEED", num_processes=2, deepspeed_stage=2), [])
    task = WGANTask()
    with pytest.raises(IncompatibleError, match="DeepSpeed engine"):
        task.check(Backend(distributed_type="DEEPSPEED", num_processes=2, deepspeed_stage=1), [], 1)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps must be 1"):
        task.check(Backend(), [], 4)


def run_recipe(*args: str):
    spec = importlib.util.spec_from_file_location("wgan_gp_recipe", ROOT / "recipes" / "wgan_gp.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe
    spec.loader.exec_module(recipe)
    reset_accelerate()
    return recipe.main([*CONFIG, "--tracker", "none", "--log_every", "5", "--data.num_workers", "0", *args])


def adam_steps(trainer, module_name: str) -> set[int]:
    gan, optimizer = trainer.accelerator.unwrap_model(trainer.state.model), trainer.state.optimizer
    return {int(optimizer.state[p]["step"]) for p in getattr(gan, module_name).parameters()}


@pytest.mark.slow
def test_recipe_alternates_as_configured_logs_and_resumes_exactly(tmp_path):
    trainer = run_recipe("--output_dir", str(tmp_path / "run"), "--max_steps", "12", "--n_critic", "3",
                         "--checkpoint_every", "6", "--techniques.gan_samples.every", "6",
                         "--techniques.gan_samples.judge_samples", "50")
    # Counted by the optimizer itself: each critic parameter was stepped 12 times, each generator parameter 12 / 3.
    assert adam_steps(trainer, "critic") == {12} and adam_steps(trainer, "generator") == {4}
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in train] == [5, 10, 12]
    for line in train:
        assert line["gradient_penalty"] > 0 and line["critic_grad_norm"] > 0
        assert "train/wasserstein" in line and "generator_loss" in line
    assert {line.get("picture/samples") for line in lines} >= {"step_00000006.png", "step_00000012.png"}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["step"] for s in summary["samples"]] == [6, 12]
    assert all(0 <= s["confident"] <= 1 and 0 <= s["class_spread"] <= 1 for s in summary["samples"])
    assert (tmp_path / "run" / "samples.png").stat().st_size > 1000
    assert summary["doctor"] == []  # no false findings on a healthy GAN (generator grads are absent by design)

    # Resume mid-epoch from step 6 (one generator update is behind it, one ahead): the same final weights.
    resumed = run_recipe("--output_dir", str(tmp_path / "resumed"), "--max_steps", "12", "--n_critic", "3",
                         "--techniques.gan_samples.every", "6", "--techniques.gan_samples.judge_samples", "50",
                         "--resume_from", str(tmp_path / "run" / "checkpoints" / "step_00000006"))
    assert adam_steps(resumed, "critic") == {12} and adam_steps(resumed, "generator") == {4}
    first, second = load_file(tmp_path / "run" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs after resume"


@pytest.mark.slow
def test_two_process_ddp_double_backward_keeps_ranks_equal_and_resumes(tmp_path):
    common = (*CONFIG, "--tracker", "none", "--max_steps", "8", "--n_critic", "2", "--log_every", "4",
              "--techniques.gan_samples.every", "0", "--techniques.gan_samples.judge_samples", "50",
              "--techniques.dump_params", "{}")
    result = launch(DUMP, *common, "--output_dir", str(tmp_path / "run"), "--checkpoint_every", "4",
                    launch_config="multi_cpu.yaml", env={"DUMP_RECIPE": "wgan_gp"})
    assert result.returncode == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["run"]["num_processes"] == 2 and summary["run"]["distributed_type"] == "MULTI_CPU"
    rank0, rank1 = (load_file(tmp_path / "run" / f"params_rank{rank}.safetensors") for rank in (0, 1))
    for name in rank0:  # the critic's gradients (penalty's double backward included) and the generator's synced
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
    result = launch(DUMP, *common, "--output_dir", str(tmp_path / "resumed"),
                    "--resume_from", str(tmp_path / "run" / "checkpoints" / "step_00000004"),
                    launch_config="multi_cpu.yaml", env={"DUMP_RECIPE": "wgan_gp"})
    assert result.returncode == 0
    resumed = load_file(tmp_path / "resumed" / "params_rank0.safetensors")
    for name in rank0:
        assert torch.equal(rank0[name], resumed[name]), f"{name} differs after resume"
