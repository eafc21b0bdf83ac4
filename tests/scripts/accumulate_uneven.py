"""Train a Linear on tiny data with gradient accumulation whose last window per epoch is partial, then write the
final weights to output_dir/weights.safetensors (rank 0), so a test can compare them with one large batch.

    accelerate launch --config_file launch_configs/multi_cpu.yaml tests/scripts/accumulate_uneven.py \
        OUTPUT_DIR N BATCH_SIZE ACCUMULATION
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py

from framework.config import TrainerConfig  # noqa: E402
from framework.loop import Trainer  # noqa: E402
from framework.task import ClassificationTask  # noqa: E402
from helpers import tiny_classification_data  # noqa: E402

output_dir, n, batch_size, accumulation = sys.argv[1], *map(int, sys.argv[2:5])
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
config = TrainerConfig(output_dir=output_dir, epochs=2, tracker="none", log_every=1, doctor=False,
                       gradient_accumulation_steps=accumulation)
trainer = Trainer(config, model, optimizer, ClassificationTask(num_classes=3),
                  DataLoader(tiny_classification_data(n), batch_size=batch_size), techniques=[])
trainer.fit()
if trainer.accelerator.is_main_process:
    unwrapped = trainer.accelerator.unwrap_model(trainer.state.model)
    save_file({k: v.detach().contiguous() for k, v in unwrapped.state_dict().items()},
              f"{output_dir}/weights.safetensors")
    print(f"steps {trainer.state.step}")
