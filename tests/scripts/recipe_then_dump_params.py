"""Run a recipe (the image recipe, or the one named by $DUMP_RECIPE) as `accelerate launch` would, with test-only
techniques a test switches on from the command line:

- `--techniques.dump_params '{}'`: write this rank's final parameters (whole tensors, gathered under ZeRO-3) to
  output_dir/params_rank{N}.safetensors, so a test can compare the ranks;
- `--techniques.kill_at '{step: S}'`: SIGKILL the whole launch (its process group) after optimizer step S;
- `--techniques.kill_while_saving '{step: S}'`: SIGKILL it while the checkpoint of step S is half written;
- `--techniques.sigterm_at '{step: S, rank: R}'`: send SIGTERM to rank R only, after step S;
- `--techniques.nan_at '{step: S, rank: R, times: K}'`: make rank R's loss NaN on the first K batches at step S,
  and write output_dir/nan_rank{N}.json saying whether the weights changed across the first of them;
- `--techniques.pace '{seconds: T}'`: sleep T seconds after every optimizer step, so a test can signal the launch
  mid-run (it watches step_rank0).
Every rank writes its latest step to output_dir/step_rank{N}.
"""

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import framework.checkpoint
from framework.technique import Technique, register


@register("dump_params")
class DumpParams(Technique):
    def fit_end(self, state):
        model = state.accelerator.unwrap_model(state.model)
        named = dict(model.named_parameters())
        if any(hasattr(p, "ds_tensor") for p in named.values()):
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(named.values())):
                tensors = {name: p.detach().clone() for name, p in named.items()}
        else:
            tensors = {name: p.detach().clone() for name, p in named.items()}
        rank = state.accelerator.process_index
        save_file({k: v.float().contiguous() for k, v in tensors.items()},
                  str(state.output_dir / f"params_rank{rank}.safetensors"))


def kill_launch() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)  # the test starts the launch in a session of its own


@register("kill_at")
class KillAt(Technique):
    def __init__(self, step: int):
        self.step = step

    def after_optimizer_step(self, state):
        (state.output_dir / f"step_rank{state.accelerator.process_index}").write_text(str(state.step))
        if state.step == self.step and state.accelerator.is_main_process:
            kill_launch()


@register("kill_while_saving")
class KillWhileSaving(Technique):
    def __init__(self, step: int):
        flush_and_list = framework.checkpoint._flush_and_list

        def flush_then_die(path):  # accelerate has written the files; the marker and the rename are still to come
            if path.name == f".tmp_step_{step:08d}":
                kill_launch()
            return flush_and_list(path)

        framework.checkpoint._flush_and_list = flush_then_die


@register("sigterm_at")
class SigtermAt(Technique):
    def __init__(self, step: int, rank: int = 0):
        self.step, self.rank = step, rank

    def after_optimizer_step(self, state):
        (state.output_dir / f"step_rank{state.accelerator.process_index}").write_text(str(state.step))
        if state.step == self.step and state.accelerator.process_index == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)


@register("pace")
class Pace(Technique):
    def __init__(self, seconds: float = 0.2):
        self.seconds = seconds

    def after_optimizer_step(self, state):
        (state.output_dir / f"step_rank{state.accelerator.process_index}").write_text(str(state.step))
        time.sleep(self.seconds)


@register("nan_at")
class NanAt(Technique):
    def __init__(self, step: int, rank: int = 0, times: int = 1):
        self.step, self.rank, self.times = step, rank, times
        self.snapshot = None

    def on_loss(self, state, loss, batch, outputs):
        if state.step != self.step or self.times == 0:
            return loss
        self.times -= 1
        if self.snapshot is None:
            self.snapshot = [p.detach().clone() for p in state.model.parameters()]
        return loss * float("nan") if state.accelerator.process_index == self.rank else loss

    def batch_end(self, state, logs):
        if self.snapshot is not None and not isinstance(self.snapshot, bool):
            unchanged = all(torch.equal(a, p) for a, p in zip(self.snapshot, state.model.parameters()))
            report = {"step": state.step, "weights_unchanged": unchanged}
            (state.output_dir / f"nan_rank{state.accelerator.process_index}.json").write_text(json.dumps(report))
            self.snapshot = True


name = os.environ.get("DUMP_RECIPE", "image_classification")
path = Path(__file__).resolve().parents[2] / "recipes" / f"{name}.py"
spec = importlib.util.spec_from_file_location(name, path)
recipe = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = recipe  # type hints resolve through sys.modules, as for a script run as __main__
spec.loader.exec_module(recipe)
recipe.run_main(lambda: recipe.main(sys.argv[1:]))
