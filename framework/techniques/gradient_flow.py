"""Gradient flow: every N steps, the mean and max |gradient| of each weight, logged and drawn as the classic
gradient-flow bar plot (as in the PyTorch forum's "Check gradient flow in network",
https://discuss.pytorch.org/t/check-gradient-flow-in-network/15063). Gradients that shrink by decades from the output
towards the input are vanishing (Bengio et al., https://doi.org/10.1109/72.279181; Glorot & Bengio,
https://proceedings.mlr.press/v9/glorot10a.html); a layer at exactly zero receives no signal at all.

Hook: `before_optimizer_step`, where the gradients are final. That is why this reads `param.grad` there rather than
using `register_full_backward_hook` or tensor hooks (`Tensor.register_hook`): those fire once per micro-batch during
backward, before gradient accumulation has summed the micro-batches and before DDP's all-reduce has averaged the ranks,
and under fp16 on still-scaled gradients. At `before_optimizer_step` the loop has run the whole accumulation, DDP
has synchronised and the loop has unscaled: `param.grad` is exactly the gradient the optimizer applies (before any
clipping by a technique listed after this one). Reading it needs no hook, so there is nothing to remove afterwards.

Backends: DDP and single device read `param.grad`; FSDP2 (`fully_shard`, launch_configs/fsdp.yaml) holds each gradient
as a sharded DTensor, gathered per parameter (`full_tensor()`) on measured steps. Refused: DeepSpeed, whose engine
reduces and partitions the gradients and takes the optimizer step inside `accelerator.backward` (no hook after
backward sees a full gradient), and FSDP1, whose parameters' `.grad` are local pieces of a flat shard.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from accelerate.utils import DistributedType

from framework.backend import Backend
from framework.errors import IncompatibleError, require_int
from framework.plots import plot_gradient_flow
from framework.state import TrainState
from framework.technique import Technique, register
from framework.tracking import log_picture

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support
    DTensor = None


@torch.no_grad()
def gradient_flow(named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
                  include_biases: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and max |grad| of each parameter, as 0-dim fp32 tensors on the gradient's device (no host sync).

    Args:
        named_parameters: `model.named_parameters()`, in model order (input to output for sequential models).
        include_biases: False (the classic figure): leave out parameters named `bias`, whose gradient is the layer's
            summed error signal and would crowd the plot without telling more about the flow.

    Returns:
        `{parameter name: (mean |grad|, max |grad|)}`, skipping parameters without a gradient (frozen, or unused in
        this step). A DTensor gradient (FSDP2) is gathered to the full gradient first: every rank must call this.
    """
    stats = {}
    for name, parameter in named_parameters:
        grad = parameter.grad
        if grad is None or (not include_biases and name.rsplit(".", 1)[-1] == "bias"):
            continue
        if DTensor is not None and isinstance(grad, DTensor):
            grad = grad.full_tensor()
        if grad.numel() == 0:
            continue
        # Norms with an fp32 accumulator: no |grad| copy of the parameter's size, and bf16 gradients summed in fp32.
        mean = torch.linalg.vector_norm(grad, 1, dtype=torch.float32) / grad.numel()
        top = torch.linalg.vector_norm(grad, float("inf"), dtype=torch.float32)
        stats[name] = (mean, top)
    return stats


@register("gradient_flow")
class GradientFlow(Technique):
    """Log the mean and max |grad| of every weight every `every` optimizer steps, and draw the gradient-flow plot.

    On steps `every`, `2·every`, … logs `grad_flow/<parameter>/mean` and `grad_flow/<parameter>/max` (device tensors,
    written at the next log line: choose `every` as a multiple of `log_every`), and the main process writes
    `output_dir/gradient_flow/step_XXXXXXXX.png` and logs it as the picture `gradient_flow` (an image in W&B and
    TensorBoard, its file name in metrics.jsonl). Drawing the plot reads the values to the host once per measured
    step, on the main process only. With SAM it measures again after the second backward pass: the gradient SAM
    applies wins.

    Args:
        every: optimizer steps between measurements (≥ 1).
        include_biases: also measure parameters named `bias` (the classic figure shows weights only).
    """

    def __init__(self, every: int = 100, include_biases: bool = False):
        require_int("gradient_flow.every", every, 1)
        self.every = every
        self.include_biases = include_biases

    def check(self, backend: Backend, others: Sequence[Technique]) -> None:
        if backend.distributed_type == "DEEPSPEED":
            raise IncompatibleError(
                "gradient_flow cannot read gradients under DeepSpeed: the engine reduces and partitions them and "
                "steps inside backward, so no hook after backward sees the full gradient. Use a DDP launch config "
                "(multi_cpu.yaml, ddp.yaml) to measure gradient flow."
            )

    def fit_start(self, state: TrainState) -> None:
        accelerator = state.accelerator
        if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
            raise IncompatibleError(
                "gradient_flow under FSDP1 would read each rank's piece of a flat gradient shard, not the layer's "
                "gradient. Use FSDP2 (fsdp_version: 2, as in launch_configs/fsdp.yaml) or a DDP launch config."
            )

    def before_optimizer_step(self, state: TrainState) -> None:
        step = state.step + 1  # the optimizer step about to be taken (state.step counts the steps done)
        if step % self.every:
            return
        # Names as in the user's model: without DDP's `module.` or torch.compile's `_orig_mod.` prefixes.
        model = state.accelerator.unwrap_model(state.model, keep_torch_compile=False)
        stats = gradient_flow(model.named_parameters(), self.include_biases)
        for name, (mean, top) in stats.items():
            state.log(**{f"grad_flow/{name}/mean": mean, f"grad_flow/{name}/max": top})
        if stats and state.accelerator.is_main_process:
            path = state.output_dir / "gradient_flow" / f"step_{step:08d}.png"
            values = torch.stack([torch.stack(pair) for pair in stats.values()]).tolist()  # one host sync
            plot_gradient_flow(dict(zip(stats, values)), path, title=f"gradient flow, step {step}")
            log_picture(state.accelerator, "gradient_flow", path, step=step)
