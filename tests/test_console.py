"""A run's console shows the run: known-harmless library messages are silenced (framework/console.py lists them),
and everything else still gets through."""

from __future__ import annotations

import json
import logging
import subprocess
import warnings

import pytest
import torch

import framework  # noqa: F401  (importing the framework applies the filters)
from framework import console
from helpers import ROOT, launch_command, launch_environment

RECIPE = ROOT / "recipes" / "image_classification.py"

#: Lines the launcher or the libraries printed on a plain CPU run before they were silenced.
NOISE = (
    "`--num_cpu_threads_per_process` was set to",  # accelerate launch, cpu.yaml
    "The following values were not passed to `accelerate launch`",
    "Setting accelerator to CPU",  # DeepSpeed, imported by accelerate even without DeepSpeed
    "No CUDA runtime is found",  # torch.utils.cpp_extension, DeepSpeed's CPU ops
    "is deprecated. Please use `torch.distributed.",  # FutureWarning from DeepSpeed's collectives
    "return func(*args, **kwargs)",  # ... and its second line
    "Removed shared tensor",  # accelerate, saving tied weights
)
#: Printed by the launcher process of a DeepSpeed launch, before any framework code runs (see framework/console.py).
LAUNCHER_ONLY = {"deepspeed_zero3.yaml": {"Setting accelerator to CPU": 1}}


def user_launch(launch_config: str, *args: str) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file launch_configs/<launch_config> recipes/image_classification.py ...` as a
    user types it (tests/helpers.launch adds --num_cpu_threads_per_process, which would hide the launcher's warning)."""
    environment = launch_environment()
    environment.pop("OMP_NUM_THREADS", None)
    command = launch_command(RECIPE, *args, launch_config=launch_config, one_thread=False)
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900,
                          start_new_session=True)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the noise is that of CPU runs")
@pytest.mark.parametrize("launch_config", ["cpu.yaml", "multi_cpu.yaml", "deepspeed_zero3.yaml"])
def test_console_shows_the_run_and_no_library_noise(tmp_path, launch_config):
    """Output to a pipe (as under SLURM or nohup): no library noise, no progress bar, one plain line per log step,
    the model and batch layout at the start, throughput at the end; summary.json says how the run executed."""
    result = user_launch(launch_config, "--max_steps", "4", "--data.batch_size", "16", "--tracker", "tensorboard",
                         "--log_every", "2", "--output_dir", str(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    for line in NOISE:
        allowed = LAUNCHER_ONLY.get(launch_config, {}).get(line, 0)
        assert output.count(line) <= allowed, f"{line!r} is still printed:\n{output[-5000:]}"
    assert "test/accuracy" in output and f"wrote {tmp_path}" in output  # the run's own lines still show

    processes = 1 if launch_config == "cpu.yaml" else 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    parameters = summary["model"]["parameters"]
    assert summary["model"]["class"] == "ResNet" and parameters == summary["model"]["trainable_parameters"] > 70_000
    assert summary["run"]["global_batch_size"] == 16 * processes and summary["run"]["num_machines"] == 1
    assert summary["run"]["per_process_batch_size"] == 16 and summary["run"]["samples_per_second"] > 0
    assert (summary["run"].get("zero_stage"), summary["run"].get("offload_optimizer")) == (
        (3, "none") if launch_config == "deepspeed_zero3.yaml" else (None, None))
    assert f"model ResNet: {parameters:,} parameters ({parameters:,} trainable)" in result.stdout
    assert f"global batch {16 * processes} = 16 per process × {processes} process(es)" in result.stdout
    plain = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in plain] == ["2/4", "4/4"] and all("samples/s" in line for line in plain)
    assert "\r" not in output  # no progress bar redrawing one line of a log file
    assert "trained 4 steps" in result.stdout and f"tensorboard --logdir {tmp_path}" in result.stdout


def record(logger_name: str, message: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.getLogger(logger_name).makeRecord(logger_name, level, __file__, 0, message, (), None)


@pytest.mark.parametrize("logger_name, message", [
    ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."),
    ("torch.utils.cpp_extension", "No CUDA runtime is found, using CUDA_HOME='/usr/local'"),
    ("accelerate.utils.other", "[RANK 0] Removed shared tensor {'lm_head.weight'} while saving. This should be OK, "
                               "but check by verifying that you don't receive any warning while reloading"),
])
def test_known_messages_are_dropped_and_others_kept(logger_name, message):
    logger = logging.getLogger(logger_name)
    assert not logger.filter(record(logger_name, message))
    assert logger.filter(record(logger_name, "Something else went wrong"))
    assert logger.filter(record(logger_name, message, level=logging.ERROR))  # never an error


def test_known_future_warnings_are_ignored_and_others_shown():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # as pytest's own capture does: every warning shown...
        console.silence_known_noise()  # ...but these (what importing the framework does in a run)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                      "`torch.distributed.all_gather_single` instead.", FutureWarning)
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
                      "`torch.distributed.reduce_scatter_single` instead.", FutureWarning)
        warnings.warn("`some_other_function` is deprecated.", FutureWarning)
    assert [str(w.message) for w in caught] == ["`some_other_function` is deprecated."]


def test_saving_tied_weights_prints_nothing(capfd):
    from accelerate import PartialState
    from accelerate.utils.other import clean_state_dict_for_safetensors

    PartialState(cpu=True)  # accelerate's logger needs it
    shared = torch.zeros(2, 2)
    cleaned = clean_state_dict_for_safetensors({"wte.weight": shared, "lm_head.weight": shared})
    assert list(cleaned) == ["wte.weight"]
    captured = capfd.readouterr()
    assert "Removed shared tensor" not in captured.out + captured.err


def test_silencing_twice_adds_nothing():
    before = {name: len(logging.getLogger(name).filters) for name in console.SILENCED_LOGS}
    console.silence_known_noise()
    assert {name: len(logging.getLogger(name).filters) for name in console.SILENCED_LOGS} == before
