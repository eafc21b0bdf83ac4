"""Sharpness-aware minimisation (Foret et al., https://arxiv.org/abs/2010.01412) and its adaptive variant ASAM
(Kwon et al., https://arxiv.org/abs/2102.11600): step with the gradient taken at the worst nearby point.

Per optimizer step: the gradient g at w gives the perturbation e (‖e‖ = rho); the gradient is taken again at w + e
(a second forward-backward on the same batch, all-reduced under DDP as usual); w is restored and the base optimizer
steps with that second gradient. Hook: `optimizer_step` (SAM owns the step). Other techniques' gradient hooks
(clipping, centralization) run on both gradients, so clipping bounds the one applied. Under fp16 the loop unscales
each pass's gradients once; an overflow in the first pass skips the step, as the loss scaler would. Outside the
loop, `sam_step(params, closure, optimizer, rho)` does the same step after a plain `loss.backward()`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from framework.backend import Backend
from framework.errors import ConfigError, require
from framework.state import TrainState
from framework.technique import Technique, register


@torch.no_grad()
def sam_perturbation(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], rho: float,
                     adaptive: bool = False) -> list[torch.Tensor]:
    """e = rho · g / ‖g‖, or for ASAM e = rho · w² · g / ‖|w| · g‖ (norms over all parameters together)."""
    if adaptive:
        scaled = torch._foreach_mul(torch._foreach_abs(list(params)), list(grads))
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(scaled)))
        return torch._foreach_mul(torch._foreach_mul(scaled, torch._foreach_abs(list(params))), rho / (norm + 1e-12))
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads))))
    return torch._foreach_mul(list(grads), rho / (norm + 1e-12))


def sam_step(params: Iterable[torch.Tensor], closure: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer,
             rho: float = 0.05, adaptive: bool = False, skip_nonfinite: bool = False) -> torch.Tensor | None:
    """One SAM (or ASAM) step in any loop, after the first backward: `.grad` holds the gradient g at w.

    Moves the weights to w + e (`sam_perturbation`), calls `closure` there (as for `optimizer.step(closure)`: zero
    the gradients, forward, backward, return the loss), moves the weights back to w keeping that second gradient,
    and steps `optimizer` with it. Parameters without a gradient are left alone. Returns the closure's loss.
    `skip_nonfinite` (fp16): a non-finite e skips the second pass and lets `optimizer.step()` (a loss scaler's,
    which skips the step) see the overflow; returns None then.
    """
    params = [p for p in params if p.grad is not None]
    perturbation = sam_perturbation(params, [p.grad for p in params], rho, adaptive)
    if skip_nonfinite and not torch.isfinite(torch.stack(torch._foreach_norm(perturbation))).all():
        optimizer.step()
        return None
    with torch.no_grad():
        torch._foreach_add_(params, perturbation)  # to the worst nearby point
    loss = closure()
    with torch.no_grad():
        torch._foreach_sub_(params, perturbation)  # back, keeping the gradient taken there
    optimizer.step()
    return loss


@register("sam")
class SAM(Technique):
    """Sharpness-aware minimisation around the recipe's optimizer.

    Args:
        rho: radius of the neighbourhood (0.05 for SAM; ASAM papers use larger values, e.g. 0.5-2.0).
        adaptive: ASAM: scale the neighbourhood by each weight's magnitude.
    """

    owns_optimizer_step = True

    def __init__(self, rho: float = 0.05, adaptive: bool = False):
        require(rho > 0, f"sam.rho must be positive, got {rho}.")
        self.rho, self.adaptive = rho, adaptive

    def check(self, backend: Backend, others: Sequence[Technique]) -> None:
        if backend.gradient_accumulation_steps > 1:
            raise ConfigError("sam takes two forward-backward passes on each batch and cannot accumulate gradients "
                              "over micro-batches: set gradient_accumulation_steps to 1 (use a larger batch instead).")

    def optimizer_step(self, state: TrainState, recompute_gradients: Callable[[], torch.Tensor]) -> None:
        # fp16: an overflow is checked only then (a host sync); the loss scaler skips the step and lowers the scale.
        sam_step(state.model.parameters(), recompute_gradients, state.optimizer, self.rho, self.adaptive,
                 skip_nonfinite=state.accelerator.scaler is not None)
