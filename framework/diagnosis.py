"""Diagnosis several parts of the framework share: where a forward pass first turns NaN/inf, which weights hold
NaN/inf, and what to print when training runs out of memory.

The doctor (framework/techniques/doctor/) replays the latest batch with `first_nonfinite_layer` to name the layer
behind a non-finite loss; NaNGuard does the same when it stops a run; `run_main` turns a `torch.OutOfMemoryError` into
a `FrameworkError` with `out_of_memory_report`. Pure functions of a model, a tensor or an error: no state, no hooks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch


# --- non-finite values -----------------------------------------------------------------------------------------------
def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def all_finite(value: Any) -> bool:
    """True if every floating-point tensor in `value` (a tensor, or nested tuples/lists/dicts of them) is finite."""
    return all(bool(torch.isfinite(t).all()) for t in _tensors(value) if t.is_floating_point() or t.is_complex())


class NonFiniteLayer(NamedTuple):
    """Where a forward pass first turned non-finite."""

    name: str  # the module's name in the model ("" for the model itself)
    module_type: str  # its class name
    inputs_finite: bool  # False: it received NaN/inf already (from the batch or code outside submodules)
    weights_finite: bool  # False: its own weights are NaN/inf (an earlier update spread a NaN into them)
    input_max: float | None = None  # the largest |value| among its finite floating-point inputs (None: none)
    weight_max: float | None = None  # the largest |value| among its own finite weights (None: no weights)
    dtype: torch.dtype | None = None  # the dtype of its (first floating-point) output


def _abs_max(value: Any) -> float | None:
    """The largest |x| over the floating-point tensors in `value`, or None when there are none (or it is not finite)."""
    maxima = [t.detach().abs().max().float() for t in _tensors(value) if t.is_floating_point() and t.numel()]
    if not maxima:
        return None
    largest = float(torch.stack(maxima).max())
    return largest if math.isfinite(largest) else None


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """The names of the parameters that hold a NaN/inf, in the model's order (after an update spread one in)."""
    local = [(name, p.to_local() if hasattr(p, "to_local") else p) for name, p in model.named_parameters()]  # FSDP2
    return [name for name, p in local if p.numel() and not bool(torch.isfinite(p).all())]


@torch.no_grad()
def first_nonfinite_layer(model: torch.nn.Module, forward: Callable[[], Any]) -> NonFiniteLayer | None:
    """Run `forward()` once with a forward hook on every module of `model` and return the first module, in the order
    they finish, whose output holds a NaN/inf (inner modules finish before the modules that contain them), or None.

    The model is left as it was: hooks removed, buffers (BatchNorm statistics) restored.
    """
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    found: list[NonFiniteLayer] = []

    def hook(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if not found and not all_finite(output):
            weights = list(module.parameters(recurse=False)) or list(module.parameters())
            dtype = next((t.dtype for t in _tensors(output) if t.is_floating_point()), None)
            found.append(NonFiniteLayer(names[id(module)], type(module).__name__, all_finite((args, kwargs)),
                                        all_finite(list(module.parameters())), _abs_max((args, kwargs)),
                                        _abs_max(weights), dtype))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    return found[0] if found else None


# --- out of memory -------------------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def out_of_memory_report(error: BaseException, device: torch.device | str) -> str:
    """What to print when training ran out of memory: the error's first line, the peak memory when on CUDA, and the
    ways this framework trades memory for something else, with their exact flags."""
    device = torch.device(device)
    text = str(error).strip()
    lines = [f"out of memory on {device}: {text.splitlines()[0] if text else type(error).__name__}"]
    if device.type == "cuda":
        try:
            peak = torch.cuda.max_memory_allocated(device)
            reserved = torch.cuda.max_memory_reserved(device)
            total = torch.cuda.get_device_properties(device).total_memory
            lines.append(f"peak memory: {_gib(peak)} allocated by tensors, {_gib(reserved)} reserved by the caching "
                         f"allocator, of {_gib(total)} on this GPU.")
            if reserved > 1.25 * peak:
                lines.append("much more reserved than allocated: fragmentation; also try "
                             "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True.")
        except Exception as failure:  # the CUDA context may be unusable after the error
            lines.append(f"peak memory: unavailable ({failure}).")
    else:
        lines.append(f"peak memory: not measured on {device.type} (only CUDA reports it).")
    lines += [
        "to fit, try one of (most effective last):",
        "  - a smaller per-process batch: --data.batch_size <half of now>",
        "  - keep the effective batch with gradient accumulation: --gradient_accumulation_steps 2 (or more)",
        "  - bf16 mixed precision (activations in half the bytes): accelerate launch --config_file "
        "launch_configs/bf16.yaml ...",
        "  - gradient checkpointing (recompute activations in backward, ~1/3 more compute): "
        "--techniques.gradient_checkpointing.policy full",
        "  - DeepSpeed ZeRO (shard optimizer state and gradients over GPUs): launch_configs/deepspeed_zero2.yaml; "
        "parameters too: deepspeed_zero3.yaml; optimizer in CPU memory: deepspeed_zero3_offload.yaml",
    ]
    return "\n".join(lines)
