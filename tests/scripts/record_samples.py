"""Train a Linear on 40 indexed samples and record which samples each rank trained on, per epoch, to
output_dir/samples_rank{R}.jsonl (appended across restarts), so a test can check that a resume on another world
size trains every sample of the interrupted epoch exactly once.

    accelerate launch --config_file launch_configs/multi_cpu.yaml tests/scripts/record_samples.py OUTPUT_DIR \
        MAX_STEPS [--resume]
"""

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py

from framework.config import TrainerConfig, run_main  # noqa: E402
from framework.loop import Trainer  # noqa: E402
from framework.task import ClassificationTask  # noqa: E402
from framework.technique import Technique  # noqa: E402
from helpers import tiny_classification_data  # noqa: E402


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
    model = torch.nn.Linear(4, 3)
    config = TrainerConfig(output_dir=output_dir, epochs=3, max_steps=max_steps, tracker="none", doctor=False,
                           checkpoint_every=1, resume_from="latest" if "--resume" in sys.argv else None)
    Trainer(config, model, torch.optim.SGD(model.parameters(), lr=0.1), ClassificationTask(num_classes=3),
            DataLoader(data, batch_size=4, shuffle=True), techniques=[RecordSamples()]).fit()


if __name__ == "__main__":
    run_main(main)
