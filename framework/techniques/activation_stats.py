"""Activation statistics: every N steps, the mean, standard deviation, fraction of exact zeros (dead ReLUs) and, for
bounded activations, fraction of saturated outputs of chosen layers, read with forward hooks
(https://pytorch.org/docs/stable/generated/torch.nn.Module.html#torch.nn.Module.register_forward_hook).

Healthy layers keep a mean near 0 and a std near 1 (the goal of Kaiming/Xavier initialisation, He et al.,
https://arxiv.org/abs/1502.01852; Glorot & Bengio, https://proceedings.mlr.press/v9/glorot10a.html). A std that shrinks
layer by layer means vanishing signals; a ReLU whose zero fraction climbs towards 1 is dying; a tanh/sigmoid whose
saturated fraction is high passes almost no gradient back.

Hooks: `on_batch` (register the forward hooks before the first micro-batch of a measured step), `on_loss` (remove
them right after that forward), `fit_end` (remove any that are left).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from framework.errors import ConfigError, require, require_int
from framework.state import TrainState
from framework.technique import Technique, register

#: The layers measured when `modules` is empty: every Linear and convolution (pre-activations) and every activation
#: layer (what the next layer receives). Activations called as functions (`F.relu`) are not modules and not seen.
DEFAULT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, _ConvNd,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softsign, nn.Softplus, nn.LogSigmoid,
)


def output_bounds(module: nn.Module) -> tuple[float, float] | None:
    """The output range of a bounded activation layer (where saturation means something), else None.

    Hardtanh's bounds are its arguments, read from the module (ReLU6 is a Hardtanh with bounds 0 and 6).
    """
    if isinstance(module, nn.Hardtanh):  # also ReLU6
        return float(module.min_val), float(module.max_val)
    if isinstance(module, (nn.Tanh, nn.Softsign)):
        return -1.0, 1.0
    if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)):
        return 0.0, 1.0
    return None


@torch.no_grad()
def activation_stats(output: torch.Tensor, saturation: float | None = None,
                     bounds: tuple[float, float] = (-1.0, 1.0)) -> dict[str, torch.Tensor]:
    """Summary statistics of one layer's output, as 0-dim fp32 tensors on its device (no host sync).

    Args:
        output: the layer's output, any shape and floating dtype (bf16/fp16 are measured in fp32).
        saturation: when given, also the fraction of outputs within `1 - saturation` of either bound, measured
            on the range mapped to [-1, 1]: for tanh (bounds -1, 1) and 0.99 that is |x| ≥ 0.99; for a sigmoid
            (bounds 0, 1) it is x ≤ 0.005 or x ≥ 0.995, the same pre-activations (σ(z) = (1 + tanh(z / 2)) / 2).
        bounds: the layer's output range (see `output_bounds`).

    Returns:
        "mean"; "std" (population std, over every element of the batch); "zeros" (fraction exactly 0: dead ReLU
        outputs); and "saturated" when `saturation` is given.
    """
    x = output.detach().float()
    std, mean = torch.std_mean(x, correction=0)
    stats = {"mean": mean, "std": std, "zeros": (x == 0).float().mean()}
    if saturation is not None:
        low, high = bounds
        half_range = (high - low) / 2
        centred = (x - (low + high) / 2).abs() / half_range  # in [0, 1] inside the bounds
        stats["saturated"] = (centred >= saturation).float().mean()
    return stats


def _first_tensor(output: Any) -> torch.Tensor | None:
    """A module's output tensor (the first element of a tuple/list output, e.g. an RNN's), if it is a float tensor."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) and output.is_floating_point() else None


