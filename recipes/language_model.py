"""Language model: the framework's byte-level GPT, or any Hugging Face transformers causal LM, on the Python
standard library's own source (or any text data set).

    accelerate launch --config_file launch_configs/cpu.yaml recipes/language_model.py \
        [--config recipes/configs/language_model.yaml] [--data.context_length 2048 --model.attention chunked]
    accelerate launch --config_file launch_configs/cpu.yaml recipes/language_model.py \
        --config recipes/configs/llama_tiny.yaml     # a transformers Llama with a byte-level BPE

With no --config the run is exactly recipes/configs/language_model.yaml's: the config's defaults equal it.

Reports held-out loss and bits per byte next to the unigram baseline; the `text_sample` technique prints (and
logs) a generated sample at the end. A transformers model is exported to output_dir/hf_model/ by the `hf_export`
technique (`save_pretrained`: config, weights, tokenizer), which `AutoModelForCausalLM.from_pretrained` and
`pipeline("text-generation")` load.
"""

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Optional

import torch
from torch import nn

from framework.config import TrainerConfig, parse_config, run_main
from framework.data.text import TextData, TextDataConfig, text_data
from framework.loop import Trainer
from framework.models.causal_lm import CausalLMConfig, build_causal_lm, flops_per_token
from framework.models.gpt import GPT, GPTConfig
from framework.optim import OptimizerConfig
from framework.task import LanguageModelTask


@dataclass
class ModelConfig(GPTConfig, CausalLMConfig):
    """The model: the framework's GPT (n_layer ... attention_chunk_size), or with `source: transformers` a transformers
    causal LM (architecture, sizes or pretrained, attn_implementation)."""

    source: Literal["framework", "transformers"] = "framework"


@dataclass
class LanguageModelConfig(TrainerConfig):
    """Train a language model (the framework's GPT or a transformers model)."""

    output_dir: str = "outputs/language_model"
    epochs: int = 1
    max_steps: int | None = 600
    log_every: int = 20
    data: TextDataConfig = field(default_factory=TextDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-3, weight_decay=0.1,
                                                                               betas=(0.9, 0.95)))
    techniques: dict[str, Optional[dict[str, Any]]] = field(default_factory=lambda: {
        "cosine_lr": {"warmup_steps": 50},
        "gradient_clipping": {"max_norm": 1.0},
        "text_sample": {"prompt": "def ", "length": 300},
    })


def build_model(config: LanguageModelConfig, data: TextData) -> nn.Module:
    """The configured model, sized for the data's vocabulary and context. The config keeps the GPT's sizes, so
    output_dir/config.yaml rebuilds this model."""
    if config.model.source == "transformers":
        tokenizer = data.tokenizer
        special = {"eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id, "pad": tokenizer.pad_token_id}
        return build_causal_lm(config.model, data.vocab_size, config.data.context_length, special)
    config.model = replace(config.model, vocab_size=data.vocab_size, context_length=config.data.context_length)
    return GPT(config.model)


def main(args: list[str] | None = None) -> Trainer:
    config = parse_config(LanguageModelConfig, args)
    if config.model.source == "transformers":  # output_dir/hf_model/, which transformers loads on its own
        config.techniques.setdefault("hf_export", {})
    torch.manual_seed(config.seed)  # the same initial weights on every rank and every run
    data = text_data(config.data, seed=config.seed)
    # Factories: the Trainer builds the model once the backend exists, so ZeRO-3 can build it partitioned.
    trainer = Trainer(config, lambda: build_model(config, data), config.optimizer.build,
                      LanguageModelTask(tokenizer=data.tokenizer),
                      data.loaders["train"], data.loaders["validation"], data.loaders["test"],
                      flops_per_token=lambda model: flops_per_token(model, config.data.context_length))
    trainer.state.summary["unigram_bits_per_byte"] = data.unigram_bits_per_byte()
    results = trainer.fit()
    if trainer.accelerator.is_main_process and "metrics" in results:
        print(f"unigram baseline {results['unigram_bits_per_byte']:.3f} bits/byte; "
              f"held-out {results['metrics']['test/bits_per_byte']:.3f} bits/byte")
    return trainer


if __name__ == "__main__":
    run_main(main)
