"""Shared test helpers: launching real processes, resetting accelerate's singletons, tiny data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; a test that builds two Accelerators resets them in between."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny_classification_data(n: int = 32, features: int = 4, classes: int = 3, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, features, generator=generator)
    labels = torch.randint(0, classes, (n,), generator=generator)
    return [{"pixel_values": x, "label": y} for x, y in zip(inputs, labels)]


def launch_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    environment = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), **(env or {})}
    environment.pop("WORLD_SIZE", None)
    return environment


def launch(script: str | Path, *args: str, launch_config: str | Path = "cpu.yaml", timeout: int = 600,
           env: dict[str, str] | None = None, launcher_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `accelerate launch --config_file launch_configs/<launch_config> [launcher_args] script args...` for real."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "launch_configs" / launch_config), "--num_cpu_threads_per_process", "1", *launcher_args,
               str(script), *args]
    # A session of its own: a test can kill the whole launch (launcher and ranks) as a crash would, and only it.
    result = subprocess.run(command, cwd=ROOT, env=launch_environment(env), capture_output=True, text=True,
                            timeout=timeout, start_new_session=True)
    if result.returncode != 0:
        print(result.stdout[-5000:], result.stderr[-10000:], sep="\n")
    return result


def load_recipe(name: str):
    """A recipe script (recipes/NAME.py) as a module, registered in sys.modules so its config's type hints resolve
    as they do for a script run as __main__."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def assert_same_weights(first_dir: Path, second_dir: Path,
                        names: tuple[str, ...] = ("model.safetensors", "model_ema.safetensors")) -> None:
    """The runs in two output directories ended with bitwise the same weights."""
    from safetensors.torch import load_file

    for name in names:
        first, second = load_file(first_dir / name), load_file(second_dir / name)
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), f"{name}: {key} differs from the uninterrupted run"
