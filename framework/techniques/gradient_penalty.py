"""Gradient penalty (WGAN-GP, Gulrajani et al. 2017, https://arxiv.org/abs/1704.00028): keep the critic 1-Lipschitz
by pushing the norm of its input gradient towards 1 on random interpolates between real and generated samples.

    x̂ = ε·real + (1 − ε)·fake,  ε ~ U(0, 1) per sample
    GP = λ · mean over the batch of (‖∇_x̂ f(x̂)‖₂ − 1)²        (one-sided: max(0, ‖∇‖ − 1)²)

Hook: `on_loss`, on the critic updates of a task that owns its step (`framework.task.WGANTask`): their outputs
carry `critic`, `real` and `fake`; other updates (the generator's) pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from framework.backend import Backend
from framework.errors import ConfigError, IncompatibleError, require
from framework.state import TrainState
from framework.technique import Technique, register


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     weight: float = 10.0, one_sided: bool = False, scale: float = 1.0,
                     epsilon: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """λ·mean((‖∇f(x̂)‖ − 1)²) on interpolates x̂ of `real` and `fake` (detached), and the gradient norms (B,).

    The graph is kept (`create_graph=True`), so the penalty's gradient reaches the critic's parameters (a double
    backward). The norms and the penalty are computed in fp32. `scale`: under fp16 the critic's output is
    multiplied by the loss scale before the inner gradient (so it does not underflow) and the gradient divided by
    it after, as in PyTorch's AMP recipe for gradient penalties. `epsilon` (B,) replaces the random draw (tests).
    """
    if epsilon is None:
        epsilon = torch.rand(real.shape[0], device=real.device)
    epsilon = epsilon.to(real.dtype).reshape(-1, *([1] * (real.dim() - 1)))  # one ε per sample, over all its dims
    interpolates = (epsilon * real.detach() + (1 - epsilon) * fake.detach()).requires_grad_(True)
    scores = critic(interpolates)
    (gradients,) = torch.autograd.grad(scores.float().sum() * scale, interpolates, create_graph=True)
    norms = (gradients.float() / scale).flatten(1).norm(2, dim=1)
    excess = norms - 1
    if one_sided:
        excess = excess.clamp(min=0)
    return weight * excess.pow(2).mean(), norms


@register("gradient_penalty")
class GradientPenalty(Technique):
    """Add λ·GP to the critic's loss on a GAN task's critic updates; logs `gradient_penalty` and `critic_grad_norm`.

    Args:
        weight: λ (the paper's 10).
        one_sided: penalise only norms above 1 (the paper's variant that allows a flatter critic).
    """

    def __init__(self, weight: float = 10.0, one_sided: bool = False):
        require(weight >= 0, f"gradient_penalty.weight must be >= 0, got {weight}.")
        self.weight = weight
        self.one_sided = one_sided

    def check(self, backend: Backend, others: list[Technique]) -> None:
        if backend.distributed_type == "DEEPSPEED":
            raise IncompatibleError(
                "gradient_penalty needs a double backward through the critic and a task that takes two updates per "
                "step, which the DeepSpeed engine (one backward, one step) does not run. Use a DDP launch config "
                "(multi_cpu.yaml, ddp.yaml) or a single process.")

    def fit_start(self, state: TrainState) -> None:
        if not getattr(state.task, "owns_step", False):
            raise ConfigError("gradient_penalty works on a GAN task's critic updates (e.g. recipes/wgan_gp.py); this "
                              "run's task has no critic. Remove the technique.")

    def on_loss(self, state: TrainState, loss: torch.Tensor, batch: Any, outputs: Any) -> torch.Tensor:
        if not (isinstance(outputs, dict) and "critic" in outputs):
            return loss  # a generator update
        scaler = state.accelerator.scaler
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        penalty, norms = gradient_penalty(outputs["critic"], outputs["real"], outputs["fake"], self.weight,
                                          self.one_sided, scale)
        state.log(gradient_penalty=penalty.detach(), critic_grad_norm=norms.detach().mean())
        return loss + penalty.to(loss.dtype)
