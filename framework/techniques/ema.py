"""Exponential moving average of the weights (Polyak averaging), evaluated in place of the live weights.

Polyak & Juditsky 1992; as used by e.g. timm's ModelEmaV3 and Mean Teacher (https://arxiv.org/abs/1703.01780).
Hooks: `fit_start` (copy the weights), `after_optimizer_step` (one fused foreach update), `eval_start` /
`eval_end` (swap the EMA weights in and back), `fit_end` (write `model_ema.safetensors`). State checkpointed.

Under DeepSpeed ZeRO-3 each rank holds only a shard of every parameter (`param.ds_tensor`). The average is kept
shard-local: each rank averages its own shards, so an update costs no communication and 1/world_size of the memory
(gathering every parameter on every step would cost a full all-gather per step and a full copy per rank). Swapping
the shards in is enough for evaluation, since ZeRO-3 gathers shards in every forward; export and checkpoints gather
through DeepSpeed's `GatheredParameters`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import save_file

from framework.backend import full_state_dict
from framework.errors import require
from framework.state import TrainState
from framework.technique import Technique, register


def ema_decay(num_updates: int, decay: float, warmup: bool = False, update_every: int = 1) -> float:
    """The decay of the next update, after `num_updates` updates: decay**update_every, and with `warmup`
    at most (1 + n) / (10 + n), so early averages do not remember the random initialisation.

    Updating every N optimizer steps with decay**N keeps the averaging horizon of one update per step.
    """
    value = decay**update_every
    if warmup:
        value = min(value, (1 + num_updates) / (10 + num_updates))
    return value


@torch.no_grad()
def ema_update_(
    ema_params: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    decay: float,
    ema_buffers: Sequence[torch.Tensor] = (),
    buffers: Sequence[torch.Tensor] = (),
) -> None:
    """ema ← decay · ema + (1 − decay) · param for every parameter in one fused pass; buffers are copied.

    The same `torch._foreach_lerp_` that `torch.optim.swa_utils.get_ema_multi_avg_fn` runs, on plain lists of
    tensors (or this rank's ZeRO-3 shards), so it needs no `AveragedModel` copy of the module.

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
        require(0.0 < decay < 1.0, f"ema.decay must be within (0, 1), got {decay}.")
        require(update_every >= 1, f"ema.update_every must be at least 1, got {update_every}.")
        self.decay = decay
        self.warmup = warmup
        self.update_every = update_every
        self.evaluate_with_ema = evaluate_with_ema
        self.num_updates = 0

    def current_decay(self) -> float:
        return ema_decay(self.num_updates, self.decay, self.warmup, self.update_every)

    # --- the tensors this rank owns: whole parameters, or its ZeRO-3 shards -------------------------------------------
    def _live(self) -> list[torch.Tensor]:
        return [p.ds_tensor for p in self._params] if self._zero3 else self._params

    def fit_start(self, state: TrainState) -> None:
        model = state.accelerator.unwrap_model(state.model)
        self._params = list(model.parameters())
        self._buffers = list(model.buffers())
        self._zero3 = any(hasattr(p, "ds_tensor") for p in self._params)
        self.ema_params = [t.detach().clone() for t in self._live()]
        self.ema_buffers = [b.detach().clone() for b in self._buffers]
        self._backup: list[torch.Tensor] | None = None

    def after_optimizer_step(self, state: TrainState) -> None:
        if state.step % self.update_every == 0:
            ema_update_(self.ema_params, self._live(), self.current_decay(), self.ema_buffers, self._buffers)
            self.num_updates += 1

    # --- swapping the average in and out ----------------------------------------------------------------------
    @torch.no_grad()
    def _swap_in(self) -> None:
        live = self._live() + self._buffers
        self._backup = [t.detach().clone() for t in live]
        torch._foreach_copy_(live, self.ema_params + self.ema_buffers)
        self._drop_gathered_copies()

    @torch.no_grad()
    def _swap_out(self) -> None:
        torch._foreach_copy_(self._live() + self._buffers, self._backup)
        self._backup = None
        self._drop_gathered_copies()

    def _drop_gathered_copies(self) -> None:
        """ZeRO-3 keeps small parameters gathered between forwards; drop those copies so the next forward gathers
        the shards just swapped in."""
        if self._zero3:
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            gathered = [p for p in self._params if p.ds_status == ZeroParamStatus.AVAILABLE]
            if gathered:
                gathered[0].partition(param_list=gathered)

    def eval_start(self, state: TrainState) -> None:
        if self.evaluate_with_ema:
            self._swap_in()

    def eval_end(self, state: TrainState) -> None:
        if self._backup is not None:
            self._swap_out()

    def ema_state_dict(self, state: TrainState) -> dict[str, torch.Tensor]:
        """The averaged weights as one state dict on the main process (gathered under ZeRO-3; all ranks call)."""
        self._swap_in()
        weights = full_state_dict(state.accelerator, state.model)  # copies, taken before swapping out
        self._swap_out()
        return weights

    def evaluated_weights(self, state: TrainState) -> dict[str, torch.Tensor] | None:
        """The average, when evaluation runs on it (`evaluate_with_ema`): best-model saving keeps these weights."""
        return self.ema_state_dict(state) if self.evaluate_with_ema else None

    def fit_end(self, state: TrainState) -> None:
        weights = self.ema_state_dict(state)
        if state.accelerator.is_main_process:
            save_file(weights, str(state.output_dir / "model_ema.safetensors"))

    # --- checkpointed state: whole tensors, whatever the sharding -----------------------------------------------
    @torch.no_grad()
    def state_dict(self) -> dict[str, Any]:
        params = self.ema_params
        if self._zero3:
            import deepspeed

            self._swap_in()
            with deepspeed.zero.GatheredParameters(self._params):
                params = [p.detach().clone() for p in self._params]
            self._swap_out()
        return {"params": params, "buffers": self.ema_buffers, "num_updates": self.num_updates}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        params = list(state_dict["params"])
        if self._zero3:  # let DeepSpeed cut the whole tensors into this rank's shards
            import deepspeed

            backup = [t.detach().clone() for t in self._live()]
            with deepspeed.zero.GatheredParameters(self._params, modifier_rank=0):
                torch._foreach_copy_([p.data for p in self._params], params)
            params = [t.detach().clone() for t in self._live()]
            torch._foreach_copy_(self._live(), backup)
            self._drop_gathered_copies()
        torch._foreach_copy_(self.ema_params, params)
        if self.ema_buffers:
            torch._foreach_copy_(self.ema_buffers, list(state_dict["buffers"]))
        self.num_updates = int(state_dict["num_updates"])