def select_layers(model: nn.Module, patterns: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to measure: matching `patterns` (class names or fnmatch patterns on module names),
    or, with no patterns, the leaf modules of the `DEFAULT_LAYERS` classes. The model itself is never chosen."""
    chosen = []
    for name, module in model.named_modules():
        if not name:
            continue
        if patterns:
            if any(type(module).__name__ == p or fnmatch.fnmatchcase(name, p) for p in patterns):
                chosen.append((name, module))
        elif isinstance(module, DEFAULT_LAYERS) and next(module.children(), None) is None:
            chosen.append((name, module))
    return chosen


@register("activation_stats")
class ActivationStats(Technique):
    """Log per-layer activation statistics every `every` optimizer steps.

    The forward hooks exist only during the one forward pass that is measured (the first micro-batch of steps
    `every`, `2·every`, …): registered in `on_batch`, removed in `on_loss`, so the other steps run without any hook
    (no Python call per layer, and evaluation forwards are never measured). They are removed before backward, so
    gradient checkpointing's recomputation does not measure a layer twice. A module called twice in one forward (a
    shared activation layer) is measured at its first call.

    Logs `activations/<layer>/{mean,std,zeros}` (and `/saturated` for bounded activations) as device tensors, written
    at the next log line: choose `every` as a multiple of `log_every` so they land on their own step. Under several
    processes the values are the main process's micro-batch (no all-reduce). With `compile`, adding and removing
    hooks makes torch.compile check its guards again and may recompile on measured steps: use a large `every`.

    Args:
        every: optimizer steps between measurements (≥ 1).
        modules: class names (`"ReLU"`, `"Conv2d"`) or fnmatch patterns on module names (`"blocks.*.mlp.fc"`). Empty
            (the default): every leaf Linear, convolution and activation layer (`DEFAULT_LAYERS`).
        saturation: the saturated fraction of tanh, sigmoid, softsign, hardtanh, hardsigmoid and ReLU6 outputs is
            the share within `1 - saturation` of either end of their range (0.99: |tanh| ≥ 0.99); None: not measured.
            Unbounded layers (Linear, ReLU, GELU, …) have no saturation and never log it.
    """

    def __init__(self, every: int = 100, modules: list[str] | None = None, saturation: float | None = 0.99):
        require_int("activation_stats.every", every, 1)
        require(saturation is None or 0.0 < saturation <= 1.0,
                f"activation_stats.saturation must be within (0, 1] or null, got {saturation}.")
        self.every = every
        self.modules = list(modules or [])
        self.saturation = saturation
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self._measured_step = -1  # the step whose forward was measured (once per step under accumulation)
        self._seen: set[str] = set()

    def _layers(self, state: TrainState) -> list[tuple[str, nn.Module]]:
        # Names as in the user's model: without DDP's `module.` or torch.compile's `_orig_mod.` prefixes.
        model = state.accelerator.unwrap_model(state.model, keep_torch_compile=False)
        layers = select_layers(model, self.modules)
        if not layers:
            kinds = sorted({type(m).__name__ for m in model.modules()})
            raise ConfigError(f"activation_stats: no module of {type(model).__name__} matches "
                              f"{self.modules or 'the default layers'}; its module classes are {', '.join(kinds)}.")
        return layers

    def fit_start(self, state: TrainState) -> None:
        self._layers(state)  # refuse patterns that match nothing before the first step, not at step `every`

    def on_batch(self, state: TrainState, batch: Any) -> Any:
        step = state.step + 1  # the optimizer step this micro-batch belongs to
        if step % self.every == 0 and step != self._measured_step:
            self._measured_step = step
            self._seen = set()
            for name, module in self._layers(state):
                self.handles.append(module.register_forward_hook(self._hook(state, name, output_bounds(module))))
        return batch

    def _hook(self, state: TrainState, name: str, bounds: tuple[float, float] | None):
        saturation = self.saturation if bounds is not None else None

        def measure(module: nn.Module, inputs: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is None or name in self._seen:
                return
            self._seen.add(name)
            # Computed now, not later: an in-place activation (ReLU(inplace=True)) overwrites this output next.
            stats = activation_stats(tensor, saturation, bounds or (-1.0, 1.0))
            state.log(**{f"activations/{name}/{key}": value for key, value in stats.items()})

        return measure

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def on_loss(self, state: TrainState, loss: torch.Tensor, batch: Any, outputs: Any) -> torch.Tensor:
        self.remove_hooks()  # the measured forward is over; backward (and any recomputation) runs hook-free
        return loss

    def fit_end(self, state: TrainState) -> None:
        self.remove_hooks()
