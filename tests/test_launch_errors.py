"""Launches that would silently run wrong are refused before training, with one line naming the problem and fix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file

from framework.backend import Backend, check_launch_environment
from framework.checkpoint import MARKER, check_resumable
from framework.compat import LAUNCH_BACKENDS, compatibility_table
from framework.errors import ConfigError, LaunchError
from helpers import ROOT, launch, launch_environment

RECIPE = ROOT / "recipes" / "image_classification.py"
CONFIG = ("--config", str(ROOT / "recipes" / "configs" / "image_classification.yaml"))
CPU_ONLY = not torch.cuda.is_available()


def refused(result) -> str:
    """The run's stderr, after checking it stopped with one `error:` line and no stack trace of our code (the
    accelerate launcher still prints its own when a child exits non-zero)."""
    assert result.returncode != 0
    assert "\nerror: " in "\n" + result.stderr
    assert f'File "{ROOT / "framework"}' not in result.stderr and f'File "{RECIPE}"' not in result.stderr
    return result.stderr


@pytest.mark.skipif(not CPU_ONLY, reason="the refusal is for machines without a GPU")
def test_fp16_on_cpu_is_refused(tmp_path):
    result = launch(RECIPE, *CONFIG, "--output_dir", str(tmp_path), "--tracker", "none", launch_config="fp16.yaml")
    assert "fp16 mixed precision needs a GPU" in refused(result)


@pytest.mark.skipif(not CPU_ONLY, reason="the refusal is for machines without a GPU")
def test_fsdp_on_cpu_is_refused(tmp_path):
    result = launch(RECIPE, *CONFIG, "--output_dir", str(tmp_path), "--tracker", "none", launch_config="fsdp.yaml",
                    launcher_args=("--num_processes", "1"))
    assert "FSDP needs GPUs" in refused(result)


SINGLE_GPU_ON_CPU = "asks for GPU 0 but torch finds no GPU here"


@pytest.mark.skipif(not CPU_ONLY, reason="the refusal is for machines without a GPU")
def test_single_gpu_on_cpu_is_refused(tmp_path):
    result = launch(RECIPE, *CONFIG, "--output_dir", str(tmp_path), "--tracker", "none", launch_config="single_gpu.yaml")
    error = refused(result)
    assert SINGLE_GPU_ON_CPU in error and "launch_configs/cpu.yaml" in error
    assert [line.startswith("error: ") for line in error.splitlines()].count(True) == 1  # once, not once per rank
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.skipif(not CPU_ONLY, reason="the refusal is for machines without a GPU")
def test_single_gpu_refusal_is_one_line_and_exit_status_2(tmp_path):
    """What accelerate launch passes for single_gpu.yaml (gpu_ids '0', use_cpu false), without the launcher."""
    env = launch_environment({"CUDA_VISIBLE_DEVICES": "0", "ACCELERATE_USE_CPU": "False",
                              "ACCELERATE_MIXED_PRECISION": "no"})
    result = subprocess.run([sys.executable, str(RECIPE), *CONFIG, "--output_dir", str(tmp_path), "--tracker", "none"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and SINGLE_GPU_ON_CPU in lines[0], result.stderr


@pytest.mark.skipif(not CPU_ONLY, reason="the refusal is for machines without a GPU")
@pytest.mark.parametrize("env, refused_with", [
    ({"ACCELERATE_USE_CPU": "False", "CUDA_VISIBLE_DEVICES": "0"}, SINGLE_GPU_ON_CPU),  # single_gpu.yaml
    ({"ACCELERATE_USE_CPU": "False", "CUDA_VISIBLE_DEVICES": "0,1"}, "asks for GPUs 0,1"),  # --gpu_ids 0,1
    ({"ACCELERATE_USE_CPU": "False", "CUDA_VISIBLE_DEVICES": "0", "ACCELERATE_MIXED_PRECISION": "fp16"},
     "fp16 mixed precision needs a GPU"),  # fp16.yaml: the fp16 message comes first
    ({"ACCELERATE_USE_CPU": "True"}, None),  # cpu.yaml
    ({"ACCELERATE_USE_CPU": "True", "CUDA_VISIBLE_DEVICES": "0"}, None),  # single_gpu.yaml with --cpu: asked for
    ({"ACCELERATE_USE_CPU": "False"}, None),  # bf16.yaml, multi_cpu.yaml (gpu_ids: all), DeepSpeed configs
    ({"ACCELERATE_USE_CPU": "False", "CUDA_VISIBLE_DEVICES": ""}, None),  # GPUs hidden on purpose
    ({"ACCELERATE_USE_CPU": "False", "CUDA_VISIBLE_DEVICES": "-1"}, None),
    ({}, None),  # python recipes/x.py, no launcher
])
def test_launch_environment_refusals(monkeypatch, env, refused_with):
    for name in ("ACCELERATE_USE_CPU", "CUDA_VISIBLE_DEVICES", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if refused_with is None:
        check_launch_environment()
    else:
        with pytest.raises(LaunchError, match=refused_with) as error:
            check_launch_environment()
        assert "\n" not in str(error.value)


def test_deepspeed_config_contradicting_the_recipe_is_refused(tmp_path):
    settings = json.loads((ROOT / "launch_configs" / "deepspeed" / "zero2.json").read_text())
    settings["gradient_accumulation_steps"] = 4
    (tmp_path / "zero2_gas4.json").write_text(json.dumps(settings))
    yaml = (ROOT / "launch_configs" / "deepspeed_zero2.yaml").read_text()
    yaml = yaml.replace("launch_configs/deepspeed/zero2.json", str(tmp_path / "zero2_gas4.json"))
    (tmp_path / "zero2_gas4.yaml").write_text(yaml)
    result = launch(RECIPE, *CONFIG, "--output_dir", str(tmp_path / "run"), "--tracker", "none",
                    launch_config=tmp_path / "zero2_gas4.yaml")
    error = refused(result)
    assert "sets gradient_accumulation_steps=4 but the recipe asks for 1" in error and '"auto"' in error


def zero3_marker(directory, num_processes=2):
    directory.mkdir(parents=True)
    backend = {"distributed_type": "DEEPSPEED", "num_processes": num_processes, "mixed_precision": "no",
               "device_type": "cpu", "deepspeed_stage": 3}
    (directory / MARKER).write_text(json.dumps({"step": 10, "backend": backend}))
    return directory


def test_a_checkpoint_deepspeed_cannot_load_is_refused(tmp_path):
    checkpoint = zero3_marker(tmp_path / "checkpoints" / "step_00000010")
    check_resumable(checkpoint, Backend("DEEPSPEED", 2, deepspeed_stage=3))  # the same backend: fine
    check_resumable(checkpoint, Backend("MULTI_CPU", 1))  # without DeepSpeed: consolidated as it loads
    with pytest.raises(ConfigError, match="ZeRO-3 on 2 processes and cannot be loaded by DeepSpeed ZeRO-3 on 4"):
        check_resumable(checkpoint, Backend("DEEPSPEED", 4, deepspeed_stage=3))
    # The conversion is the framework's own command: never the zero_to_fp32.py shipped inside the checkpoint.
    with pytest.raises(ConfigError, match="python -m framework.checkpoint consolidate") as refusal:
        check_resumable(checkpoint, Backend("DEEPSPEED", 2, deepspeed_stage=2))
    assert "zero_to_fp32" not in str(refusal.value)
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    ddp_backend = {"distributed_type": "MULTI_CPU", "num_processes": 2}
    (ddp / MARKER).write_text(json.dumps({"step": 10, "backend": ddp_backend}))
    with pytest.raises(ConfigError, match="a run without DeepSpeed and cannot be loaded by DeepSpeed ZeRO-2"):
        check_resumable(ddp, Backend("DEEPSPEED", 2, deepspeed_stage=2))
    result = launch(RECIPE, *CONFIG, "--output_dir", str(tmp_path / "run"), "--tracker", "none",
                    "--resume_from", str(checkpoint), launch_config="deepspeed_zero2.yaml")
    assert "was written by DeepSpeed ZeRO-3 on 2 processes and cannot be loaded by DeepSpeed ZeRO-2" in refused(result)


@pytest.mark.parametrize("name", list(LAUNCH_BACKENDS))
def test_launch_configs_parse_and_match_the_compatibility_table(name):
    """Every launch config is accepted by accelerate's own parser and is what the table says it is."""
    config = load_config_from_file(str(ROOT / "launch_configs" / f"{name}.yaml"))
    backend = LAUNCH_BACKENDS[name]
    expected_type = {"MULTI_CPU": "MULTI_GPU"}.get(backend.distributed_type, backend.distributed_type)  # see multi_cpu.yaml
    assert config.distributed_type.name == expected_type
    assert config.num_processes == backend.num_processes
    if backend.distributed_type == "DEEPSPEED":
        settings = json.loads((ROOT / config.deepspeed_config["deepspeed_config_file"]).read_text())
        assert settings["zero_optimization"]["stage"] == backend.deepspeed_stage
        assert {settings[k] for k in ("gradient_accumulation_steps", "gradient_clipping",
                                       "train_micro_batch_size_per_gpu")} == {"auto"}
    else:
        assert str(config.mixed_precision) in (backend.mixed_precision, f"PrecisionType.{backend.mixed_precision}")
    assert sorted(p.stem for p in (ROOT / "launch_configs").glob("*.yaml")) == sorted(LAUNCH_BACKENDS)


def test_readme_shows_the_generated_compatibility_table():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- compatibility-table:start -->\n", "<!-- compatibility-table:end -->"
    shown = readme[readme.index(start) + len(start):readme.index(end)]
    assert shown == compatibility_table(), "README table is stale: paste `python -m framework.compat` into it"


def test_a_refusal_reaches_the_console_when_another_rank_refuses_first():
    """Rank 1 refuses at once, rank 0 two seconds later: torchrun stops the other ranks as soon as one fails, so
    rank 0 (the one that prints) was killed before it could say why."""
    result = launch(ROOT / "tests" / "scripts" / "refuse_late_on_rank0.py", launch_config="multi_cpu.yaml")
    assert "error: data.batch_size 0 must be positive: set it to 1 or more." in refused(result)
