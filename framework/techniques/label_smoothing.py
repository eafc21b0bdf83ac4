"""Label smoothing (Szegedy et al., https://arxiv.org/abs/1512.00567): train towards (1 − ε)·target + ε/C instead
of a one-hot target, so the model is not pushed to infinitely confident logits.

Hook: `on_batch` (training batches only; validation loss stays against the true labels).

For index targets, cross-entropy against the smoothed targets equals `torch.nn.CrossEntropyLoss(label_smoothing=ε)`.
Soft targets (after Mixup / CutMix) are smoothed the same way; since smoothing is linear, listing it before or after
`mixup` gives the same targets, smoothed once.
"""

from __future__ import annotations

from typing import Any

import torch

from framework.errors import require
from framework.state import TrainState
from framework.technique import Technique, register
from framework.techniques.mixup import classification_keys, one_hot_targets


def smooth_targets(targets: torch.Tensor, num_classes: int, epsilon: float) -> torch.Tensor:
    """(1 − ε)·t + ε/C as float (B, C): `targets` are class indices (B,) or soft targets (B, C)."""
    return (1.0 - epsilon) * one_hot_targets(targets, num_classes) + epsilon / num_classes


@register("label_smoothing")
class LabelSmoothing(Technique):
    """Replace each training batch's targets by smoothed soft targets. Hook: `on_batch`.

    Args:
        epsilon: the probability mass spread uniformly over all classes (0.1 is the paper's).
    """

    def __init__(self, epsilon: float = 0.1):
        require(0.0 <= epsilon < 1.0, f"label_smoothing.epsilon must be within [0, 1), got {epsilon}.")
        self.epsilon = epsilon

    def fit_start(self, state: TrainState) -> None:
        classification_keys(state, self.name)

    def on_batch(self, state: TrainState, batch: dict[str, Any]) -> dict[str, Any]:
        num_classes, _, target_key = classification_keys(state, self.name)
        return {**batch, target_key: smooth_targets(batch[target_key], num_classes, self.epsilon)}
