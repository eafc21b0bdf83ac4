"""The Trainer's modes that train nothing: `--preview_lr` (the schedules drawn), `--find_lr` (the LR range test) and
`--evaluate_only` (a finished run's saved weights evaluated on the run's own validation and test data, through the
launched backend)."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Callable
from typing import Any

from safetensors.torch import load_file

from framework.backend import weights_swapped_in
from framework.errors import ConfigError
from framework.lr_finder import find_lr
from framework.techniques.lr_schedule import preview_lr


def mode_instead_of_training(trainer: Any) -> Callable[[], dict[str, Any]] | None:
    """The mode the config asks for in place of training (called once the model and data are prepared), or None."""
    config = trainer.config
    if config.preview_lr:
        return lambda: preview_lr(trainer)
    if config.find_lr:
        return lambda: find_lr(trainer)
    if config.evaluate_only:
        return lambda: evaluate_saved_weights(trainer, trainer.state.output_dir / "model.safetensors")
    return None


def evaluate_saved_weights(trainer: Any, path: Path) -> dict[str, float]:
    """The validation and test metrics of the weights in `path` (a finished run's model.safetensors) on `trainer`'s
    data, printed and written to output_dir/evaluation.json. Nothing is trained or deleted."""
    if not path.is_file():
        raise ConfigError(f"--evaluate_only true reads the weights of a finished run, but {path} does not exist: "
                          "point --output_dir at a run directory that holds model.safetensors.")
    accelerator, state = trainer.accelerator, trainer.state
    results: dict[str, float] = {}
    with weights_swapped_in(accelerator, state.model, load_file(path)):
        for split in ("val", "test"):
            if trainer.data[split] is not None:
                results.update(trainer.evaluate(trainer.data[split], split, hooks=False))
    if accelerator.is_main_process:
        (state.output_dir / "evaluation.json").write_text(
            json.dumps({"weights": str(path), "metrics": results}, indent=2) + "\n")
        print(f"evaluated {path}:\n" + "\n".join(f"{k:>18s} = {v:.4f}" for k, v in results.items()))
    accelerator.end_training()
    return results
