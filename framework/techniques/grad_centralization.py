"""Gradient centralization (Yong et al., https://arxiv.org/abs/2004.01461): remove the mean of every output
channel's gradient for conv and linear weights, which constrains the weights to a hyperplane and smooths training.

Hook: `before_optimizer_step` (gradients synchronised; list it before `gradient_clipping` so clipping sees the
centralized gradient).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from framework.backend import Backend
from framework.errors import IncompatibleError
from framework.state import TrainState
from framework.technique import Technique, register


@torch.no_grad()
def centralize_gradients_(parameters: Iterable[torch.Tensor]) -> None:
    """For every parameter with 2 or more dimensions (conv / linear weights: output channels first), subtract from
    its gradient the mean over all dimensions but the first. Biases and norm weights (1-D) are left alone."""
    for parameter in parameters:
        grad = parameter.grad
        if grad is not None and grad.dim() > 1:
            grad.sub_(grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True))


@register("gradient_centralization")
class GradientCentralization(Technique):
    """Centralize conv / linear weight gradients before every optimizer step."""

    def check(self, backend: Backend, others: Sequence[Technique]) -> None:
        if backend.distributed_type == "DEEPSPEED":
            raise IncompatibleError("gradient_centralization: the DeepSpeed engine steps inside backward, before "
                                    "gradients could be changed. Use a DDP launch config or remove it.")

    def before_optimizer_step(self, state: TrainState) -> None:
        centralize_gradients_(state.model.parameters())
