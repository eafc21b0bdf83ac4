"""Draw every LR schedule, with and without linear warmup, side by side on one figure (no training).

    python recipes/lr_schedules.py [--epochs 30] [--warmup_epochs 3] [--output_dir outputs/lr_schedules]

Writes output_dir/lr_schedules.png.
"""

import os
from dataclasses import dataclass

from framework.config import parse_config, run_main
from framework.plots import plot_lr_curves
from framework.techniques import (
    CosineLR,
    CosineRestartsLR,
    ExponentialLR,
    MultiStepLR,
    OneCycleLR,
    PlateauLR,
    StepLR,
    schedule_lrs,
)


@dataclass
class LRSchedulesConfig:
    """Draw all LR schedules."""

    output_dir: str = "outputs/lr_schedules"
    """The figure is written to output_dir/lr_schedules.png."""
    epochs: int = 30
    """Length of the drawn run in epochs."""
    steps_per_epoch: int = 20
    """Optimizer steps per epoch of the drawn run."""
    warmup_epochs: float = 3.0
    """Epochs of linear warmup in the second curve of each panel (the first has none)."""
    lr: float = 0.1
    """The optimizer's (peak) learning rate."""


def schedules(warmup_epochs: float | None) -> dict:
    """One of each schedule, with settings a user might pick for a 30-epoch run."""
    return {
        "step_lr (every 10 epochs ×0.1)": StepLR(step_size_epochs=10, warmup_epochs=warmup_epochs),
        "multistep_lr (epochs 15, 25)": MultiStepLR(milestones_epochs=[15, 25], warmup_epochs=warmup_epochs),
        "exponential_lr (×0.9 per epoch)": ExponentialLR(gamma=0.9, warmup_epochs=warmup_epochs),
        "cosine_lr": CosineLR(warmup_epochs=warmup_epochs),
        "cosine_restarts_lr (5 epochs, ×2)": CosineRestartsLR(cycle_epochs=5, cycle_mult=2, warmup_epochs=warmup_epochs),
        "plateau_lr (loss stalls after epoch 10)": PlateauLR(patience=3, warmup_epochs=warmup_epochs),
        "onecycle_lr": OneCycleLR(warmup_epochs=warmup_epochs),
    }


def main() -> None:
    config = parse_config(LRSchedulesConfig)
    total = config.epochs * config.steps_per_epoch

    def validation_loss(epoch: int) -> float:  # improves for 10 epochs, then stalls: what plateau_lr reacts to
        return 1.0 / min(epoch, 10)

    panels = {}
    for (title, plain), warmed in zip(schedules(None).items(), schedules(config.warmup_epochs).values()):
        panels[title] = {
            "no warmup": schedule_lrs(plain, config.steps_per_epoch, total, config.lr, validation_loss),
            f"{config.warmup_epochs:g} warmup epochs": schedule_lrs(warmed, config.steps_per_epoch, total, config.lr,
                                                                   validation_loss),
        }
    output = os.path.join(config.output_dir, "lr_schedules.png")
    print(f"wrote {plot_lr_curves(panels, output, config.steps_per_epoch)}")


if __name__ == "__main__":
    run_main(main)
