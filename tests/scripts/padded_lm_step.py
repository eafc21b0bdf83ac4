"""One optimizer step of a tiny GPT on padded blocks at gradient accumulation 4, then every rank writes its weights to
output_dir/weights_rank{R}.safetensors, so a test can compare them with one large batch of all the ranks' blocks.
The test imports `padded_blocks` and `tiny_gpt` from here to build its reference from the same data and weights.

    accelerate launch --config_file launch_configs/multi_cpu.yaml tests/scripts/padded_lm_step.py OUTPUT_DIR
"""

from __future__ import annotations

import sys

import torch

from framework.models.gpt import GPT, GPTConfig

VOCAB, LENGTH = 32, 12  # blocks of LENGTH + 1 tokens: LENGTH predictions each
BATCH_SIZE, ACCUMULATION, RANKS = 3, 4, 2


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, context_length=LENGTH, n_layer=1, n_head=2, n_embd=16))


def padded_blocks(fullness: list[float], batch_size: int = BATCH_SIZE, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """len(fullness) micro-batches of `batch_size` blocks, as a flat list of samples in micro-batch order. Micro-batch i
    keeps each token with a probability drawn per block from [0, fullness[i]) (random, not only trailing, padding):
    a small fullness gives nearly empty blocks, so micro-batches hold very different numbers of real tokens."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for full in fullness:
        tokens = torch.randint(0, VOCAB, (batch_size, LENGTH + 1), generator=generator)
        density = torch.rand(batch_size, 1, generator=generator) * full
        mask = (torch.rand(batch_size, LENGTH + 1, generator=generator) < density).long()
        samples += [{"input_ids": t, "attention_mask": m} for t, m in zip(tokens, mask)]
    return samples


def rank_fullness() -> list[float]:
    """Global micro-batch b goes to rank b % RANKS (accelerate's batch sharding): rank 0 full blocks, rank 1 sparse."""
    return [1.0 if b % RANKS == 0 else 0.15 for b in range(RANKS * ACCUMULATION)]


def main(output_dir: str) -> None:
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader

    from framework.config import TrainerConfig
    from framework.loop import Trainer
    from framework.task import LanguageModelTask

    model = tiny_gpt()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is minus the gradient
    config = TrainerConfig(output_dir=output_dir, max_steps=1, tracker="none", log_every=1, doctor=False,
                           gradient_accumulation_steps=ACCUMULATION)
    trainer = Trainer(config, model, optimizer, LanguageModelTask(),
                      DataLoader(padded_blocks(rank_fullness()), batch_size=BATCH_SIZE), techniques=[])
    trainer.fit()
    accelerator = trainer.accelerator
    weights = accelerator.unwrap_model(trainer.state.model).state_dict()
    save_file({k: v.detach().contiguous() for k, v in weights.items() if k != "lm_head.weight"},  # tied to wte
              f"{output_dir}/weights_rank{accelerator.process_index}.safetensors")
    print(f"rank {accelerator.process_index}: steps {trainer.state.step}")


if __name__ == "__main__":
    main(sys.argv[1])
