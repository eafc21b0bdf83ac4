"""Build the Accelerator from the launch config, and refuse launches that would silently run wrong.

The recipe never chooses a backend: `accelerate launch --config_file launch_configs/X.yaml` does. Two traps on
machines without a GPU (see DESIGN.md) are handled here:

* a MULTI_GPU launch starts N processes, but each would believe it is alone: we build the Accelerator with
  `cpu=True` and a gloo process group so the ranks really synchronise;
* whenever the world size we got differs from the launcher's `WORLD_SIZE`, we stop before training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration

from framework.errors import LaunchError
from framework.technique import Backend


def launched_world_size() -> int:
    """The number of processes the launcher (accelerate launch / torchrun) started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(
    output_dir: str, gradient_accumulation_steps: int = 1, log_with: Sequence[Any] = ()
) -> Accelerator:
    """An Accelerator for whatever the launch config asked for; raises `LaunchError` if the launch went wrong."""
    extra: dict[str, Any] = {}
    if launched_world_size() > 1 and not torch.cuda.is_available():
        extra = {"cpu": True, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=list(log_with) or None,
        project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=output_dir),
        # The shuffling order is a function of (seed, epoch): a resumed run sees the batches it would have seen.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        **extra,
    )
    check_launch(accelerator)
    return accelerator


def check_launch(accelerator: Accelerator) -> None:
    """Refuse a world size that differs from the launcher's, and fp16 where accelerate would silently run fp32."""
    expected = launched_world_size()
    if accelerator.num_processes != expected:
        raise LaunchError(
            f"the launcher started {expected} processes but this one joined a run of {accelerator.num_processes}: "
            "the ranks would train unsynchronised. Launch with `accelerate launch --config_file "
            "launch_configs/multi_cpu.yaml` (CPU) or `launch_configs/ddp.yaml` (GPUs)."
        )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise LaunchError(
            "fp16 mixed precision needs a GPU; on CPU accelerate would silently train in fp32. "
            "Use launch_configs/bf16.yaml (bf16 runs on CPU) or launch_configs/cpu.yaml."
        )


def describe_backend(accelerator: Accelerator) -> Backend:
    """The Backend that `Technique.check` sees for this Accelerator."""
    stage = None
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        stage = int(plugin.zero_stage)
    return Backend(
        distributed_type=accelerator.distributed_type.name,
        num_processes=accelerator.num_processes,
        mixed_precision=str(accelerator.mixed_precision),
        device_type=accelerator.device.type,
        deepspeed_stage=stage,
    )
