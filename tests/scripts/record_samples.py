"""Train a Linear on 40 indexed samples and record which samples each rank trained on, per epoch, to
output_dir/samples_rank{R}.jsonl (appended across restarts), so a test can check that a resume on another world
size trains every sample of the interrupted epoch exactly once.

    accelerate launch --config_file launch_configs/multi_cpu.yaml tests/scripts/record_samples.py OUTPUT_DIR \
        MAX_STEPS [--resume] [--adamw]

--adamw: a Linear and a BatchNorm (buffers too) trained by AdamW with a decay and a no-decay group (the framework's
default optimizer), whose moments DeepSpeed's universal checkpoint carries; and the full fp32 weights, buffers and
Adam state written right after a resume's load (state_after_resume.pt), so a test can compare them with the
checkpoint's. Without it: a Linear trained by SGD without momentum.
"""

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py

from framework.config import TrainerConfig, run_main  # noqa: E402
from framework.loop import Trainer  # noqa: E402
from framework.optim import weight_decay_groups  # noqa: E402
from framework.task import ClassificationTask  # noqa: E402
from framework.technique import Technique  # noqa: E402
from helpers import tiny_classification_data  # noqa: E402


def full_state(state) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 value, exp_avg and exp_avg_sq, the buffers and the Adam step, gathered whole from
    whichever backend holds them (DeepSpeed's ZeRO shards through its public accessors; every rank must call)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    model, result = state.model, {}
    deepspeed = hasattr(model, "zero_optimization")
    inner = state.optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    for name, parameter in model.named_parameters():
        name = name.removeprefix("module.")
        if deepspeed:
            result[name] = safe_get_full_fp32_param(parameter)
            for key in ("exp_avg", "exp_avg_sq"):
                result[f"{name}.{key}"] = safe_get_full_optimizer_state(parameter, key)
        else:
            result[name] = parameter.detach().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                result[f"{name}.{key}"] = inner.state[parameter][key].clone()
    for name, buffer in model.named_buffers():
        result[name.removeprefix("module.")] = buffer.detach().clone()
    result["step"] = torch.as_tensor(next(iter(inner.state.values()))["step"], dtype=torch.float32)
    return result


class DumpState(Technique):
    def __init__(self):
        self.first = True

    def on_batch(self, state, batch):
        if self.first and state.step > 0:  # a resumed run, its state just loaded
            values = full_state(state)
            if state.accelerator.is_main_process:
                torch.save({k: v.detach().cpu().float() for k, v in values.items()},
                           state.output_dir / "state_after_resume.pt")
        self.first = False
        return batch


class RecordSamples(Technique):
    def on_batch(self, state, batch):
        rank = state.accelerator.process_index
        with open(state.output_dir / f"samples_rank{rank}.jsonl", "a") as file:
            file.write(json.dumps({"epoch": state.epoch, "indices": batch["index"].tolist()}) + "\n")
        return batch


def main():
    output_dir, max_steps = sys.argv[1], int(sys.argv[2])
    data = [{**sample, "index": torch.tensor(i)} for i, sample in enumerate(tiny_classification_data(40))]
    torch.manual_seed(0)
    adamw = "--adamw" in sys.argv
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)) if adamw else torch.nn.Linear(4, 3)
    config = TrainerConfig(output_dir=output_dir, epochs=3, max_steps=max_steps, tracker="none", doctor=False,
                           checkpoint_every=1, resume_from="latest" if "--resume" in sys.argv else None)
    optimizer = (torch.optim.AdamW(weight_decay_groups(model, 0.05), lr=0.01) if adamw
                 else torch.optim.SGD(model.parameters(), lr=0.1))
    techniques = [RecordSamples(), *([DumpState()] if adamw else [])]
    Trainer(config, model, optimizer, ClassificationTask(num_classes=3),
            DataLoader(data, batch_size=4, shuffle=True), techniques=techniques).fit()


if __name__ == "__main__":
    run_main(main)
