"""A Task is what varies between kinds of training (classification, language modelling, GANs): forward, loss,
evaluation outputs. The loop stays the same."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class Task:
    """Base class. `eval_outputs` returns per-sample tensors; the loop gathers them over ranks (dropping the samples
    a distributed sampler duplicated) and `compute_metrics` reduces them."""

    def forward(self, model: torch.nn.Module, batch: Any) -> Any:
        raise NotImplementedError

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def eval_outputs(self, outputs: Any, batch: Any) -> dict[str, torch.Tensor]:
        return {"loss": self.loss(outputs, batch).reshape(1)}

    def compute_metrics(self, gathered: dict[str, torch.Tensor]) -> dict[str, float]:
        return {name: values.float().mean().item() for name, values in gathered.items()}

    def batch_size(self, batch: Any) -> int:
        """Samples in this batch on this rank (for throughput and `samples_seen`)."""
        raise NotImplementedError


class ClassificationTask(Task):
    """Images (or any inputs) to class logits with cross-entropy.

    Args:
        input_key / target_key: the batch's keys for inputs and integer (or soft, float) targets.
        label_smoothing: ε of `torch.nn.functional.cross_entropy` for training; evaluation reports the plain loss.
    """

    def __init__(self, input_key: str = "pixel_values", target_key: str = "label", label_smoothing: float = 0.0):
        self.input_key = input_key
        self.target_key = target_key
        self.label_smoothing = label_smoothing

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch[self.input_key])

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(outputs, batch[self.target_key], label_smoothing=self.label_smoothing)

    def eval_outputs(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        target = batch[self.target_key]
        return {
            "loss": F.cross_entropy(outputs.float(), target, reduction="none"),
            "accuracy": (outputs.argmax(dim=-1) == target).float(),
        }

    def batch_size(self, batch: dict[str, torch.Tensor]) -> int:
        return batch[self.target_key].shape[0]
