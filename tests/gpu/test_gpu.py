"""GPU-only checks (marked `gpu`, skipped without CUDA, and under `GPU_DRY_RUN=1`, which `tests/gpu/run.sh --dry-run`
sets: collected, never run). Run them all with tests/gpu/run.sh on a GPU machine."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch

from helpers import ROOT, launch, plain_accuracy

DRY_RUN = bool(os.environ.get("GPU_DRY_RUN"))
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DRY_RUN, reason="dry run (GPU_DRY_RUN=1): collected, not run"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@functools.cache
def deepspeed_missing() -> str | None:
    """Why DeepSpeed cannot run here (None: it can). It has no wheel on PyPI; tests/gpu/prepare.sh builds one."""
    try:
        import deepspeed  # noqa: F401
    except Exception as error:  # noqa: BLE001  (any failure to import: the DeepSpeed cases cannot run)
        return f"DeepSpeed is not importable here ({type(error).__name__}: {str(error)[:200]})"
    return None


DUMP = ROOT / "tests" / "scripts" / "recipe_then_dump_params.py"
CONFIG = ("--config", str(ROOT / "recipes" / "configs" / "image_classification.yaml"))

# launch config, extra launcher arguments, expected (distributed type, mixed precision)
CASES = {
    "fp32": ("single_gpu.yaml", (), ("NO", "no")),
    "bf16": ("bf16.yaml", (), ("NO", "bf16")),
    "fp16": ("fp16.yaml", (), ("NO", "fp16")),  # GradScaler: clipping must see unscaled gradients
    "fsdp": ("fsdp.yaml", ("--num_processes", "1"), ("FSDP", "bf16")),
    "zero2": ("deepspeed_zero2.yaml", ("--num_processes", "1"), ("DEEPSPEED", "no")),
    "zero3": ("deepspeed_zero3.yaml", ("--num_processes", "1"), ("DEEPSPEED", "no")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recipe_on_one_gpu(tmp_path, case):
    launch_config, launcher_args, (distributed_type, precision) = CASES[case]
    if distributed_type == "DEEPSPEED" and deepspeed_missing():
        pytest.skip(deepspeed_missing())
    result = launch(DUMP, *CONFIG, "--output_dir", str(tmp_path), "--epochs", "8", "--tracker", "none",
                    "--log_every", "5", launch_config=launch_config, launcher_args=launcher_args)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run"]["device"].startswith("cuda")
    assert summary["run"]["distributed_type"] == distributed_type
    assert summary["run"]["mixed_precision"] == precision
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open() if "train/loss" in line]
    assert all(0 < line["grad_norm"] < 100 for line in lines)  # finite, unscaled (an fp16 scale is ~65536)
    assert lines[-1]["train/loss"] < lines[0]["train/loss"] - 0.5
    assert summary["metrics"]["test/accuracy"] > 0.9
    exported = plain_accuracy(tmp_path / "model_ema.safetensors")  # the consolidated export loads on CPU
    assert exported == pytest.approx(summary["metrics"]["test/accuracy"], abs=3 / 360)


def test_sam_and_centralization_under_fp16(tmp_path):
    """fp16 with a GradScaler: each of SAM's passes is unscaled once; centralization and clipping see true
    gradients; ranks (one GPU here) train normally."""
    result = launch(DUMP, *CONFIG, "--output_dir", str(tmp_path), "--epochs", "8", "--tracker", "none",
                    "--techniques.sam", "{rho: 0.05}", "--techniques.gradient_centralization", "{}",
                    launch_config="fp16.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run"]["mixed_precision"] == "fp16" and "sam" in summary["run"]["techniques"]
    assert summary["metrics"]["test/accuracy"] > 0.9


def test_regularized_recipe_under_fp16_with_pinned_workers(tmp_path):
    """Mixup/CutMix soft targets, label smoothing and drop path under fp16 autocast; loaders pin memory on CUDA."""
    config = ROOT / "recipes" / "configs" / "digits_regularized.yaml"
    result = launch(ROOT / "recipes" / "image_classification.py", "--config", str(config), "--output_dir",
                    str(tmp_path), "--tracker", "none", "--epochs", "10", "--data.num_workers", "2",
                    launch_config="fp16.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run"]["mixed_precision"] == "fp16" and summary["metrics"]["test/accuracy"] > 0.9


def test_language_model_recipe_under_bf16(tmp_path):
    result = launch(ROOT / "recipes" / "language_model.py", "--config",
                    str(ROOT / "recipes" / "configs" / "language_model.yaml"), "--output_dir", str(tmp_path),
                    "--tracker", "none", "--max_steps", "100", "--model.attention", "chunked",
                    launch_config="bf16.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"]["test/bits_per_byte"] < summary["unigram_bits_per_byte"]


@pytest.mark.parametrize("launch_config", ["fp16.yaml", "bf16.yaml"])
def test_wgan_gp_under_mixed_precision(tmp_path, launch_config):
    """The penalty is computed in fp32 (under fp16 at the loss scale, then unscaled): finite, positive, and the
    critic's input-gradient norm in the range a Lipschitz critic gives."""
    result = launch(ROOT / "recipes" / "wgan_gp.py", "--config", str(ROOT / "recipes" / "configs" / "wgan_gp.yaml"),
                    "--output_dir", str(tmp_path), "--max_steps", "200", "--log_every", "50", "--tracker", "none",
                    "--techniques.gan_samples.every", "0", launch_config=launch_config)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open() if "gradient_penalty" in line]
    assert len(lines) == 4
    assert all(0 <= line["gradient_penalty"] < 100 and 0 < line["critic_grad_norm"] < 10 for line in lines)
