"""Lookahead (Zhang et al., https://arxiv.org/abs/1907.08610) around any base optimizer: every k steps the slow
weights move a fraction alpha toward the fast (optimizer's) weights, and the fast weights restart from there.

Hook: `fit_start` (slow weights = the initial weights), `after_optimizer_step` (the sync every k steps). The slow
weights are checkpointed. Under DDP every rank holds the same fast weights, so the slow ones agree too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from framework.backend import Backend
from framework.errors import ConfigError, IncompatibleError
from framework.state import TrainState
from framework.technique import Technique, register


@torch.no_grad()
def lookahead_sync_(slow: Sequence[torch.Tensor], fast: Sequence[torch.Tensor], alpha: float) -> None:
    """slow ← slow + alpha · (fast − slow), then fast ← slow (fused foreach ops)."""
    torch._foreach_lerp_(list(slow), list(fast), alpha)
    torch._foreach_copy_(list(fast), list(slow))


@register("lookahead")
class Lookahead(Technique):
    """Wrap the optimizer's updates in Lookahead: `k` fast steps, then a slow step of size `alpha`."""

    def __init__(self, k: int = 5, alpha: float = 0.5):
        if k < 1 or not 0.0 < alpha <= 1.0:
            raise ConfigError(f"lookahead needs k ≥ 1 and alpha in (0, 1], got k={k}, alpha={alpha}.")
        self.k, self.alpha = k, alpha

    def check(self, backend: Backend, others: Sequence[Technique]) -> None:
        if backend.distributed_type == "DEEPSPEED":
            raise IncompatibleError("lookahead rewrites the weights between steps, but DeepSpeed keeps its own "
                                    "master copy of them and would undo it. Use a DDP launch config or remove it.")

    def fit_start(self, state: TrainState) -> None:
        self._fast = list(state.accelerator.unwrap_model(state.model).parameters())
        self.slow = [p.detach().clone() for p in self._fast]

    def after_optimizer_step(self, state: TrainState) -> None:
        if state.step % self.k == 0:
            lookahead_sync_(self.slow, self._fast, self.alpha)

    def state_dict(self) -> dict[str, Any]:
        return {"slow": self.slow}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        torch._foreach_copy_(self.slow, list(state_dict["slow"]))
