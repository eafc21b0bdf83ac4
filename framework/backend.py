"""Build the Accelerator from the launch config, and refuse launches that would silently run wrong.

The recipe never chooses a backend: `accelerate launch --config_file launch_configs/X.yaml` does. Two traps on
machines without a GPU (see DESIGN.md) are handled here:

* a MULTI_GPU launch starts N processes, but each would believe it is alone: we build the Accelerator with
  `cpu=True` and a gloo process group so the ranks really synchronise;
* whenever the world size we got differs from the launcher's `WORLD_SIZE`, we stop before training.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import accelerate.optimizer
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DeepSpeedPlugin,
    DistributedType,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    broadcast,
)

from framework.errors import ConfigError, LaunchError

# accelerate's optimizer step asks `is_lomo_available()` twice per step, and each answer is a fresh search of
# sys.path on disk (~0.3 ms per step, measured in benchmarks/loop_parity.py). The answer cannot change while a run
# lives, so it is asked once.
accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)


@dataclass(frozen=True)
class Backend:
    """Where a run executes, as `Technique.check` sees it (read from the Accelerator, or made up in tests/docs)."""

    distributed_type: str = "NO"  # accelerate's DistributedType name: NO, MULTI_CPU, MULTI_GPU, DEEPSPEED, FSDP
    num_processes: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    device_type: str = "cpu"  # cpu | cuda | ...
    deepspeed_stage: int | None = None  # ZeRO stage when distributed_type is DEEPSPEED
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (SAM cannot accumulate)


FP16_ON_CPU = (
    "fp16 mixed precision needs a GPU; on CPU accelerate would silently train in fp32. "
    "Use launch_configs/bf16.yaml (bf16 runs on CPU) or launch_configs/cpu.yaml."
)


def launched_world_size() -> int:
    """The number of processes the launcher (accelerate launch / torchrun) started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(
    output_dir: str,
    gradient_accumulation_steps: int = 1,
    log_with: Sequence[Any] = (),
    deepspeed_values: Mapping[str, Any] | None = None,
    compile: bool = False,
    find_unused_parameters: bool = False,
    non_blocking: bool = False,
) -> Accelerator:
    """An Accelerator for whatever the launch config asked for; raises `LaunchError` if the launch went wrong.

    `deepspeed_values` are what the recipe's techniques set in a DeepSpeed config (e.g. `gradient_clipping`); with
    `gradient_accumulation_steps` they fill the config's "auto" entries, and a config that contradicts them is refused.
    `non_blocking`: the training loader pins its memory, so batches are copied to the GPU asynchronously.
    """
    check_launch_environment()
    extra: dict[str, Any] = {}
    use_deepspeed = _env_flag("ACCELERATE_USE_DEEPSPEED")
    if launched_world_size() > 1 and not torch.cuda.is_available():
        # gloo makes the CPU ranks one group; cpu=True would also turn DeepSpeed off, so only without it.
        extra = {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")], "cpu": not use_deepspeed}
    if find_unused_parameters:  # DDP: a task that updates one part of the model at a time (a GAN)
        extra.setdefault("kwargs_handlers", []).append(DistributedDataParallelKwargs(find_unused_parameters=True))
    if compile:
        extra["dynamo_backend"] = "inductor"  # else accelerate reads the launch config's dynamo_config
    if use_deepspeed:
        extra["deepspeed_plugin"] = deepspeed_plugin(gradient_accumulation_steps, deepspeed_values or {})
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=list(log_with) or None,
        project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=output_dir),
        # The shuffling order is a function of (seed, epoch): a resumed run sees the batches it would have seen.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=non_blocking),
        **extra,
    )
    check_launch(accelerator)
    return accelerator


