"""Mixup (Zhang et al., https://arxiv.org/abs/1710.09412) and CutMix (Yun et al., https://arxiv.org/abs/1905.04899):
train on convex combinations of pairs of samples and of their one-hot targets.

Mixup blends whole inputs, x' = λ·x + (1 − λ)·x[perm]; CutMix pastes a box of x[perm] into x and weights the
targets by the area actually pasted. λ ~ Beta(α, α) once per batch; the partner of each sample is a random
permutation of the batch. One technique, `mixup`, switches between the two per batch (`cutmix_alpha`,
`switch_prob`); `cutmix` is the same technique with CutMix-only defaults.

Hook: `on_batch` (training batches only, before forward; evaluation batches are never mixed). Outside the loop,
`mix_batch(inputs, targets, num_classes, ..., generator=g)` does the same to plain tensors.

Mixing has no label smoothing of its own: list `label_smoothing` next to it. Smoothing is linear in the targets, so
mixing then smoothing equals smoothing then mixing, and the targets are smoothed exactly once in either order.
Training accuracy under mixing is measured against the dominant label (`framework.task.dominant_label`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from framework.backend import Backend
from framework.errors import ConfigError, IncompatibleError, require
from framework.state import TrainState
from framework.technique import Technique, register


def one_hot_targets(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices (B,) as float one-hot rows (B, C); soft (floating-point) targets are returned unchanged."""
    if target.is_floating_point():
        return target
    return F.one_hot(target, num_classes).float()


