"""The same recipe on every backend that runs on CPU, launched for real: it trains, the ranks agree, a checkpoint
resumes, and the exported weights load into a plain model that evaluates like the run did."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from framework.models.resnet import ResNet, ResNetConfig
from helpers import ROOT, launch, plain_accuracy

DUMP = ROOT / "tests" / "scripts" / "recipe_then_dump_params.py"
CONFIG = ("--config", str(ROOT / "recipes" / "configs" / "image_classification.yaml"))

# launch config -> (world size, accelerate's distributed type, mixed precision)
BACKENDS = {
    "cpu.yaml": (1, "NO", "no"),
    "multi_cpu.yaml": (2, "MULTI_CPU", "no"),
    "bf16.yaml": (1, "NO", "bf16"),
    "deepspeed_zero1.yaml": (2, "DEEPSPEED", "no"),
    "deepspeed_zero2.yaml": (2, "DEEPSPEED", "no"),
    "deepspeed_zero3.yaml": (2, "DEEPSPEED", "no"),
    "deepspeed_zero3_offload.yaml": (2, "DEEPSPEED", "no"),
}


def train(output_dir, launch_config, *extra):
    result = launch(DUMP, *CONFIG, "--output_dir", str(output_dir), "--epochs", "2", "--tracker", "none",
                    "--log_every", "5", "--techniques.dump_params", "{}", *extra, launch_config=launch_config)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((output_dir / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("launch_config", list(BACKENDS))
def test_backend_trains_agrees_resumes_and_exports(tmp_path, launch_config):
    world_size, distributed_type, precision = BACKENDS[launch_config]
    summary = train(tmp_path / "run", launch_config)
    assert summary["run"]["num_processes"] == world_size
    assert summary["run"]["distributed_type"] == distributed_type
    assert summary["run"]["mixed_precision"] == precision

    losses = [line["train/loss"] for line in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open())
              if "train/loss" in line]
    assert losses[-1] < losses[0] - 0.1, losses

    ranks = [load_file(tmp_path / "run" / f"params_rank{rank}.safetensors") for rank in range(world_size)]
    for other in ranks[1:]:
        for name in ranks[0]:
            assert torch.equal(ranks[0][name], other[name]), f"{name} differs between ranks"

    # The exported files are consolidated (ZeRO-3 gathered) and load into a plain model; the EMA weights are what
    # the run evaluated (a sample or two may flip where ranks held different BatchNorm statistics or under bf16).
    plain_accuracy(tmp_path / "run" / "model.safetensors")
    assert plain_accuracy(tmp_path / "run" / "model_ema.safetensors") == pytest.approx(
        summary["metrics"]["test/accuracy"], abs=2.5 / 360)

    # Resume from the first epoch's checkpoint and finish: the same final weights as the uninterrupted run. (On
    # cpu, multi_cpu and ZeRO-2, tests/test_fault_tolerance.py kills runs mid-epoch and demands bitwise equality;
    # ZeRO-1 checkpoints through the same DeepSpeed optimizer class as ZeRO-2, and bf16 autocast on CPU holds no state
    # of its own (no grad scaler) beyond the cpu run's.)
    if launch_config in ("cpu.yaml", "multi_cpu.yaml", "bf16.yaml", "deepspeed_zero1.yaml", "deepspeed_zero2.yaml"):
        return
    steps_per_epoch = summary["run"]["steps"] // 2
    checkpoint = tmp_path / "run" / "checkpoints" / f"step_{steps_per_epoch:08d}"
    resumed = train(tmp_path / "resumed", launch_config, "--resume_from", str(checkpoint))
    assert resumed["run"]["steps"] == summary["run"]["steps"] and resumed["run"]["num_processes"] == world_size
    final = load_file(tmp_path / "resumed" / "params_rank0.safetensors")
    for name, value in ranks[0].items():
        torch.testing.assert_close(final[name], value, rtol=1e-4, atol=1e-5, msg=f"{name} after resume")


@pytest.mark.slow
def test_clipping_bounds_the_update_under_deepspeed_as_on_ddp(tmp_path):
    """One SGD step (no momentum, no weight decay) with clipping: ‖Δθ‖ = lr · max_norm exactly, whoever clips."""
    lr, max_norm = 1.0, 0.01
    torch.manual_seed(0)  # the recipe's seed-0 initial weights
    initial = {name: p.detach() for name, p in ResNet(ResNetConfig()).named_parameters()}
    finals = {}
    for launch_config in ("cpu.yaml", "multi_cpu.yaml", "deepspeed_zero2.yaml"):
        out = tmp_path / launch_config
        result = launch(DUMP, *CONFIG, "--output_dir", str(out), "--max_steps", "1", "--log_every", "1",
                        "--tracker", "none", "--optimizer.name", "sgd", "--optimizer.momentum", "0",
                        "--optimizer.weight_decay", "0", "--optimizer.lr", str(lr), "--techniques.ema", "null",
                        "--techniques.cosine_lr", "null", "--techniques.gradient_clipping.max_norm", str(max_norm),
                        "--techniques.dump_params", "{}", launch_config=launch_config)
        assert result.returncode == 0, result.stderr[-3000:]
        final = load_file(out / "params_rank0.safetensors")
        update = torch.sqrt(sum(((final[n] - initial[n]) ** 2).sum() for n in initial))
        assert update.item() == pytest.approx(lr * max_norm, rel=1e-3), launch_config
        logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert logged["grad_norm"] > 10 * max_norm  # the pre-clip norm: clipping really acted
        finals[launch_config] = (final, logged["grad_norm"])
    (ddp, ddp_norm), (zero2, zero2_norm) = finals["multi_cpu.yaml"], finals["deepspeed_zero2.yaml"]
    assert zero2_norm == pytest.approx(ddp_norm, rel=1e-4)  # the engine reports the true global norm
    for name in ddp:
        torch.testing.assert_close(zero2[name], ddp[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_ema_under_zero3_equals_ema_under_ddp(tmp_path):
    """Shard-local EMA under ZeRO-3 averages exactly what DDP's whole-tensor EMA does (same ranks, same batches).

    Parameters are compared; BatchNorm running statistics differ by design (DDP broadcasts rank 0's buffers before
    every forward, DeepSpeed keeps each rank's own)."""
    exported = {}
    for launch_config in ("multi_cpu.yaml", "deepspeed_zero3.yaml"):
        out = tmp_path / launch_config
        result = launch(DUMP, *CONFIG, "--output_dir", str(out), "--epochs", "2", "--tracker", "none",
                        "--techniques.ema.decay", "0.8", launch_config=launch_config)
        assert result.returncode == 0, result.stderr[-3000:]
        exported[launch_config] = load_file(out / "model_ema.safetensors")
    ddp, zero3 = exported["multi_cpu.yaml"], exported["deepspeed_zero3.yaml"]
    parameters = [n for n in ddp if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(parameters) > 10
    for name in parameters:
        torch.testing.assert_close(zero3[name], ddp[name], rtol=1e-4, atol=1e-6, msg=name)
    live = load_file(tmp_path / "deepspeed_zero3.yaml" / "model.safetensors")
    assert any(not torch.allclose(live[n], zero3[n]) for n in parameters)  # the average is not the live weights