def build_model(accelerator: Accelerator, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`factory()`, called where the launched backend wants the model built. Under DeepSpeed ZeRO-3 with the launch
    config's `zero3_init_flag: true`, accelerate has told transformers (its HfDeepSpeedConfig) to build models inside
    `deepspeed.zero.Init`: each rank then holds only its shard of the weights from the start, so a model larger than
    one device's memory can be built at all. With the flag false the model is built whole on every rank and
    partitioned when it is prepared. Models that are not transformers' are built whole either way: zero.Init would
    skip initialisation that a model runs over its submodules after building them (the framework's GPT does)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero3_init_flag:
        return factory()
    # accelerate sets transformers' ZeRO-3 reference whatever the flag says; the flag is the user's word, so honour it
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        return factory()
    finally:
        plugin.set_deepspeed_weakref()


def set_determinism(deterministic: bool) -> None:
    """`--deterministic`: only deterministic kernels, so the same run twice gives bitwise-equal weights (the data
    order and the DataLoader workers' seeds already follow the run's seed). Otherwise cuDNN autotunes convolutions on
    CUDA (`benchmark`), the faster choice for fixed input shapes. Called before any CUDA work: cuBLAS reads
    CUBLAS_WORKSPACE_CONFIG when it starts."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic and torch.cuda.is_available()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("true", "1", "yes")


def requested_gpus() -> str | None:
    """The GPU ids the launch asked for, or None. accelerate launch passes a launch config's `gpu_ids` (or
    `--gpu_ids`) as CUDA_VISIBLE_DEVICES, except `gpu_ids: all`; an empty value or -1 hides every GPU on purpose."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return visible if visible and not visible.startswith("-") else None


def check_launch_environment() -> None:
    """Refuse, before accelerate builds anything, launch configs that would silently run differently here."""
    if torch.cuda.is_available():
        return
    if os.environ.get("ACCELERATE_MIXED_PRECISION") == "fp16":
        raise LaunchError(FP16_ON_CPU)
    if _env_flag("ACCELERATE_USE_FSDP"):
        raise LaunchError(
            "FSDP needs GPUs; on CPU accelerate would silently train unsharded. Use launch_configs/multi_cpu.yaml, "
            "or launch_configs/deepspeed_zero3.yaml to shard parameters on CPU."
        )
    gpus = requested_gpus()
    if gpus is not None and not _env_flag("ACCELERATE_USE_CPU"):  # single_gpu.yaml; cpu.yaml sets use_cpu: true
        plural = "s" if "," in gpus else ""
        raise LaunchError(
            f"the launch config asks for GPU{plural} {gpus} but torch finds no GPU here "
            f"(gpu_ids: '{gpus}', passed as CUDA_VISIBLE_DEVICES); accelerate would silently train on the CPU. "
            "Use launch_configs/cpu.yaml (or multi_cpu.yaml for several CPU processes), or check `nvidia-smi` and "
            "that torch was built with CUDA."
        )


def deepspeed_plugin(gradient_accumulation_steps: int, values: Mapping[str, Any]) -> DeepSpeedPlugin:
    """The launch config's DeepSpeed plugin with its "auto" entries filled from the recipe (one source of truth).

    accelerate would fill an "auto" `gradient_clipping` with 1.0 (clipping a recipe that asked for none) and, on a
    different accumulation, warn and use the DeepSpeed value; here a contradiction is an error instead.
    """
    plugin = DeepSpeedPlugin()  # reads the launch config from the environment accelerate launch set
    wanted = {"gradient_accumulation_steps": gradient_accumulation_steps, "gradient_clipping": 0.0, **values}
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the launch config")
    for key, value in wanted.items():
        current = plugin.deepspeed_config.get(key, "auto")
        if current == "auto":
            plugin.deepspeed_config[key] = value
        elif float(current) != float(value):
            raise ConfigError(
                f"the DeepSpeed config ({source}) sets {key}={current} but the recipe asks for {value}. "
                f'Set "{key}": "auto" there so the recipe decides, or change the recipe.'
            )
    plugin.gradient_accumulation_steps = gradient_accumulation_steps
    plugin.gradient_clipping = plugin.deepspeed_config["gradient_clipping"]
    return plugin


def unscale_gradients_once(accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> None:
    """Unscale fp16 gradients (GradScaler) for this backward pass unless that is done already.

    The loop calls it before `before_optimizer_step`, so every technique sees true gradients. GradScaler raises on
    a second `unscale_` in one step, which accelerate's own `unscale_gradients` would do; hence this check.
    """
    scaler = accelerator.scaler
    if scaler is None:
        return
    from torch.amp.grad_scaler import OptState

    inner = getattr(optimizer, "optimizer", optimizer)
    if scaler._per_optimizer_states[id(inner)]["stage"] is not OptState.UNSCALED:
        scaler.unscale_(inner)


def forget_unscaling(accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> None:
    """Before a second backward pass in the same step (SAM): its gradients arrive scaled, so they are unscaled (and
    checked for inf) anew, and the optimizer step is judged on them."""
    if accelerator.scaler is not None:
        from torch.amp.grad_scaler import _refresh_per_optimizer_state

        accelerator.scaler._per_optimizer_states[id(getattr(optimizer, "optimizer", optimizer))] = (
            _refresh_per_optimizer_state())


def clip_grad_norm(accelerator: Accelerator, parameters, max_norm: float, norm_type: float = 2.0):
    """`accelerator.clip_grad_norm_` for gradients the loop has unscaled already (fp16 would unscale them twice)."""
    if accelerator.scaler is None:
        return accelerator.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)


def gradient_norm(accelerator: Accelerator, parameters) -> torch.Tensor:
    """The global gradient norm, measured without touching the gradients (a clip at max_norm=inf would scale them
    by inf/inf = NaN when the fp32 norm overflows, and accelerate skips that clip only in some versions). Sharded
    gradients (DeepSpeed, FSDP) are measured by accelerate, which asks the engine."""
    if accelerator.distributed_type.name in ("DEEPSPEED", "FSDP"):
        return accelerator.clip_grad_norm_(parameters, float("inf"))
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole weights as CPU copies on the main process (empty elsewhere under ZeRO-3). Every rank must
    call it: under ZeRO-3 it gathers the shards."""
    weights = accelerator.get_state_dict(model) or {}
    return {name: t.detach().cpu().contiguous().clone() for name, t in weights.items()}


@contextmanager
def weights_swapped_in(accelerator: Accelerator, model: torch.nn.Module,
                       weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside, the model holds `weights` (a whole state dict, as `full_state_dict` returns, read by every rank);
    afterwards its own weights again, exactly. Under ZeRO-3 DeepSpeed cuts the whole tensors into each rank's shards."""
    module = accelerator.unwrap_model(model)
    parameters = list(module.parameters())
    zero3 = any(hasattr(p, "ds_tensor") for p in parameters)
    own = [p.ds_tensor if zero3 else p for p in parameters] + list(module.buffers())
    backup = [t.detach().clone() for t in own]
    with torch.no_grad():
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(parameters, modifier_rank=0):
                module.load_state_dict(weights)
        else:
            module.load_state_dict(weights)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(own, backup)
        if zero3:  # ZeRO-3 keeps small parameters gathered between forwards: drop those stale copies
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            gathered = [p for p in parameters if p.ds_status == ZeroParamStatus.AVAILABLE]
            if gathered:
                gathered[0].partition(param_list=gathered)


def local_weights_finite(accelerator: Accelerator, model: torch.nn.Module) -> torch.Tensor:
    """1.0 when every weight this rank holds is finite (ZeRO-3: its shards), else 0.0: one value on the device."""
    local = [getattr(p, "ds_tensor", p).detach() for p in accelerator.unwrap_model(model).parameters()]
    return torch.stack([torch.isfinite(t).all() for t in local]).all().float().reshape(1).to(accelerator.device)


def weights_finite(accelerator: Accelerator, model: torch.nn.Module) -> bool:
    """True when every weight is finite on every rank. One host read."""
    return bool(accelerator.gather(local_weights_finite(accelerator, model)).min().item())


def main_process_decides(accelerator: Accelerator, decision: bool) -> bool:
    """Rank 0's `decision`, on every rank: a stop or save that must happen everywhere or nowhere."""
    flag = torch.tensor([float(decision)], device=accelerator.device)
    return bool(broadcast(flag, from_process=0).item())


def on_main_process(accelerator: Accelerator, work: Callable[[], Any], failed_elsewhere: str) -> None:
    """`work()` on the main process while the others wait; an exception it raises is raised on every rank (the
    others raise `ConfigError(failed_elsewhere)`), so all ranks stop together instead of waiting on each other."""
    error = None
    if accelerator.is_main_process:
        try:
            work()
        except Exception as caught:  # noqa: BLE001 - raised below, once the other ranks know
            error = caught
    if main_process_decides(accelerator, error is not None):
        raise error or ConfigError(failed_elsewhere)


def check_launch(accelerator: Accelerator) -> None:
    """Refuse a world size that differs from the launcher's, and fp16 where accelerate would silently run fp32."""
    expected = launched_world_size()
    if accelerator.num_processes != expected:
        raise LaunchError(
            f"the launcher started {expected} processes but this one joined a run of {accelerator.num_processes}: "
            "the ranks would train unsynchronised. Launch with `accelerate launch --config_file "
            "launch_configs/multi_cpu.yaml` (CPU) or `launch_configs/ddp.yaml` (GPUs)."
        )
    if _env_flag("ACCELERATE_USE_DEEPSPEED") and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise LaunchError(
            f"the launch config asked for DeepSpeed but accelerate set up {accelerator.distributed_type.name}. "
            "Check that deepspeed is installed (pip install deepspeed) and the launch config names a ZeRO config."
        )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":  # an Accelerator built by hand
        raise LaunchError(FP16_ON_CPU)


def num_machines() -> int:
    """Machines in the run: the launcher's world size over the processes it started on this machine."""
    world = launched_world_size()
    return max(1, world // int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def deepspeed_summary(accelerator: Accelerator) -> dict[str, Any]:
    """Under DeepSpeed, its ZeRO stage and where optimizer state and parameters are offloaded (for summary.json)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return {}
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    return {"zero_stage": int(plugin.zero_stage),
            "offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none"),
            "offload_param": zero.get("offload_param", {}).get("device", "none")}


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
        gradient_accumulation_steps=accelerator.gradient_accumulation_steps,
    )
