"""Two ranks with the default doctor (its values read with the log lines), logging every 5 steps: rank 1's loss alone
turns NaN at step 4, the last step before the log line at step 5 (rank 0's losses up to then are finite: the NaN
gradients reach its weights only in that step's update). Each rank that stops on NonFiniteLossError writes
OUTPUT_DIR/stopped_rank<N> (the step), waits for the other, and exits with 3.

    accelerate launch --config_file launch_configs/multi_cpu.yaml tests/scripts/nonfinite_on_one_rank.py OUTPUT_DIR
"""

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from framework.config import TrainerConfig
from framework.errors import NonFiniteLossError
from framework.loop import Trainer
from framework.task import ClassificationTask
from framework.technique import Technique
from framework.techniques.doctor import Doctor

NAN_STEP = 4


class NaNOnRank1(Technique):
    def on_batch(self, state, batch):
        if state.accelerator.process_index == 1 and state.step == NAN_STEP:
            return {**batch, "pixel_values": batch["pixel_values"] * float("nan")}
        return batch


def main(output_dir: str) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(64, 4, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    data = [{"pixel_values": x, "label": y} for x, y in zip(inputs, labels)]
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    config = TrainerConfig(output_dir=output_dir, epochs=2, tracker="none", log_every=5)
    trainer = Trainer(config, model, torch.optim.SGD(model.parameters(), lr=0.1), ClassificationTask(num_classes=3),
                      DataLoader(data, batch_size=4), techniques=[Doctor(), NaNOnRank1()])
    try:
        trainer.fit()
    except NonFiniteLossError:
        rank = trainer.accelerator.process_index
        (Path(output_dir) / f"stopped_rank{rank}").write_text(str(trainer.state.step))
        trainer.accelerator.wait_for_everyone()
        sys.exit(3)


if __name__ == "__main__":
    main(sys.argv[1])
