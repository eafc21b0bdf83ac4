"""Exponential moving average of the weights (Polyak averaging), evaluated in place of the live weights.

Polyak & Juditsky 1992; as used by e.g. timm's ModelEmaV3 and Mean Teacher (https://arxiv.org/abs/1703.01780).
Hooks: `fit_start` (copy the weights), `after_optimizer_step` (one fused foreach update), `eval_start` /
`eval_end` (swap the EMA weights in and back), `fit_end` (write `model_ema.safetensors`). State checkpointed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import save_file

from framework.errors import ConfigError, IncompatibleError
from framework.state import TrainState
from framework.technique import Backend, Technique, register


@torch.no_grad()
def ema_update_(
    ema_params: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    decay: float,
    ema_buffers: Sequence[torch.Tensor] = (),
    buffers: Sequence[torch.Tensor] = (),
) -> None:
    """ema ← decay · ema + (1 − decay) · param for every parameter in one fused pass; buffers are copied.

    Buffers (BatchNorm running statistics, counters) are copied rather than averaged: they are statistics of the
    current weights, not weights.
    """
    if ema_params:
        torch._foreach_lerp_(list(ema_params), list(params), 1.0 - decay)
    if ema_buffers:
        torch._foreach_copy_(list(ema_buffers), list(buffers))


@register("ema")
class EMA(Technique):
    """Keep an exponential moving average of the model's weights; evaluate and export it.

    Args:
        decay: the averaging factor per update (0.999 ≈ an average over the last 1,000 updates).
        warmup: use min(decay, (1 + n) / (10 + n)) after n updates, so early averages do not remember the
            random initialisation.
        update_every: update every N optimizer steps, with decay**N so the averaging horizon stays the same.
        evaluate_with_ema: run evaluation (validation and test) on the EMA weights.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = False, update_every: int = 1, evaluate_with_ema: bool = True):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"ema.decay must be within (0, 1), got {decay}.")
        if update_every < 1:
            raise ConfigError(f"ema.update_every must be at least 1, got {update_every}.")
        self.decay = decay
        self.warmup = warmup
        self.update_every = update_every
        self.evaluate_with_ema = evaluate_with_ema
        self.num_updates = 0

    def check(self, backend: Backend, others: Sequence[Technique]) -> None:
        if backend.deepspeed_stage == 3:
            raise IncompatibleError(
                "ema cannot run under DeepSpeed ZeRO-3: each rank holds only a shard of the weights. "
                "Use launch_configs/deepspeed_zero2.yaml or remove ema."
            )

    def current_decay(self) -> float:
        decay = self.decay ** self.update_every
        if self.warmup:
            decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
        return decay

    def fit_start(self, state: TrainState) -> None:
        model = state.accelerator.unwrap_model(state.model)
        self._names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
        self._params = [p for p in model.parameters()]
        self._buffers = [b for b in model.buffers()]
        self.ema_params = [p.detach().clone() for p in self._params]
        self.ema_buffers = [b.detach().clone() for b in self._buffers]
        self._backup: list[torch.Tensor] | None = None

    def after_optimizer_step(self, state: TrainState) -> None:
        if state.step % self.update_every == 0:
            ema_update_(self.ema_params, self._params, self.current_decay(), self.ema_buffers, self._buffers)
            self.num_updates += 1

    @torch.no_grad()
    def eval_start(self, state: TrainState) -> None:
        if self.evaluate_with_ema:
            live = self._params + self._buffers
            self._backup = [t.detach().clone() for t in live]
            torch._foreach_copy_(live, self.ema_params + self.ema_buffers)

    @torch.no_grad()
    def eval_end(self, state: TrainState) -> None:
        if self._backup is not None:
            torch._foreach_copy_(self._params + self._buffers, self._backup)
            self._backup = None

    def fit_end(self, state: TrainState) -> None:
        if state.accelerator.is_main_process:
            tensors = {n: t.detach().cpu().contiguous() for n, t in zip(self._names, self.ema_params + self.ema_buffers)}
            save_file(tensors, str(state.output_dir / "model_ema.safetensors"))

    def state_dict(self) -> dict[str, Any]:
        return {"params": self.ema_params, "buffers": self.ema_buffers, "num_updates": self.num_updates}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        torch._foreach_copy_(self.ema_params, list(state_dict["params"]))
        if self.ema_buffers:
            torch._foreach_copy_(self.ema_buffers, list(state_dict["buffers"]))
        self.num_updates = int(state_dict["num_updates"])
