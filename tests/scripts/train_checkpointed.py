"""Train a tiny GPT (or the reference ResNet) with the gradient_checkpointing technique under whatever backend the
accelerate launch config chose, then write this rank's final parameters (whole tensors, gathered under ZeRO-3) to
output_dir/params_rank{N}.safetensors so a test can compare the ranks.

    accelerate launch --config_file launch_configs/multi_cpu.yaml tests/scripts/train_checkpointed.py \
        --output_dir /tmp/run [--model gpt|resnet] [--policy full|every_k|selective|none] [--steps 12]
"""

import argparse

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from framework.config import TrainerConfig, build_techniques
from framework.loop import Trainer
from framework.models.gpt import GPT, GPTConfig
from framework.models.resnet import ResNet, ResNetConfig
from framework.task import ClassificationTask, Task
from framework.technique import Technique
from framework.techniques.stochastic_depth import StochasticDepth


class NextToken(Task):
    """Next-token cross-entropy on (B, T + 1) blocks (kept here so the script needs only the model)."""

    def forward(self, model, batch):
        return model(batch["input_ids"][:, :-1])

    def loss(self, outputs, batch):
        return torch.nn.functional.cross_entropy(outputs.flatten(0, 1).float(), batch["input_ids"][:, 1:].flatten())

    def batch_size(self, batch):
        return batch["input_ids"].shape[0]


class DumpParams(Technique):
    def fit_end(self, state):
        model = state.accelerator.unwrap_model(state.model)
        named = dict(model.named_parameters())
        if any(hasattr(p, "ds_tensor") for p in named.values()):  # ZeRO-3: each rank holds a shard
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(named.values())):
                tensors = {name: p.detach().clone() for name, p in named.items()}
        else:
            tensors = {name: p.detach().clone() for name, p in named.items()}
        save_file({k: v.float().contiguous() for k, v in tensors.items()},
                  str(state.output_dir / f"params_rank{state.accelerator.process_index}.safetensors"))


def counting_sequences(n: int, length: int, generator: torch.Generator) -> list[dict]:
    """Each block counts up by a per-block step from a random start (mod 32): learnable within a few steps."""
    start = torch.randint(0, 32, (n, 1), generator=generator)
    step = torch.randint(1, 4, (n, 1), generator=generator)
    return [{"input_ids": row} for row in (start + step * torch.arange(length + 1)) % 32]


def separable_images(n: int, generator: torch.Generator) -> list[dict]:
    """8×8 single-channel images whose class shifts the mean: learnable within a few steps."""
    labels = torch.randint(0, 10, (n,), generator=generator)
    images = torch.randn(n, 1, 8, 8, generator=generator) + labels[:, None, None, None] * 0.3
    return [{"pixel_values": x, "label": y} for x, y in zip(images, labels)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model", choices=["gpt", "resnet"], default="gpt")
    parser.add_argument("--policy", default="full", help="full | every_k | selective, or none (technique off)")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()

    torch.manual_seed(0)  # the same initial weights and data on every rank
    generator = torch.Generator().manual_seed(0)
    if args.model == "gpt":
        # dropout and drop path on: the recomputation must draw the same masks as the forward pass
        model = GPT(GPTConfig(n_layer=3, n_head=4, n_embd=32, context_length=32, dropout=0.1, attention="sdpa"))
        data, task, lr = counting_sequences(256, 32, generator), NextToken(), 3e-3
    else:
        model = ResNet(ResNetConfig())
        data, task, lr = separable_images(256, generator), ClassificationTask(num_classes=10), 1e-2
    specs = {} if args.policy == "none" else {"gradient_checkpointing": {"policy": args.policy}}
    config = TrainerConfig(output_dir=args.output_dir, max_steps=args.steps, tracker="none", log_every=1,
                           overwrite=True, techniques=specs)
    techniques = [StochasticDepth(rate=0.2), *build_techniques(config.techniques), DumpParams()]
    trainer = Trainer(config, model, torch.optim.AdamW(model.parameters(), lr=lr), task,
                      DataLoader(data, batch_size=8, shuffle=True), techniques=techniques)
    trainer.fit()


if __name__ == "__main__":
    main()
