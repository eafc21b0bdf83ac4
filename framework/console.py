"""What the console shows: known-harmless library messages are silenced here, in one place, so a run shows the run.

Applied when `framework` is imported (framework/__init__.py imports this module first, before accelerate, DeepSpeed
or torch.distributed can print). Each filter drops one exact message, and only that message: errors and every other
warning of the same libraries still reach the console. To see everything again, set FRAMEWORK_SHOW_ALL_WARNINGS=1.

Silenced in the training processes (the message, who prints it, why it does not concern the run):

- "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it." DeepSpeed's
  logger, once per process on every launch without a GPU (accelerate imports DeepSpeed whenever it is installed, even
  for cpu.yaml). The framework itself refuses GPU launch configs on a machine without a GPU (fp16.yaml, single_gpu.yaml,
  fsdp.yaml), with a message that names the fix; CPU is what the launch asked for.
- "No CUDA runtime is found, using CUDA_HOME='...'" torch.utils.cpp_extension's logger, when DeepSpeed JIT-builds
  its CPU ops (shm comm, CPU Adam) on a machine without CUDA: those ops need no CUDA.
- "`torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed.all_gather_single`
  instead." and the same for `reduce_scatter_tensor` (FutureWarning, two lines each, on every rank, dozens per
  step under ZeRO-3): DeepSpeed calls torch's old names. Nothing for the user to change; the new names do the same.
- "Removed shared tensor {'lm_head.weight'} while saving. This should be OK, but check by verifying that you don't
  receive any warning while reloading" accelerate's logger, for each checkpoint and export of a model with tied
  weights (the GPT's output layer shares the token embedding). safetensors stores a shared tensor once; the model
  re-ties it when built, and a checkpoint that really lacks a weight is refused when it is loaded.

Removed in the launch configs instead (printed by `accelerate launch` before any framework code runs):

- "The following values were not passed to `accelerate launch` and had defaults used instead:
  `--num_cpu_threads_per_process` was set to `N` ..." accelerate, on every cpu.yaml launch: cpu.yaml now sets
  num_cpu_threads_per_process (under `mpirun_config:`, the one place accelerate reads it from a YAML).

Left alone (printed by the launcher process of a DeepSpeed launch, which no launch-config key reaches):
torchrun's "Setting OMP_NUM_THREADS environment variable for each process to be 1 in default ..." banner and the
launcher's own "Setting accelerator to CPU" line. `export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu` before
`accelerate launch` removes both on a machine without a GPU. DeepSpeed's "DeepSpeed deepspeed.ops.comm.
deepspeed_shm_comm_op built successfully" is a print() (one line per rank), not a warning, and is left too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings

#: logger name -> the messages (regular expressions, searched in the formatted message) dropped from it.
SILENCED_LOGS: dict[str, tuple[str, ...]] = {
    "DeepSpeed": (r"^Setting accelerator to CPU\. If you have GPU or other accelerator, we were unable to detect it\.$",),
    "torch.utils.cpp_extension": (r"^No CUDA runtime is found, using CUDA_HOME=",),
    "accelerate.utils.other": (r"Removed shared tensor \{.*\} while saving\. This should be OK",),
}

#: (category, message regular expression matched at the start) of the Python warnings ignored.
SILENCED_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated\. "
                    r"Please use `torch\.distributed\.(all_gather_single|reduce_scatter_single)` instead\."),
)


class KnownMessageFilter(logging.Filter):
    """Drops the log records below ERROR whose message matches one of `patterns`."""

    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def silence_known_noise() -> None:
    """Install the filters listed in this module's docstring (once; calling again adds nothing)."""
    if os.environ.get("FRAMEWORK_SHOW_ALL_WARNINGS", "0").lower() in ("1", "true", "yes"):
        return
    for name, patterns in SILENCED_LOGS.items():
        logger = logging.getLogger(name)  # the same object the library gets later, so the filter stays on it
        if not any(isinstance(f, KnownMessageFilter) for f in logger.filters):
            logger.addFilter(KnownMessageFilter(patterns))
    for category, message in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)  # no duplicate: it replaces itself


def tell_launcher(message: str) -> None:
    """Under torchrun (every accelerate launch of several processes, FSDP or DeepSpeed), write `message` where
    torchrun reads a failed process's error (TORCHELASTIC_ERROR_FILE, as torch's `@record` does), so the failure
    report torchrun prints after the processes exit ends with the message instead of a link to its docs."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as file:
            json.dump({"message": message, "timestamp": int(time.time())}, file)


silence_known_noise()
