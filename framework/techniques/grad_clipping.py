"""Gradient clipping by global norm (through `accelerator.clip_grad_norm_`, which knows how DDP / FSDP / DeepSpeed hold
gradients; under fp16 the loop has unscaled them once already). Pascanu et al., https://arxiv.org/abs/1211.5063.

The pure function is torch's own `torch.nn.utils.clip_grad_norm_`, which accelerate calls after unscaling; the
tests check this technique against it. Hook: `before_optimizer_step`. Logs `grad_norm`, the global norm
*before* clipping, on every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from accelerate.utils import DistributedType

from framework.backend import Backend, clip_grad_norm
from framework.errors import IncompatibleError, require
from framework.state import TrainState
from framework.technique import Technique, register


@register("gradient_clipping")
class GradientClipping(Technique):
    """Clip the global gradient norm to `max_norm` before every optimizer step.

    Args:
        max_norm: the largest global gradient norm allowed.
        norm_type: the p of the p-norm (2.0: Euclidean; `inf`: largest absolute value).
    """

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0):
        require(max_norm > 0, f"gradient_clipping.max_norm must be positive, got {max_norm}.")
        self.max_norm = max_norm
        self.norm_type = norm_type

    def check(self, backend: Backend, others: Sequence[Technique]) -> None:
        if backend.distributed_type == "FSDP" and backend.mixed_precision == "fp16":
            raise IncompatibleError("gradient_clipping under FSDP with fp16 is not supported (its sharded loss scaler "
                                    "needs FSDP's own clipping). Use fsdp.yaml's bf16.")
        if backend.distributed_type == "DEEPSPEED" and self.norm_type != 2.0:
            raise IncompatibleError(
                "gradient_clipping: the DeepSpeed engine clips by the 2-norm only; set norm_type 2.0."
            )

    def deepspeed_config(self) -> dict[str, Any]:
        return {"gradient_clipping": self.max_norm}  # the engine clips inside its step, after the all-reduce

    def before_optimizer_step(self, state: TrainState) -> None:
        if state.accelerator.distributed_type == DistributedType.DEEPSPEED:
            return  # the engine already clipped in its step; the loop logs the engine's global norm
        norm = clip_grad_norm(state.accelerator, state.model.parameters(), self.max_norm, self.norm_type)
        # Before and after clipping: the applied norm is min(norm, max_norm), no second pass over the gradients.
        state.log(grad_norm=norm, grad_norm_clipped=torch.clamp(norm, max=self.max_norm))