def mixup_batch(
    inputs: torch.Tensor, targets_soft: torch.Tensor, lam: float | torch.Tensor, permutation: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup: λ·x + (1 − λ)·x[perm] for the inputs (any shape, dtype kept) and the same for the soft targets."""
    mixed = (lam * inputs + (1 - lam) * inputs[permutation]).to(inputs.dtype)
    return mixed, lam * targets_soft + (1 - lam) * targets_soft[permutation]


def cutmix_box(
    height: int, width: int, lam: float, generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """A box (top, bottom, left, right) of area ≈ (1 − λ)·H·W, centre uniform over the image, clipped to it.

    Each side scales with its own image side (cut_h = H·√(1 − λ), cut_w = W·√(1 − λ)), so non-square images
    keep the intended area. Clipping at the border makes the box smaller: `cutmix_batch` corrects λ to the true
    area. The centre is drawn from `generator` (torch's global CPU RNG by default).
    """
    ratio = math.sqrt(1.0 - float(lam))
    cut_h, cut_w = round(height * ratio), round(width * ratio)
    centre_y = int(torch.randint(height, (), generator=generator))
    centre_x = int(torch.randint(width, (), generator=generator))
    top, left = centre_y - cut_h // 2, centre_x - cut_w // 2
    return (
        min(max(top, 0), height),
        min(max(top + cut_h, 0), height),
        min(max(left, 0), width),
        min(max(left + cut_w, 0), width),
    )


def cutmix_batch(
    inputs: torch.Tensor, targets_soft: torch.Tensor, box: tuple[int, int, int, int], permutation: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix: paste x[perm] into `box` of x (the last two dimensions are H, W); mix targets by the pasted area.

    Returns (inputs, targets, λ) with λ = 1 − box area / (H·W), the share of each sample that is still its own.
    """
    top, bottom, left, right = box
    height, width = inputs.shape[-2:]
    mixed = inputs.clone()
    # Index the box view, not the whole batch: only the pasted pixels are copied.
    mixed[..., top:bottom, left:right] = inputs[..., top:bottom, left:right][permutation]
    lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    return mixed, lam * targets_soft + (1 - lam) * targets_soft[permutation], lam


def sample_lambda(alpha: float, generator: torch.Generator | None = None) -> float:
    """λ ~ Beta(α, α), drawn from `generator` (a CPU generator; torch's global CPU RNG by default).

    The draw is torch's own Beta sampler (`Beta(α, α).sample()` is the first coordinate of a Dirichlet(α, α) draw),
    called with the generator, so without one it is the same number `torch.distributions.Beta` gives. On the CPU:
    no device sync, and the global RNG is seeded by `set_seed` and saved in checkpoints.
    """
    concentration = torch.tensor([alpha, alpha], dtype=torch.get_default_dtype())
    return float(torch._sample_dirichlet(concentration, generator=generator)[0])


def mix_batch(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    alpha: float = 0.2,
    cutmix_alpha: float = 0.0,
    switch_prob: float = 0.5,
    prob: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """Mix one batch with a permutation of itself: Mixup, CutMix, or a random switch between them.

    inputs (B, ...) (images (B, C, H, W) for CutMix) and targets (B,) class indices or (B, C) soft targets.
    Returns (inputs, soft targets (B, num_classes), λ), λ the share of each sample that is still its own
    (for CutMix corrected to the box's true area). A batch left unmixed (`prob`) comes back as it was, λ None.
    `alpha` / `cutmix_alpha` 0 turn Mixup / CutMix off; with both on, a batch uses CutMix with `switch_prob`.

    Every random number (the `prob` coin, the permutation, the switch, λ, the box's centre) is drawn from
    `generator` in that order, or from torch's global RNG when it is None (the permutation then on the inputs'
    device). The `mixup` technique calls this with no generator.
    """
    if prob < 1.0 and float(torch.rand((), generator=generator)) >= prob:
        return inputs, targets, None
    soft = one_hot_targets(targets, num_classes)
    device = inputs.device if generator is None else generator.device
    permutation = torch.randperm(inputs.shape[0], device=device, generator=generator).to(inputs.device)
    if cutmix_alpha > 0 and (alpha == 0 or float(torch.rand((), generator=generator)) < switch_prob):
        lam = sample_lambda(cutmix_alpha, generator)
        box = cutmix_box(inputs.shape[-2], inputs.shape[-1], lam, generator)
        return cutmix_batch(inputs, soft, box, permutation)
    lam = sample_lambda(alpha, generator)
    mixed, soft = mixup_batch(inputs, soft, lam, permutation)
    return mixed, soft, lam


def classification_keys(state: TrainState, who: str) -> tuple[int, str, str]:
    """(num_classes, input_key, target_key) of the run's task, or a ConfigError that names the fix."""
    task = state.task
    if not all(hasattr(task, key) for key in ("num_classes", "input_key", "target_key")):
        raise ConfigError(f"{who} builds soft targets and needs the number of classes, but the run's task "
                          f"({type(task).__name__}) has no num_classes. Use ClassificationTask(num_classes=...).")
    return task.num_classes, task.input_key, task.target_key


@register("mixup")
class Mixup(Technique):
    """Mix each training batch with a permutation of itself: Mixup, CutMix, or a per-batch switch between them.

    Hook: `on_batch`. Mixed batches get soft targets (B, num_classes); batches left unmixed (`prob`, `stop_epoch`)
    pass through unchanged with their original targets, which `F.cross_entropy` takes as well.

    Args:
        alpha: Mixup's λ ~ Beta(alpha, alpha); 0 turns Mixup off. 0.2-0.4 is typical for ImageNet.
        cutmix_alpha: CutMix's λ ~ Beta(cutmix_alpha, cutmix_alpha); 0 turns CutMix off (1.0 is the paper's).
            CutMix needs image inputs (B, C, H, W).
        switch_prob: when both are on, the probability that a batch uses CutMix rather than Mixup.
        prob: the probability that a batch is mixed at all.
        stop_epoch: from this epoch on (counted from 0) batches are no longer mixed, so the last epochs train
            on clean data; None mixes to the end.
    """

    def __init__(self, alpha: float = 0.2, cutmix_alpha: float = 0.0, switch_prob: float = 0.5, prob: float = 1.0,
                 stop_epoch: int | None = None):
        for key, value in (("alpha", alpha), ("cutmix_alpha", cutmix_alpha)):
            require(value >= 0, f"{self.name}.{key} must be >= 0 (0 turns it off), got {value}.")
        for key, value in (("switch_prob", switch_prob), ("prob", prob)):
            require(0.0 <= value <= 1.0,
                    f"{self.name}.{key} is a probability and must be within [0, 1], got {value}.")
        if alpha == 0 and cutmix_alpha == 0:
            raise ConfigError(f"{self.name}.alpha and {self.name}.cutmix_alpha are both 0, so nothing would be "
                              "mixed. Set alpha > 0 for Mixup and/or cutmix_alpha > 0 for CutMix.")
        require(stop_epoch is None or stop_epoch >= 0,
                f"{self.name}.stop_epoch must be >= 0 or null, got {stop_epoch}.")
        self.alpha = alpha
        self.cutmix_alpha = cutmix_alpha
        self.switch_prob = switch_prob
        self.prob = prob
        self.stop_epoch = stop_epoch

    def check(self, backend: Backend, others: Sequence[Technique]) -> None:
        if any(isinstance(other, Mixup) for other in others):
            raise IncompatibleError(
                "mixup and cutmix are both listed, so batches would be mixed twice. List only `mixup` and set its "
                "`cutmix_alpha` (and `switch_prob`) to switch between Mixup and CutMix per batch.")

    def fit_start(self, state: TrainState) -> None:
        classification_keys(state, self.name)

    def on_batch(self, state: TrainState, batch: dict[str, Any]) -> dict[str, Any]:
        if self.stop_epoch is not None and state.epoch >= self.stop_epoch:
            return batch
        num_classes, input_key, target_key = classification_keys(state, self.name)
        inputs = batch[input_key]
        if self.cutmix_alpha > 0 and inputs.dim() < 3:
            raise ConfigError(f"{self.name}: CutMix pastes boxes into images (B, C, H, W), but the inputs "
                              f"{input_key!r} have shape {tuple(inputs.shape)}. Set cutmix_alpha to 0.")
        inputs, targets, lam = mix_batch(inputs, batch[target_key], num_classes, self.alpha, self.cutmix_alpha,
                                         self.switch_prob, self.prob)
        if lam is None:  # left unmixed (`prob`)
            return batch
        return {**batch, input_key: inputs, target_key: targets}


@register("cutmix")
class CutMix(Mixup):
    """CutMix only: `mixup` with Mixup off and cutmix_alpha 1.0 (https://arxiv.org/abs/1905.04899). Hook: `on_batch`.

    To switch between Mixup and CutMix per batch, use `mixup` with `cutmix_alpha` instead; listing both is refused.
    """

    def __init__(self, alpha: float = 0.0, cutmix_alpha: float = 1.0, switch_prob: float = 0.5, prob: float = 1.0,
                 stop_epoch: int | None = None):
        super().__init__(alpha, cutmix_alpha, switch_prob, prob, stop_epoch)
