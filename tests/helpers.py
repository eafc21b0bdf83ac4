"""Shared test helpers (benchmarks/common.py uses the launch ones too): launching real processes, resetting
accelerate's singletons, tiny data, a tiny Trainer and TrainState, a plain model's accuracy."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from framework.technique import Technique

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
    # The repository first; a PYTHONPATH already set stays behind it (the GPU check's wheels live on one).
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": path, **(env or {})}
    environment.pop("WORLD_SIZE", None)
    return environment


def launch_command(script: str | Path, *args: str, launch_config: str | Path = "cpu.yaml",
                   launcher_args: tuple[str, ...] = (), one_thread: bool = True) -> list[str]:
    """`accelerate launch --config_file launch_configs/<launch_config> [--num_cpu_threads_per_process 1]
    [launcher_args] script args...` as a command line (`one_thread=False`: as a user types it, without the flag)."""
    threads = ["--num_cpu_threads_per_process", "1"] if one_thread else []
    # A free port for each launch instead of the config's fixed one, so launches that overlap (another test
    # session, a benchmark) never meet at the rendezvous with "address already in use".
    port = [] if "--main_process_port" in launcher_args else ["--main_process_port", str(free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "launch_configs" / launch_config), *threads, *port, *launcher_args, str(script), *args]


def free_port() -> int:
    """A TCP port that nothing listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(script: str | Path, *args: str, launch_config: str | Path = "cpu.yaml", timeout: int = 600,
           env: dict[str, str] | None = None, launcher_args: tuple[str, ...] = (),
           check: bool = False) -> subprocess.CompletedProcess:
    """Run `accelerate launch --config_file launch_configs/<launch_config> [launcher_args] script args...` for real.
    A failed launch prints the ends of its output; with `check=True` it raises RuntimeError holding them instead."""
    command = launch_command(script, *args, launch_config=launch_config, launcher_args=launcher_args)
    # A session of its own: a test can kill the whole launch (launcher and ranks) as a crash would, and only it.
    result = subprocess.run(command, cwd=ROOT, env=launch_environment(env), capture_output=True, text=True,
                            timeout=timeout, start_new_session=True)
    if result.returncode != 0:
        if check:
            raise command_failed(command, result)
        print(result.stdout[-5000:], result.stderr[-10000:], sep="\n")
    return result


def command_failed(command: list[str], result: subprocess.CompletedProcess) -> RuntimeError:
    """The error for a command that exited non-zero, holding the ends of its output."""
    return RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                        f"{result.stderr[-6000:]}")


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


# --- in-process training --------------------------------------------------------------------------------------------
def make_trainer(tmp_path, techniques=(), batch_size=2, n=8, accumulation=1, epochs=2, shuffle=False, lr=0.1,
                 accelerator=None, **config):
    """A Trainer for a Linear(4, 3) classifier on `n` tiny samples (SGD with momentum, no tracker, logs every step)."""
    from torch.utils.data import DataLoader

    from framework.config import TrainerConfig
    from framework.loop import Trainer
    from framework.task import ClassificationTask

    torch.manual_seed(0)
    data = tiny_classification_data(n)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    config = TrainerConfig(output_dir=str(tmp_path), epochs=epochs, tracker="none", log_every=1,
                           gradient_accumulation_steps=accumulation, **config)
    loader = DataLoader(data, batch_size=batch_size, shuffle=shuffle)
    return Trainer(config, model, optimizer, ClassificationTask(num_classes=3), loader,
                   DataLoader(data[:4], batch_size=2), DataLoader(data[4:], batch_size=2), techniques=list(techniques),
                   accelerator=accelerator)


def tiny_state(tmp_path, model=None, lr=0.1):
    """A TrainState around `model` (default: Linear(3, 4) → BatchNorm1d → Linear(4, 2)) and SGD, prepared on CPU."""
    from accelerate import Accelerator

    from framework.state import TrainState

    model = model or torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    return TrainState(accelerator, model, optimizer, tmp_path, steps_per_epoch=10, max_steps=100)


def plain_accuracy(weights_file) -> float:
    """Test accuracy of a plain single-process ResNet loaded (strictly) from an exported safetensors file."""
    from safetensors.torch import load_file

    from framework.data import ImageDataConfig, image_data
    from framework.models.resnet import ResNet, ResNetConfig

    model = ResNet(ResNetConfig())
    model.load_state_dict(load_file(weights_file))
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in image_data(ImageDataConfig(num_workers=0)).loaders["test"]:
            correct += (model(batch["pixel_values"]).argmax(-1) == batch["label"]).sum().item()
            total += len(batch["label"])
    return correct / total


def scaled_accelerator(init_scale: float):
    """A CPU Accelerator with a real fp16 GradScaler starting at `init_scale`."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)  # prepare() hands it to the optimizer
    return accelerator


class LossTimes(Technique):
    """Multiplies the loss, so that the scaled gradients overflow float32."""

    def __init__(self, factor: float):
        self.factor = factor

    def on_loss(self, state, loss, batch, outputs):
        return loss * self.factor


class PeakTensorBytes(TorchDispatchMode):
    """Every tensor storage that an ATen op allocates under this mode, forward and backward, and the high-water mark
    of those still alive. Deterministic (allocations, not the process's RSS, which the allocator's page reuse and
    other processes' load made flaky), and what a GPU's `max_memory_allocated` would count."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.counted: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.counted:  # a view of a counted storage allocates nothing
                    self.counted.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.counted.discard(key)
        self.live -= nbytes
