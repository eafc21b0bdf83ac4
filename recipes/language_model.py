"""Language model: a byte-level GPT on the Python standard library's own source (or any text data set).

    accelerate launch --config_file launch_configs/cpu.yaml recipes/language_model.py \
        [--config recipes/configs/language_model.yaml] [--data.context_length 2048 --model.attention chunked]

With no --config the run is exactly recipes/configs/language_model.yaml's: the config's defaults equal it.

Reports held-out loss and bits per byte next to the unigram baseline; the `text_sample` technique prints (and
logs) a generated sample at the end.
"""

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch

from framework.config import TrainerConfig, parse_config, run_main
from framework.data.text import TextDataConfig, text_data
from framework.loop import Trainer
from framework.models.gpt import GPT, GPTConfig
from framework.optim import OptimizerConfig
from framework.task import LanguageModelTask


@dataclass
class LanguageModelConfig(TrainerConfig):
    """Train a byte-level GPT."""

    output_dir: str = "outputs/language_model"
    epochs: int = 1
    max_steps: int | None = 600
    log_every: int = 20
    data: TextDataConfig = field(default_factory=TextDataConfig)
    model: GPTConfig = field(default_factory=GPTConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-3, weight_decay=0.1,
                                                                               betas=(0.9, 0.95)))
    techniques: dict[str, Optional[dict[str, Any]]] = field(default_factory=lambda: {
        "cosine_lr": {"warmup_steps": 50},
        "gradient_clipping": {"max_norm": 1.0},
        "text_sample": {"prompt": "def ", "length": 300},
    })


def main(args: list[str] | None = None) -> Trainer:
    config = parse_config(LanguageModelConfig, args)
    torch.manual_seed(config.seed)  # the same initial weights on every rank and every run
    data = text_data(config.data, seed=config.seed)
    # The model covers exactly the context the data gives it; the config keeps it, so output_dir/config.yaml
    # rebuilds this model.
    config.model = replace(config.model, vocab_size=256, context_length=config.data.context_length)
    model = GPT(config.model)
    trainer = Trainer(config, model, config.optimizer.build(model), LanguageModelTask(token_name="byte"),
                      data.loaders["train"], data.loaders["validation"], data.loaders["test"])
    trainer.state.summary["unigram_bits_per_byte"] = data.unigram_bits_per_byte()
    results = trainer.fit()
    if trainer.accelerator.is_main_process:
        print(f"unigram baseline {results['unigram_bits_per_byte']:.3f} bits/byte; "
              f"held-out {results['metrics']['test/bits_per_byte']:.3f} bits/byte")
    return trainer


if __name__ == "__main__":
    run_main(main)
