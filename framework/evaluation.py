"""A model's metrics on a loader, over all ranks' samples, each counted once."""

from __future__ import annotations

from collections import defaultdict

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from framework.data.loaders import to_channels_last
from framework.task import Task


@torch.no_grad()
def evaluate_model(accelerator: Accelerator, model: torch.nn.Module, task: Task, loader: DataLoader,
                   channels_last: bool = False) -> dict[str, float]:
    """The task's metrics of `model` on `loader`. accelerate's `gather_for_metrics` collects every rank's per-sample
    outputs and drops the samples it repeated to fill the last batch, so each sample counts once."""
    model.eval()
    collected: dict[str, list[torch.Tensor]] = defaultdict(list)
    for batch in loader:
        if channels_last:
            batch = to_channels_last(batch)
        outputs = task.forward(model, batch)
        for name, values in accelerator.gather_for_metrics(task.eval_outputs(outputs, batch)).items():
            collected[name].append(values)
    model.train()
    return task.compute_metrics({name: torch.cat(values) for name, values in collected.items()})
