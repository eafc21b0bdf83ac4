"""The LR range test (Smith, https://arxiv.org/abs/1506.01186; fastai's `lr_find`): train for a few hundred steps
while the LR grows exponentially, watch the smoothed loss, and suggest an LR.

Two suggestions are shown: where the smoothed loss falls fastest (steepest descent against log LR), and a tenth of
the LR at the smoothed loss's minimum. The sweep stops when the smoothed loss exceeds `diverge` times its best.
Model and optimizer are restored afterwards. Under DDP the loss is averaged over ranks at every step, so every rank
computes the same suggestion. Run it from a recipe with `--find_lr true`: a run mode of the Trainer with a loop of
its own (like `--preview_lr` and `--evaluate_only`), not a technique.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import numpy as np
import torch

from framework.errors import IncompatibleError
from framework.plots import plot_lr_finder


def lr_sweep(start_lr: float, end_lr: float, steps: int) -> list[float]:
    """`steps` LRs growing exponentially from `start_lr` to `end_lr`."""
    return np.geomspace(start_lr, end_lr, steps).tolist()


def smooth(losses: list[float], beta: float = 0.98) -> list[float]:
    """Exponential moving average with bias correction (the first values are not pulled toward 0)."""
    average, smoothed = 0.0, []
    for step, loss in enumerate(losses, 1):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta**step))
    return smoothed


def suggest_lrs(lrs: list[float], smoothed: list[float], skip_start: int = 10, skip_end: int = 5) -> dict[str, float]:
    """`steepest`: the LR where the smoothed loss falls fastest against log LR; `minimum_over_10`: a tenth of the
    LR with the lowest smoothed loss. The first `skip_start` and last `skip_end` points are left out (batch noise
    at the start, divergence at the end), as fastai does, when enough points remain."""
    if len(lrs) > skip_start + skip_end + 2:
        lrs, smoothed = lrs[skip_start:len(lrs) - skip_end], smoothed[skip_start:len(smoothed) - skip_end]
    gradient = np.gradient(np.asarray(smoothed), np.log(np.asarray(lrs)))
    return {"steepest": float(lrs[int(np.argmin(gradient))]),
            "minimum_over_10": float(lrs[int(np.argmin(smoothed))] / 10)}


def find_lr(trainer: Any, start_lr: float = 1e-6, end_lr: float = 10.0, steps: int = 200, diverge: float = 4.0,
            beta: float = 0.98) -> dict[str, Any]:
    """Run the range test on a prepared trainer (model, optimizer and data wrapped by accelerate), restore model and
    optimizer, write lr_finder.png / lr_finder.json to the output directory and return the result."""
    accelerator, state, task = trainer.accelerator, trainer.state, trainer.task
    if accelerator.distributed_type.name == "DEEPSPEED":
        raise IncompatibleError("--find_lr sets and restores the optimizer's LR and state step by step, which the "
                                "DeepSpeed engine owns. Find the LR with multi_cpu.yaml or ddp.yaml, then launch "
                                "DeepSpeed with it.")
    saved_model = copy.deepcopy(accelerator.unwrap_model(state.model).state_dict())
    saved_optimizer = copy.deepcopy(state.optimizer.state_dict())
    base = state.optimizer.param_groups[0]["lr"]
    scales = [group["lr"] / base for group in state.optimizer.param_groups]  # layer-wise groups keep their ratios
    lrs, losses = lr_sweep(start_lr, end_lr, steps), []
    state.model.train()
    batches = iter(())
    for lr in lrs:
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(trainer.data["train"])
            batch = next(batches)
        for group, scale in zip(state.optimizer.param_groups, scales):
            group["lr"] = lr * scale
        loss = task.loss(task.forward(state.model, batch), batch)
        accelerator.backward(loss)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        losses.append(accelerator.reduce(loss.detach().float(), reduction="mean").item())
        smoothed = smooth(losses, beta)
        if not math.isfinite(smoothed[-1]) or (len(losses) > 10 and smoothed[-1] > diverge * min(smoothed)):
            break
    accelerator.unwrap_model(state.model).load_state_dict(saved_model)
    state.optimizer.load_state_dict(saved_optimizer)

    tried, smoothed = lrs[: len(losses)], smooth(losses, beta)
    suggestions = suggest_lrs(tried, smoothed)
    agreed = accelerator.gather(torch.tensor([suggestions["steepest"]], device=accelerator.device))
    assert torch.all(agreed == agreed[0]), f"ranks disagree on the LR: {agreed.tolist()}"
    result = {"suggestions": suggestions, "lrs": tried, "losses": losses, "smoothed": smoothed,
              "stopped_early": len(losses) < steps}
    if accelerator.is_main_process:
        state.output_dir.mkdir(parents=True, exist_ok=True)
        (state.output_dir / "lr_finder.json").write_text(json.dumps(result, indent=1) + "\n")
        path = plot_lr_finder(tried, losses, smoothed, suggestions, state.output_dir / "lr_finder.png")
        print(f"LR finder: steepest descent at {suggestions['steepest']:.2e}, minimum/10 at "
              f"{suggestions['minimum_over_10']:.2e} ({len(losses)} steps); wrote {path}")
    accelerator.end_training()
    return result

